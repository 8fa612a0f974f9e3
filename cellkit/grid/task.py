"""One run of a grid as a cluster task: lock, ledger, the papermill subprocess, and no orphans.

:func:`run_task` is what a Dask worker executes for one run of a grid (see
:func:`cellkit.grid.runner.run_grid`)::

    1. take OUT/.locks/<run>.lock (fcntl; held until the run's processes are gone: the papermill
       worker inherits the descriptor), waiting while an earlier attempt still holds it
    2. end what is left of an earlier attempt (its kernel, tagged CELLKIT_GRID_RUN=<lock path>)
    3. decide under the lock: skip (finished), resume (last.pth), run, or replace
    4. run ``python -m cellkit.grid.worker job.json`` (papermill, its own kernel); the
       subprocess dies with the worker (PR_SET_PDEATHSIG), its kernel with it (ipykernel's parent
       poller), so a killed worker leaves nothing training behind
    5. record started / finished / failed / interrupted in OUT/ledger.jsonl

A run whose processes were killed (a dead worker, a killed kernel) raises :class:`RunInterrupted`
(or never returns): Dask runs the task again (``retries``, the scheduler's ``allowed-failures``)
and the retry resumes from the run's ``checkpoints/last.pth``.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distributed import get_worker

from ..errors import CellkitError
from ..outputs import write_json
from ..runs import RunDir, read_json
from .ledger import Ledger
from .processes import ATTEMPT, PARENT, TAG, end_orphans
from .spec import RunSpec
from .status import (
    ERROR_FILE,
    FAILED,
    INTERRUPTED,
    JOB_FILE,
    LOCKS,
    LOG_FILE,
    OK,
    OUTCOME_FILE,
    RUNNING,
    finished,
    move_aside,
    read_status,
    run_action,
    timestamp,
    write_status,
)

__all__ = ["RunBusy", "RunInterrupted", "RunLock", "RunTask", "run_notebook", "run_task"]

class RunInterrupted(CellkitError):
    """The run's processes were killed (not a failure of the notebook): the task is retried."""


class RunBusy(CellkitError):
    """Another live process holds the run's lock (``lock_timeout`` passed)."""


# --------------------------------------------------------------------------------------------
# the lock


class RunLock:
    """An exclusive ``fcntl.flock`` on a file; the holder writes who it is into it.

    The lock belongs to the open file: processes that inherit the descriptor (``pass_fds``) hold it
    too, and it is released only when the last of them closes it or dies, whatever kills them.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def holder(self) -> dict[str, Any] | None:
        """What the current (or last) holder wrote: ``{"pid", "host", "since", ...}``."""
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, json.JSONDecodeError):
            return None

    def acquire(self, timeout: float | None = None, on_wait: Callable[[dict[str, Any] | None], None] | None = None,
                poll: float = 0.25, **info: Any) -> "RunLock":
        """Take the lock, waiting while another process holds it.

        Args:
            timeout: seconds to wait (None: as long as it takes; 0: do not wait).
            on_wait: called once, with :meth:`holder`, when the lock is busy.
            info: extra fields written into the file beside pid, host and time.

        Raises:
            RunBusy: still held after ``timeout`` seconds.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        t0 = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and on_wait is not None:
                    on_wait(self.holder())
                told = True
                if timeout is not None and time.monotonic() - t0 >= timeout:
                    os.close(fd)
                    h = self.holder() or {}
                    raise RunBusy(f"{self.path}: held by pid {h.get('pid', '?')} on {h.get('host', '?')} "
                                   f"since {h.get('since', '?')}") from None
                time.sleep(poll)
        self.fd = fd
        self.note(**info)
        return self

    def note(self, **info: Any) -> None:
        """Rewrite the holder's record (pid, host, time and ``info``)."""
        assert self.fd is not None
        rec = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        data = json.dumps(rec, default=str).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# the task


@dataclass
class RunTask:
    """Everything a worker needs for one run of a grid (pickled to the worker)."""

    run: RunSpec
    """The :class:`~cellkit.grid.spec.RunSpec`."""
    out_dir: str
    notebook: str
    kernel: str
    threads: dict[str, int] = field(default_factory=dict)
    """Worker address -> CPU threads of a run there (see :class:`cellkit.grid.cluster.Cluster`)."""
    default_threads: int = 1
    lock_timeout: float | None = None
    """Seconds to wait for an earlier attempt still holding the lock (None: wait)."""

    @property
    def lock_path(self) -> Path:
        return Path(self.out_dir) / LOCKS / f"{self.run.name}.lock"


def run_task(job: RunTask) -> dict[str, Any]:
    """Run one run of a grid (the Dask task); returns its ``status.json`` content plus ``action``/``attempt``.

    Raises:
        RunInterrupted: the papermill worker or its kernel was killed; the retry resumes.
        RunBusy: the lock stayed held longer than ``job.lock_timeout``.
    """
    r = job.run
    ledger = Ledger(job.out_dir)
    worker, threads = _worker_address(), job.default_threads
    if worker is not None:
        threads = job.threads.get(worker, threads)
    lock = RunLock(job.lock_path)

    def waiting(holder: dict[str, Any] | None) -> None:
        ledger.append("waiting", r.name, holder=holder)

    lock.acquire(timeout=job.lock_timeout, on_wait=waiting, worker=worker)
    try:
        ended = end_orphans(str(lock.path))
        action = run_action(r)
        if action == "skip":
            ledger.append("skipped", r.name, worker=worker)
            status = dict(read_status(r) or {})
            return {**status, "action": "skip", "attempt": None}
        if action == "replace" and r.folder is not None and r.folder.exists():
            move_aside(r.folder)
        attempt = ledger.attempts(r.name) + 1
        resume = action == "resume"
        epochs_done = len(RunDir(r.run_dir).history()) if resume else 0

        def started(pid: int) -> None:
            lock.note(worker=worker, child_pid=pid, attempt=attempt)
            ledger.append("started", r.name, attempt=attempt, action=action, epochs_done=epochs_done, worker=worker,
                          child_pid=pid, threads=threads, ended_orphans=ended)

        status = run_notebook(r, Path(job.notebook), job.kernel, resume, threads, attempt=attempt,
                              lock_fd=lock.fd, tag=str(lock.path), on_start=started)
        if status.get("interrupted"):
            ledger.append("interrupted", r.name, attempt=attempt, error=status.get("error"))
            raise RunInterrupted(f"run {r.name}, attempt {attempt}: {status.get('error')}")
        ledger.append("finished" if status["status"] == OK else "failed", r.name, attempt=attempt,
                      status=status["status"], error=status.get("error"))
        assert status["status"] in (OK, FAILED)
        return {**status, "action": action, "attempt": attempt}
    finally:
        lock.release()


