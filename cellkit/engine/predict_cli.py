"""``cellkit predict`` (test images -> submission) and ``cellkit tune-thresholds`` (validation ->
``RUN_DIR/thresholds.json``). Heavy imports stay inside the command functions."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="predict the test images of a dataset and write test-results.json + zip",
        description="Predict every image of DIR/test_release (ids from test_image_name_to_ids.json), write "
        "test-results.json and a zip ready to upload, and validate them. Thresholds come from the run's "
        "thresholds.json (cellkit tune-thresholds) when present, then from --set.",
    )
    p.add_argument("--checkpoint", action="append", required=True, metavar="FILE",
                   help="model checkpoint (.pth); repeat for an ensemble")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder holding test_release/ and the id json")
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
    p.add_argument("--data", metavar="DIR", help="dataset folder, if it moved since training")
    p.add_argument("--metric", default="ap50", choices=("ap50", "ap", "ap75"), help="what to maximise (default ap50)")
    p.add_argument("--score-grid", type=_floats, metavar="LIST",
                   help="e.g. 0,0.05,0.1,0.3 (default 0 only: dropping low scores never raises AP)")
    p.add_argument("--mask-grid", type=_floats, metavar="LIST", help="e.g. 0.3,0.4,0.5,0.6")
    p.add_argument("--nms-grid", type=_floats_or_none, metavar="LIST", help="e.g. none,0.3,0.5 (none: no mask NMS)")
    _common(p)
    p.set_defaults(func=cmd_tune)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set predict.score_thresh=0.05 (repeatable)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _floats_or_none(text: str) -> list[float | None]:
    return [None if v.strip().lower() in ("none", "off") else _floats(v)[0] for v in text.split(",") if v.strip()]


def _require_files(paths: list[str]) -> list[Path]:
    from ..errors import DataError

    out = [Path(p).expanduser() for p in paths]
    for p in out:
        if not p.is_file():
            raise DataError(p, "checkpoint not found")
    return out


def prediction_overrides(checkpoint: Path, set_items: list[str], tta: bool = False,
                         use_thresholds: bool = True) -> tuple[dict[str, Any], Path | None]:
    """Config overrides for inference: the run's tuned thresholds, then ``--tta``, then ``--set``.

    Returns:
        (overrides, the thresholds file used or None).
    """
    from ..config import parse_set_args
    from .tune import find_thresholds, load_thresholds

    overrides: dict[str, Any] = {}
    found = find_thresholds(checkpoint) if use_thresholds else None
    if found is not None:
        overrides.update(load_thresholds(found))
    if tta:
        overrides["predict.tta"] = True
    overrides.update(parse_set_args(set_items))
    return overrides, found


def cmd_predict(args: argparse.Namespace) -> int:
    problems = predict_submission(
        _require_files(args.checkpoint), args.data, args.out, args.overrides, args.tta, args.device,
        use_thresholds=not args.no_thresholds, progress=not args.no_progress,
    )
    return 1 if any(p.severity == "error" for p in problems) else 0


def predict_submission(
    checkpoints: list[Path], data: str | Path, out: str | Path, set_items: list[str] | None = None, tta: bool = False,
    device: str = "auto", use_thresholds: bool = True, progress: bool = True,
) -> list[Any]:
    """Predict ``data``'s test images with one checkpoint or an ensemble, write the submission
    (json + zip at ``out``), check it and print what happened.

    Returns:
        the problems :func:`~cellkit.engine.submission.check_submission` found (empty: valid).
    """
    from ..data import TestImageDataset, read_test_index
    from .checkpoint import model_from_checkpoint
    from .devices import resolve_device
    from .postprocess import DropCounts
    from .predict import predict_images
    from .submission import check_submission, summarize_problems, write_submission

    index = read_test_index(data)
    dev = resolve_device(device)
    overrides, found = prediction_overrides(checkpoints[0], list(set_items or []), tta, use_thresholds)
    if found is not None:
        print(f"thresholds from {found}")
    models, cfg = [], None
    for p in checkpoints:
        model, c, _ = model_from_checkpoint(p, dev, overrides)
        models.append(model)
        cfg = cfg or c
    assert cfg is not None
    pc = cfg.predict
    print(f"predicting {len(index)} test images on {dev} with {len(models)} model(s): score_thresh={pc.score_thresh} "
          f"mask_thresh={pc.mask_thresh} nms_thresh={pc.nms_thresh} tta={pc.tta}")
    counts = DropCounts()
    entries = predict_images(models, TestImageDataset(index), pc, progress=progress, counts=counts)
    json_path, zip_path = write_submission(entries, out)
    n_images = len({e["image_id"] for e in entries})
    print(f"wrote {len(entries)} detections on {n_images}/{len(index)} images to {json_path} and {zip_path} ({counts})")
    problems = check_submission(entries, index, num_classes=cfg.model.num_classes)
    for prob in problems[:10]:
        print(f"  {prob}")
    print(f"check-submission: {summarize_problems(problems)}")
    return problems


def cmd_tune(args: argparse.Namespace) -> int:
    from ..config import parse_set_args
    from ..data import CellDataset, build_coco, train_val_samples
    from ..errors import DataError
    from ..models.mask_geometry import mask_geometry_of
    from .checkpoint import model_from_checkpoint
    from .devices import resolve_device
    from .predict import iter_detections
    from .tune import DEFAULT_MASK_GRID, DEFAULT_NMS_GRID, DEFAULT_SCORE_GRID, tune_thresholds, write_thresholds
    from .validate import ImagesOnly

    run = Path(args.run).expanduser()
    if not run.is_dir():
        raise DataError(run, "run directory not found")
    ckpt = _require_files([args.checkpoint or str(run / "checkpoints" / "best.pth")])[0]
    overrides = parse_set_args(args.overrides)
    if args.data:
        overrides["data.root"] = str(args.data)
    device = resolve_device(args.device)
    model, cfg, _ = model_from_checkpoint(ckpt, device, overrides)
    progress = not args.no_progress
    val = train_val_samples(cfg.data, cfg.model.num_classes, progress)[1]
    if not val:
        raise DataError(run, "the run's configuration has no validation images (data.val_fraction is 0)")
    gt: Any = run / "val_gt.json" if (run / "val_gt.json").is_file() else build_coco(val, cfg.model.num_classes, progress)
    cached = list(iter_detections(model, ImagesOnly(CellDataset(val, cache=False)), cfg.predict, progress=progress))
    result = tune_thresholds(
        cached, gt, cfg.predict, args.score_grid or DEFAULT_SCORE_GRID, args.mask_grid or DEFAULT_MASK_GRID,
        args.nms_grid or DEFAULT_NMS_GRID, args.metric, cfg.eval.max_dets, cfg.model.num_classes,
        cfg.eval.backend, progress, geometry=mask_geometry_of(model),
    )
    print(result.format())
    path = write_thresholds(result, run, checkpoint=str(ckpt), tta=cfg.predict.tta)
    print(f"wrote {path}; cellkit predict --checkpoint {ckpt} uses these thresholds")
    return 0
