"""Ablation grids: many runs of the training notebook through papermill, one table at the end.

A grid spec (a YAML file, a grid name from the shipped grids ``cellkit/recipes/grids/``, linked as
``configs/grids/``, or a dict) names the runs::

    name: tiny                       # the grid's name
    notebook: notebooks/02_training.ipynb   # the default (shipped in the package); else relative to the grid file or the cwd
    config: demo                     # base recipe of every run (recipe name or YAML path)
    overrides: {train.epochs: 1}     # dotted keys applied to every run
    data: null                       # dataset folder (hw3 layout); null: the synthetic dataset
    grid:                            # cartesian product -> one run per combination
      model.backbone: [resnet18, mobilenet_v3_large]
      train.scheduler: [constant, cosine]
    runs:                            # explicit runs (each crossed with the grid when both are given)
      - {name: cbam, config: ablation/resnet50_cbam, overrides: {train.lr: 0.001}, reported: 0.3617}

Each run is one task on a Dask distributed cluster (:mod:`cellkit.cluster`: a LocalCluster by
default, a running scheduler, or SLURM) that executes the notebook with papermill in its own
kernel (a separate process, so every run gets its own environment: ``CUDA_VISIBLE_DEVICES`` when
there are GPUs, a share of the CPU threads otherwise) into ``OUT/<run name>/``
(:mod:`cellkit.gridcell`)::

    OUT/grid.json                    the expanded grid (run order, settings)
    OUT/ledger.jsonl                 append-only: every start (attempt n), finish, failure, retry
    OUT/<name>/02_training.ipynb     the executed notebook
    OUT/<name>/config.yaml           the resolved config of the run
    OUT/<name>/run/                  the run directory (metrics.json, metrics.jsonl, checkpoints/,
                                     TensorBoard event files ...)
    OUT/<name>/status.json           ok / failed / running / interrupted, times, the error of a failed run
    OUT/<name>/error.txt             the failing cell's error and traceback (failed runs only)
    OUT/<name>/log.txt               the worker's log (cell outputs), every attempt
    OUT/<name>/job.json              the papermill call (notebook, kernel, parameters)
    OUT/results.json, results.md     the results table; OUT/ap50.png, OUT/curves.png its plots
    OUT/.locks/                      the runner's and each run's lock (fcntl)

A run whose ``status.json`` says ok with the same settings and whose ``run/metrics.json`` is valid
is skipped on re-run; a failed or interrupted run is resumed from its last checkpoint; a run whose
settings changed is started again (the old folder is kept as ``<name>.replaced-<time>``). A run
whose worker dies is retried (``retries``) and resumes; the runner may be killed and started
again: nothing keeps running behind it and no run executes twice at once.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from .config import Config, load_config, resolve_config_path
from .errors import CellkitError, ConfigError, DataError
from .outputs import write_json
from .resources import GRIDS, NOTEBOOKS
from .resources import TRAINING_NOTEBOOK as DEFAULT_NOTEBOOK

GRID_KEYS = ("name", "description", "notebook", "kernel", "config", "overrides", "data", "grid", "runs")
RUN_KEYS = ("name", "config", "overrides", "reported")
OK, FAILED, RUNNING, PENDING = "ok", "failed", "running", "pending"


# --------------------------------------------------------------------------------------------
# the spec


@dataclass(frozen=True)
class GridSpec:
    """A parsed grid file (see the module docstring for the keys)."""

    name: str
    notebook: Path
    config: str
    overrides: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    grid: dict[str, list[Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    kernel: str | None = None
    """Jupyter kernel name (None: the one named in the notebook's metadata, else ``python3``)."""
    description: str = ""
    source: Path | None = None
    """The YAML file it came from (None: a dict)."""


@dataclass
class RunSpec:
    """One run of a grid: the notebook's ``config``, ``overrides`` and ``data`` parameters."""

    name: str
    config: str
    """Recipe name or absolute YAML path, as passed to the notebook."""
    overrides: dict[str, Any]
    """Dotted keys -> values (grid-wide, then the run's, then the grid point's, then extra ones)."""
    run_dir: Path | None
    """Where the notebook trains (``OUT/<name>/run``); None when expanded without an output folder."""
    data: str | None = None
    reported: float | None = None
    """The number a report gives for this run (shown beside the result)."""
    cfg: Config | None = field(default=None, repr=False, compare=False)
    """The resolved, validated config (what the notebook will build)."""

    @property
    def folder(self) -> Path | None:
        """``OUT/<name>``: the executed notebook, status and logs of the run."""
        return self.run_dir.parent if self.run_dir is not None else None

    def settings(self) -> dict[str, Any]:
        """What identifies the run for skipping: config reference, overrides and data (JSON-plain)."""
        return json.loads(json.dumps({"config": self.config, "overrides": self.overrides, "data": self.data}))

    def parameters(self, resume: bool = False) -> dict[str, Any]:
        """The papermill parameters of the training notebook (a run not resumed replaces
        whatever an earlier attempt without a checkpoint to resume from left in its run folder)."""
        return {
            "config": self.config, "overrides": json.loads(json.dumps(self.overrides)), "data": self.data,
            "run_dir": str(self.run_dir) if self.run_dir is not None else None,
            "resume": resume, "overwrite": not resume, "interactive": False,
        }


def load_grid(spec: "str | os.PathLike[str] | Mapping[str, Any] | GridSpec") -> GridSpec:
    """Parse a grid: a YAML path, a grid name from ``configs/grids/``, a dict, or a :class:`GridSpec`.

    Raises:
        ConfigError: unreadable file, unknown key (with a suggestion), malformed ``grid``/``runs``.
    """
    if isinstance(spec, GridSpec):
        return spec
    source: Path | None = None
    if isinstance(spec, Mapping):
        raw = dict(spec)
        base = Path.cwd()
    else:
        source = _resolve_grid_path(spec)
        try:
            raw = yaml.safe_load(source.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a grid is a mapping of keys ({', '.join(GRID_KEYS)})")
        base = source.parent
    where = str(source) if source else "grid"
    _check_keys(raw, GRID_KEYS, where)
    name = str(raw.get("name") or (source.stem if source else "grid"))

    grid = raw.get("grid") or {}
    if not isinstance(grid, Mapping):
        raise ConfigError(f"{where}: 'grid' maps dotted config keys to lists of values, e.g. train.lr: [0.001, 0.0001]")
    grid = _flatten(grid, where + ": grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid key '{key}' needs a non-empty list of values, got {values!r}")
    runs = raw.get("runs") or []
    if not isinstance(runs, list):
        raise ConfigError(f"{where}: 'runs' is a list of {{name, config, overrides}} mappings")
    parsed_runs = []
    for i, run in enumerate(runs):
        if isinstance(run, str):  # a bare recipe name
            run = {"config": run}
        if not isinstance(run, Mapping):
            raise ConfigError(f"{where}: runs[{i}] must be a mapping with keys {', '.join(RUN_KEYS)}, got {run!r}")
        _check_keys(run, RUN_KEYS, f"{where}: runs[{i}]")
        run = dict(run)
        run["overrides"] = _flatten(run.get("overrides") or {}, f"{where}: runs[{i}].overrides")
        if run.get("config") is not None:
            run["config"] = _resolve_config_ref(run["config"], base, f"{where}: runs[{i}]")
        if run.get("reported") is not None and not isinstance(run["reported"], (int, float)):
            raise ConfigError(f"{where}: runs[{i}].reported must be a number, got {run['reported']!r}")
        parsed_runs.append(run)
    if not grid and not parsed_runs:
        raise ConfigError(f"{where}: nothing to run; give 'grid:' (key -> list of values) and/or 'runs:'")
    if "config" in grid:
        grid["config"] = [_resolve_config_ref(c, base, f"{where}: grid.config") for c in grid["config"]]
    return GridSpec(
        name=name,
        notebook=_resolve_notebook(raw.get("notebook"), base),
        config=_resolve_config_ref(raw.get("config") or "demo", base, where),
        overrides=_flatten(raw.get("overrides") or {}, f"{where}: overrides"),
        data=str(raw["data"]) if raw.get("data") else None,
        grid=grid,
        runs=parsed_runs,
        kernel=raw.get("kernel"),
        description=str(raw.get("description") or ""),
        source=source,
    )


def expand_grid(
    spec: "str | os.PathLike[str] | Mapping[str, Any] | GridSpec",
    out_dir: str | os.PathLike[str] | None = None,
    *,
    data: str | os.PathLike[str] | None = None,
    extra_overrides: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> list[RunSpec]:
    """The runs of a grid, in order: each explicit run (or the base config) x each grid point.

    Names join the run's name and the grid point's values: ``model.backbone=resnet50_se,
    train.scheduler=plateau`` -> ``resnet50_se-plateau``; numbers, booleans and lists keep their
    key (``train.lr=0.001`` -> ``lr=0.001``).

    Args:
        spec: see :func:`load_grid`.
        out_dir: the grid's output folder (sets each run's ``run_dir`` to ``out_dir/<name>/run``).
        data: dataset folder for every run (overrides the grid's ``data``).
        extra_overrides: dotted keys applied after everything else (``cellkit ablate --set``).
        validate: build every run's config with :func:`cellkit.load_config` now, so a typo fails
            before anything starts.

    Raises:
        ConfigError: an invalid config in any run (naming the run), or duplicate run names.
        DataError: ``data`` is not a folder.
    """
    g = load_grid(spec)
    where = str(g.source) if g.source else f"grid {g.name}"
    data_str = str(data) if data is not None else g.data
    if data_str is not None:
        data_path = Path(data_str).expanduser().resolve()
        if not data_path.is_dir():
            raise DataError(data_path, "dataset folder not found (the grid's data / --data)")
        data_str = str(data_path)
    extra = _flatten(dict(extra_overrides or {}), "extra overrides")
    keys = list(g.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(g.grid[k] for k in keys))] or [{}]
    base_runs = g.runs or [{}]
    out: list[RunSpec] = []
    for i, run in enumerate(base_runs):
        for point in points:
            config = point.get("config", run.get("config") or g.config)
            overrides = {**g.overrides, **run.get("overrides", {}),
                         **{k: v for k, v in point.items() if k != "config"}, **extra}
            parts = [_run_base_name(run, i, len(base_runs), g)] + [_slug(k, v) for k, v in point.items()]
            name = _safe_name("-".join(p for p in parts if p) or g.name)
            run_dir = Path(out_dir) / name / "run" if out_dir is not None else None
            out.append(RunSpec(name, config, overrides, run_dir, data_str, run.get("reported")))
    counts: dict[str, int] = {}
    for r in out:
        counts[r.name] = counts.get(r.name, 0) + 1
    dupes = sorted(n for n, c in counts.items() if c > 1)
    if dupes:
        raise ConfigError(f"{where}: runs share a name ({', '.join(dupes)}); give each explicit run a distinct 'name'")
    if validate:
        for r in out:
            try:
                r.cfg = load_config(r.config, {**r.overrides, **({"data.root": r.data} if r.data else {})})
            except ConfigError as e:
                raise ConfigError(f"{where}: run '{r.name}': {e}") from None
    return out


def format_plan(grid: GridSpec, runs: list[RunSpec], actions: list[str], out: Any) -> str:
    """The dry-run listing: each run, what would happen to it, its config and key settings."""
    lines = [f"grid {grid.name}: {len(runs)} runs -> {out}",
             f"notebook: {grid.notebook}" + ("" if grid.notebook.is_file() else "  (MISSING)")]
    if runs and runs[0].data:
        lines.append(f"data: {runs[0].data}")
    common = {k: v for k, v in runs[0].overrides.items() if all(k in r.overrides and r.overrides[k] == v for r in runs)}
    if common and len(runs) > 1:
        lines.append("every run: " + " ".join(f"{k}={_as_written(v)}" for k, v in common.items()))
    else:
        common = {}
    width = max(len(r.name) for r in runs)
    words = {"skip": "finished, skip", "resume": "resume", "run": "run", "replace": "settings changed, run again"}
    for r, action in zip(runs, actions):
        cfg = r.cfg
        lines.append(f"  {r.name:<{width}}  [{words[action]}]  config {r.config}")
        if cfg is not None:
            m, t = cfg.model, cfg.train
            lines.append(f"  {'':<{width}}    backbone {m.backbone} (attention {attention_of(m.backbone)}), "
                         f"weights {m.weights}, {t.optimizer} lr {t.lr:g}, "
                         f"scheduler {scheduler_label(dataclasses.asdict(t))}, {t.epochs} epochs")
        own = {k: v for k, v in r.overrides.items() if k not in common}
        if own:
            lines.append(f"  {'':<{width}}    " + " ".join(f"{k}={_as_written(v)}" for k, v in own.items()))
    return "\n".join(lines)


def _as_written(v: Any) -> str:
    """An override value as a grid file writes it (strings bare, the rest as JSON)."""
    return v if isinstance(v, str) else json.dumps(v)


# --------------------------------------------------------------------------------------------
# running


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
    """Run every cell of the grid on a Dask cluster and return the results table rows.

    Each run is one task: it executes the notebook through papermill in its own kernel and folder.
    Finished runs are skipped, failed ones recorded (``status.json``, ``error.txt``) and the grid
    goes on. A run whose worker dies (or whose kernel is killed) is retried up to ``retries`` times
    and the retry resumes from the run's ``checkpoints/last.pth``. Everything that happens is
    appended to ``OUT/ledger.jsonl`` (see :class:`cellkit.gridcell.Ledger`). The runner itself may
    be killed and started again on the same folder: finished runs are skipped, the interrupted one
    resumes, a run never executes twice at once (``OUT/.locks/<run>.lock``) and nothing is left
    running (the workers, their papermill subprocesses and kernels die with the runner).

    The rows (see :func:`collect_results`) carry an extra ``action`` (see :func:`run_action`):
    ``run``, ``resume``, ``skip`` or ``replace``. A local cluster's workers are spawned processes
    that import the main module again: in a script, call this under ``if __name__ == "__main__":``.

    Args:
        spec: see :func:`load_grid`.
        out_dir: the grid's output folder (on a file system every worker sees, for a remote cluster).
        jobs: shorthand for ``cluster="local:N"`` (0: one worker per GPU).
        gpus: GPU ids a local cluster spreads its workers over (default: the visible CUDA devices);
            each worker gets one in ``CUDA_VISIBLE_DEVICES``. Without GPUs the CPU cores are split
            between the workers.
        data: dataset folder for every run (else the grid's ``data``, else synthetic data).
        extra_overrides: dotted keys applied to every run after the grid's own.
        progress: a bar over the runs and one line per event (start, retry, finish).
        cluster: ``local`` (default), ``local:N``, ``tcp://HOST:PORT`` or ``slurm[:N]``
            (:func:`cellkit.cluster.parse_cluster`), or an open ``distributed.Client``.
        retries: how often a run whose processes were killed is started again.
        lock_timeout: seconds a task waits for an earlier attempt of its run that still holds the
            run's lock (None: until it ends).

    Raises:
        CellkitError: an invalid grid or config (before any run starts), a missing notebook, a
            malformed cluster spec, or another live runner on the same folder.
    """
    from .cluster import parse_cluster
    from .gridcell import CellLock

    g = load_grid(spec)
    out = Path(out_dir).expanduser().resolve()
    runs = expand_grid(g, out, data=data, extra_overrides=extra_overrides)
    if not g.notebook.is_file():
        raise CellkitError(f"{g.notebook}: notebook not found (set 'notebook:' in the grid or pass --notebook)")
    kernel = g.kernel or _notebook_kernel(g.notebook)
    client = None
    if cluster is not None and not isinstance(cluster, str) and hasattr(cluster, "submit"):
        client = cluster
    elif jobs is not None and cluster is None:
        cluster = f"local:{jobs}" if jobs > 0 else "local"
    cspec = parse_cluster(cluster) if client is None else None
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"retries must be a non-negative integer, got {retries!r}")
    from .outputs import check_writable_dir

    check_writable_dir(out, "grid output folder")
    out.mkdir(parents=True, exist_ok=True)
    runner_lock = CellLock(out / ".locks" / "runner.lock")
    try:
        runner_lock.acquire(timeout=0, cluster=str(cspec or client))
    except CellkitError:
        h = runner_lock.holder() or {}
        raise CellkitError(f"{out}: this grid is being run by pid {h.get('pid', '?')} on {h.get('host', '?')} "
                           f"(since {h.get('since', '?')}); wait for it or stop it first") from None
    try:
        return _run_grid_locked(g, runs, out, kernel, client, cspec, gpus, progress, retries, lock_timeout)
    finally:
        runner_lock.release()


def _run_grid_locked(g: GridSpec, runs: list[RunSpec], out: Path, kernel: str, client: Any, cspec: Any,
                     gpus: Sequence[int | str] | None, progress: bool, retries: int,
                     lock_timeout: float | None) -> list[dict[str, Any]]:
    import contextlib

    from .cluster import Cluster, _threads_per_worker, open_cluster
    from .gridcell import CellJob, Ledger, run_cell
    from .progress import bar

    ledger = Ledger(out)
    write_json({
        "name": g.name, "source": str(g.source) if g.source else None, "notebook": str(g.notebook),
        "kernel": kernel, "runs": [{"name": r.name, "reported": r.reported, **r.settings()} for r in runs],
    }, out / "grid.json", indent=1, default=str)
    plan = [(r, run_action(r)) for r in runs]
    actions = {r.name: action for r, action in plan}
    todo = [(i, r) for i, (r, action) in enumerate(plan) if action != "skip"]
    say = _say if progress else (lambda msg: None)
    pbar = bar(total=len(runs), desc=f"grid {g.name}", enabled=progress, leave=True, unit="run")
    for r, action in plan:
        if action == "skip":
            say(f"{r.name}: finished before, skipped")
            pbar.update(1)
    if todo:
        if client is not None:
            info = client.scheduler_info()["workers"]
            opened = contextlib.nullcontext(Cluster(
                client, None, "the given client", any("GPU" in (w.get("resources") or {}) for w in info.values()),
                _threads_per_worker(client, info)))
        else:
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
                job = CellJob(r, str(out), str(g.notebook), kernel, threads, default_threads, lock_timeout)
                fut = cl.client.submit(run_cell, job, key=f"cellkit-{r.name}-{os.urandom(4).hex()}", pure=False,
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

    rows = collect_results(out)
    for row in rows:
        row["action"] = actions.get(row["name"])
    save_plots(out, rows)
    return rows


def _follow(futures: dict[Any, RunSpec], ledger: Any, say: Any, pbar: Any) -> None:
    """Wait for the tasks; print each run's events from the ledger as they happen and its final line."""
    from distributed import wait

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
            line = _event_line(e)
            if line:
                say(line)
        for fut in done:
            r = futures[fut]
            if fut.status == "finished":
                status = fut.result()
                if status.get("action") == "skip":
                    say(f"{r.name}: finished elsewhere meanwhile, skipped")
                else:
                    say(_status_line(r, status))
            else:
                exc = fut.exception()
                err = _task_error(exc)
                ledger.append("failed", r.name, error=err)
                previous = _read_json(r.folder / "status.json") or {} if r.folder else {}
                status = _write_status(r, {**{k: v for k, v in previous.items() if k not in ("name", "settings")},
                                           "status": FAILED, "error": err, "interrupted": False})
                if r.folder is not None:
                    (r.folder / "error.txt").write_text(err + f"\n\nlog: {r.folder / 'log.txt'}\n")
                say(_status_line(r, status))
            pbar.update(1)


def _task_error(exc: BaseException | None) -> str:
    name = type(exc).__name__
    if name == "KilledWorker":
        return "KilledWorker: the workers running this run died too many times (the scheduler's allowed-failures)"
    return f"{name}: {exc}"


def _event_line(e: Mapping[str, Any]) -> str | None:
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
        return f"{run}: attempt {e.get('attempt')} interrupted ({_one_line(e.get('error'), 120)}); retrying"
    return None


def run_action(r: RunSpec) -> str:
    """What :func:`run_grid` will do with a run: ``skip`` (finished with the same settings),
    ``resume`` (same settings, unfinished, a checkpoint to continue from), ``run`` (nothing there
    yet, or no checkpoint) or ``replace`` (its folder holds a run with other settings: kept aside
    as ``<name>.replaced-<time>``, then run). Looks only; changes nothing."""
    assert r.folder is not None and r.run_dir is not None
    status = _read_json(r.folder / "status.json")
    if status is None:
        return "replace" if r.folder.exists() and any(r.folder.iterdir()) else "run"
    if status.get("settings") != r.settings():
        return "replace"
    if status.get("status") == OK and _valid_metrics(r.run_dir / "metrics.json"):
        return "skip"
    return "resume" if (r.run_dir / "checkpoints" / "last.pth").is_file() else "run"


def _move_aside(folder: Path) -> None:
    """Keep an older run whose settings differ: ``<name>`` -> ``<name>.replaced-<time>``."""
    target = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    folder.rename(target)


def visible_gpus() -> list[str]:
    """Ids of the CUDA devices this process may use (as ``CUDA_VISIBLE_DEVICES`` entries)."""
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - a broken CUDA install counts as none
        count = 0
    if not count:
        return []
    listed = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


# --------------------------------------------------------------------------------------------
# the worker (python -m cellkit.ablation --worker JOB.json): papermill in a process of its own


def _worker(job_path: str) -> int:
    """Execute one run's notebook (``job.json``: notebook, output, parameters, kernel, cwd) with
    papermill's Python API and write its outcome (ok, or the failing cell's error and traceback)
    to ``job["outcome"]``; returns the exit status.

    Not the bare ``papermill`` CLI with a per-job environment: the CLI cannot die with its parent
    (this calls ``prctl(PR_SET_PDEATHSIG)`` first, so a killed Dask worker leaves no training
    behind; the kill -9 tests rely on it), reports a failure only as text on stderr (the ablation
    needs the cell, error name and traceback as data for ``status.json`` and ``error.txt``), and
    takes parameters as command-line strings whose types it guesses (``-p``) or as YAML text
    (``-y``), where ``job.json`` hands the overrides' exact JSON values straight to the API.
    """
    import logging

    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from .gridcell import PARENT, die_with_parent

    parent = os.environ.get(PARENT)
    die_with_parent(int(parent) if parent and parent.isdigit() else None)  # no orphan if the task's worker dies
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
                   "cell_index": e.cell_index, "traceback": _strip_ansi("\n".join(e.traceback or []))}
    except Exception as e:  # kernel died, notebook unreadable, ...
        import traceback

        outcome = {"status": FAILED, "ename": type(e).__name__, "evalue": str(e), "traceback": traceback.format_exc()}
    write_json(outcome, Path(job["outcome"]), indent=1, default=str)
    return 0 if outcome["status"] == OK else 1


# --------------------------------------------------------------------------------------------
# results


def collect_results(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The results table of a grid folder, also written as ``results.json`` and ``results.md``.

    One row per run (in the grid's order; every ``<name>/status.json`` folder when there is no
    ``grid.json``): ``name, backbone, base_backbone, attention, scheduler, epochs_run,
    best_val_ap50, best_val_ap, best_epoch, stop_reason, seconds, wall_seconds, status, error,
    reported, run_dir, attempts`` (times the run was started, from ``ledger.jsonl``). Numbers come
    from each run's ``metrics.json`` (from ``metrics.jsonl`` when the run stopped before writing
    it); the settings from its resolved ``config.yaml``.
    """
    out = Path(out_dir)
    grid = _read_json(out / "grid.json")
    if grid:
        entries = [(e["name"], e.get("reported")) for e in grid.get("runs", [])]
    else:
        folders = sorted(p.parent for p in out.glob("*/status.json"))
        entries = [(f.name, None) for f in folders if ".replaced-" not in f.name]
    from .gridcell import Ledger

    attempts = {run: s["attempts"] for run, s in Ledger(out).summary().items()}
    rows = [_result_row(out / name, name, reported) for name, reported in entries]
    for row in rows:
        row["attempts"] = attempts.get(row["name"], 0)
    write_json(rows, out / "results.json", indent=1, default=str)
    (out / "results.md").write_text(format_results_table(rows, title=f"Grid {grid['name']}" if grid else "") + "\n")
    return rows


def _result_row(folder: Path, name: str, reported: float | None) -> dict[str, Any]:
    run_dir = folder / "run"
    status = _read_json(folder / "status.json") or {}
    cfg = _read_yaml(run_dir / "config.yaml") or _read_yaml(folder / "config.yaml") or {}
    model, train = cfg.get("model") or {}, cfg.get("train") or {}
    backbone = model.get("backbone")
    metrics = _read_json(run_dir / "metrics.json") if _valid_metrics(run_dir / "metrics.json") else None
    history = read_history(run_dir)
    best = max((h for h in history if h.get("val_ap50") is not None), key=lambda h: h["val_ap50"], default=None)
    row: dict[str, Any] = {
        "name": name,
        "backbone": (metrics or {}).get("backbone") or backbone,
        "attention": attention_of(backbone),
        "base_backbone": base_backbone(backbone),
        "scheduler": scheduler_label(train),
        "epochs_run": metrics["epochs_run"] if metrics else (len(history) or None),
        "best_val_ap50": metrics["best_val_ap50"] if metrics else (best or {}).get("val_ap50"),
        "best_val_ap": metrics.get("best_val_ap") if metrics else (best or {}).get("val_ap"),
        "best_epoch": metrics.get("best_epoch") if metrics else (best or {}).get("epoch"),
        "stop_reason": (metrics or {}).get("stop_reason"),
        "seconds": (metrics or {}).get("seconds"),
        "wall_seconds": status.get("wall_seconds"),
        "status": status.get("status", PENDING),
        "error": status.get("error"),
        "reported": reported,
        "run_dir": str(run_dir),
    }
    return row


def read_history(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-epoch dicts of ``run_dir/metrics.jsonl`` ([] when missing; unreadable lines skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def attention_of(backbone: str | None) -> str:
    """``none``, ``SE`` or ``CBAM`` from a registry backbone name (``resnet50_v2_cbam`` -> ``CBAM``)."""
    parts = (backbone or "").lower().split("_")
    if "cbam" in parts:
        return "CBAM"
    if "se" in parts:
        return "SE"
    return "none" if backbone else "?"


def base_backbone(backbone: str | None) -> str | None:
    """The backbone without its attention suffix (``resnet50_v2_se`` -> ``resnet50_v2``)."""
    if not backbone:
        return backbone
    return "_".join(p for p in backbone.split("_") if p.lower() not in ("se", "cbam"))


def scheduler_label(train: Mapping[str, Any]) -> str:
    """``train.scheduler`` plus early stopping, as report 000's table puts it: ``plateau + early stop``."""
    if not train:
        return "?"
    label = str(train.get("scheduler", "constant"))
    if train.get("early_stop_decays") is not None or train.get("early_stop_patience") is not None:
        label += " + early stop"
    return label


def format_results_table(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """A markdown table like report 000's: backbone, attention, scheduler, epochs, AP50 (best in bold)."""
    with_reported = any(r.get("reported") is not None for r in rows)
    with_attempts = any((r.get("attempts") or 0) > 1 for r in rows)
    head = ["Run", "Backbone", "Attention", "Scheduler", "Epochs", "Best val AP50", "Best val AP", "Best epoch",
            "Train time"] + (["Reported"] if with_reported else []) + ["Status"] + (["Attempts"] if with_attempts else [])
    best = max((r["best_val_ap50"] for r in rows if r.get("best_val_ap50") is not None), default=None)
    lines = ([f"## {title}", ""] if title else []) + [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" if h in ("Epochs", "Best val AP50", "Best val AP", "Best epoch", "Train time", "Reported",
                                       "Attempts")
                       else "---" for h in head) + "|",
    ]
    for r in rows:
        ap50 = _fmt(r.get("best_val_ap50"))
        if best is not None and r.get("best_val_ap50") == best and len(rows) > 1:
            ap50 = f"**{ap50}**"
        cells = [r["name"], r.get("base_backbone") or "?", r.get("attention") or "?", r.get("scheduler") or "?",
                 _fmt(r.get("epochs_run")), ap50, _fmt(r.get("best_val_ap")), _fmt(r.get("best_epoch")),
                 _fmt_seconds(r.get("seconds"))]
        if with_reported:
            cells.append(_fmt(r.get("reported")))
        cells.append(r.get("status") or PENDING)
        if with_attempts:
            cells.append(_fmt(r.get("attempts")))
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    failed = [r for r in rows if r.get("status") == FAILED]
    if failed:
        lines += ["", "Failed runs:"] + [f"- {r['name']}: {_one_line(r.get('error'))}" for r in failed]
    return "\n".join(lines)


