"""The grid spec: a YAML file (or dict) naming the runs of an ablation, expanded into :class:`RunSpec` s.

::

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
    seeds: 3                         # replicates: every configuration with train.seed 0, 1, 2 (or a list of
                                     # seeds; or a train.seed axis in grid:)
    baseline: resnet18               # the configuration the others are compared with (default: the first)

A *configuration* is one combination of settings; with several seeds it has several runs
(``<configuration>-seed=<s>``), which the results table treats as replicates
(:mod:`cellkit.analysis.replicates`).
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config import Config, load_config, resolve_config_path
from ..documents import read_yaml
from ..errors import CellkitError, ConfigError, DataError
from ..resources import GRIDS, NOTEBOOKS
from ..resources import TRAINING_NOTEBOOK as DEFAULT_NOTEBOOK

GRID_KEYS = ("name", "description", "notebook", "kernel", "config", "overrides", "data", "grid", "runs", "seeds",
             "baseline")
SEED_KEY = "train.seed"
RUN_KEYS = ("name", "config", "overrides", "reported")


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
    seeds: list[int] | None = None
    """``train.seed`` of each replicate of every configuration (None: one run per configuration)."""
    baseline: str | None = None
    """The configuration the others are compared with (None: the first)."""


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
    configuration: str = ""
    """The configuration this run replicates (its name without the seed; the run's name when there are no seeds)."""
    seed: int | None = None
    """Its ``train.seed`` when the grid replicates seeds, else None."""

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
            raw = read_yaml(source, "grid file") or {}  # limits: size, aliases, depth, duplicate keys
        except DataError as e:
            raise ConfigError(str(e)) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a grid is a mapping of keys ({', '.join(GRID_KEYS)})")
        base = source.parent
    where = str(source) if source else "grid"
    _check_keys(raw, GRID_KEYS, where)
    name = str(raw.get("name") or (source.stem if source else "grid"))

    grid = raw.get("grid") or {}
    if not isinstance(grid, Mapping):
        raise ConfigError(f"{where}: 'grid' maps dotted config keys to lists of values, e.g. train.lr: [0.001, 0.0001]")
    grid = flatten_overrides(grid, where + ": grid")
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
        run["overrides"] = flatten_overrides(run.get("overrides") or {}, f"{where}: runs[{i}].overrides")
        if run.get("config") is not None:
            run["config"] = _resolve_config_ref(run["config"], base, f"{where}: runs[{i}]")
        if run.get("reported") is not None and not isinstance(run["reported"], (int, float)):
            raise ConfigError(f"{where}: runs[{i}].reported must be a number, got {run['reported']!r}")
        parsed_runs.append(run)
    if not grid and not parsed_runs:
        raise ConfigError(f"{where}: nothing to run; give 'grid:' (key -> list of values) and/or 'runs:'")
    if "config" in grid:
        grid["config"] = [_resolve_config_ref(c, base, f"{where}: grid.config") for c in grid["config"]]
    seeds = _parse_seeds(raw.get("seeds"), grid, where)
    return GridSpec(
        name=name,
        notebook=_resolve_notebook(raw.get("notebook"), base),
        config=_resolve_config_ref(raw.get("config") or "demo", base, where),
        overrides=flatten_overrides(raw.get("overrides") or {}, f"{where}: overrides"),
        data=str(raw["data"]) if raw.get("data") else None,
        grid=grid,
        runs=parsed_runs,
        kernel=raw.get("kernel"),
        description=str(raw.get("description") or ""),
        source=source,
        seeds=seeds,
        baseline=str(raw["baseline"]) if raw.get("baseline") is not None else None,
    )


def _parse_seeds(value: Any, grid: dict[str, list[Any]], where: str) -> list[int] | None:
    """``seeds: N`` (seeds 0..N-1) or ``seeds: [s, ...]``, or a ``train.seed`` axis taken out of ``grid``."""
    axis = grid.pop(SEED_KEY, None)
    if value is not None and axis is not None:
        raise ConfigError(f"{where}: give 'seeds' or a grid axis {SEED_KEY}, not both")
    if axis is not None:
        value = axis
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"{where}: seeds must be at least 1 (runs per configuration), got {value}")
        return list(range(value))
    if (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                 for v in value)):
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: seeds repeat a value: {value}")
        return list(value)
    raise ConfigError(f"{where}: seeds is a number of runs per configuration (e.g. 3) or a list of seeds "
                      f"(e.g. [0, 1, 2]), got {value!r}")


