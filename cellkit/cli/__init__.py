"""The ``cellkit`` command line (also ``python -m cellkit``).

One module per command group; each adds its subcommands with :mod:`cellkit.cli.common`'s shared
arguments and turns ``args`` into calls of the library. The CLI is a torch-free face: the library
modules a command needs are imported inside its command function (each such import says so), so
``cellkit --help``, ``cellkit evaluate --gt --pred`` and ``cellkit check-submission`` never
import torch. Errors a user can fix
(:class:`cellkit.errors.CellkitError`) are printed as one line naming the file and the problem, with
exit status 2; no traceback.
"""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import CellkitError
from . import ablate, data, evaluate, info, predict, train

GROUPS = (train, data, info, evaluate, predict, ablate)


def build_parser() -> argparse.ArgumentParser:
    """The ``cellkit`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="cellkit", description="Instance segmentation of stained cell images with Mask R-CNN."
    )
    parser.add_argument("--version", action="version", version=f"cellkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (2 for an error the user can fix, 130 on Ctrl-C)."""
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


__all__ = ["build_parser", "main"]
