"""Run every run of a grid on a Dask cluster, follow it, and tabulate the results.

Each run is one task (:func:`cellkit.grid.task.run_task`) on a Dask distributed cluster
(:mod:`cellkit.grid.cluster`: a LocalCluster by default, a running scheduler, or SLURM) that
executes the training notebook with papermill in its own kernel (a separate process, so every run
gets its own environment: ``CUDA_VISIBLE_DEVICES`` when there are GPUs, a share of the CPU
threads otherwise) into ``OUT/<run name>/`` (:mod:`cellkit.grid.status` lists the files).

A run whose ``status.json`` says ok with the same settings and whose ``run/metrics.json`` is valid
is skipped on re-run; a failed or interrupted run is resumed from its last checkpoint; a run
whose settings changed is started again (the old folder is kept as ``<name>.replaced-<time>``). A
run whose worker dies is retried (``retries``) and resumes; the runner may be killed and started
again: nothing keeps running behind it and no run executes twice at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from distributed import wait
from tqdm.auto import tqdm

from ..errors import CellkitError, ConfigError
from ..outputs import check_writable_dir, write_json
from ..progress import bar
from ..runs import RunDir
from .cluster import Cluster, ClusterSpec, open_cluster, parse_cluster, threads_per_worker, visible_gpus
from .ledger import Ledger
from .results import collect_results, save_plots
from .spec import GridSpec, RunSpec, baseline_of, expand_grid, load_grid, notebook_kernel
from .status import (
    ERROR_FILE,
    FAILED,
    GRID_FILE,
    LOCKS,
    LOG_FILE,
    OK,
    fmt_seconds,
    one_line,
    read_status,
    run_action,
    write_status,
)
from .task import RunBusy, RunLock, RunTask, run_task

Say = Callable[[str], None]


def run_grid(
    spec: "str | os.PathLike[str] | Mapping[str, Any] | GridSpec",
    out_dir: str | os.PathLike[str],
    jobs: int | None = None,
    gpus: Sequence[int | str] | None = None,
    data: str | os.PathLike[str] | None = None,
    extra_overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    cluster: "str | Any | None" = None,
    retries: int = 2,
    lock_timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Run every run of the grid on a Dask cluster and return the results table rows.

    Each run is one task: it executes the notebook through papermill in its own kernel and folder.
    Finished runs are skipped, failed ones recorded (``status.json``, ``error.txt``) and the grid
    goes on. A run whose worker dies (or whose kernel is killed) is retried up to ``retries`` times
    and the retry resumes from the run's ``checkpoints/last.pth``. Everything that happens is
    appended to ``OUT/ledger.jsonl`` (see :class:`cellkit.grid.ledger.Ledger`). The runner itself
    may be killed and started again on the same folder: finished runs are skipped, the interrupted
    one resumes, a run never executes twice at once (``OUT/.locks/<run>.lock``) and nothing is
    left running (the workers, their papermill subprocesses and kernels die with the runner).

    The rows (see :func:`cellkit.grid.results.collect_results`) carry an extra ``action`` (see
    :func:`cellkit.grid.status.run_action`): ``run``, ``resume``, ``skip`` or ``replace``. A local
    cluster's workers are spawned processes that import the main module again: in a script, call
    this under ``if __name__ == "__main__":``.

    Args:
        spec: see :func:`cellkit.grid.spec.load_grid`.
        out_dir: the grid's output folder (on a file system every worker sees, for a remote cluster).
        jobs: shorthand for ``cluster="local:N"`` (0: one worker per GPU).
        gpus: GPU ids a local cluster spreads its workers over (default: the visible CUDA devices);
            each worker gets one in ``CUDA_VISIBLE_DEVICES``. Without GPUs the CPU cores are split
            between the workers.
        data: dataset folder for every run (else the grid's ``data``, else synthetic data).
        extra_overrides: dotted keys applied to every run after the grid's own.
        progress: a bar over the runs and one line per event (start, retry, finish).
        cluster: ``local`` (default), ``local:N``, ``tcp://HOST:PORT`` or ``slurm[:N]``
            (:func:`cellkit.grid.cluster.parse_cluster`), or an open ``distributed.Client``.
        retries: how often a run whose processes were killed is started again.
        lock_timeout: seconds a task waits for an earlier attempt of its run that still holds the
            run's lock (None: until it ends).

    Raises:
        CellkitError: an invalid grid or config (before any run starts), a missing notebook, a
            malformed cluster spec, or another live runner on the same folder.
    """
    g = load_grid(spec)
    out = Path(out_dir).expanduser().resolve()
    runs = expand_grid(g, out, data=data, extra_overrides=extra_overrides)
    if not g.notebook.is_file():
        raise CellkitError(f"{g.notebook}: notebook not found (set 'notebook:' in the grid or pass --notebook)")
    kernel = g.kernel or notebook_kernel(g.notebook)
    client = None
    if cluster is not None and not isinstance(cluster, str) and hasattr(cluster, "submit"):
        client = cluster
    elif jobs is not None and cluster is None:
        cluster = f"local:{jobs}" if jobs > 0 else "local"
    cspec = parse_cluster(cluster) if client is None else None
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"retries must be a non-negative integer, got {retries!r}")
    check_writable_dir(out, "grid output folder")
    out.mkdir(parents=True, exist_ok=True)
    runner_lock = RunLock(out / LOCKS / "runner.lock")
    try:
        runner_lock.acquire(timeout=0, cluster=str(cspec or client))
    except RunBusy:
        h = runner_lock.holder() or {}
        raise CellkitError(f"{out}: this grid is being run by pid {h.get('pid', '?')} on {h.get('host', '?')} "
                           f"(since {h.get('since', '?')}); wait for it or stop it first") from None
    try:
        return _run_locked(g, runs, out, kernel, client, cspec, gpus, progress, retries, lock_timeout)
    finally:
        runner_lock.release()


