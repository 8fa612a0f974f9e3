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

Each run executes the notebook with papermill in its own kernel (a separate worker process, so
every run gets its own environment: ``CUDA_VISIBLE_DEVICES`` when there are GPUs, a share of the CPU
threads otherwise) into ``OUT/<run name>/``::

    OUT/grid.json                    the expanded grid (run order, settings)
    OUT/<name>/02_training.ipynb     the executed notebook
    OUT/<name>/config.yaml           the resolved config of the run
    OUT/<name>/run/                  the run directory (metrics.json, metrics.jsonl, checkpoints/ ...)
    OUT/<name>/status.json           ok / failed / running, times, the error of a failed run
    OUT/<name>/error.txt             the failing cell's error and traceback (failed runs only)
    OUT/<name>/log.txt               the worker's log (cell outputs)
    OUT/<name>/job.json              the papermill call (notebook, kernel, parameters)
    OUT/results.json, results.md     the results table; OUT/ap50.png, OUT/curves.png its plots

A run whose ``status.json`` says ok with the same settings and whose ``run/metrics.json`` is valid
is skipped on re-run; a failed or interrupted run is resumed from its last checkpoint; a run whose
settings changed is started again (the old folder is kept as ``<name>.replaced-<time>``).
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import os
import queue
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from .config import Config, load_config, resolve_config_path
from .errors import CellkitError, ConfigError, DataError
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
        lines.append("every run: " + " ".join(f"{k}={_short(v)}" for k, v in common.items()))
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
            lines.append(f"  {'':<{width}}    " + " ".join(f"{k}={_short(v)}" for k, v in own.items()))
    return "\n".join(lines)


