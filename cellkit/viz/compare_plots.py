"""The static figure of a two-run comparison (:mod:`cellkit.evaluation.compare`)."""
from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ..evaluation.compare import CATEGORIES
from .overlay import COMPARE_COLORS

__all__ = ["plot_run_comparison"]


def plot_run_comparison(cmp: Any, max_images: int = 12, title: str | None = None) -> Figure:
    """Three panels: cells per class by category (found by both / A only / B only / neither), AP50
    per class of each run with the part of the difference the differing cells explain, and the
    images with the most cells found by one run only.

    Args:
        cmp: a :class:`~cellkit.evaluation.compare.RunComparison`.
        max_images: images in the third panel.
    """
    a, b = cmp.names
    labels = {"both": "both", "a_only": f"{a} only", "b_only": f"{b} only", "neither": "neither"}
    colors = {k: np.array(c) / 255 for k, c in COMPARE_COLORS.items()}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1.1, 1.1, 1.4]})

    # 1. cells per class, stacked by category
    by_class = cmp.counts_by_class()
    names = [n for n, c in by_class.items() if sum(c.values())]  # classes with cells
    y = np.arange(len(names))
    left = np.zeros(len(names))
    ax = axes[0]
    for c in CATEGORIES:
        v = np.array([by_class[n][c] for n in names], float)
        ax.barh(y, v, left=left, color=colors[c], label=labels[c])
        left += v
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("ground-truth cells")
    ax.set_title("cells by class: who finds them")
    ax.legend(fontsize=8, loc="lower right")

    # 2. AP50 per class, and the explained part of the difference
    per = cmp.per_class()
    ax = axes[1]
    w = 0.38
    ap_a = np.array([per[n]["ap50_a"] for n in names], float)
    ap_b = np.array([per[n]["ap50_b"] for n in names], float)
    ax.bar(y - w / 2, np.nan_to_num(ap_a), w, color="#777777", label=f"A = {a}")
    ax.bar(y + w / 2, np.nan_to_num(ap_b), w, color="#2b2b2b", label=f"B = {b}")
    for k, n in enumerate(names):
        e = per[n]["explained"]
        if np.isfinite(e):
            ax.annotate(f"{e:+.3f}", (k, max(np.nan_to_num(ap_a[k]), np.nan_to_num(ap_b[k])) + 0.02),
                        ha="center", fontsize=8)
    ax.set_xticks(y, names)
    top = np.nanmax(np.concatenate([ap_a, ap_b, [0.0]]))
    ax.set_ylim(0, max(0.1, top * 1.25 + 0.05))
    ax.set_ylabel("AP50")
    ax.set_title(f"AP50 B - A = {cmp.ap50_diff:+.4f}; differing cells explain {cmp.explained:+.4f}\n"
                 "(numbers: explained part per class)", fontsize=9)
    ax.legend(fontsize=8)

    # 3. the images with the most cells found by one run only
    ax = axes[2]
    diffs = [d for d in cmp.by_image() if d.n_diff][:max_images]
    if diffs:
        yy = np.arange(len(diffs))
        ax.barh(yy, [-d.a_only for d in diffs], color=colors["a_only"], label=labels["a_only"])
        ax.barh(yy, [d.b_only for d in diffs], color=colors["b_only"], label=labels["b_only"])
        ax.set_yticks(yy, [_short_name(d.file_name) for d in diffs], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.8)
        ax.legend(fontsize=8)
        ax.set_xlabel(f"cells found by {a} only (left) / {b} only (right)")
    else:
        ax.text(0.5, 0.5, "both runs find the same cells", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("images with the most differing cells")
    fig.suptitle(title or f"{a} vs {b}: {sum(cmp.counts().values())} validation cells at IoU {cmp.iou:g}")
    fig.tight_layout()
    return fig


def _short_name(name: str, n: int = 18) -> str:
    name = name.split("/")[0]
    return name if len(name) <= n else name[: n - 1] + "…"
