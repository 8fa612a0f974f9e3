"""``cellkit compare RUN_A RUN_B``: is one run better than the other on the same images? (no torch)"""
from __future__ import annotations

import argparse
import json
from typing import Any

from .common import iou_float, non_negative_int


def add_commands(sub: Any) -> None:
    """Add ``compare`` to the ``cellkit`` subcommands."""
    p = sub.add_parser(
        "compare", help="two finished runs on the same images: AP50 of each, the difference with its paired "
        "95 %% interval and a verdict (A better, B better, not distinguishable), cell by cell",
        description="Compare two finished training runs (run directories, or grid run folders OUT/<name>) on "
        "their validation split (the best epoch's val_predictions.json against val_gt.json), or on their "
        "hold-out split (--split holdout). Prints each run's segm AP50 with its 95 % interval, the difference "
        "B - A with a paired bootstrap 95 % interval (both runs scored on the same draws of the images) and the "
        "verdict: B better or A better when the interval excludes 0, else not distinguishable. Then which cells "
        "each run finds, per class and per image. Runs evaluated on different images are refused (exit 2).",
    )
    p.add_argument("run_a", metavar="RUN_A", help="the first run (A)")
    p.add_argument("run_b", metavar="RUN_B", help="the second run (B)")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), default=None,
                   help="what to call them (default: the grid run's or the run folder's name)")
    p.add_argument("--split", choices=("val", "holdout"), default="val",
                   help="val: the split that chose each run's epoch (default); holdout: the split scored once "
                   "(data.holdout_fraction)")
    p.add_argument("--bootstrap", type=non_negative_int, default=None, metavar="N",
                   help="bootstrap draws of the images (default: run A's eval.bootstrap, 1000; "
                   "0: no interval, no verdict)")
    p.add_argument("--bootstrap-seed", type=non_negative_int, default=None, metavar="S",
                   help="seed of the draws (default: run A's eval.bootstrap_seed)")
    p.add_argument("--iou", type=iou_float, default=0.5, metavar="T",
                   help="IoU at which a prediction finds a cell, for the cell-by-cell counts (default 0.5)")
    p.add_argument("--images", type=non_negative_int, default=10, metavar="N",
                   help="list the N images with the most cells found by one run only (default 10)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON (only JSON on stdout)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    """``cellkit compare``: print the comparison; exit 0 (2 for runs on different images)."""
    from ..analysis.compare import compare_runs  # torch-free face: evaluation and run files only

    cmp = compare_runs(args.run_a, args.run_b, names=args.names, iou=args.iou, bootstrap=args.bootstrap,
                       bootstrap_seed=args.bootstrap_seed, split=args.split)
    if args.json:
        out = cmp.to_dict()
        out["runs"], out["split"] = [args.run_a, args.run_b], args.split
        print(json.dumps(out, indent=1, default=str))
    else:
        print(cmp.format(max_images=args.images))
    return 0
