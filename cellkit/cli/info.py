"""``cellkit config`` and ``cellkit models``: what a run would use."""
from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from ..errors import ConfigError
from .common import add_config, config_from_args


def add_commands(sub: Any) -> None:
    p = sub.add_parser("config", help="print the resolved configuration")
    add_config(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("models", help="list the backbones with trainable-parameter counts and available weights")
    add_config(p, data=False)
    p.add_argument("pattern", nargs="*", default=["*"], help="only names matching these fnmatch patterns ('resnet50*')")
    p.add_argument("--pretrained", choices=("imagenet", "coco"), help="only backbones with these weights")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="only backbones with this tag (family, head, attention, neck, library), e.g. attention=se; "
                        "repeatable")
    p.add_argument("--names", action="store_true", help="print the matching names only (nothing is built)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)


def cmd_config(args: argparse.Namespace) -> int:
    print(yaml.safe_dump(config_from_args(args).to_dict(), sort_keys=False), end="")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ..models.registry import backbone_info, list_backbones  # torch-free face: loads when the command runs
    from ..models.table import backbone_table, format_table  # torch-free face: loads when the command runs

    tags: dict[str, list[str]] = {}
    for t in args.tag:
        key, sep, value = t.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"--tag: expected KEY=VALUE (attention=se), got {t!r}")
        tags.setdefault(key, []).append(value)
    names = list_backbones(args.pattern, pretrained=args.pretrained, tags=tags)
    if args.names:  # from the registry's metadata alone
        if args.json:
            infos = [backbone_info(n) for n in names]
            print(json.dumps([{"name": i.name, "tags": i.tags, "pretrained": list(i.pretrained)} for i in infos], indent=1))
        else:
            print("\n".join(names))
        return 0
    rows = backbone_table(config_from_args(args), names)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0
