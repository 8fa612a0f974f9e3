"""The files of a grid's output folder, each run's ``status.json``, and what to do with a run.

::

    OUT/grid.json                    the expanded grid (run order, settings)
    OUT/ledger.jsonl                 append-only: every start (attempt n), finish, failure, retry
    OUT/<name>/02_training.ipynb     the executed notebook
    OUT/<name>/run/                  the run directory (:mod:`cellkit.runs`)
    OUT/<name>/status.json           ok / failed / running / interrupted, times, the error of a failed run
    OUT/<name>/error.txt             the failing cell's error and traceback (failed runs only)
    OUT/<name>/log.txt               the worker's log (cell outputs), every attempt
    OUT/<name>/job.json              the papermill call (notebook, kernel, parameters)
    OUT/results.json, results.md     the configurations compared with the baseline, and every run
    OUT/ap50.png, curves.png         each run's AP50 with its interval; every run's curves
    OUT/forest.png                   each configuration's difference to the baseline, with its interval
    OUT/.locks/                      the runner's and each run's lock (fcntl)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from ..outputs import write_json
from ..runs import RunDir, read_json
from .spec import RunSpec

OK, FAILED, RUNNING, PENDING, INTERRUPTED = "ok", "failed", "running", "pending", "interrupted"

GRID_FILE = "grid.json"
LEDGER_FILE = "ledger.jsonl"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
LOCKS = ".locks"
STATUS_FILE = "status.json"
ERROR_FILE = "error.txt"
LOG_FILE = "log.txt"
JOB_FILE = "job.json"
OUTCOME_FILE = ".outcome.json"


def read_status(r: RunSpec) -> dict[str, Any] | None:
    """The run's ``status.json`` (None when there is none, or it is unreadable)."""
    return read_json(r.folder / STATUS_FILE) if r.folder is not None else None


def write_status(r: RunSpec, status: Mapping[str, Any]) -> dict[str, Any]:
    """Write the run's ``status.json`` (atomically) with its name and settings; returns what was written."""
    assert r.folder is not None
    full = {"name": r.name, **status, "settings": r.settings()}
    write_json(full, r.folder / STATUS_FILE, indent=1, default=str)
    return full


def finished(r: RunSpec) -> bool:
    """The run's ``run/metrics.json`` holds a complete summary."""
    return r.run_dir is not None and RunDir(r.run_dir).summary() is not None


def run_action(r: RunSpec) -> str:
    """What the grid runner will do with a run: ``skip`` (finished with the same settings),
    ``resume`` (same settings, unfinished, a checkpoint to continue from), ``run`` (nothing there
    yet, or no checkpoint) or ``replace`` (its folder holds a run with other settings: kept aside
    as ``<name>.replaced-<time>``, then run). Looks only; changes nothing."""
    assert r.folder is not None and r.run_dir is not None
    status = read_status(r)
    if status is None:
        return "replace" if r.folder.exists() and any(r.folder.iterdir()) else "run"
    if status.get("settings") != r.settings():
        return "replace"
    if status.get("status") == OK and finished(r):
        return "skip"
    return "resume" if RunDir(r.run_dir).checkpoint("last").is_file() else "run"


def move_aside(folder: Path) -> Path:
    """Keep an older run whose settings differ: ``<name>`` -> ``<name>.replaced-<time>``; returns the new path."""
    target = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    folder.rename(target)
    return target


def timestamp(t: float) -> str:
    """``2026-12-03T10:11:12`` (local time) of a unix time."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def one_line(text: Any, limit: int = 200) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    line = " ".join(str(text or "").split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def fmt_seconds(s: Any) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``; ``-`` for None."""
    if s is None:
        return "-"
    s = float(s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