def run_notebook(r: RunSpec, notebook: Path, kernel: str, resume: bool, threads: int, attempt: int = 1,
                 lock_fd: int | None = None, tag: str | None = None,
                 on_start: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Execute one run's notebook in a papermill subprocess (its own environment and kernel) and
    write its ``status.json``; returns the status. ``interrupted: True`` marks a run whose
    processes were killed (signal, dead kernel) rather than one whose notebook failed."""
    assert r.folder is not None and r.run_dir is not None
    r.folder.mkdir(parents=True, exist_ok=True)
    (r.folder / ERROR_FILE).unlink(missing_ok=True)
    outcome_path = r.folder / OUTCOME_FILE
    outcome_path.unlink(missing_ok=True)
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES") or None
    device = f"cuda:{gpu}" if gpu else "cpu"
    started = time.time()
    write_status(r, {"status": RUNNING, "started": timestamp(started), "device": device, "resumed": resume,
                      "attempt": attempt, "host": socket.gethostname(), "worker_pid": os.getpid()})
    job = {
        "notebook": str(notebook), "output": str(r.folder / notebook.name), "cwd": str(r.folder),
        "kernel": kernel, "parameters": r.parameters(resume), "outcome": str(outcome_path),
    }
    write_json(job, r.folder / JOB_FILE, indent=1, default=str)
    env = job_env(threads)
    env[PARENT] = str(os.getpid())
    env[ATTEMPT] = str(attempt)
    if tag is not None:
        env[TAG] = tag
    with open(r.folder / LOG_FILE, "ab") as log:
        log.write(f"\n== {timestamp(started)} attempt {attempt}: {'resuming' if resume else 'running'} {r.name} "
                  f"on {socket.gethostname()} ({'GPU ' + gpu if gpu else f'CPU, {threads} threads'})\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "cellkit.grid.worker", str(r.folder / JOB_FILE)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                pass_fds=(lock_fd,) if lock_fd is not None else (), start_new_session=True)
        if on_start is not None:
            on_start(proc.pid)
        try:
            returncode = proc.wait()
        except BaseException:  # the task is being cancelled: take the run's processes down with it
            _kill_group(proc)
            raise
    outcome = read_json(outcome_path)
    outcome_path.unlink(missing_ok=True)
    interrupted = False
    if outcome is None:
        interrupted = returncode < 0
        why = (f"the papermill worker was killed by signal {-returncode}" if interrupted
               else f"the papermill worker exited with code {returncode} without a result")
        outcome = {"status": FAILED, "ename": "Interrupted" if interrupted else "WorkerError", "evalue": why + "; see log.txt"}
    elif outcome.get("ename") == "DeadKernelError":
        interrupted = True
    t1 = time.time()
    status: dict[str, Any] = {
        "status": outcome.get("status", FAILED), "started": timestamp(started), "finished": timestamp(t1),
        "wall_seconds": round(t1 - started, 1), "started_unix": started, "finished_unix": t1, "device": device,
        "resumed": resume, "attempt": attempt, "notebook": str(r.folder / notebook.name), "returncode": returncode,
    }
    if status["status"] == OK and not finished(r):
        status.update(status=FAILED, ename="MissingMetrics",
                      evalue=f"the notebook finished but {RunDir(r.run_dir).summary_file} is missing or invalid")
    elif status["status"] != OK:
        status.update(status=FAILED, ename=outcome.get("ename"), evalue=outcome.get("evalue"),
                      cell=outcome.get("cell"), cell_index=outcome.get("cell_index"))
    if status["status"] == FAILED:
        status["error"] = f"{status.get('ename') or 'Error'}: {status.get('evalue') or ''}".strip()
        where = f" (notebook cell In [{status['cell']}])" if status.get("cell") is not None else ""
        text = f"{status['error']}{where}\n\n{outcome.get('traceback') or ''}\nlog: {r.folder / LOG_FILE}\n"
        (r.folder / ERROR_FILE).write_text(text)
    if interrupted:
        status.update(status=INTERRUPTED, interrupted=True)
    return write_status(r, status)


def job_env(threads: int) -> dict[str, str]:
    """The papermill worker's (and its kernel's) environment: this one, with ``threads`` CPU threads
    (a Dask worker sets OMP_NUM_THREADS=1 for itself; the run gets its share of the cores)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(max(1, int(threads)))
    env.setdefault("CELLKIT_PROGRESS", "0")  # no tqdm widgets in the executed notebooks
    pkg_root = str(Path(__file__).resolve().parents[2])  # the kernel imports this cellkit
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _worker_address() -> str | None:
    try:
        return get_worker().address
    except ValueError:  # not inside a Dask worker
        return None
