"""The papermill worker of a grid's run: ``python -m cellkit.grid.worker JOB.json`` (internal).

It executes one run's notebook (``job.json``: notebook, output, parameters, kernel, cwd) with
papermill's Python API and writes its outcome (ok, or the failing cell's error and traceback) to
``job["outcome"]``. Not the bare ``papermill`` CLI with a per-job environment: the CLI cannot die
with its parent (this calls ``prctl(PR_SET_PDEATHSIG)`` first, so a killed Dask worker leaves no
training behind; the kill -9 tests rely on it), reports a failure only as text on stderr (the
grid needs the cell, error name and traceback as data for ``status.json`` and ``error.txt``), and
takes parameters as command-line strings whose types it guesses (``-p``) or as YAML text
(``-y``), where ``job.json`` hands the overrides' exact JSON values straight to the API.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Iterable

import papermill as pm
from papermill.exceptions import PapermillExecutionError

from ..outputs import write_json
from .processes import PARENT, die_with_parent
from .status import FAILED, OK


def run_job(job_path: str) -> int:
    """Execute the notebook of ``job_path`` and write its outcome; returns the exit status (0: ok)."""
    parent = os.environ.get(PARENT)
    # no orphan if the task's worker dies; a parent that died while this started is caught here too
    die_with_parent(int(parent) if parent and parent.isdigit() else None)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    job = json.loads(Path(job_path).read_text())
    print(f"python {sys.executable}; kernel {job['kernel']}; parameters {json.dumps(job['parameters'])}", flush=True)
    outcome: dict[str, Any]
    try:
        pm.execute_notebook(job["notebook"], job["output"], parameters=job["parameters"], kernel_name=job["kernel"],
                            cwd=job["cwd"], progress_bar=False, log_output=True)
        outcome = {"status": OK}
    except PapermillExecutionError as e:
        outcome = {"status": FAILED, "ename": e.ename, "evalue": e.evalue, "cell": e.exec_count,
                   "cell_index": e.cell_index, "traceback": strip_ansi("\n".join(e.traceback or []))}
    except Exception as e:  # kernel died, notebook unreadable, ...
        outcome = {"status": FAILED, "ename": type(e).__name__, "evalue": str(e), "traceback": traceback.format_exc()}
    write_json(outcome, Path(job["outcome"]), indent=1, default=str)
    return 0 if outcome["status"] == OK else 1


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes (papermill's tracebacks carry them)."""
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def main(argv: Iterable[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 1:
        return run_job(args[0])
    print("usage: python -m cellkit.grid.worker JOB.json (internal; use `cellkit ablate`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
