"""The results of a grid folder: the configurations compared with the baseline, one row per run, and the plots.

``results.md`` holds two tables:

* **Configurations**: per configuration, the mean AP50 over its seeds with their standard
  deviation and a 95 % interval that holds both image and seed variation, its hold-out AP50 when
  the runs hold one out, and its difference to the baseline with a paired interval, the
  Holm-corrected p-value and a verdict (better, worse, not distinguishable). The verdict uses the
  hold-out split when every configuration has one (scored once, so not biased by the choice of
  the epoch), else the validation split that chose each run's epoch (and says so). Only a
  distinguishable verdict is highlighted; no number is bolded for being the largest.
* **Runs**: every run with its settings, its val AP50 (at the epoch that split chose) and
  hold-out AP50, each with its own interval over images, epochs, time and status.

``results.json`` is the list of run rows (:func:`collect_results`); each row carries its
configuration's comparison under ``"comparison"``. The numbers come from
:mod:`cellkit.analysis.replicates`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import yaml

from ..analysis.replicates import BETTER, SPLITS, WORSE, compare_configurations
from ..errors import CellkitError, ConfigError
from ..outputs import write_atomic, write_json
from ..runs import RunDir, read_json
from ..viz.ablation_plots import plot_ablation_bars, plot_ablation_curves, plot_forest
from .ledger import Ledger
from .spec import RunSpec, attention_of, base_backbone, resolve_run_config, scheduler_label
from .status import FAILED, GRID_FILE, OK, PENDING, RESULTS_JSON, RESULTS_MD, STATUS_FILE, fmt_seconds, one_line

SPLIT_LABELS = {"val": "val AP50 (chose the epoch)", "holdout": "hold-out AP50 (scored once)"}
"""How the tables name each split's AP50: the validation split chose the epoch it is reported at."""


def collect_results(out_dir: str | os.PathLike[str], progress: bool = False) -> list[dict[str, Any]]:
    """The results of a grid folder, also written as ``results.json`` and ``results.md``.

    One row per run (in the grid's order; every ``<name>/status.json`` folder when there is no
    ``grid.json``): ``name, configuration, seed, backbone, base_backbone, attention, scheduler,
    epochs_run, best_val_ap50, val_ap50_ci, best_val_ap, best_epoch, holdout_ap50, holdout_ap50_ci,
    stop_reason, seconds, wall_seconds, status, error, reported, run_dir, attempts`` (times the run
    was started, from ``ledger.jsonl``) and ``comparison`` (its configuration's numbers, see
    :func:`compare_rows`; None for a run that did not finish). Numbers come from each run's
    ``metrics.json`` (from ``metrics.jsonl`` when the run stopped before writing it) and its
    prediction files; the settings from its resolved ``config.yaml`` (from the grid's settings
    for a run that has not trained yet).
    """
    out = Path(out_dir)
    grid = read_json(out / GRID_FILE)
    if grid:
        entries = [(e["name"], e.get("reported"), e) for e in grid.get("runs", [])]
    else:
        folders = sorted(p.parent for p in out.glob(f"*/{STATUS_FILE}"))
        entries = [(f.name, None, None) for f in folders if ".replaced-" not in f.name]
    attempts = {run: s["attempts"] for run, s in Ledger(out).summary().items()}
    rows = [result_row(out / name, name, reported, settings) for name, reported, settings in entries]
    for row in rows:
        row["attempts"] = attempts.get(row["name"], 0)
    compare_rows(rows, (grid or {}).get("baseline"), progress=progress)
    write_json(rows, out / RESULTS_JSON, indent=1, default=str)
    write_atomic(out / RESULTS_MD, format_results_table(rows, title=f"Grid {grid['name']}" if grid else "") + "\n")
    return rows


