"""Where cellkit writes: checked before the long work starts, and written so that no crash, kill -9,
Ctrl-C or full disk leaves a mix of old and new files.

Every command with outputs (``convert``, ``synth``, ``train``, ``demo``, ``predict``,
``tune-thresholds``, ``evaluate --run``, ``ablate``) calls :func:`check_writable_dir` or
:func:`check_writable_file` on them first: an output under a regular file, on a read-only file
system or in ``/proc`` is a one-line :class:`~cellkit.errors.DataError` at once, not a traceback
after an hour of training or predicting. The checks create nothing; they try to create (and at
once drop) a nameless temporary file in the nearest folder that exists, which is the only test
that holds for root too (root ignores permission bits, so ``os.access`` says yes to folders that
``chmod`` made read-only, and writing there does work). :func:`check_not_input` and
:func:`check_replaceable` refuse an output path that is one of the command's inputs or an
existing file of another kind (a checkpoint, a dataset's test index) before anything is written.

The writers:

- :func:`write_atomic` (text or bytes) and :func:`write_json`: a temporary file beside the target,
  renamed over it; a reader sees the old file or the new one, never half of one.
- :func:`write_files_together`: several files of one folder (a submission's json and zip,
  ``train_gt.json`` and ``val_gt.json``) as **one** change. Two renames can never be one step,
  so the files live in a version folder and the names the user sees are symbolic links through
  one pointer::

      OUT/train_gt.json -> .train_gt.json+val_gt.json/train_gt.json
      OUT/val_gt.json   -> .train_gt.json+val_gt.json/val_gt.json
      OUT/.train_gt.json+val_gt.json -> .train_gt.json+val_gt.json.v<time>-<pid>/   (the pointer)

  A new version is written whole into a new version folder, then the pointer is switched by one
  rename: killed at any instant, the names show the old set or the new set, never a mix. (Files
  of an earlier cellkit, or of a first write, are first moved behind the pointer as they are,
  which changes nothing a reader sees.) On a file system without symbolic links the files are
  renamed one after the other.
- :func:`replace_folder`: a whole folder (a synthetic dataset) swapped for a new one in one step
  (``renameat2(RENAME_EXCHANGE)`` on Linux).
- Checkpoints (:func:`cellkit.models.checkpoint.save_checkpoint`) stream ``torch.save`` into a
  temporary file themselves, inside :func:`disk_errors`; appended logs (``ledger.jsonl``) are
  appended under a lock instead.

Temporary names carry the writer's pid (``.NAME.tmp<pid>``, ``.SET.v<time>-<pid>``): a later
writer removes those whose process is gone (killed mid-write), and leaves those of live writers.

Every writer turns an ``OSError`` into a one-line :class:`~cellkit.errors.DataError` naming the
file (:func:`disk_errors`): a full disk is ``PATH: cannot write: no space left on device``, and
the previous file (or set, or folder) is left as it was. No torch here.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from .errors import DataError

PathLike = str | os.PathLike[str]

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
"""The errors of a full disk (or a used-up quota)."""


# --------------------------------------------------------------------------------------------
# checks before the work


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


def check_not_input(outputs: Iterable[PathLike], inputs: Mapping[str, PathLike | None]) -> None:
    """Refuse an output that is one of the command's inputs (the same file, by any path or link).

    Args:
        outputs: the files the command will write.
        inputs: what each input is (``"the test index"``) -> its path (None: no such input).

    Raises:
        DataError: naming the output and the input it would destroy.
    """
    for out in outputs:
        o = Path(out).expanduser()
        for what, inp in inputs.items():
            if inp is not None and _same_file(o, Path(inp).expanduser()):
                raise DataError(o, f"is {what} this command reads; writing there would destroy it; choose another --out")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_replaceable(path: PathLike, what: str, looks_like: Callable[[Path], bool] | None = None) -> None:
    """Refuse to replace an existing file that cellkit did not write as this kind of output.

    A file is replaceable when it does not exist, is a member of a set that
    :func:`write_files_together` wrote, or ``looks_like(path)`` says it is an output of this
    kind (written by an earlier cellkit). A checkpoint, a dataset's test index or notes of one's
    own at that path are refused before any work.

    Args:
        what: the kind of output (``"submission file"``), for the message.
        looks_like: recognises a previous output of this kind from the file's first bytes.

    Raises:
        DataError: the path is a folder, or an existing file of another kind.
    """
    p = Path(path).expanduser()
    if not os.path.lexists(p) or is_set_member(p):
        return
    if p.is_dir():
        raise DataError(p, f"the {what} is a folder, not a file")
    if p.is_file() and looks_like is not None and looks_like(p):
        return
    raise DataError(p, f"exists and is not a {what} that cellkit wrote; refusing to replace it (choose another --out, "
                       "or move the file away)")


def read_head(path: PathLike, n: int = 4096) -> bytes:
    """The first ``n`` bytes of a file (b"" when it cannot be read), for ``looks_like`` checks."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _probe(folder: Path, target: Path, what: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".cellkit-write-test-"):
            pass
    except OSError as e:
        reason = _reason(e)
        raise DataError(target, f"cannot write the {what}: {folder} does not accept new files ({reason})") from None


