"""The results table of a grid folder: one row per run, as markdown and JSON, and its plots."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import yaml

from ..errors import ConfigError
from ..outputs import write_atomic, write_json
from ..runs import RunDir, read_json
from ..viz.ablation_plots import plot_ablation_bars, plot_ablation_curves
from .ledger import Ledger
from .spec import RunSpec, attention_of, base_backbone, resolve_run_config, scheduler_label
from .status import FAILED, GRID_FILE, PENDING, RESULTS_JSON, RESULTS_MD, STATUS_FILE, fmt_seconds, one_line


def collect_results(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The results table of a grid folder, also written as ``results.json`` and ``results.md``.

    One row per run (in the grid's order; every ``<name>/status.json`` folder when there is no
    ``grid.json``): ``name, backbone, base_backbone, attention, scheduler, epochs_run,
    best_val_ap50, best_val_ap, best_epoch, stop_reason, seconds, wall_seconds, status, error,
    reported, run_dir, attempts`` (times the run was started, from ``ledger.jsonl``). Numbers come
    from each run's ``metrics.json`` (from ``metrics.jsonl`` when the run stopped before writing
    it); the settings from its resolved ``config.yaml`` (from the grid's settings for a run that
    has not trained yet).
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
    return {
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
        "run_dir": str(run.path),
    }


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
    """A markdown table like report 000's: backbone, attention, scheduler, epochs, AP50 (best in bold)."""
    with_reported = any(r.get("reported") is not None for r in rows)
    with_attempts = any((r.get("attempts") or 0) > 1 for r in rows)
    head = ["Run", "Backbone", "Attention", "Scheduler", "Epochs", "Best val AP50", "Best val AP", "Best epoch",
            "Train time"] + (["Reported"] if with_reported else []) + ["Status"] + (["Attempts"] if with_attempts else [])
    best = max((r["best_val_ap50"] for r in rows if r.get("best_val_ap50") is not None), default=None)
    numeric = ("Epochs", "Best val AP50", "Best val AP", "Best epoch", "Train time", "Reported", "Attempts")
    lines = ([f"## {title}", ""] if title else []) + [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" if h in numeric else "---" for h in head) + "|",
    ]
    for r in rows:
        ap50 = fmt(r.get("best_val_ap50"))
        if best is not None and r.get("best_val_ap50") == best and len(rows) > 1:
            ap50 = f"**{ap50}**"
        cells = [r["name"], r.get("base_backbone") or "?", r.get("attention") or "?", r.get("scheduler") or "?",
                 fmt(r.get("epochs_run")), ap50, fmt(r.get("best_val_ap")), fmt(r.get("best_epoch")),
                 fmt_seconds(r.get("seconds"))]
        if with_reported:
            cells.append(fmt(r.get("reported")))
        cells.append(r.get("status") or PENDING)
        if with_attempts:
            cells.append(fmt(r.get("attempts")))
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    failed = [r for r in rows if r.get("status") == FAILED]
    if failed:
        lines += ["", "Failed runs:"] + [f"- {r['name']}: {one_line(r.get('error'))}" for r in failed]
    return "\n".join(lines)


def save_plots(out_dir: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]] | None = None) -> list[Path]:
    """Write ``ap50.png`` (bar chart per run) and ``curves.png`` (every run's curves) into ``out_dir``."""
    out = Path(out_dir)
    rows = list(rows) if rows is not None else collect_results(out)
    histories = {r["name"]: RunDir(r["run_dir"]).history() for r in rows}
    paths = []
    for fig, name in ((plot_ablation_bars(rows), "ap50.png"), (plot_ablation_curves(histories), "curves.png")):
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    return paths


def fmt(v: Any) -> str:
    """A table cell: ``-`` for None, 4 decimals for floats."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)
