"""``cellkit train``: the Trainer from the command line (also under torchrun)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train Mask R-CNN (synthetic data without --data); torchrun -m cellkit train ... for DDP",
        description="Train Mask R-CNN. Without --data it trains on the built-in synthetic dataset. "
        "Multi-GPU: torchrun --nproc_per_node N -m cellkit train ...",
    )
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (see configs/)")
    p.add_argument("--data", metavar="DIR", help="dataset folder (hw3 layout)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<name>-<time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=0.001 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pth")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..cli import config_from_args
    from ..errors import ConfigError
    from .trainer import train

    if args.resume and not args.out:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    if args.resume and not args.config and args.out and (Path(args.out) / "config.yaml").is_file():
        args.config = str(Path(args.out) / "config.yaml")
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if summary.get("run_dir"):
        best = summary["best_val_ap50"]
        print(f"run directory: {out}  (best val AP50 {best:.4f} at epoch {summary['best_epoch']})" if best is not None
              else f"run directory: {out}")
    return 0
