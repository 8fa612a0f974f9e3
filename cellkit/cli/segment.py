"""``cellkit segment`` (your own images -> label maps, overlay, measurements, ImageJ ROIs, QuPath
GeoJSON) and ``cellkit export`` (a checkpoint's whole predictor -> ONNX or TorchScript)."""
from __future__ import annotations

import argparse
from typing import Any

from ..errors import CellkitError
from .common import add_device, add_no_progress, add_set

FORMATS = ("labels", "overlay", "csv", "rois", "geojson")  # cellkit.inference.segment.FORMATS, without torch


def formats(text: str) -> list[str]:
    """argparse type: comma-separated output formats."""
    items = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown format(s) {', '.join(bad) or '(none)'}; choose from {', '.join(FORMATS)}")
    return items


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "segment", help="segment your own images (TIFF/PNG, 8/16 bit, grey or RGB, any size) with a checkpoint",
        description="Segment image files, folders or glob patterns with a trained checkpoint and write, per image, "
        "OUT/NAME/: image.tif + classK.tif label maps (the training layout), overlay.png, cells.csv (measurements), "
        "rois.zip (ImageJ/Fiji ROI Manager) and cells.geojson (QuPath), plus segment.json. Large images are "
        "predicted in tiles. An unreadable image is skipped and named (exit status 1); existing OUT/NAME folders "
        "are replaced only with --overwrite.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders of images, or glob patterns")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="model checkpoint (.pth)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (one subfolder per image)")
    p.add_argument("--formats", type=formats, default=list(FORMATS), metavar="LIST",
                   help=f"comma-separated subset of {','.join(FORMATS)} (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs of the same images")
    p.add_argument("--no-thresholds", action="store_true", help="ignore the run's thresholds.json")
    add_set(p)
    add_device(p)
    add_no_progress(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser(
        "export", help="export a checkpoint's whole predictor (to masks) as ONNX or TorchScript",
        description="Export the predictor of a checkpoint, from a [0, 1] float image (3, H, W) to boxes, labels, "
        "scores and full-size mask probabilities, as one file that runs without cellkit (onnxruntime, or "
        "torch.jit.load). The file records classes, scale, thresholds and the input's intensity mapping.",
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="model checkpoint (.pth)")
    p.add_argument("--format", dest="fmt", choices=("onnx", "torchscript"), default="onnx", help="default: onnx")
    p.add_argument("--out", required=True, metavar="FILE", help="the exported file (model.onnx, model.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--no-thresholds", action="store_true", help="ignore the run's thresholds.json")
    add_set(p)
    p.set_defaults(func=cmd_export)


def cmd_segment(args: argparse.Namespace) -> int:
    from ..inference.segment import segment_images  # torch-free face: torch loads when the command runs

    report = segment_images(args.images, args.checkpoint, args.out, args.formats, args.overwrite, args.overrides,
                            args.device, use_thresholds=not args.no_thresholds, progress=not args.no_progress)
    return 1 if report.skipped else 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from ..inference.export_model import export_model, read_export_metadata  # torch-free face: torch loads here
    except ModuleNotFoundError as e:  # onnx is an extra
        raise CellkitError(f"cellkit export needs the package {e.name}: pip install 'cellkit[export]'") from None

    path = export_model(args.checkpoint, args.out, args.fmt, args.overwrite, args.overrides,
                        use_thresholds=not args.no_thresholds)
    meta = read_export_metadata(path)
    print(f"wrote {path} ({args.fmt}): classes {', '.join(meta['classes'])}; score_thresh {meta['score_thresh']}, "
          f"mask_thresh {meta['mask_thresh']}; input {meta['input']}, intensity: {meta['intensity']}")
    return 0