def save_plots(out_dir: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]] | None = None) -> list[Path]:
    """Write ``ap50.png`` (bar chart per run) and ``curves.png`` (every run's curves) into ``out_dir``."""
    import matplotlib.pyplot as plt

    from .viz.ablation_plots import plot_ablation_bars, plot_ablation_curves

    out = Path(out_dir)
    rows = list(rows) if rows is not None else collect_results(out)
    histories = {r["name"]: read_history(r["run_dir"]) for r in rows}
    paths = []
    for fig, name in ((plot_ablation_bars(rows), "ap50.png"), (plot_ablation_curves(histories), "curves.png")):
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    return paths


# --------------------------------------------------------------------------------------------
# helpers


def _resolve_grid_path(spec: str | os.PathLike[str]) -> Path:
    p = Path(spec).expanduser()
    if p.is_file():
        return p.resolve()
    named = GRIDS / (p.name if p.suffix in (".yaml", ".yml") else f"{spec}.yaml")
    if named.is_file():
        return named
    names = sorted(q.stem for q in GRIDS.glob("*.yaml")) if GRIDS.is_dir() else []
    close = difflib.get_close_matches(str(spec), names, n=1)
    hint = f"; did you mean grid '{close[0]}'?" if close else (f"; shipped grids: {', '.join(names)}" if names else "")
    raise ConfigError(f"{p}: grid file not found (nor a grid of that name in {GRIDS}){hint}")