def _run_locked(g: GridSpec, runs: list[RunSpec], out: Path, kernel: str, client: Any, cspec: ClusterSpec | None,
                gpus: Sequence[int | str] | None, progress: bool, retries: int,
                lock_timeout: float | None) -> list[dict[str, Any]]:
    ledger = Ledger(out)
    write_json({
        "name": g.name, "source": str(g.source) if g.source else None, "notebook": str(g.notebook),
        "kernel": kernel, "baseline": baseline_of(g, runs),
        "runs": [{"name": r.name, "configuration": r.configuration, "seed": r.seed, "reported": r.reported,
                  **r.settings()} for r in runs],
    }, out / GRID_FILE, indent=1, default=str)
    plan = [(r, run_action(r)) for r in runs]
    actions = {r.name: action for r, action in plan}
    todo = [(i, r) for i, (r, action) in enumerate(plan) if action != "skip"]
    say: Say = _say if progress else (lambda msg: None)
    pbar = bar(total=len(runs), desc=f"grid {g.name}", enabled=progress, leave=True, unit="run")
    for r, action in plan:
        if action == "skip":
            say(f"{r.name}: finished before, skipped")
            pbar.update(1)
    if todo:
        if client is not None:
            info = client.scheduler_info()["workers"]
            opened: Any = contextlib.nullcontext(Cluster(
                client, None, "the given client", any("GPU" in (w.get("resources") or {}) for w in info.values()),
                threads_per_worker(client, info)))
        else:
            assert cspec is not None
            if cspec.kind == "local":  # no more local workers than runs left to do
                n = cspec.workers or max(1, len(visible_gpus() if gpus is None else gpus))
                cspec = dataclasses.replace(cspec, workers=min(n, len(todo)))
            opened = open_cluster(cspec, gpus, retries)
        with opened as cl:
            ledger.append("grid-started", cluster=cl.description, runs=[r.name for _, r in todo])
            say(f"grid {g.name}: {len(todo)} of {len(runs)} runs on {cl.description}")
            threads = {a: cl.threads_for(a) for a in cl.threads}
            default_threads = min(threads.values(), default=cl.threads_for(None))
            futures = {}
            for i, r in todo:
                task = RunTask(r, str(out), str(g.notebook), kernel, threads, default_threads, lock_timeout)
                fut = cl.client.submit(run_task, task, key=f"cellkit-{r.name}-{os.urandom(4).hex()}", pure=False,
                                       retries=retries, priority=len(runs) - i,
                                       resources={"GPU": 1} if cl.gpu_resources else None)
                futures[fut] = r
            try:
                _follow(futures, ledger, say, pbar)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
            finally:
                pbar.close()
                ledger.append("grid-finished")
    else:
        pbar.close()

    rows = collect_results(out, progress=progress)
    for row in rows:
        row["action"] = actions.get(row["name"])
    save_plots(out, rows)
    return rows