def result_row(folder: Path, name: str, reported: float | None = None,
               settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The results row of the run in ``folder`` (``OUT/<name>``), see :func:`collect_results`."""
    run = RunDir(folder / "run")
    status = read_json(folder / STATUS_FILE) or {}
    cfg = _config_of(run, settings)
    model, train = cfg.get("model") or {}, cfg.get("train") or {}
    backbone = model.get("backbone")
    metrics = run.summary()
    history = run.history()
    best = max((h for h in history if h.get("val_ap50") is not None), key=lambda h: h["val_ap50"], default=None)
    lo_hi = [(best or {}).get("val_ap50_lo"), (best or {}).get("val_ap50_hi")]
    hold = [(metrics or {}).get(k) for k in ("holdout_ap50_lo", "holdout_ap50_hi")]
    return {
        "name": name,
        "configuration": (settings or {}).get("configuration") or name,
        "seed": (settings or {}).get("seed"),
        "backbone": (metrics or {}).get("backbone") or backbone,
        "attention": attention_of(backbone),
        "base_backbone": base_backbone(backbone),
        "scheduler": scheduler_label(train),
        "epochs_run": metrics["epochs_run"] if metrics else (len(history) or None),
        "best_val_ap50": metrics["best_val_ap50"] if metrics else (best or {}).get("val_ap50"),
        "val_ap50_ci": lo_hi if None not in lo_hi else None,
        "best_val_ap": metrics.get("best_val_ap") if metrics else (best or {}).get("val_ap"),
        "best_epoch": metrics.get("best_epoch") if metrics else (best or {}).get("epoch"),
        "holdout_ap50": (metrics or {}).get("holdout_ap50"),
        "holdout_ap50_ci": hold if None not in hold else None,
        "stop_reason": (metrics or {}).get("stop_reason"),
        "seconds": (metrics or {}).get("seconds"),
        "wall_seconds": status.get("wall_seconds"),
        "status": status.get("status", PENDING),
        "error": status.get("error"),
        "reported": reported,
        "run_dir": str(run.path),
        "comparison": None,
    }


def compare_rows(rows: list[dict[str, Any]], baseline: str | None = None, progress: bool = False) -> None:
    """Score the finished runs (status ok) of ``rows`` and compare their configurations with the
    baseline (:func:`cellkit.analysis.replicates.compare_configurations`), on the validation split
    and, where runs hold one out, the hold-out split. Sets each finished run's ``val_ap50_ci`` /
    ``holdout_ap50(_ci)`` from its own scoring and ``comparison``::

        {"baseline": name, "verdict_split": "holdout" or "val",
         "val": {configuration, n_seeds, mean, sd, ci, diff, diff_ci, p_value, p_holm, verdict, ...},
         "holdout": {...} or None}

    ``baseline``: a configuration (default: the first with a finished run). A grid whose
    baseline has not finished gets no comparison (``comparison`` stays None).
    """
    groups: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        if r.get("status") == OK:
            groups.setdefault(r["configuration"], []).append((r["name"], r["run_dir"]))
    if not groups or (baseline is not None and baseline not in groups):
        return
    base = baseline or next(iter(groups))
    by_split: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        try:
            results = compare_configurations(groups, base, split, progress=progress)
        except CellkitError:  # no hold-out predictions for the baseline, or no bootstrap
            results = []
        by_split[split] = {c.name: c for c in results}
    val, hold = by_split["val"], by_split["holdout"]
    verdict_split = "holdout" if hold and set(hold) == set(val) else "val"
    by_name = {r["name"]: r for r in rows}
    for split, results in by_split.items():
        for c in results.values():
            for run in c.runs:
                row = by_name[run.name]
                key = "val_ap50" if split == "val" else "holdout_ap50"
                if split == "holdout":
                    row["holdout_ap50"] = run.ap50
                row[f"{key}_ci"] = list(run.interval) if run.interval is not None else None
    for r in rows:
        name = r["configuration"]
        if name in val:
            r["comparison"] = {"baseline": base, "verdict_split": verdict_split, "val": val[name].to_dict(),
                               "holdout": hold[name].to_dict() if name in hold else None}


def configurations(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One dict per compared configuration, in grid order: its numbers on the verdict's split, plus
    ``baseline``, ``verdict_split`` and its numbers on the other split under ``"val"`` / ``"holdout"``."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        c = r.get("comparison")
        if not c or r["configuration"] in seen:
            continue
        main = c[c["verdict_split"]] or c["val"]
        seen[r["configuration"]] = {**main, "baseline": c["baseline"], "verdict_split": c["verdict_split"],
                                    "val": c["val"], "holdout": c["holdout"]}
    return list(seen.values())


def _config_of(run: RunDir, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run's resolved config as a dict: its ``config.yaml``, else resolved from the grid's settings."""
    try:
        data = yaml.safe_load(run.config.read_text())
        if isinstance(data, dict):
            return data
    except (OSError, yaml.YAMLError):
        pass
    if not settings:
        return {}
    spec = RunSpec("", str(settings.get("config")), dict(settings.get("overrides") or {}), None, settings.get("data"))
    try:
        return resolve_run_config(spec).to_dict()
    except ConfigError:
        return {}


def format_results_table(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """Markdown: the configurations compared with the baseline (when any run finished), then the runs
    (backbone, attention, scheduler, epochs, val and hold-out AP50 with their intervals, time,
    status). Only a verdict that is distinguishable is highlighted; nothing for being the largest."""
    lines = [f"## {title}", ""] if title else []
    confs = configurations(rows)
    if confs:
        lines += format_configurations(confs) + [""]
    lines += format_runs(rows)
    failed = [r for r in rows if r.get("status") == FAILED]
    if failed:
        lines += ["", "Failed runs:"] + [f"- {r['name']}: {one_line(r.get('error'))}" for r in failed]
    return "\n".join(lines)


def format_configurations(confs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The configurations table (rows of :func:`configurations`)."""
    base, split = confs[0]["baseline"], confs[0]["verdict_split"]
    with_hold = any(c.get("holdout") for c in confs)
    seeds = max(c["n_seeds"] for c in confs)
    head = ["Configuration", "Seeds", SPLIT_LABELS["val"], "sd over seeds"] + (
        [SPLIT_LABELS["holdout"]] if with_hold else []) + [f"{_short(split)} - {base}", "p (Holm)", "Verdict"]
    where = ("the hold-out split (scored once at each run's chosen epoch)" if split == "holdout" else
             "the validation split, which also chose each run's epoch (no hold-out split: a "
             "data.holdout_fraction > 0 would give an unbiased one)")
    out = ["Configurations: AP50 as the mean over seeds, with a 95 % interval over images"
           + (" and seeds" if seeds > 1 else " (one seed: the seed's own variation is not in it)")
           + f"; each compared with the baseline ('{base}') on {where}, paired over the same images; "
           "verdict at p < 0.05 after Holm's correction for the number of comparisons.", "",
           "| " + " | ".join(head) + " |", "|" + "|".join("---" if h in ("Configuration", "Verdict") else "---:"
                                                        for h in head) + "|"]
    for c in confs:
        val, hold = c["val"], c.get("holdout")
        verdict = c["verdict"]
        if verdict in (BETTER, WORSE):
            verdict = f"**{verdict}**"
        cells = [c["configuration"], str(c["n_seeds"]), fmt_ci(val["mean"], val["ci"]), fmt(val["sd"])]
        if with_hold:
            cells.append(fmt_ci(hold["mean"], hold["ci"]) if hold else "-")
        diff = "-" if c["diff"] is None else fmt_ci(c["diff"], c["diff_ci"], signed=True)
        cells += [diff, fmt(c["p_holm"], ".3f") if c["p_holm"] is not None else "-", verdict]
        if c.get("note"):
            cells[-1] += f" ({c['note']})"
        out.append("| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |")
    return out


def format_runs(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The runs table."""
    with_reported = any(r.get("reported") is not None for r in rows)
    with_attempts = any((r.get("attempts") or 0) > 1 for r in rows)
    with_seeds = any(r.get("seed") is not None for r in rows)
    with_hold = any(r.get("holdout_ap50") is not None for r in rows)
    head = (["Run", "Backbone", "Attention", "Scheduler", "Epochs", SPLIT_LABELS["val"], "Best val AP", "Best epoch"]
            + ([SPLIT_LABELS["holdout"]] if with_hold else []) + (["Seed"] if with_seeds else []) + ["Train time"]
            + (["Reported"] if with_reported else []) + ["Status"] + (["Attempts"] if with_attempts else []))
    text = ("Run", "Backbone", "Attention", "Scheduler", "Status")
    lines = ["Runs (each AP50 with its own 95 % interval over images):", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" if h in text else "---:" for h in head) + "|"]
    for r in rows:
        cells = [r["name"], r.get("base_backbone") or "?", r.get("attention") or "?", r.get("scheduler") or "?",
                 fmt(r.get("epochs_run")), fmt_ci(r.get("best_val_ap50"), r.get("val_ap50_ci")),
                 fmt(r.get("best_val_ap")), fmt(r.get("best_epoch"))]
        if with_hold:
            cells.append(fmt_ci(r.get("holdout_ap50"), r.get("holdout_ap50_ci")))
        if with_seeds:
            cells.append(fmt(r.get("seed")))
        cells.append(fmt_seconds(r.get("seconds")))
        if with_reported:
            cells.append(fmt(r.get("reported")))
        cells.append(r.get("status") or PENDING)
        if with_attempts:
            cells.append(fmt(r.get("attempts")))
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return lines


def save_plots(out_dir: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]] | None = None) -> list[Path]:
    """Write ``ap50.png`` (each run's AP50 with its interval), ``curves.png`` (every run's curves) and,
    when configurations were compared, ``forest.png`` (each configuration's difference to the
    baseline with its interval) into ``out_dir``."""
    out = Path(out_dir)
    rows = list(rows) if rows is not None else collect_results(out)
    histories = {r["name"]: RunDir(r["run_dir"]).history() for r in rows}
    figures = [(plot_ablation_bars(rows), "ap50.png"), (plot_ablation_curves(histories), "curves.png")]
    confs = configurations(rows)
    if confs:
        figures.append((plot_forest(confs), "forest.png"))
    else:  # nothing compared (yet): no stale plot of an earlier state
        (out / "forest.png").unlink(missing_ok=True)
    paths = []
    for fig, name in figures:
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    return paths


def _short(split: str) -> str:
    return "hold-out" if split == "holdout" else "val"


def fmt(v: Any, spec: str = ".4f") -> str:
    """A table cell: ``-`` for None, 4 decimals for floats."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def fmt_ci(value: Any, ci: Sequence[Any] | None, signed: bool = False) -> str:
    """``0.7744 [0.70, 0.83]`` (``+0.0123 [-0.02, +0.05]`` with ``signed``); ``-`` for no value."""
    if value is None:
        return "-"
    spec = "+.4f" if signed else ".4f"
    text = format(float(value), spec)
    if ci is not None and None not in ci:
        s2 = "+.2f" if signed else ".2f"
        text += f" [{format(float(ci[0]), s2)}, {format(float(ci[1]), s2)}]"
    return text
