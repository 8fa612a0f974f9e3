"""``cellkit train`` (also under torchrun) and ``cellkit demo``."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from ..config import parse_set_args
from ..errors import ConfigError
from ..runs import RunDir, check_run_dir
from .common import add_config, add_no_progress, add_out, config_from_args


def add_commands(sub: Any) -> None:
    p = sub.add_parser("demo", help="synthesise a dataset, train the CPU demo recipe, evaluate, report")
    add_out(p, "demo folder (default: runs/demo)", default="runs/demo")
    add_config(p, data=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train", help="train Mask R-CNN (synthetic data without --data); torchrun -m cellkit train ... for DDP",
        description="Train Mask R-CNN. Without --data it trains on the built-in synthetic dataset. "
        "Multi-GPU: torchrun --nproc_per_node N -m cellkit train ...",
    )
    add_config(p)
    add_out(p, "run directory (default: runs/<name>-<time>)", metavar="RUN_DIR")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pth")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds a previous run: delete its checkpoints, metrics and plots and start again")
    add_no_progress(p)
    p.set_defaults(func=cmd_train)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo  # torch-free face: torch loads when the command runs

    return run_demo(args.out, config=args.config, overrides=parse_set_args(args.overrides))


def cmd_train(args: argparse.Namespace) -> int:
    from ..engine.defaults import train  # torch-free face: torch loads when the command runs

    if args.resume and not args.out:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    if args.resume and not args.config and args.out and RunDir(args.out).config.is_file():
        args.config = str(RunDir(args.out).config)
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # before the data and the model are built; under torchrun only rank 0 looks at the lock
    check_run_dir(out, resume=args.resume, overwrite=args.overwrite, probe_lock=os.environ.get("RANK", "0") == "0")
    summary = train(cfg, out, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    if summary.get("run_dir"):
        best = summary["best_val_ap50"]
        lo, hi = summary.get("best_val_ap50_lo"), summary.get("best_val_ap50_hi")
        ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
        print(f"run directory: {out}  (best val AP50 {best:.4f}{ci} at epoch {summary['best_epoch']}, the epoch that "
              "split chose)" if best is not None else f"run directory: {out}")
    return 0
