"""One grid cell as a cluster task: lock, ledger, the papermill subprocess, and no orphans.

:func:`run_cell` is what a Dask worker executes for one run of a grid (see
:func:`cellkit.ablation.run_grid`)::

    1. take OUT/.locks/<run>.lock (fcntl; held until the run's processes are gone: the papermill
       worker inherits the descriptor), waiting while an earlier attempt still holds it
    2. end what is left of an earlier attempt (its kernel, tagged CELLKIT_GRID_CELL=<lock path>)
    3. decide under the lock: skip (finished), resume (last.pth), run, or replace
    4. run ``python -m cellkit.ablation --worker job.json`` (papermill, its own kernel); the
       subprocess dies with the worker (PR_SET_PDEATHSIG), its kernel with it (ipykernel's parent
       poller), so a killed worker leaves nothing training behind
    5. record started / finished / failed / interrupted in OUT/ledger.jsonl

A run whose processes were killed (a dead worker, a killed kernel) raises :class:`RunInterrupted`
(or never returns): Dask runs the task again (``retries``, the scheduler's ``allowed-failures``)
and the retry resumes from the run's ``checkpoints/last.pth``.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import CellkitError

__all__ = ["CellBusy", "CellJob", "CellLock", "Ledger", "RunInterrupted", "die_with_parent", "end_orphans",
           "run_cell", "tagged_processes"]

TAG = "CELLKIT_GRID_CELL"
"""Environment variable that marks every process of a grid cell (value: the cell's lock path)."""
ATTEMPT = "CELLKIT_GRID_ATTEMPT"
"""Environment variable with the attempt number (1, 2, ...) of the run in that process."""
PARENT = "CELLKIT_GRID_PARENT"
"""The pid of the task process that started the papermill worker (it exits if that one is gone)."""


class RunInterrupted(CellkitError):
    """The run's processes were killed (not a failure of the notebook): the task is retried."""


class CellBusy(CellkitError):
    """Another live process holds the run's lock (``lock_timeout`` passed)."""


# --------------------------------------------------------------------------------------------
# the ledger


class Ledger:
    """``OUT/ledger.jsonl``: one JSON line per event, appended, never rewritten.

    Events: ``grid-started`` / ``grid-finished`` (the runner), and per run ``started`` (with
    ``attempt``, ``action`` run/resume, ``epochs_done``, the worker's and the papermill
    subprocess's pids), ``waiting`` (for an earlier attempt's lock), ``skipped``, ``finished``,
    ``failed``, ``interrupted``. Each line has ``time`` (ISO), ``t`` (unix), ``host`` and ``pid``.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.path = Path(out_dir) / "ledger.jsonl"

    def append(self, event: str, run: str | None = None, **fields: Any) -> dict[str, Any]:
        """Append one event (whole lines under an exclusive lock, so writers never interleave)."""
        t = time.time()
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)), "t": round(t, 3), "event": event,
               "run": run, "host": socket.gethostname(), "pid": os.getpid(), **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.write(json.dumps(rec, default=str) + "\n")
                f.flush()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return rec

    def read(self, start: int = 0) -> list[dict[str, Any]]:
        """Every event from line ``start`` on (a torn last line is skipped)."""
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines[start:]:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def attempts(self, run: str) -> int:
        """How many times ``run`` was started (over every invocation of the grid)."""
        return sum(1 for e in self.read() if e.get("run") == run and e.get("event") == "started")

    def summary(self) -> dict[str, dict[str, Any]]:
        """Run -> ``{"attempts", "last"}`` (the last event of that run)."""
        out: dict[str, dict[str, Any]] = {}
        for e in self.read():
            run = e.get("run")
            if not run:
                continue
            s = out.setdefault(run, {"attempts": 0, "last": None})
            if e.get("event") == "started":
                s["attempts"] += 1
            if e.get("event") != "waiting":
                s["last"] = e
        return out


# --------------------------------------------------------------------------------------------
# the lock


class CellLock:
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
                poll: float = 0.25, **info: Any) -> "CellLock":
        """Take the lock, waiting while another process holds it.

        Args:
            timeout: seconds to wait (None: as long as it takes; 0: do not wait).
            on_wait: called once, with :meth:`holder`, when the lock is busy.
            info: extra fields written into the file beside pid, host and time.

        Raises:
            CellBusy: still held after ``timeout`` seconds.
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
                    raise CellBusy(f"{self.path}: held by pid {h.get('pid', '?')} on {h.get('host', '?')} "
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

    def __enter__(self) -> "CellLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# processes


def die_with_parent(parent_pid: int | None = None) -> None:
    """Make this process die when its parent does (Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``;
    elsewhere a thread that polls the parent pid). Exits at once if ``parent_pid`` is given and
    is no longer the parent (it died while this process started)."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            armed = libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # PR_SET_PDEATHSIG = 1
        except OSError:
            armed = False
    if not armed:
        expected = parent_pid or os.getppid()

        def watch() -> None:
            while os.getppid() == expected:
                time.sleep(0.5)
            os._exit(3)

        threading.Thread(target=watch, name="cellkit-parent-watch", daemon=True).start()
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(3)


def tagged_processes(tag: str) -> list[Any]:
    """Live processes (of this user) whose environment has ``CELLKIT_GRID_CELL=tag``, this one excluded."""
    import psutil

    out = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(TAG) == tag and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return out


def end_orphans(tag: str, grace: float = 5.0) -> list[int]:
    """Terminate (then kill) the processes left by an earlier attempt of a cell; returns their pids.

    Call it holding the cell's lock: every live process of the cell then belongs to a dead attempt
    (a kernel whose papermill worker was killed exits on its own within a second or so; this makes
    sure before the next attempt starts).
    """
    import psutil

    procs = tagged_processes(tag)
    if not procs:
        return []
    _, alive = psutil.wait_procs(procs, timeout=min(grace, 2.0))  # most end by themselves
    for p in alive:
        with _quiet_psutil():
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for p in alive:
        with _quiet_psutil():
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
    return [p.pid for p in procs]


class _quiet_psutil:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> bool:
        import psutil

        return typ is not None and issubclass(typ, psutil.Error)


# --------------------------------------------------------------------------------------------
# the task


@dataclass
class CellJob:
    """Everything a worker needs to run one grid cell (pickled to the worker)."""

    run: Any
    """The :class:`~cellkit.ablation.RunSpec`."""
    out_dir: str
    notebook: str
    kernel: str
    threads: dict[str, int] = field(default_factory=dict)
    """Worker address -> CPU threads of a run there (see :class:`cellkit.cluster.Cluster`)."""
    default_threads: int = 1
    lock_timeout: float | None = None
    """Seconds to wait for an earlier attempt still holding the lock (None: wait)."""

    @property
    def lock_path(self) -> Path:
        return Path(self.out_dir) / ".locks" / f"{self.run.name}.lock"


def run_cell(job: CellJob) -> dict[str, Any]:
    """Run one grid cell (the Dask task); returns its ``status.json`` content plus ``action``/``attempt``.

    Raises:
        RunInterrupted: the papermill worker or its kernel was killed; the retry resumes.
        CellBusy: the lock stayed held longer than ``job.lock_timeout``.
    """
    from .ablation import FAILED, OK, _move_aside, read_history, run_action

    r = job.run
    ledger = Ledger(job.out_dir)
    worker, threads = _worker_address(), job.default_threads
    if worker is not None:
        threads = job.threads.get(worker, threads)
    lock = CellLock(job.lock_path)

    def waiting(holder: dict[str, Any] | None) -> None:
        ledger.append("waiting", r.name, holder=holder)

    lock.acquire(timeout=job.lock_timeout, on_wait=waiting, worker=worker)
    try:
        ended = end_orphans(str(lock.path))
        action = run_action(r)
        if action == "skip":
            ledger.append("skipped", r.name, worker=worker)
            status = dict(_read_status(r) or {})
            return {**status, "action": "skip", "attempt": None}
        if action == "replace" and r.folder is not None and r.folder.exists():
            _move_aside(r.folder)
        attempt = ledger.attempts(r.name) + 1
        resume = action == "resume"
        epochs_done = len(read_history(r.run_dir)) if resume else 0

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


def run_notebook(r: Any, notebook: Path, kernel: str, resume: bool, threads: int, attempt: int = 1,
                 lock_fd: int | None = None, tag: str | None = None,
                 on_start: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Execute one run's notebook in a papermill subprocess (its own environment and kernel) and
    write its ``status.json``; returns the status. ``interrupted: True`` marks a run whose
    processes were killed (signal, dead kernel) rather than one whose notebook failed."""
    from .ablation import FAILED, OK, RUNNING, _now, _read_json, _valid_metrics, _write_status

    assert r.folder is not None and r.run_dir is not None
    r.folder.mkdir(parents=True, exist_ok=True)
    (r.folder / "error.txt").unlink(missing_ok=True)
    outcome_path = r.folder / ".outcome.json"
    outcome_path.unlink(missing_ok=True)
    if r.cfg is not None:
        r.cfg.save(r.folder / "config.yaml")
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES") or None
    device = f"cuda:{gpu}" if gpu else "cpu"
    started = time.time()
    _write_status(r, {"status": RUNNING, "started": _now(started), "device": device, "resumed": resume,
                      "attempt": attempt, "host": socket.gethostname(), "worker_pid": os.getpid()})
    job = {
        "notebook": str(notebook), "output": str(r.folder / notebook.name), "cwd": str(r.folder),
        "kernel": kernel, "parameters": r.parameters(resume), "outcome": str(outcome_path),
    }
    from .outputs import write_json

    write_json(job, r.folder / "job.json", indent=1, default=str)
    env = job_env(threads)
    env[PARENT] = str(os.getpid())
    env[ATTEMPT] = str(attempt)
    if tag is not None:
        env[TAG] = tag
    with open(r.folder / "log.txt", "ab") as log:
        log.write(f"\n== {_now(started)} attempt {attempt}: {'resuming' if resume else 'running'} {r.name} "
                  f"on {socket.gethostname()} ({'GPU ' + gpu if gpu else f'CPU, {threads} threads'})\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "cellkit.ablation", "--worker", str(r.folder / "job.json")],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                pass_fds=(lock_fd,) if lock_fd is not None else (), start_new_session=True)
        if on_start is not None:
            on_start(proc.pid)
        try:
            returncode = proc.wait()
        except BaseException:  # the task is being cancelled: take the run's processes down with it
            _kill_group(proc)
            raise
    outcome = _read_json(outcome_path)
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
        "status": outcome.get("status", FAILED), "started": _now(started), "finished": _now(t1),
        "wall_seconds": round(t1 - started, 1), "started_unix": started, "finished_unix": t1, "device": device,
        "resumed": resume, "attempt": attempt, "notebook": str(r.folder / notebook.name), "returncode": returncode,
    }
    if status["status"] == OK and not _valid_metrics(r.run_dir / "metrics.json"):
        status.update(status=FAILED, ename="MissingMetrics",
                      evalue=f"the notebook finished but {r.run_dir / 'metrics.json'} is missing or invalid")
    elif status["status"] != OK:
        status.update(status=FAILED, ename=outcome.get("ename"), evalue=outcome.get("evalue"),
                      cell=outcome.get("cell"), cell_index=outcome.get("cell_index"))
    if status["status"] == FAILED:
        status["error"] = f"{status.get('ename') or 'Error'}: {status.get('evalue') or ''}".strip()
        where = f" (notebook cell In [{status['cell']}])" if status.get("cell") is not None else ""
        text = f"{status['error']}{where}\n\n{outcome.get('traceback') or ''}\nlog: {r.folder / 'log.txt'}\n"
        (r.folder / "error.txt").write_text(text)
    if interrupted:
        status.update(status="interrupted", interrupted=True)
    return _write_status(r, status)


def job_env(threads: int) -> dict[str, str]:
    """The papermill worker's (and its kernel's) environment: this one, with ``threads`` CPU threads
    (a Dask worker sets OMP_NUM_THREADS=1 for itself; the run gets its share of the cores)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(max(1, int(threads)))
    env.setdefault("CELLKIT_PROGRESS", "0")  # no tqdm widgets in the executed notebooks
    pkg_root = str(Path(__file__).resolve().parents[1])  # the kernel imports this cellkit
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
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def _read_status(r: Any) -> dict[str, Any] | None:
    from .ablation import _read_json

    return _read_json(r.folder / "status.json") if r.folder is not None else None
