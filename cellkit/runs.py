"""The run directory: what a training run writes where, who may write it, and how to read it back.

Every module that reads or writes a run goes through this one (no other module spells a file
name of a run). A run directory holds::

    config.yaml             the resolved config                               RunDir.config
    metrics.jsonl           one line per epoch                                RunDir.metrics_log
    metrics.json            the final summary                                 RunDir.summary_file
    val_gt.json             COCO ground truth of the validation split         RunDir.val_gt
    val_predictions.json    validation predictions of the best epoch          RunDir.predictions()
    holdout_gt.json         ... and of the hold-out split, when there is one
    eval.json               the full evaluation of the best epoch (demo)      RunDir.eval_file
    thresholds.json         tuned thresholds (cellkit tune-thresholds)        RunDir.thresholds
    checkpoints/last.pth    everything needed to resume                       RunDir.checkpoint("last")
    checkpoints/best.pth    weights, config and history of the best epoch     RunDir.checkpoint("best")
    plots/curves.png        loss and AP50 curves                              RunDir.curves
    events.out.tfevents.*   TensorBoard
    .lock                   held while a training runs in it

:func:`claim_run_dir` is what a training holds while it writes the folder:

- **a lock**: ``RUN_DIR/.lock``, locked with ``fcntl.flock`` and holding the pid, host and start
  time of its owner. A second process that wants the same folder gets a one-line
  :class:`~cellkit.errors.DataError` naming the owner, instead of deleting the first one's
  checkpoint mid-write and interleaving epochs. The kernel drops the lock when its owner dies
  (even by SIGKILL), so the file a dead process leaves is taken over without asking. A clean exit
  removes the file (while still holding the lock; a process that locked the old file then sees it
  is gone and locks the new one).
- **a guard**: a folder that holds a previous run (:data:`RUN_MARKERS`) is refused unless the
  caller resumes it (``resume=True``, ``--resume``) or replaces it (``overwrite=True``,
  ``--overwrite``), which first deletes the previous run's outputs (:data:`RUN_OUTPUTS`; other
  files stay). Resuming a run that has no ``checkpoints/last.pth`` is refused too (it would
  start from scratch over the old run's best.pth and metrics), and so is resuming with a key
  changed that cannot change mid-run (:func:`check_resume_config`; :data:`RESUMABLE_KEYS` can).
- the clean-up of temporary files a killed process left in ``checkpoints/``, done only while
  holding the lock.

On a system without ``fcntl`` (Windows) or a file system that refuses locks, training goes on
without the lock (with a note); the guard still applies. No torch here.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import Config, load_config
from .documents import loads_json, short
from .documents import read_json as read_document
from .errors import ConfigError, DataError
from .outputs import check_writable_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

PathLike = str | os.PathLike[str]

CONFIG = "config.yaml"
METRICS_LOG = "metrics.jsonl"
SUMMARY = "metrics.json"
VAL_GT = "val_gt.json"
VAL_PREDICTIONS = "val_predictions.json"
HOLDOUT_GT = "holdout_gt.json"
HOLDOUT_PREDICTIONS = "holdout_predictions.json"
EVAL = "eval.json"
THRESHOLDS = "thresholds.json"
CHECKPOINTS = "checkpoints"
CURVES = "plots/curves.png"
LOCK_NAME = ".lock"

RUN_MARKERS = (f"{CHECKPOINTS}/last.pth", f"{CHECKPOINTS}/best.pth", METRICS_LOG, SUMMARY)
"""Files whose presence means a folder holds a run."""
RUN_OUTPUTS = (f"{CHECKPOINTS}/*.pth", f"{CHECKPOINTS}/.*.tmp*", METRICS_LOG, SUMMARY, VAL_GT, "val_predictions*.json",
               HOLDOUT_GT, "holdout_predictions*.json", THRESHOLDS, EVAL, "plots/*.png", CONFIG,
               "events.out.tfevents.*")
"""What ``overwrite`` deletes: the files a training run (and its follow-up commands) write."""


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory (nothing is checked or created; see :func:`open_run`).

    Attributes:
        path: the folder.
    """

    path: Path

    def __init__(self, path: PathLike) -> None:
        object.__setattr__(self, "path", Path(path).expanduser())

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_log(self) -> Path:
        return self.path / METRICS_LOG

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    @property
    def val_gt(self) -> Path:
        return self.path / VAL_GT

    @property
    def holdout_gt(self) -> Path:
        return self.path / HOLDOUT_GT

    @property
    def eval_file(self) -> Path:
        return self.path / EVAL

    @property
    def thresholds(self) -> Path:
        return self.path / THRESHOLDS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def curves(self) -> Path:
        return self.path / CURVES

    @property
    def lock(self) -> Path:
        return self.path / LOCK_NAME

    def checkpoint(self, which: str = "best") -> Path:
        """``checkpoints/best.pth`` or ``checkpoints/last.pth``."""
        return self.checkpoints / f"{which}.pth"

    def predictions(self, checkpoint: str = "best", split: str = "val") -> Path:
        """The predictions of a split by a checkpoint: ``val_predictions.json`` for the best
        epoch's (what training writes and the analysis reads), ``val_predictions_<name>.json``
        for another checkpoint; ``holdout_...`` for the hold-out split."""
        stem = VAL_PREDICTIONS if split == "val" else HOLDOUT_PREDICTIONS
        if checkpoint == "best":
            return self.path / stem
        return self.path / stem.replace(".json", f"_{Path(checkpoint).stem}.json")

    def history(self) -> list[dict[str, Any]]:
        """The per-epoch dicts of ``metrics.jsonl`` ([] when missing; unreadable lines skipped)."""
        return read_history(self.path)

    def summary(self) -> dict[str, Any] | None:
        """``metrics.json`` when it is a complete summary (``epochs_run`` and ``best_val_ap50``), else None."""
        m = read_json(self.summary_file)
        return m if isinstance(m, dict) and "epochs_run" in m and "best_val_ap50" in m else None

    def previous_run(self) -> list[str]:
        """The :data:`RUN_MARKERS` present (empty: no previous run here)."""
        return [m for m in RUN_MARKERS if (self.path / m).is_file()]