def _follow(futures: dict[Any, RunSpec], ledger: Ledger, say: Say, pbar: Any) -> None:
    """Wait for the tasks; print each run's events from the ledger as they happen and its final line."""
    seen = len(ledger.read())
    pending = set(futures)
    while pending:
        try:
            done, pending = wait(pending, timeout=1.0, return_when="FIRST_COMPLETED")
        except TimeoutError:  # distributed raises the builtin since 2023
            done = set()
        events = ledger.read(seen)
        seen += len(events)
        for e in events:
            line = event_line(e)
            if line:
                say(line)
        for fut in done:
            r = futures[fut]
            if fut.status == "finished":
                status = fut.result()
                if status.get("action") == "skip":
                    say(f"{r.name}: finished elsewhere meanwhile, skipped")
                else:
                    say(status_line(r, status))
            else:
                err = _task_error(fut.exception())
                ledger.append("failed", r.name, error=err)
                previous = read_status(r) or {}
                status = write_status(r, {**{k: v for k, v in previous.items() if k not in ("name", "settings")},
                                          "status": FAILED, "error": err, "interrupted": False})
                if r.folder is not None:
                    (r.folder / ERROR_FILE).write_text(err + f"\n\nlog: {r.folder / LOG_FILE}\n")
                say(status_line(r, status))
            pbar.update(1)


def _task_error(exc: BaseException | None) -> str:
    name = type(exc).__name__
    if name == "KilledWorker":
        return "KilledWorker: the workers running this run died too many times (the scheduler's allowed-failures)"
    return f"{name}: {exc}"


def event_line(e: Mapping[str, Any]) -> str | None:
    """The progress line of a ledger event (None: not worth a line)."""
    run, ev = e.get("run"), e.get("event")
    if ev == "started":
        what = (f"resuming after epoch {e.get('epochs_done')}" if e.get("action") == "resume" else "started")
        more = f" (attempt {e['attempt']})" if (e.get("attempt") or 1) > 1 else ""
        return f"{run}: {what}{more} on {e.get('worker') or e.get('host')}"
    if ev == "waiting":
        h = e.get("holder") or {}
        return f"{run}: waiting for an earlier attempt (pid {h.get('pid', '?')} on {h.get('host', '?')}) to end"
    if ev == "interrupted":
        return f"{run}: attempt {e.get('attempt')} interrupted ({one_line(e.get('error'), 120)}); retrying"
    return None


def status_line(r: RunSpec, status: Mapping[str, Any]) -> str:
    """The one line printed when a run ends: its best val AP50 and time, or its error."""
    t = fmt_seconds(status.get("wall_seconds"))
    if status.get("status") == OK:
        m = RunDir(r.run_dir).summary() if r.run_dir else None
        ap = (m or {}).get("best_val_ap50")
        best = f"best val AP50 {ap:.4f} (epoch {(m or {}).get('best_epoch')})" if ap is not None else "no validation AP50"
        return f"{r.name}: ok, {best}, {t}"
    return f"{r.name}: FAILED after {t}: {one_line(status.get('error'))} (see {r.folder}/{ERROR_FILE})"


def _say(msg: str) -> None:
    tqdm.write(msg)
    sys.stdout.flush()
