"""Plots of an ablation grid: each run's validation AP50 with its interval, every run's curves on one figure,
and the forest plot of each configuration's difference to the baseline."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_ablation_bars(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Horizontal bars of each run's best validation AP50 (rows of :func:`cellkit.grid.results.collect_results`)
    with its 95 % interval over images (``val_ap50_ci``) as an error bar.

    No run is highlighted for being the largest (whether a difference is real is the forest
    plot's question, :func:`plot_forest`); failed runs get a hatched red stub labelled ``failed``
    (with the AP50 they reached before failing, if any); runs not run yet are labelled
    ``pending``; a report's number (``reported``) is drawn as a black tick beside the bar.
    """
    names = [str(r["name"]) for r in rows]
    values = [r.get("best_val_ap50") for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.42 * max(1, len(rows))))
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
            ci = r.get("val_ap50_ci")
            err = None if not ci or None in ci else [[max(0.0, v - ci[0])], [max(0.0, ci[1] - v)]]
            ax.barh(y, width, color="tab:blue", xerr=err, ecolor="black", capsize=3)
            label = f"{v:.4f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if err is not None else "")
            width = max(width, ci[1]) if err is not None else width
        ax.text(width + 0.005, y, label, va="center", fontsize=8, color="#cc0000" if status == "failed" else "black")
        if r.get("reported") is not None:
            ax.plot([r["reported"]] * 2, [y - 0.4, y + 0.4], color="black", lw=2,
                    label="reported" if y == first_reported else None)
    ax.set_yticks(ys, names, fontsize=8)
    ax.invert_yaxis()
    highs = [r["val_ap50_ci"][1] for r in rows if r.get("val_ap50_ci") and r["val_ap50_ci"][1] is not None]
    top = max([v for v in values if v is not None] + reported + highs + [0.05])
    ax.set_xlim(0, min(1.0, top * 1.25 + 0.05))
    ax.set_xlabel("validation AP50 (segm) at the epoch it chose, 95 % interval over images")
    ax.grid(axis="x", alpha=0.3)
    if reported:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "validation AP50 per run (at the epoch that split chose)")
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


def plot_forest(configurations: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """One row per configuration: its AP50 difference to the baseline with the 95 % interval, a line at 0.

    Args:
        configurations: dicts as :func:`cellkit.grid.results.configurations` gives them:
            ``configuration``, ``n_seeds``, ``diff``, ``diff_ci`` (None for the baseline), ``verdict``,
            ``baseline``, ``verdict_split``, ``p_holm``.

    A configuration whose verdict is ``better`` or ``worse`` (distinguishable after Holm's
    correction) is drawn in colour (green, red); the others grey. The baseline sits at 0.
    """
    rows = list(configurations)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * max(1, len(rows))))
    colours = {"better": "tab:green", "worse": "tab:red"}
    base = rows[0].get("baseline") if rows else ""
    split = rows[0].get("verdict_split", "val") if rows else "val"
    for y, c in enumerate(rows):
        verdict = c.get("verdict", "")
        if c.get("diff") is None:  # the baseline itself, or a configuration that could not be compared
            if verdict == "baseline":
                ax.plot([0], [y], marker="D", color="black")
            ax.text(0.0, y, f"  {verdict}" + (f" ({c['note']})" if c.get("note") else ""), va="center", fontsize=7)
            continue
        lo, hi = c["diff_ci"]
        colour = colours.get(verdict, "grey")
        ax.errorbar([c["diff"]], [y], xerr=[[c["diff"] - lo], [hi - c["diff"]]], fmt="o", color=colour, capsize=4)
        p = c.get("p_holm")
        label = f"  {c['diff']:+.3f} [{lo:+.2f}, {hi:+.2f}] {verdict}" + (f", p={p:.3f}" if p is not None else "")
        ax.text(hi, y, label, va="center", fontsize=7, color=colour if colour != "grey" else "black")
    ax.axvline(0.0, color="black", lw=1)
    ax.set_yticks(range(len(rows)), [f"{c['configuration']} ({c.get('n_seeds', 1)} seed"
                                     f"{'s' if c.get('n_seeds', 1) != 1 else ''})" for c in rows], fontsize=8)
    ax.invert_yaxis()
    lows = [c["diff_ci"][0] for c in rows if c.get("diff_ci")] + [0.0]
    highs = [c["diff_ci"][1] for c in rows if c.get("diff_ci")] + [0.0]
    span = max(0.02, max(highs) - min(lows))
    ax.set_xlim(min(lows) - 0.1 * span, max(highs) + 0.6 * span)
    where = "hold-out" if split == "holdout" else "validation"
    ax.set_xlabel(f"{where} AP50 minus the baseline's ('{base}')\n95 % interval over images and seeds", fontsize=9,
                  wrap=True)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or f"each configuration against the baseline ('{base}')\nverdicts Holm-corrected", fontsize=10,
                 wrap=True)  # a long configuration name wraps instead of running off the figure
    fig.tight_layout()
    return fig