def read_json(path: PathLike) -> Any:
    """A JSON file's content, or None when it is missing, unreadable or hostile (:mod:`cellkit.documents`)."""
    try:
        return read_document(path)
    except DataError:
        return None


def read_history(run_dir: PathLike) -> list[dict[str, Any]]:
    """The per-epoch dicts of ``run_dir/metrics.jsonl`` ([] when missing; unreadable lines skipped)."""
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(loads_json(line, path))
        except DataError:  # a line cut short (or hostile): skipped
            continue
    return rows


# --------------------------------------------------------------------------------------------
# reading a finished run


@dataclass
class RunFiles:
    """The files of a finished training run that the analysis reads."""

    run_dir: Path
    config: Config
    gt: Path
    predictions: Path


def open_run(run_dir: PathLike) -> RunFiles:
    """A training run's config, validation ground truth and validation predictions of its best epoch.

    ``run_dir`` may also be a grid run's folder ``OUT/<name>`` holding ``run/``.

    Raises:
        DataError: the folder is not a finished run (``make demo`` or notebook 02 make one).
    """
    run = find_run_dir(run_dir)
    rd = RunDir(run)
    for path in (rd.config, rd.val_gt, rd.predictions()):
        if not path.is_file():
            raise DataError(path, "not found: point run_dir at a finished training run "
                                  "(make demo writes runs/demo/run; notebook 02 writes its run_dir)")
    return RunFiles(run, load_config(rd.config), rd.val_gt, rd.predictions())


