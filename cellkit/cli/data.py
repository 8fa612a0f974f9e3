"""``cellkit synth``, ``cellkit convert`` and ``cellkit stats``: the dataset."""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import ConfigError
from .common import add_config, add_data, add_out, config_from_args, fraction, non_negative_int, positive_int


def add_commands(sub: Any) -> None:
    p = sub.add_parser("synth", help="write the built-in synthetic dataset in the real on-disk layout")
    add_out(p, "output folder", required=True)
    p.add_argument("--train", type=positive_int, default=40, help="training images (default 40)")
    p.add_argument("--test", type=non_negative_int, default=8, help="test images (default 8)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--max-size", type=positive_int, default=None, help="cap on each image side in px (at least 16)")
    p.add_argument("--classes", type=positive_int, default=4, metavar="K",
                   help="classes of cells, at most 12 (default 4: the synthetic dataset imitates the hw3 data)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert", help="write COCO train_gt.json / val_gt.json for a dataset")
    add_data(p, required=True, help="dataset folder (hw3 layout)")
    add_out(p, "output folder", required=True)
    p.add_argument("--val-fraction", type=fraction, default=0.1, metavar="F",
                   help="share of the images held out for validation, in [0, 1) (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--num-classes", type=positive_int, default=None, metavar="K",
                   help="categories 1..K (default: the dataset's highest classK.tif)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("stats", help="dataset statistics: images, instances per class, sizes")
    add_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)


def cmd_synth(args: argparse.Namespace) -> int:
    from ..data.synth import write_synthetic  # torch-free face: the data package loads when the command runs

    if args.max_size is not None and args.max_size < 16:
        raise ConfigError(f"--max-size: must be at least 16 px, got {args.max_size}")
    if args.classes > 12:
        raise ConfigError(f"--classes: at most 12, got {args.classes}")
    out = write_synthetic(args.out, args.train, args.test, args.seed, args.max_size, n_classes=args.classes)
    print(f"wrote {args.train} training and {args.test} test images to {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..data.coco import convert  # torch-free face: the data package loads when the command runs

    train, val = convert(args.data, args.out, args.val_fraction, args.seed, args.num_classes)
    for p in (train, val):
        d = json.loads(p.read_text())
        print(f"{p}: {len(d['images'])} images, {len(d['annotations'])} instances")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from ..analysis.stats import dataset_stats, format_stats  # torch-free face: loads when the command runs

    cfg = config_from_args(args)
    stats = dataset_stats(cfg.data, num_classes=cfg.model.num_classes)
    print(json.dumps(stats.to_dict(), indent=1) if args.json else format_stats(stats))
    return 0
