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
import errno
import sys

from .. import __version__
from ..errors import CellkitError
from . import ablate, compare, data, evaluate, info, predict, segment, train

GROUPS = (train, data, info, evaluate, compare, predict, segment, ablate)


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
        print(f"cellkit {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk wherever a writer did not name its file itself
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = e.filename or getattr(args, "out", None)  # the file, else the command's output
        prefix = f"{where}: " if where else ""
        print(f"cellkit {args.command}: error: {prefix}cannot write: no space left on device", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cellkit {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(message: str, limit: int = 400) -> str:
    """An error message as one line of at most ``limit`` characters (the writers keep theirs short;
    this is the backstop for a message that quotes something long)."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["build_parser", "main"]
