"""Arguments every command shares, defined once: ``--config``, ``--set``, ``--data``, ``--out``,
``--no-progress``, ``--device``; and the resolved config of a command's arguments."""
from __future__ import annotations

import argparse
from typing import Any

from ..config import Config, load_config, parse_set_args


def add_config(p: argparse.ArgumentParser, data: bool = True) -> None:
    """``--config FILE``, ``--set KEY=VALUE`` (repeatable) and, with ``data``, ``--data DIR``."""
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config or recipe name (see cellkit/recipes, configs/)")
    if data:
        add_data(p)
    add_set(p)


def add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=0.001 (repeatable)")


def add_data(p: argparse.ArgumentParser, required: bool = False, help: str | None = None) -> None:
    p.add_argument("--data", metavar="DIR", required=required,
                   help=help or "dataset folder (hw3 layout); default: the built-in synthetic dataset")


def add_out(p: argparse.ArgumentParser, help: str, required: bool = False, default: str | None = None,
            metavar: str = "DIR") -> None:
    p.add_argument("--out", metavar=metavar, required=required, default=default, help=help)


def add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")


def config_from_args(args: argparse.Namespace) -> Config:
    """The resolved config of a command: ``--config``, then ``--data``, then each ``--set``."""
    overrides: dict[str, Any] = {}
    if getattr(args, "data", None):
        overrides["data.root"] = str(args.data)
    overrides.update(parse_set_args(getattr(args, "overrides", [])))
    return load_config(getattr(args, "config", None), overrides)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return v


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= v < 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return v


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1] (score thresholds)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= v <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return v


def iou_float(text: str) -> float:
    """argparse type: an IoU threshold in (0, 1]."""
    v = unit_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError("expected an IoU in (0, 1], got 0")
    return v


def floats(text: str) -> list[float]:
    """argparse type: comma-separated numbers."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def floats_or_none(text: str) -> list[float | None]:
    """argparse type: comma-separated numbers where ``none``/``off`` means None."""
    return [None if v.strip().lower() in ("none", "off") else floats(v)[0] for v in text.split(",") if v.strip()]