def find_run_dir(path: PathLike) -> Path:
    """``path`` itself, or ``path/run`` when ``path`` is a grid run's folder (``OUT/<name>``)."""
    p = Path(path).expanduser()
    if not (p / VAL_GT).is_file() and (p / "run" / VAL_GT).is_file():
        return p / "run"
    return p


def checkpoint_path(run_dir: PathLike, checkpoint: str = "best") -> Path:
    """``run_dir/checkpoints/{best,last}.pth``, or ``checkpoint`` itself when it is a path.

    Raises:
        DataError: no such run directory or checkpoint.
    """
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise DataError(run, "run directory not found")
    ckpt = Path(checkpoint).expanduser() if checkpoint not in ("best", "last") else RunDir(run).checkpoint(checkpoint)
    if not ckpt.is_file():
        raise DataError(ckpt, "checkpoint not found (train a run first, or pass --checkpoint)")
    return ckpt


def run_of_checkpoint(checkpoint: PathLike) -> RunDir:
    """The run a checkpoint belongs to: ``RUN`` for ``RUN/checkpoints/x.pth``, else the checkpoint's folder."""
    p = Path(checkpoint).expanduser().resolve().parent
    return RunDir(p.parent if p.name == CHECKPOINTS else p)


def find_thresholds(checkpoint: PathLike) -> Path | None:
    """The ``thresholds.json`` of the run a checkpoint belongs to (``RUN/checkpoints/x.pth`` or
    ``RUN/x.pth``), or None."""
    p = Path(checkpoint).expanduser().resolve().parent
    for folder in (p, p.parent) if p.name == CHECKPOINTS else (p,):
        if (folder / THRESHOLDS).is_file():
            return folder / THRESHOLDS
    return None


# --------------------------------------------------------------------------------------------
# one training at a time


def previous_run(run_dir: PathLike) -> list[str]:
    """The :data:`RUN_MARKERS` present in ``run_dir`` (empty: no previous run there)."""
    return RunDir(run_dir).previous_run()


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
    last = RunDir(run).checkpoint("last")
    if found and resume and not last.is_file():
        raise DataError(last, f"nothing to resume from: the run holds {', '.join(found)} but no "
                              f"{CHECKPOINTS}/last.pth; start again with --overwrite, or choose another folder")


RESUMABLE_KEYS = ("name", "data.root", "data.num_workers", "data.cache", "train.epochs", "train.device",
                  "train.eval_every", "train.checkpoint_every", "train.early_stop_decays", "train.early_stop_patience",
                  "train.max_nonfinite", "train.tensorboard", "train.tensorboard_images", "eval.backend",
                  "eval.bootstrap", "eval.bootstrap_seed")
"""The config keys a resumed run may change (more epochs, the data moved, another device); any
other change (the optimiser, the learning rate, the model, the split, the augmentation) would
make the checkpoint's state or the epochs before it mean something else."""


def check_resume_config(stored: Any, cfg: Config) -> None:
    """Refuse to resume a run whose checkpoint was trained with another value of a key outside
    :data:`RESUMABLE_KEYS`.

    Args:
        stored: the config dict the checkpoint holds (``Config.to_dict()`` of the run).
        cfg: the config the resumed run would use.

    Raises:
        ConfigError: naming the first changed key, both values and the keys that can change.
    """
    if not isinstance(stored, dict):
        return
    old = _flatten(stored)
    for key, value in cfg.flat().items():
        if key in RESUMABLE_KEYS or key not in old or old[key] == value:
            continue  # a key missing from the checkpoint came with a later cellkit
        raise ConfigError(f"{key} cannot change when resuming (the run has {short(old[key], 30)}, now "
                          f"{short(value, 30)}); keys that can: train.epochs, train.eval_every, early stopping, "
                          "train.device, data.root, data.num_workers; or start again with --overwrite")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


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
        for stale in (run / CHECKPOINTS).glob(".*.tmp*"):  # left by a process killed mid-write
            stale.unlink()
        yield lock
