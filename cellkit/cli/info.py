"""``cellkit config`` and ``cellkit models``: what a run would use."""
from __future__ import annotations

import argparse
import json
from typing import Any

from .common import add_config, config_from_args


def add_commands(sub: Any) -> None:
    p = sub.add_parser("config", help="print the resolved configuration")
    add_config(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("models", help="list the backbones with trainable-parameter counts and available weights")
    add_config(p, data=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(config_from_args(args).to_dict(), sort_keys=False), end="")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ..models.table import backbone_table, format_table

    rows = backbone_table(config_from_args(args))
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0