def _check_keys(raw: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    for key in raw:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"{where}: unknown grid key '{key}'{hint}")


def _flatten(d: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` and ``{"train.lr": 1}`` both become ``{"train.lr": 1}``."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping of dotted config keys to values, got {d!r}")
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = prefix + str(k).replace("__", ".")
        if isinstance(v, Mapping):
            out.update(_flatten(v, where, key + "."))
        else:
            out[key] = v
    return out


def _resolve_config_ref(ref: Any, base: Path, where: str) -> str:
    """A recipe name stays a name; a YAML path becomes absolute (the kernel runs elsewhere)."""
    if not isinstance(ref, (str, os.PathLike)):
        raise ConfigError(f"{where}: config must be a recipe name or a YAML path, got {ref!r}")
    p = Path(ref).expanduser()
    for candidate in ((p,) if p.is_absolute() else (base / p, Path.cwd() / p)):
        if candidate.is_file():
            return str(candidate.resolve())
    try:
        resolve_config_path(str(ref))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return str(ref)


def _resolve_notebook(ref: Any, base: Path) -> Path:
    if not ref:
        return DEFAULT_NOTEBOOK
    p = Path(str(ref)).expanduser()
    if p.is_absolute():
        return p
    shipped = NOTEBOOKS.parent / p if p.parts and p.parts[0] == "notebooks" else NOTEBOOKS / p
    for candidate in (base / p, Path.cwd() / p, shipped):
        if candidate.is_file():
            return candidate.resolve()
    return shipped


def _notebook_kernel(notebook: Path) -> str:
    try:
        meta = json.loads(notebook.read_text()).get("metadata", {})
    except (OSError, json.JSONDecodeError) as e:
        raise CellkitError(f"{notebook}: not a readable notebook ({e})") from None
    return (meta.get("kernelspec") or {}).get("name") or "python3"


def _run_base_name(run: Mapping[str, Any], i: int, n: int, g: GridSpec) -> str:
    if run.get("name"):
        return str(run["name"])
    if run.get("config"):
        return Path(str(run["config"])).stem
    if run.get("overrides"):
        return "-".join(_slug(k, v) for k, v in run["overrides"].items())
    return "" if n == 1 else f"run{i}"


def _slug(key: str, value: Any) -> str:
    if key == "config":
        return Path(str(value)).stem
    if isinstance(value, str) and not _is_number(value):
        return value
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(value, (list, tuple)):
        text = "_".join(_scalar(v) for v in value)
    else:
        text = _scalar(value)
    return f"{leaf}={text}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _scalar(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("._") or "run"
    return name[:120]


def _status_line(r: RunSpec, status: Mapping[str, Any]) -> str:
    t = _fmt_seconds(status.get("wall_seconds"))
    if status.get("status") == OK:
        m = _read_json(r.run_dir / "metrics.json") if r.run_dir else None
        ap = (m or {}).get("best_val_ap50")
        best = f"best val AP50 {ap:.4f} (epoch {m.get('best_epoch')})" if ap is not None else "no validation AP50"
        return f"{r.name}: ok, {best}, {t}"
    return f"{r.name}: FAILED after {t}: {_one_line(status.get('error'))} (see {r.folder}/error.txt)"


def _say(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg)
    sys.stdout.flush()


def _write_status(r: RunSpec, status: Mapping[str, Any]) -> dict[str, Any]:
    assert r.folder is not None
    full = {"name": r.name, **status, "settings": r.settings()}
    write_json(full, r.folder / "status.json", indent=1, default=str)
    return full


def _valid_metrics(path: Path) -> bool:
    m = _read_json(path)
    return isinstance(m, dict) and "epochs_run" in m and "best_val_ap50" in m


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _now(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _fmt_seconds(s: Any) -> str:
    if s is None:
        return "-"
    s = float(s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _one_line(text: Any, limit: int = 200) -> str:
    line = " ".join(str(text or "").split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def _main(argv: Iterable[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--worker":
        return _worker(args[1])
    print("usage: python -m cellkit.ablation --worker JOB.json (internal; use `cellkit ablate`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main())