def _short(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


# --------------------------------------------------------------------------------------------
# running


def run_grid(
    spec: "str | os.PathLike[str] | Mapping[str, Any] | GridSpec",
    out_dir: str | os.PathLike[str],
    jobs: int = 1,
    gpus: Sequence[int | str] | None = None,
    data: str | os.PathLike[str] | None = None,
    extra_overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every cell of the grid through papermill and return the results table rows.

    Each run's notebook executes in its own kernel; finished runs are skipped, failed ones are
    recorded (``status.json``, ``error.txt``) and the grid goes on. The rows (see
    :func:`collect_results`) carry an extra ``action`` (see :func:`run_action`): ``run``,
    ``resume``, ``skip`` or ``replace``.

    Args:
        spec: see :func:`load_grid`.
        out_dir: the grid's output folder.
        jobs: runs in parallel (0: one per GPU, or 1 without GPUs).
        gpus: GPU ids to spread the jobs over (default: the visible CUDA devices); each job gets
            one in ``CUDA_VISIBLE_DEVICES``. Without GPUs the CPU cores are split between the jobs.
        data: dataset folder for every run (else the grid's ``data``, else synthetic data).
        extra_overrides: dotted keys applied to every run after the grid's own.
        progress: a bar over the runs and one line per finished run.

    Raises:
        CellkitError: an invalid grid or config (before any run starts), or a missing notebook.
    """
    g = load_grid(spec)
    out = Path(out_dir).expanduser().resolve()
    runs = expand_grid(g, out, data=data, extra_overrides=extra_overrides)
    if not g.notebook.is_file():
        raise CellkitError(f"{g.notebook}: notebook not found (set 'notebook:' in the grid or pass --notebook)")
    kernel = g.kernel or _notebook_kernel(g.notebook)
    from .outputs import check_writable_dir

    check_writable_dir(out, "grid output folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "grid.json", {
        "name": g.name, "source": str(g.source) if g.source else None, "notebook": str(g.notebook),
        "kernel": kernel, "runs": [{"name": r.name, "reported": r.reported, **r.settings()} for r in runs],
    })

    slots: "queue.Queue[str | None]" = queue.Queue()
    gpu_ids = visible_gpus() if gpus is None else [str(x) for x in gpus]
    if jobs <= 0:
        jobs = max(1, len(gpu_ids))
    plan = [(r, run_action(r)) for r in runs]
    for r, action in plan:
        if action == "replace" and r.folder is not None:
            _move_aside(r.folder)
    todo = [(r, action) for r, action in plan if action != "skip"]
    jobs = max(1, min(jobs, len(todo) or 1))
    for i in range(jobs):
        slots.put(gpu_ids[i % len(gpu_ids)] if gpu_ids else None)
    threads = max(1, _cpu_count() // jobs)

    from .progress import bar

    actions = {r.name: action for r, action in plan}
    say = _say if progress else (lambda msg: None)
    pbar = bar(total=len(runs), desc=f"grid {g.name}", enabled=progress, leave=True, unit="run")
    for r, action in plan:
        if action == "skip":
            say(f"{r.name}: finished before, skipped")
            pbar.update(1)

    def job(r: RunSpec, action: str) -> dict[str, Any]:
        slot = slots.get()
        try:
            return _run_one(r, g.notebook, kernel, action == "resume", slot, threads)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="cellkit-ablate") as ex:
        futures = {ex.submit(job, r, action): r for r, action in todo}
        try:
            for fut in as_completed(futures):
                r = futures[fut]
                try:
                    status = fut.result()
                except Exception as e:  # a bug in this module, not in the run: record it all the same
                    status = _write_status(r, {"status": FAILED, "error": f"{type(e).__name__}: {e}"})
                say(_status_line(r, status))
                pbar.update(1)
        except KeyboardInterrupt:
            ex.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pbar.close()

    rows = collect_results(out)
    for row in rows:
        row["action"] = actions.get(row["name"])
    save_plots(out, rows)
    return rows


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


def _run_one(r: RunSpec, notebook: Path, kernel: str, resume: bool, gpu: str | None, threads: int) -> dict[str, Any]:
    """Execute one run in a worker process (its own environment and kernel); returns its status."""
    assert r.folder is not None and r.run_dir is not None
    r.folder.mkdir(parents=True, exist_ok=True)
    (r.folder / "error.txt").unlink(missing_ok=True)
    outcome_path = r.folder / ".outcome.json"
    outcome_path.unlink(missing_ok=True)
    if r.cfg is not None:
        r.cfg.save(r.folder / "config.yaml")
    started = time.time()
    _write_status(r, {"status": RUNNING, "started": _now(started), "device": f"cuda:{gpu}" if gpu else "cpu",
                      "resumed": resume})
    job = {
        "notebook": str(notebook), "output": str(r.folder / notebook.name), "cwd": str(r.folder),
        "kernel": kernel, "parameters": r.parameters(resume), "outcome": str(outcome_path),
    }
    _write_json(r.folder / "job.json", job)
    env = _job_env(gpu, threads)
    with open(r.folder / "log.txt", "ab") as log:
        log.write(f"\n== {_now(started)} {'resuming' if resume else 'running'} {r.name} "
                  f"({'GPU ' + gpu if gpu else f'CPU, {threads} threads'})\n".encode())
        log.flush()
        proc = subprocess.run([sys.executable, "-m", "cellkit.ablation", "--worker", str(r.folder / "job.json")],
                              env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    outcome = _read_json(outcome_path) or {
        "status": FAILED, "ename": "WorkerError",
        "evalue": f"the papermill worker exited with code {proc.returncode} without a result; see log.txt",
    }
    outcome_path.unlink(missing_ok=True)
    status: dict[str, Any] = {
        "status": outcome.get("status", FAILED), "started": _now(started), "finished": _now(time.time()),
        "wall_seconds": round(time.time() - started, 1), "started_unix": started, "finished_unix": time.time(),
        "device": f"cuda:{gpu}" if gpu else "cpu",
        "resumed": resume, "notebook": str(r.folder / notebook.name), "returncode": proc.returncode,
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
    return _write_status(r, status)


def _job_env(gpu: str | None, threads: int) -> dict[str, str]:
    """The worker's (and its kernel's) environment: one GPU or a share of the CPU threads."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(threads))
    env.setdefault("CELLKIT_PROGRESS", "0")  # no tqdm widgets in the executed notebooks
    pkg_root = str(Path(__file__).resolve().parents[1])  # the kernel imports this cellkit
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


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


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# the worker (python -m cellkit.ablation --worker JOB.json): papermill in a process of its own


def _worker(job_path: str) -> int:
    import logging

    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

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
    _write_json(Path(job["outcome"]), outcome)
    return 0 if outcome["status"] == OK else 1


# --------------------------------------------------------------------------------------------
# results


def collect_results(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The results table of a grid folder, also written as ``results.json`` and ``results.md``.

    One row per run (in the grid's order; every ``<name>/status.json`` folder when there is no
    ``grid.json``): ``name, backbone, base_backbone, attention, scheduler, epochs_run,
    best_val_ap50, best_val_ap, best_epoch, stop_reason, seconds, wall_seconds, status, error,
    reported, run_dir``. Numbers come from each run's ``metrics.json`` (from ``metrics.jsonl``
    when the run stopped before writing it); the settings from its resolved ``config.yaml``.
    """
    out = Path(out_dir)
    grid = _read_json(out / "grid.json")
    if grid:
        entries = [(e["name"], e.get("reported")) for e in grid.get("runs", [])]
    else:
        folders = sorted(p.parent for p in out.glob("*/status.json"))
        entries = [(f.name, None) for f in folders if ".replaced-" not in f.name]
    rows = [_result_row(out / name, name, reported) for name, reported in entries]
    _write_json(out / "results.json", rows)
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
    head = ["Run", "Backbone", "Attention", "Scheduler", "Epochs", "Best val AP50", "Best val AP", "Best epoch",
            "Train time"] + (["Reported"] if with_reported else []) + ["Status"]
    best = max((r["best_val_ap50"] for r in rows if r.get("best_val_ap50") is not None), default=None)
    lines = ([f"## {title}", ""] if title else []) + [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" if h in ("Epochs", "Best val AP50", "Best val AP", "Best epoch", "Train time", "Reported")
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
    _write_json(r.folder / "status.json", full)
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


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


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