def expand_grid(
    spec: "str | os.PathLike[str] | Mapping[str, Any] | GridSpec",
    out_dir: str | os.PathLike[str] | None = None,
    *,
    data: str | os.PathLike[str] | None = None,
    extra_overrides: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> list[RunSpec]:
    """The runs of a grid, in order: each explicit run (or the base config) x each grid point (a
    configuration) x each seed.

    Names join the run's name and the grid point's values: ``model.backbone=resnet50_se,
    train.scheduler=plateau`` -> ``resnet50_se-plateau``; numbers, booleans and lists keep their
    key (``train.lr=0.001`` -> ``lr=0.001``); with seeds, each configuration's runs are
    ``<configuration>-seed=<s>``.

    Args:
        spec: see :func:`load_grid`.
        out_dir: the grid's output folder (sets each run's ``run_dir`` to ``out_dir/<name>/run``).
        data: dataset folder for every run (overrides the grid's ``data``).
        extra_overrides: dotted keys applied after everything else (``cellkit ablate --set``).
        validate: build every run's config with :func:`cellkit.load_config` now, so a typo fails
            before anything starts.

    Raises:
        ConfigError: an invalid config in any run (naming the run), duplicate run names, or a
            ``baseline`` that names no configuration.
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
    extra = flatten_overrides(dict(extra_overrides or {}), "extra overrides")
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
            configuration = _safe_name("-".join(p for p in parts if p) or g.name)
            for seed in (g.seeds if g.seeds is not None else [None]):
                name = configuration if seed is None else _safe_name(f"{configuration}-seed={seed}")
                own = overrides if seed is None else {**overrides, SEED_KEY: seed}
                run_dir = Path(out_dir) / name / "run" if out_dir is not None else None
                out.append(RunSpec(name, config, own, run_dir, data_str, run.get("reported"),
                                   configuration=configuration, seed=seed))
    counts: dict[str, int] = {}
    for r in out:
        counts[r.name] = counts.get(r.name, 0) + 1
    dupes = sorted(n for n, c in counts.items() if c > 1)
    if dupes:
        raise ConfigError(f"{where}: runs share a name ({', '.join(dupes)}); give each explicit run a distinct 'name'")
    configurations = list(dict.fromkeys(r.configuration for r in out))
    if g.baseline is not None and g.baseline not in configurations:
        close = difflib.get_close_matches(g.baseline, configurations, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; the configurations: {', '.join(configurations)}"
        raise ConfigError(f"{where}: baseline '{g.baseline}' is not a configuration of the grid{hint}")
    if validate:
        for r in out:
            try:
                r.cfg = resolve_run_config(r)
            except ConfigError as e:
                raise ConfigError(f"{where}: run '{r.name}': {e}") from None
    return out


def baseline_of(g: GridSpec, runs: Sequence[RunSpec]) -> str | None:
    """The configuration the grid compares the others with: ``baseline:``, else the first."""
    return g.baseline if g.baseline is not None else (runs[0].configuration if runs else None)


def resolve_run_config(r: RunSpec) -> Config:
    """The config the notebook builds for ``r`` (its recipe, overrides and dataset).

    Raises:
        ConfigError: an invalid key or value.
    """
    return load_config(r.config, {**r.overrides, **({"data.root": r.data} if r.data else {})})


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


def notebook_kernel(notebook: Path) -> str:
    """The Jupyter kernel named in a notebook's metadata (``python3`` when it names none).

    Raises:
        CellkitError: the notebook cannot be read.
    """
    try:
        meta = json.loads(notebook.read_text()).get("metadata", {})
    except (OSError, json.JSONDecodeError) as e:
        raise CellkitError(f"{notebook}: not a readable notebook ({e})") from None
    return (meta.get("kernelspec") or {}).get("name") or "python3"


# --------------------------------------------------------------------------------------------
# what a run is, in words (the plan and the results table)


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


# --------------------------------------------------------------------------------------------
# helpers


def flatten_overrides(d: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` and ``{"train.lr": 1}`` both become ``{"train.lr": 1}``.

    Raises:
        ConfigError: ``d`` is not a mapping (``where`` names it).
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping of dotted config keys to values, got {d!r}")
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = prefix + str(k).replace("__", ".")
        if isinstance(v, Mapping):
            out.update(flatten_overrides(v, where, key + "."))
        else:
            out[key] = v
    return out


def _as_written(v: Any) -> str:
    """An override value as a grid file writes it (strings bare, the rest as JSON)."""
    return v if isinstance(v, str) else json.dumps(v)


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
