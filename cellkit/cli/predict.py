"""``cellkit predict`` (test images -> submission) and ``cellkit tune-thresholds`` (validation ->
``RUN_DIR/thresholds.json``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import parse_set_args
from ..errors import DataError
from .common import add_data, add_device, add_no_progress, add_set, floats, floats_or_none


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "predict", help="predict the test images of a dataset and write test-results.json + zip",
        description="Predict every image of DIR/test_release (ids from test_image_name_to_ids.json), write "
        "test-results.json and a zip ready to upload, and validate them. Thresholds come from the run's "
        "thresholds.json (cellkit tune-thresholds) when present, then from --set.",
    )
    p.add_argument("--checkpoint", action="append", required=True, metavar="FILE",
                   help="model checkpoint (.pth); repeat for an ensemble")
    add_data(p, required=True, help="dataset folder holding test_release/ and the id json")
    p.add_argument("--out", default="test-results.json", metavar="JSON",
                   help="submission json (default: test-results.json); the zip goes beside it")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (predict.tta_flips, tta_scales, tta_merge)")
    _common(p)
    p.add_argument("--no-thresholds", action="store_true", help="ignore the run's thresholds.json")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "tune-thresholds", help="pick score/mask/NMS thresholds that maximise validation AP50",
        description="Predict the run's validation split once with its best checkpoint, grid-search the score, "
        "mask and NMS thresholds on those detections and write RUN_DIR/thresholds.json.",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="training run directory")
    p.add_argument("--checkpoint", metavar="FILE", help="default: RUN_DIR/checkpoints/best.pth")
    add_data(p, help="dataset folder, if it moved since training")
    p.add_argument("--metric", default="ap50", choices=("ap50", "ap", "ap75"), help="what to maximise (default ap50)")
    p.add_argument("--score-grid", type=floats, metavar="LIST",
                   help="e.g. 0,0.05,0.1,0.3 (default 0 only: dropping low scores never raises AP)")
    p.add_argument("--mask-grid", type=floats, metavar="LIST", help="e.g. 0.3,0.4,0.5,0.6")
    p.add_argument("--nms-grid", type=floats_or_none, metavar="LIST", help="e.g. none,0.3,0.5 (none: no mask NMS)")
    _common(p)
    p.set_defaults(func=cmd_tune)


def _common(p: argparse.ArgumentParser) -> None:
    add_set(p)
    add_device(p)
    add_no_progress(p)


def cmd_predict(args: argparse.Namespace) -> int:
    for path in args.checkpoint:  # a mistyped path is told at once, not after the 4 s that loading torch takes
        if not Path(path).expanduser().is_file():
            raise DataError(path, "checkpoint not found")
    from ..inference.submit import predict_submission  # torch-free face: torch loads when the command runs

    problems = predict_submission(args.checkpoint, args.data, args.out, args.overrides, args.tta, args.device,
                                  use_thresholds=not args.no_thresholds, progress=not args.no_progress)
    return 1 if any(p.severity == "error" for p in problems) else 0


def cmd_tune(args: argparse.Namespace) -> int:
    from ..inference.tune import tune_run  # torch-free face: torch loads when the command runs

    overrides = parse_set_args(args.overrides)
    if args.data:
        overrides["data.root"] = str(args.data)
    result, path = tune_run(args.run, args.checkpoint, overrides, args.score_grid, args.mask_grid, args.nms_grid,
                            args.metric, args.device, progress=not args.no_progress)
    print(result.format())
    print(f"wrote {path}; cellkit predict --checkpoint {result.extra['checkpoint']} uses these thresholds")
    return 0