# --------------------------------------------------------------------------------------------
# errors of writing


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno == errno.EDQUOT:
        return "no space left on device (disk quota exceeded)"
    return e.strerror or str(e)


def write_error(path: PathLike, e: OSError) -> DataError:
    """The one-line error of a failed write of ``path``."""
    return DataError(path, f"cannot write: {_reason(e)}; nothing was replaced")


@contextlib.contextmanager
def disk_errors(path: PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block (a full disk, a quota, an I/O error) into one
    :class:`~cellkit.errors.DataError` line naming ``path``. The block must leave the previous
    output as it was when it fails (every writer here does)."""
    try:
        yield
    except OSError as e:
        raise write_error(path, e) from None


# --------------------------------------------------------------------------------------------
# temporary names and the processes that own them


def _tmp_beside(path: Path) -> Path:
    """The temporary name a writer uses beside ``path`` (hidden, unique per process)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a pid of another user's process counts)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_dead_temporaries(folder: Path, stem: str) -> list[Path]:
    """Remove what writers that died mid-write left in ``folder`` for the output ``stem``:
    ``.STEM.tmp<pid>`` files or links and ``.STEM.old<pid>`` / ``.STEM.v<time>-<pid>`` folders
    whose process is gone (the current version of a set is never among them).

    Returns:
        what was removed.
    """
    pattern = re.compile(rf"^\.{re.escape(stem)}\.(?:tmp|old)(\d+)$|^\.{re.escape(stem)}\.v[0-9a-f]+-(\d+)$")
    current = _pointer_target(folder / f".{stem}")
    keep_old = not os.path.lexists(folder / stem)  # a folder renamed aside and not back: the only copy
    gone = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return gone
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or entry.name == current or pid_alive(int(m.group(1) or m.group(2))):
            continue
        if keep_old and entry.name.startswith(f".{stem}.old"):
            continue
        _remove(Path(entry.path))
        gone.append(Path(entry.path))
    return gone


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


# --------------------------------------------------------------------------------------------
# one file


def write_atomic(path: PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically: a temporary file beside it,
    then a rename over it. An error, Ctrl-C or kill leaves the old file (or none); temporary
    files of writers that died are removed. Missing parent folders are created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: the file cannot be written (a full disk: ``no space left on device``); the
            old file is unchanged.
    """
    p = Path(path)
    with replacing(p) as tmp, disk_errors(p):
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
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
        DataError: as :func:`write_atomic`.
    """
    return write_atomic(path, json.dumps(obj, indent=indent, default=default, allow_nan=allow_nan))


@contextlib.contextmanager
def replacing(path: PathLike) -> Iterator[Path]:
    """For a file another library writes itself (``torch.jit.save``, ``onnx.save``): yields the
    temporary path beside ``path`` to write to, and renames it over ``path`` when the block ends
    without an error. An error, Ctrl-C or kill leaves the old file (or none); temporary files of
    writers that died are removed first.

    Raises:
        DataError: the file cannot be written (a full disk: ``no space left on device``).
    """
    p = Path(path)
    tmp = _tmp_beside(p)
    with disk_errors(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(p.parent, p.name)
    try:
        yield tmp
        with disk_errors(p):
            os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# several files as one change


def set_name(names: Iterable[str]) -> str:
    """The name of the set of files ``names`` of one folder (its pointer is ``.NAME``)."""
    return "+".join(sorted(names))


def is_set_member(path: PathLike) -> bool:
    """Whether ``path`` is a name :func:`write_files_together` made: a link ``.SET/NAME``."""
    p = Path(path)
    try:
        target = Path(os.readlink(p))
    except OSError:
        return False
    return (len(target.parts) == 2 and target.parts[0].startswith(".") and target.parts[0] not in (".", "..")
            and target.name == p.name)


def write_files_together(files: Mapping[PathLike, str | bytes]) -> list[Path]:
    """Write several files of one folder as one change: every reader, at every instant (kill -9
    included), sees all the old files or all the new ones (see the module docstring for how).

    Args:
        files: target path -> its content (text as UTF-8, or bytes); all in one folder.

    Returns:
        The target paths, in order.

    Raises:
        DataError: a file cannot be written (a full disk: ``no space left on device``) or a
            target is a folder; every old file is unchanged.
        ValueError: targets in different folders.
    """
    targets = [Path(p) for p in files]
    folder = targets[0].parent
    if any(t.parent != folder for t in targets) or len({t.name for t in targets}) != len(targets):
        raise ValueError(f"write_files_together: distinct files of one folder, got {[str(t) for t in targets]}")
    for t in targets:
        if t.is_dir():
            raise DataError(t, "is a folder; cannot write a file there")
    stem = set_name(t.name for t in targets)
    contents = [files[k] for k in files]
    first = targets[0]  # what an error of the set as a whole names
    with disk_errors(first):
        folder.mkdir(parents=True, exist_ok=True)
        for name in [stem, *(t.name for t in targets)]:
            remove_dead_temporaries(folder, name)
        try:
            _link_names(folder, stem, targets)
        except _NoLinks:
            return _write_one_after_another(targets, contents)
        version = folder / f".{stem}.v{time.time_ns():x}-{os.getpid()}"
        version.mkdir()
    try:
        for t, data in zip(targets, contents):
            with disk_errors(t):
                _write_durably(version / t.name, data)
        with disk_errors(first):
            _fsync_dir(version)
            previous = _switch(folder / f".{stem}", version.name)
            _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    if previous and previous != version.name:
        shutil.rmtree(folder / previous, ignore_errors=True)
    return targets


class _NoLinks(Exception):
    """The file system refuses symbolic links."""


def _link_names(folder: Path, stem: str, targets: list[Path]) -> None:
    """Make every target name a link through the pointer, changing nothing a reader sees: the
    pointer first goes to a version holding what each name shows now (hard links of the current
    files), then each name that is not yet a link becomes one.

    Raises:
        _NoLinks: the file system has no symbolic links (the caller renames file by file).
    """
    pointer = folder / f".{stem}"
    if _pointer_target(pointer) is not None and all(_is_link_of(t, stem) for t in targets):
        return
    view = folder / f".{stem}.v{time.time_ns():x}-{os.getpid()}"
    view.mkdir()
    try:
        for t in targets:
            if t.is_file():  # what a reader of this name sees now (through any link)
                try:
                    os.link(t.resolve(), view / t.name)
                except OSError:  # no hard links here (or another file system): a copy
                    shutil.copy2(t, view / t.name)
        try:
            previous = _switch(pointer, view.name)
        except (NotImplementedError, OSError) as e:
            if isinstance(e, OSError) and e.errno in NO_SPACE:
                raise
            raise _NoLinks() from None
    except BaseException:
        shutil.rmtree(view, ignore_errors=True)
        raise
    if previous and previous != view.name:
        shutil.rmtree(folder / previous, ignore_errors=True)
    for t in targets:
        if not _is_link_of(t, stem):
            tmp = _tmp_beside(t)
            tmp.unlink(missing_ok=True)
            os.symlink(f".{stem}/{t.name}", tmp)
            os.replace(tmp, t)


def _is_link_of(t: Path, stem: str) -> bool:
    try:
        return os.readlink(t) == f".{stem}/{t.name}"
    except OSError:
        return False


def _pointer_target(pointer: Path) -> str | None:
    try:
        target = os.readlink(pointer)
    except OSError:
        return None
    return target if (pointer.parent / target).is_dir() else None


def _switch(pointer: Path, version: str) -> str | None:
    """Point ``pointer`` at ``version`` (a folder beside it) with one rename; returns the old target."""
    previous = _pointer_target(pointer)
    tmp = pointer.with_name(f"{pointer.name}.tmp{os.getpid()}")  # .SET.tmp<pid>: the pointer's name is hidden already
    tmp.unlink(missing_ok=True)
    os.symlink(version, tmp)
    try:
        os.replace(tmp, pointer)
    finally:
        tmp.unlink(missing_ok=True)
    return previous


def _write_durably(path: Path, data: str | bytes) -> None:
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_one_after_another(targets: list[Path], contents: list[str | bytes]) -> list[Path]:
    """Where there are no symbolic links: every file to a temporary file first, then the renames
    (an error before them leaves every old file; a kill between two of them does not)."""
    pending: list[tuple[Path, Path]] = []
    try:
        for t, data in zip(targets, contents):
            tmp = _tmp_beside(t)
            pending.append((tmp, t))
            with disk_errors(t):
                _write_durably(tmp, data)
        for tmp, t in pending:
            with disk_errors(t):
                os.replace(tmp, t)
    finally:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
    return targets


# --------------------------------------------------------------------------------------------
# a whole folder


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or the file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(new: PathLike, out: PathLike) -> Path:
    """Put the finished folder ``new`` (a sibling of ``out``) in place of ``out`` in one step: a
    reader (or a kill) sees the old folder or the new one, never none. The old folder is then
    deleted. Without ``renameat2`` the old folder is first renamed aside (``.OUT.old<pid>``, which
    a later writer removes once this process is gone).

    Returns:
        ``out``.

    Raises:
        DataError: the rename fails.
    """
    new, out = Path(new), Path(out)
    with disk_errors(out):
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            os.replace(new, out)  # nothing (or an empty folder) to keep
            return out
        if _rename_exchange(new, out):
            shutil.rmtree(new, ignore_errors=True)  # now the old folder
            return out
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
