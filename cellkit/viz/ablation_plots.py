"""Plots of an ablation grid: best validation AP50 per run, and every run's curves on one figure."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_ablation_bars(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Horizontal bars of each run's best validation AP50 (rows of :func:`cellkit.grid.results.collect_results`).

    The best run is highlighted; failed runs get a hatched red stub labelled ``failed`` (with the
    AP50 they reached before failing, if any); runs not run yet are labelled ``pending``; a
    report's number (``reported``) is drawn as a black tick beside the bar.
    """
    names = [str(r["name"]) for r in rows]
    values = [r.get("best_val_ap50") for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.42 * max(1, len(rows))))
    best = max((v for v in values if v is not None), default=None)
    reported = [r["reported"] for r in rows if r.get("reported") is not None]
    first_reported = next((i for i, r in enumerate(rows) if r.get("reported") is not None), None)
    ys = list(range(len(rows)))
    for y, r, v in zip(ys, rows, values):
        status = r.get("status")
        width = v if v is not None else 0.0
        if status == "failed":
            ax.barh(y, max(width, 0.004), color="#f4cccc", edgecolor="#cc0000", hatch="//")
            label = "failed" + (f" ({v:.3f})" if v is not None else "")
        elif v is None:
            ax.barh(y, 0.004, color="lightgrey")
            label = status if status and status != "ok" else "no AP50"
        else:
            ax.barh(y, width, color="tab:orange" if v == best and len(rows) > 1 else "tab:blue")
            label = f"{v:.4f}"
        ax.text(width + 0.005, y, label, va="center", fontsize=8, color="#cc0000" if status == "failed" else "black")
        if r.get("reported") is not None:
            ax.plot([r["reported"]] * 2, [y - 0.4, y + 0.4], color="black", lw=2,
                    label="reported" if y == first_reported else None)
    ax.set_yticks(ys, names, fontsize=8)
    ax.invert_yaxis()
    top = max([v for v in values if v is not None] + reported + [0.05])
    ax.set_xlim(0, min(1.0, top * 1.25 + 0.05))
    ax.set_xlabel("best validation AP50 (segm)")
    ax.grid(axis="x", alpha=0.3)
    if reported:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "best validation AP50 per run")
    fig.tight_layout()
    return fig


def plot_ablation_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], title: str = "") -> Figure:
    """Two panels, one line per run: validation AP50 per epoch, and the training loss per epoch.

    Args:
        histories: run name -> the per-epoch dicts of its ``metrics.jsonl`` (empty for runs that
            never finished an epoch; they appear in the legend only).
    """
    fig, (ax_ap, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.2))
    cmap = plt.get_cmap("tab10" if len(histories) <= 10 else "tab20")
    any_loss = False
    for i, (name, history) in enumerate(histories.items()):
        color = cmap(i % cmap.N)
        val = [(h["epoch"], h["val_ap50"]) for h in history if h.get("val_ap50") is not None]
        marker = "o" if len(history) < 30 else None
        if val:
            ax_ap.plot([e for e, _ in val], [v for _, v in val], marker=marker, color=color, label=name)
        else:
            ax_ap.plot([], [], color=color, label=f"{name} (no AP50)")
        loss = [(h["epoch"], h["loss"]) for h in history if h.get("loss") is not None]
        if loss:
            any_loss = True
            ax_loss.plot([e for e, _ in loss], [v for _, v in loss], marker=marker, color=color, label=name)
    for ax in (ax_ap, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylabel("validation AP50 (segm)")
    ax_ap.set_ylim(0, 1)
    ax_ap.grid(alpha=0.3)
    ax_ap.legend(fontsize=7)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    if any_loss:
        ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    fig.suptitle(title or "validation AP50 and training loss of every run")
    fig.tight_layout()
    return fig
