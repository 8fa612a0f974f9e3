"""``OUT/ledger.jsonl``: every event of a grid, appended, never rewritten."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from .status import LEDGER_FILE, timestamp


class Ledger:
    """``OUT/ledger.jsonl``: one JSON line per event, appended, never rewritten.

    Events: ``grid-started`` / ``grid-finished`` (the runner), and per run ``started`` (with
    ``attempt``, ``action`` run/resume, ``epochs_done``, the worker's and the papermill
    subprocess's pids), ``waiting`` (for an earlier attempt's lock), ``skipped``, ``finished``,
    ``failed``, ``interrupted``. Each line has ``time`` (ISO), ``t`` (unix), ``host`` and ``pid``.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.path = Path(out_dir) / LEDGER_FILE

    def append(self, event: str, run: str | None = None, **fields: Any) -> dict[str, Any]:
        """Append one event (whole lines under an exclusive lock, so writers never interleave)."""
        t = time.time()
        rec = {"time": timestamp(t), "t": round(t, 3), "event": event, "run": run, "host": socket.gethostname(),
               "pid": os.getpid(), **fields}
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
