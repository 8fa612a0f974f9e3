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

Every file cellkit writes whole goes through one of three writers: :func:`write_atomic` (text or
bytes), :func:`write_json` (JSON through it) and :func:`write_texts_together` (several files as
one change). Each writes a temporary file beside the target and renames it over the target, so a
reader (the ablation's status view, a resumed run) sees the old file or the new one, never half
of one. Checkpoints (:func:`cellkit.models.checkpoint.save_checkpoint`) stream ``torch.save``
into such a temporary file themselves, with an ``fsync``, and appended logs (``ledger.jsonl``)
are appended under a lock instead.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

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


def _tmp_beside(path: Path) -> Path:
    """The temporary name a writer uses beside ``path`` (hidden, unique per process)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_atomic(path: PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically: a temporary file beside it,
    then a rename over it. An error or Ctrl-C leaves the old file (or none) and no temporary file.
    Missing parent folders are created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(p)
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def write_json(
    obj: Any,
    path: PathLike,
    *,
    indent: int | None = None,
    default: Callable[[Any], Any] | None = None,
    allow_nan: bool = True,
) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`write_atomic`).

    The text is built first, so an object JSON cannot represent raises before anything is written.

    Args:
        indent, default, allow_nan: as :func:`json.dumps`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError, ValueError: from :func:`json.dumps` (``path`` untouched).
    """
    return write_atomic(path, json.dumps(obj, indent=indent, default=default, allow_nan=allow_nan))


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
            tmp = _tmp_beside(p)
            pending.append((tmp, p))
            tmp.write_text(text)
        for tmp, p in pending:
            os.replace(tmp, p)
    finally:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
    return [p for _, p in pending]
