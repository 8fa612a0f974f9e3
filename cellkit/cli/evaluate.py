"""``cellkit evaluate`` and ``cellkit check-submission``: no torch unless ``evaluate --run`` predicts."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..config import EvalConfig
from ..errors import CellkitError
from ..evaluation.coco import evaluate_predictions
from ..evaluation.submission import check_submission, summarize_problems
from .common import add_no_progress, iou_float, non_negative_int, positive_int, unit_float

CLASS_FILE = re.compile(r"^class(\d+)\.tiff?$", re.IGNORECASE)
"""A label map's name (as :data:`cellkit.data.layout.CLASS_FILE`, here without importing torch)."""


def add_commands(sub: Any) -> None:
    """Add ``evaluate`` and ``check-submission`` to the ``cellkit`` subcommands."""
    p = sub.add_parser(
        "evaluate", help="COCO segm AP50 (the scored metric), AP, per-class AP, bbox AP and cell metrics",
        description="Evaluate COCO results against COCO ground truth (--gt and --pred), or predict a run's "
        "validation split with its best checkpoint and evaluate that (--run). Prints segm AP50 (the scored "
        "metric) with its 95 % interval over images (bootstrap), AP, AP75, AP by size, per-class AP, bbox AP, "
        "what pycocotools' standard cap of 100 "
        "detections gives, predictions dropped before evaluation, and precision/recall/F1/TP/(TP+FP+FN) at one IoU.",
    )
    src = p.add_argument_group("what to evaluate (either --gt and --pred, or --run)")
    src.add_argument("--gt", metavar="GT.json", help="COCO ground truth (e.g. val_gt.json from cellkit convert)")
    src.add_argument("--pred", metavar="PRED.json", help="COCO results: a list of {image_id, category_id, score, bbox, segmentation}")
    src.add_argument("--run", metavar="RUN_DIR", help="a training run: predict its validation split, then evaluate")
    src.add_argument("--checkpoint", default="best", help="with --run: best, last or a .pth path (default: best)")
    p.add_argument("--max-dets", type=positive_int, default=None, metavar="N",
                   help="detections kept per image and class (default 1000, eval.max_dets); pycocotools' default is 100")
    p.add_argument("--iou-type", choices=("segm", "bbox", "both"), default="both",
                   help="mask AP, box AP or both (default: both; segm AP50 is the headline)")
    p.add_argument("--backend", choices=("auto", "pycocotools", "faster_coco_eval"), default=None,
                   help="COCOeval implementation (default auto: faster_coco_eval when installed, which gives the same numbers faster, "
                   "else pycocotools)")
    p.add_argument("--iou-threshold", type=iou_float, default=None, metavar="T",
                   help="IoU of the cell-tool metrics (default 0.5, eval.iou_threshold)")
    p.add_argument("--score-threshold", type=unit_float, default=0.5, metavar="S",
                   help="cell-tool metrics count only predictions scoring at least this (default 0.5); COCO AP uses all")
    p.add_argument("--no-cell-metrics", action="store_true", help="skip precision/recall/F1 at one IoU")
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="categories 1..N (default: the categories of the ground truth)")
    p.add_argument("--bootstrap", type=non_negative_int, default=None, metavar="N",
                   help="bootstrap draws of the images for the 95 %% intervals [lo, hi] (default 1000, eval.bootstrap; "
                   "0: no intervals)")
    p.add_argument("--bootstrap-seed", type=non_negative_int, default=None, metavar="S",
                   help="seed of the draws (default 0, eval.bootstrap_seed)")
    p.add_argument("--json", action="store_true", help="print the same as machine-readable JSON (only JSON on stdout)")
    add_no_progress(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "check-submission", help="validate a submission file (schema, ids, categories, sizes, RLE)",
        description="Validate a submission (test-results.json or its zip) against the test index. Prints each "
        "problem with its entry index. Exit status: 0 valid (warnings allowed), 1 problems found, 2 unreadable input.",
    )
    p.add_argument("file", metavar="FILE", help="test-results.json (or a zip holding it)")
    p.add_argument("--ids", required=True, metavar="JSON",
                   help="test_image_name_to_ids.json, or the dataset folder that holds it")
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="categories 1..N (default: the highest classK.tif under train/ of the dataset folder that "
                   "holds the test index; without one, any category id of at least 1)")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="print at most N problems (0: all; default 100)")
    p.add_argument("--json", action="store_true", help="print the problems as JSON")
    p.set_defaults(func=cmd_check_submission)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``cellkit evaluate``: print the report (or JSON); exit 0."""
    defaults = EvalConfig()
    iou_types = ("segm", "bbox") if args.iou_type == "both" else (args.iou_type,)
    if args.run:
        if args.gt or args.pred:
            raise CellkitError("give either --run or --gt and --pred, not both")
        from ..inference.split import evaluate_run  # torch-free face: torch loads only to predict

        report = evaluate_run(
            args.run, checkpoint=args.checkpoint, max_dets=args.max_dets, backend=args.backend, iou_types=iou_types,
            score_threshold=args.score_threshold, iou_threshold=args.iou_threshold,
            cell_metrics=not args.no_cell_metrics, progress=not args.no_progress and not args.json,
            bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed,
        )
    else:
        if not (args.gt and args.pred):
            raise CellkitError("give --gt GT.json and --pred PRED.json (or --run RUN_DIR)")
        report = evaluate_predictions(
            args.gt, args.pred, iou_types=iou_types,  # type: ignore[arg-type]
            max_dets=args.max_dets or defaults.max_dets, backend=args.backend or defaults.backend,  # type: ignore[arg-type]
            num_classes=args.num_classes, cell_metrics=not args.no_cell_metrics,
            iou_threshold=args.iou_threshold if args.iou_threshold is not None else defaults.iou_threshold,
            score_threshold=args.score_threshold,
            bootstrap=args.bootstrap if args.bootstrap is not None else defaults.bootstrap,
            bootstrap_seed=args.bootstrap_seed if args.bootstrap_seed is not None else defaults.bootstrap_seed,
        )
    if args.json:
        out = report.to_dict()
        out["gt"], out["pred"], out["run"] = args.gt, args.pred, args.run
        print(json.dumps(out, indent=1))
    else:
        print(report.format())
    return 0


def classes_beside(ids: str) -> int | None:
    """The dataset's number of classes beside a test index (``ids``: the dataset folder or the json
    in it), as :func:`cellkit.data.layout.num_classes_of` reads it: ``synth_info.json``'s
    ``n_classes``, else the highest K of ``train/*/classK.tif``; None when neither is there."""
    folder = Path(ids).expanduser()
    root = folder if folder.is_dir() else folder.parent
    try:
        declared = json.loads((root / "synth_info.json").read_text()).get("n_classes", 4)
    except (OSError, ValueError, AttributeError):
        declared = None
    ks = [int(m.group(1)) for f in (root / "train").glob("*/class*.tif*") if (m := CLASS_FILE.match(f.name))]
    found = [k for k in [*ks, declared] if isinstance(k, int) and k >= 1]
    return max(found) if found else None


def cmd_check_submission(args: argparse.Namespace) -> int:
    """``cellkit check-submission``: exit 0 valid, 1 problems found (CellkitError -> 2 in cli.main)."""
    num_classes = args.num_classes if args.num_classes is not None else classes_beside(args.ids)
    problems = check_submission(args.file, args.ids, num_classes=num_classes)
    errors = [p for p in problems if p.severity == "error"]
    if args.json:
        print(json.dumps({
            "file": args.file, "valid": not errors,
            "problems": [{"index": p.index, "severity": p.severity, "message": p.message} for p in problems],
        }, indent=1))
    else:
        shown = problems if args.limit <= 0 else problems[: args.limit]
        for p in shown:
            print(p)
        if len(shown) < len(problems):
            print(f"... and {len(problems) - len(shown)} more (--limit 0 shows all)")
        verdict = "INVALID" if errors else "valid"
        print(f"{args.file}: {verdict} ({summarize_problems(problems)})", file=sys.stdout)
    return 1 if errors else 0
