"""The ``cellkit`` command line (also ``python -m cellkit``).

Each subcommand is a small function that parses nothing itself: it turns ``args`` into calls of
the package. Errors a user can fix (:class:`cellkit.errors.CellkitError`) are printed as one line
naming the file and the problem, with exit status 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import Config, load_config, parse_set_args
from .errors import CellkitError

def _config_args(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (see configs/)")
    if data:
        p.add_argument("--data", metavar="DIR", help="dataset folder (hw3 layout); default: the built-in synthetic dataset")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=0.001 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """The resolved config of a subcommand: --config, then --data, then each --set."""
    overrides: dict[str, Any] = {}
    if getattr(args, "data", None):
        overrides["data.root"] = str(args.data)
    overrides.update(parse_set_args(getattr(args, "overrides", [])))
    return load_config(getattr(args, "config", None), overrides)


# --------------------------------------------------------------------------------------------
# subcommands


def cmd_config(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import write_synthetic

    out = write_synthetic(args.out, args.train, args.test, args.seed, args.max_size)
    print(f"wrote {args.train} training and {args.test} test images to {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .data.coco import convert

    train, val = convert(args.data, args.out, args.val_fraction, args.seed)
    for p in (train, val):
        d = json.loads(p.read_text())
        print(f"{p}: {len(d['images'])} images, {len(d['annotations'])} instances")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .analysis.stats import dataset_stats, format_stats

    cfg = config_from_args(args)
    stats = dataset_stats(cfg.data, num_classes=cfg.model.num_classes)
    print(json.dumps(stats.to_dict(), indent=1) if args.json else format_stats(stats))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out, config=args.config, overrides=parse_set_args(args.overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellkit", description="Instance segmentation of stained cell images with Mask R-CNN."
    )
    parser.add_argument("--version", action="version", version=f"cellkit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="synthesise a dataset, train the CPU demo recipe, evaluate, report")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    _config_args(p, data=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", help="write the built-in synthetic dataset in the real on-disk layout")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=40, help="training images (default 40)")
    p.add_argument("--test", type=int, default=8, help="test images (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-size", type=int, default=None, help="cap on each image side in px")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert", help="write COCO train_gt.json / val_gt.json for a dataset")
    p.add_argument("--data", required=True, help="dataset folder (hw3 layout)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("stats", help="dataset statistics: images, instances per class, sizes")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("config", help="print the resolved configuration")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    _add_engine_commands(sub)
    return parser


def _add_engine_commands(sub: Any) -> None:
    """Subcommands defined next to what they run; each module adds its own arguments and keeps
    its heavy imports (torch, ...) inside the command functions, so ``cellkit --help`` stays fast."""
    from . import ablation_cli
    from .engine import eval_cli, predict_cli, train_cli
    from .models import cli as models_cli

    for module in (train_cli, eval_cli, predict_cli, models_cli, ablation_cli):
        module.add_commands(sub)


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CellkitError as e:
        print(f"cellkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cellkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
