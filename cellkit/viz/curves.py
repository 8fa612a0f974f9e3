"""Training curves: loss terms, validation AP50/AP and the learning rate per epoch."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ..outputs import write_atomic

LOSS_KEYS = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def plot_history(history: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Two panels: training losses (log scale) and validation AP50 / AP with the lr on a twin axis.

    Args:
        history: the per-epoch dicts of ``metrics.jsonl``.
    """
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    epochs = [h["epoch"] for h in history]
    extra = sorted({k for h in history for k in h if k.startswith("loss_") and k not in LOSS_KEYS})
    for key in (*LOSS_KEYS, *extra):  # extra: the cascade's per-stage losses, loss_mask_dice ...
        ys = [h.get(key) for h in history]
        if any(y is not None for y in ys):
            ax1.plot(epochs, ys, marker="o" if len(epochs) < 30 else None, lw=2 if key == "loss" else 1, label=key)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    if any((h.get("loss") or 0) > 0 for h in history):
        ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    val = [(h["epoch"], h.get("val_ap50"), h.get("val_ap")) for h in history if h.get("val_ap50") is not None]
    if val:
        ax2.plot([v[0] for v in val], [v[1] for v in val], marker="o", label="val AP50 (segm)")
        ax2.plot([v[0] for v in val], [v[2] for v in val], marker=".", label="val AP (segm)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation AP")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    lr_ax = ax2.twinx()
    lr_ax.plot(epochs, [h.get("lr") for h in history], color="grey", ls="--", lw=1, label="lr")
    lr_ax.set_ylabel("learning rate", color="grey")
    lr_ax.set_yscale("log")
    lines = ax2.get_legend_handles_labels()
    lines2 = lr_ax.get_legend_handles_labels()
    ax2.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_history_plot(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Write :func:`plot_history` as a PNG, atomically (a reader never sees half a plot; a full
    disk is a :class:`~cellkit.errors.DataError` naming the file)."""
    fig = plot_history(history, title)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return write_atomic(path, buf.getvalue())
