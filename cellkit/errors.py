"""Errors a user can act on.

Every error cellkit raises on purpose derives from :class:`CellkitError`; the command line prints
its message (which names the file and the problem) and exits with a non-zero status instead of
showing a traceback.
"""
from __future__ import annotations

from os import PathLike


class CellkitError(Exception):
    """An error caused by input the user can fix (a file, a setting, a command-line flag)."""


class DataError(CellkitError):
    """A dataset file is missing, unreadable or inconsistent.

    Args:
        path: the file or folder at fault.
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(CellkitError, ValueError):
    """A configuration key or value is invalid (unknown key, wrong type, value out of range)."""


class TrainingError(CellkitError):
    """Training cannot go on (for example: too many non-finite losses in a row)."""
