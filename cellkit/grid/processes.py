"""The processes of a grid's run: tagged so a later attempt can find them, and dying with their parent."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any

import psutil

TAG = "CELLKIT_GRID_RUN"
"""Environment variable that marks every process of a grid's run (value: the run's lock path)."""
ATTEMPT = "CELLKIT_GRID_ATTEMPT"
"""Environment variable with the attempt number (1, 2, ...) of the run in that process."""
PARENT = "CELLKIT_GRID_PARENT"
"""The pid of the task process that started the papermill worker (it exits if that one is gone)."""


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
    """Terminate (then kill) the processes left by an earlier attempt of a run; returns their pids.

    Call it holding the run's lock: every live process of the run then belongs to a dead attempt
    (a kernel whose papermill worker was killed exits on its own within a second or so; this makes
    sure before the next attempt starts).
    """
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
            return typ is not None and issubclass(typ, psutil.Error)
