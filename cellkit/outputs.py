"""Where cellkit writes: checked before the long work starts, and written so that no crash or Ctrl-C
leaves a mix of old and new files.

Every command with outputs (``convert``, ``synth``, ``train``, ``demo``, ``predict``,
``tune-thresholds``, ``evaluate --run``, ``ablate``) calls :func:`check_writable_dir` or
:func:`check_writable_file` on them first: an output under a regular file, on a read-only file
system or in ``/proc`` is a one-line :class:`~cellkit.errors.DataError` at once, not a traceback
after an hour of training or predicting. The checks create nothing; they try to create (and at
once drop) a nameless temporary file in the nearest folder that exists, which is the only test
that holds for root too (root ignores permission bits, so ``os.access`` says yes to folders that
``chmod`` made read-only, and writing there does work). No torch here.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

from .errors import DataError

PathLike = str | os.PathLike[str]


def check_writable_dir(path: PathLike, what: str = "output folder") -> Path:
    """Make sure ``path`` is a folder this process can write in, or one it can create.

    Nothing is created: the nearest existing ancestor must be a folder that accepts a new file.

    Args:
        what: how the error message names the folder (``"run directory"``, ...).

    Returns:
        ``path`` as a :class:`~pathlib.Path` (``~`` expanded).

    Raises:
        DataError: ``path`` (or a folder above it) is a regular file or a broken link, or its
            folder does not accept new files (read-only file system, ``/proc``, no permission).
    """
    p = Path(path).expanduser()
    anc = p
    while True:
        if anc.exists():
            break
        if os.path.lexists(anc):
            raise DataError(p, f"cannot create the {what}: {anc} is a broken symbolic link")
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        where = "is a file, not a folder" if anc == p else f"cannot be created: {anc} is a file, not a folder"
        raise DataError(p, f"the {what} {where}")
    _probe(anc, p, what)
    return p


def check_writable_file(path: PathLike, what: str = "output file") -> Path:
    """Make sure ``path`` can be written (created, or replaced through a temporary file beside it).

    Raises:
        DataError: ``path`` is a folder, an existing file this process may not write, or its folder
            fails :func:`check_writable_dir`.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(p, f"the {what} is a folder, not a file")
    if p.exists() and not os.access(p, os.W_OK):
        raise DataError(p, f"the {what} exists and is not writable")
    check_writable_dir(p.parent, f"folder of the {what}")
    return p


def _probe(folder: Path, target: Path, what: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".cellkit-write-test-"):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise DataError(target, f"cannot write the {what}: {folder} does not accept new files ({reason})") from None


def write_texts_together(files: Mapping[PathLike, str]) -> list[Path]:
    """Write several text files as one change: every file goes to a temporary file beside its
    target first; only when all are written are they renamed over their targets. An error or
    Ctrl-C before that leaves every old file as it was (and no temporary file behind).

    Returns:
        The target paths, in order.
    """
    pending: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
            pending.append((tmp, p))
            tmp.write_text(text)
        for tmp, p in pending:
            os.replace(tmp, p)
    finally:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
    return [p for _, p in pending]
