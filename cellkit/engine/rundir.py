"""A run directory is used by one training at a time, and a finished run is never replaced by accident.

:func:`claim_run_dir` is what :meth:`cellkit.engine.trainer.Trainer.fit` holds while it trains:

- **a lock**: ``RUN_DIR/.lock``, locked with ``fcntl.flock`` and holding the pid, host and start
  time of its owner. A second process that wants the same folder gets a one-line
  :class:`~cellkit.errors.DataError` naming the owner, instead of deleting the first one's
  checkpoint mid-write (its start-up cleanup of temporary files) and interleaving epochs. The
  kernel drops the lock when its owner dies (even by SIGKILL), so the file a dead process leaves
  is taken over without asking. A clean exit removes the file (while still holding the lock; a
  process that locked the old file then sees it is gone and locks the new one).
- **a guard**: a folder that holds a previous run (``checkpoints/last.pth``, ``best.pth``,
  ``metrics.jsonl`` or ``metrics.json``) is refused unless the caller resumes it
  (``resume=True``, ``--resume``) or replaces it (``overwrite=True``, ``--overwrite``), which
  first deletes the previous run's outputs (:data:`RUN_OUTPUTS`; other files stay).
- the clean-up of temporary files a killed process left in ``checkpoints/``, done only while
  holding the lock.

On a system without ``fcntl`` (Windows) or a file system that refuses locks, training goes on
without the lock (with a note); the guard still applies.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ConfigError, DataError
from ..outputs import check_writable_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

PathLike = str | os.PathLike[str]

LOCK_NAME = ".lock"
RUN_MARKERS = ("checkpoints/last.pth", "checkpoints/best.pth", "metrics.jsonl", "metrics.json")
"""Files whose presence means a folder holds a run."""
RUN_OUTPUTS = ("checkpoints/*.pth", "checkpoints/.*.tmp*", "metrics.jsonl", "metrics.json", "val_gt.json",
               "val_predictions*.json", "thresholds.json", "eval.json", "plots/*.png", "config.yaml",
               "events.out.tfevents.*")
"""What ``overwrite`` deletes: the files a training run (and its follow-up commands) write."""


def previous_run(run_dir: PathLike) -> list[str]:
    """The :data:`RUN_MARKERS` present in ``run_dir`` (empty: no previous run there)."""
    run = Path(run_dir)
    return [m for m in RUN_MARKERS if (run / m).is_file()]


class RunDirLock:
    """An exclusive, non-blocking lock on a run directory (``RUN_DIR/.lock``, ``fcntl.flock``).

    Use as a context manager, or :meth:`acquire` / :meth:`release`.

    Attributes:
        taken_over: the owner recorded in the lock file by a process that died holding it (it did
            not release), when this lock took it over; else None.
        locked: whether the lock is really held (False where the file system refuses locks).
    """

    def __init__(self, run_dir: PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.taken_over: dict[str, Any] | None = None
        self.locked = False
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        """Take the lock.

        Raises:
            DataError: another live process holds it (its pid, host and start time named).
        """
        if fcntl is None:  # pragma: no cover - Windows
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise DataError(self.run_dir, f"run directory is in use by another training ({_describe(owner)}); "
                                              "wait for it to finish, or choose another --out") from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return self  # no locks on this file system: go on unlocked
                raise DataError(self.path, f"cannot lock the run directory ({e.strerror or e})") from None
            try:  # still the file at .lock? (its owner may have removed it while we waited to lock it)
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.taken_over = _read_owner(fd) or None  # an owner on record but no lock held: it died
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd, self.locked = fd, True
        return self

    def release(self) -> None:
        """Give the lock back and remove the lock file (while still holding it)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd, self.locked = None, False

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        owner = json.loads(text) if text else {}
        return owner if isinstance(owner, dict) else {"record": text}
    except (OSError, ValueError):
        return {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner.get("pid"):
        return "its owner is not recorded"
    where = f" on {owner['host']}" if owner.get("host") else ""
    since = f", since {owner['started']}" if owner.get("started") else ""
    return f"pid {owner['pid']}{where}{since}"


def check_run_dir(run_dir: PathLike, resume: bool = False, overwrite: bool = False, probe_lock: bool = True) -> None:
    """What :func:`claim_run_dir` would refuse, checked without keeping anything (for the command
    line, before datasets and models are built): the folder can be written, holds no previous run
    unless ``resume`` or ``overwrite``, and (``probe_lock``) no other process trains in it. Under
    torchrun only the main process should probe the lock (the ranks would see each other's probe).

    Raises:
        ConfigError: ``resume`` and ``overwrite`` together.
        DataError: as :func:`claim_run_dir`.
    """
    if resume and overwrite:
        raise ConfigError("give --resume (continue the run) or --overwrite (replace it), not both")
    run = check_writable_dir(run_dir, "run directory")
    _guard(run, resume, overwrite)
    if probe_lock and run.is_dir() and (run / LOCK_NAME).exists():
        RunDirLock(run).acquire().release()


def _guard(run: Path, resume: bool, overwrite: bool) -> None:
    found = previous_run(run)
    if found and not (resume or overwrite):
        raise DataError(run, f"holds a previous run ({', '.join(found)}); continue it with --resume (resume=True), "
                             "replace it with --overwrite (overwrite=True), or choose another folder")


def clear_run(run_dir: PathLike) -> list[Path]:
    """Delete a previous run's outputs (:data:`RUN_OUTPUTS`) from ``run_dir``; returns what went."""
    run = Path(run_dir)
    gone = []
    for pattern in RUN_OUTPUTS:
        for p in run.glob(pattern):
            if p.is_file() or p.is_symlink():
                p.unlink()
                gone.append(p)
    return gone


@contextlib.contextmanager
def claim_run_dir(run_dir: PathLike | None, resume: bool = False, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> Iterator[RunDirLock | None]:
    """Hold ``run_dir`` for one training: lock it, refuse a previous run unless ``resume`` or
    ``overwrite`` (which deletes the previous outputs first), remove temporary files a killed
    process left in ``checkpoints/``. Yields the lock (None for ``run_dir=None``: nothing is written).

    Raises:
        DataError: the folder cannot be written, is in use by another process, or holds a
            previous run and neither ``resume`` nor ``overwrite`` is set.
        ConfigError: ``resume`` and ``overwrite`` together.
    """
    if run_dir is None:
        yield None
        return
    if resume and overwrite:
        raise ConfigError("give --resume (continue the run) or --overwrite (replace it), not both")
    run = check_writable_dir(run_dir, "run directory")
    with RunDirLock(run) as lock:
        if lock.taken_over:
            log(f"{run}: took over the lock of {_describe(lock.taken_over)}, which ended without releasing it")
        _guard(run, resume, overwrite)
        if overwrite and previous_run(run):
            gone = clear_run(run)
            log(f"{run}: replaced the previous run ({len(gone)} file(s) deleted)")
        for stale in (run / "checkpoints").glob(".*.tmp*"):  # left by a process killed mid-write
            stale.unlink()
        yield lock
