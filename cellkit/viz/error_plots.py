"""Figures of the error analysis (:class:`cellkit.evaluation.ErrorAnalysis`), for notebook 04_error_analysis.

Every function returns a matplotlib :class:`~matplotlib.figure.Figure` (made with ``pyplot``, like
:mod:`cellkit.viz.curves`) and never calls ``plt.show()``; close figures you do not keep
(``plt.close(fig)``).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..evaluation.curves import ThresholdPoint
from ..evaluation.operating import SizeRecall
from ..evaluation.tide import ERROR_NAMES, ERROR_TYPES, SPECIAL_TYPES, ErrorReport
from ..structures.label_maps import MaskRegion
from .overlay import STATUS_COLORS, render

__all__ = [
    "plot_ap_vs_threshold",
    "plot_confusion_matrix",
    "plot_pr_curves",
    "plot_recall_by_size",
    "plot_score_histograms",
    "plot_tide",
    "worst_images_figure",
]

_TYPE_COLORS = {
    "cls": "#e6550d", "loc": "#fdae6b", "both": "#9e9ac8", "dupe": "#74c476", "bkg": "#d62728", "miss": "#3182bd",
    "false_pos": "#7f7f7f", "false_neg": "#bcbd22",
}


def plot_tide(report: ErrorReport, title: str = "") -> Figure:
    """TIDE bar charts: AP gained by fixing each main error type (with its count), and the two
    special oracles (every false positive / false negative).

    Args:
        report: from :func:`cellkit.evaluation.ErrorAnalysis.tide`.
    """
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1.3]})
    delta = report.delta
    labels = [f"{ERROR_NAMES[t]}\n({t}, n={report.counts[t]})" for t in ERROR_TYPES]
    vals = [_nz(delta[t]) for t in ERROR_TYPES]
    ypos = np.arange(len(ERROR_TYPES))
    ax1.barh(ypos, vals, color=[_TYPE_COLORS[t] for t in ERROR_TYPES])
    ax1.set_yticks(ypos, labels, fontsize=8)
    ax1.invert_yaxis()
    top = max([*vals, *(_nz(delta[t]) for t in SPECIAL_TYPES), 0.01])
    for y, v in zip(ypos, vals):
        ax1.text(v + top * 0.01, y, f"+{v:.3f}", va="center", fontsize=8)
    ax1.set_xlim(0, top * 1.18)
    ax1.set_xlabel(f"AP{_iou_label(report.iou_fg)} gained when fixed alone")
    ax1.set_title(f"main errors (AP{_iou_label(report.iou_fg)} {_fmt(report.base_ap)}, "
                  f"all fixed {_fmt(report.fixed_ap['all'])})", fontsize=10)
    ax1.grid(axis="x", alpha=0.3)
    svals = [_nz(delta[t]) for t in SPECIAL_TYPES]
    ax2.bar(np.arange(len(SPECIAL_TYPES)), svals, color=[_TYPE_COLORS[t] for t in SPECIAL_TYPES])
    ax2.set_xticks(np.arange(len(SPECIAL_TYPES)), ["false pos.", "false neg."])
    for x, v in enumerate(svals):
        ax2.text(x, v + top * 0.01, f"+{v:.3f}", ha="center", fontsize=8)
    ax2.set_ylim(0, top * 1.18)
    ax2.set_ylabel("AP gained")
    ax2.set_title("special errors", fontsize=10)
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle(title or f"TIDE error decomposition (segm, IoU {report.iou_fg:g}, background < {report.iou_bg:g})")
    fig.tight_layout()
    return fig


def plot_pr_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "") -> Figure:
    """Per-class precision-recall curves, the class's AP (the curve's mean) in the legend.

    Args:
        curves: class name -> ``(recall (101,), precision (101,))`` from
            :meth:`cellkit.evaluation.ErrorAnalysis.pr_curves`; classes whose precision is all NaN (no
            ground truth) are listed as such.
    """
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, (rec, prec) in curves.items():
        if np.all(np.isnan(prec)):
            ax.plot([], [], ls="none", label=f"{name}: no ground truth")
            continue
        ax.plot(rec, prec, lw=1.8, label=f"{name}: AP {np.nanmean(prec):.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (interpolated)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or "precision-recall per class (IoU 0.5)")
    fig.tight_layout()
    return fig


def plot_confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str] | None = None, normalize: bool = False, title: str = ""
) -> Figure:
    """Heatmap of :meth:`cellkit.evaluation.ErrorAnalysis.confusion_matrix` with the counts written in.

    Args:
        matrix: ``(C + 1, C + 1)`` int: rows ground-truth class + background, columns predicted
            class + missed.
        class_names: C names (default ``class1``..).
        normalize: colour by the share of each row (counts are still written).
    """
    m = np.asarray(matrix)
    C = m.shape[0] - 1
    names = list(class_names) if class_names is not None else [f"class{k}" for k in range(1, C + 1)]
    shade = m.astype(np.float64)
    if normalize:
        shade = shade / np.maximum(shade.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.1 * C + 3.5, 1.0 * C + 2.5), layout="constrained")
    im = ax.imshow(shade, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of row" if normalize else "count")
    ax.set_xticks(np.arange(C + 1), [*names, "missed"], rotation=30, ha="right")
    ax.set_yticks(np.arange(C + 1), [*names, "background"])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    hi = shade.max() if shade.size else 0
    for r in range(C + 1):
        for c in range(C + 1):
            if r == C and c == C:
                continue
            ax.text(c, r, f"{int(m[r, c])}", ha="center", va="center", fontsize=9,
                    color="white" if hi and shade[r, c] > 0.6 * hi else "black")
    ax.axhline(C - 0.5, color="grey", lw=1)
    ax.axvline(C - 0.5, color="grey", lw=1)
    ax.set_title(title or "class confusion of matched cells")
    return fig


def plot_recall_by_size(table: SizeRecall, per_class: bool = True, title: str = "") -> Figure:
    """Recall per area bin (bars), all classes together and per class, instance counts on top.

    Args:
        table: from :meth:`cellkit.evaluation.ErrorAnalysis.recall_by_size`.
        per_class: also draw one bar per class (classes without instances are left out).

    Empty bins below the smallest and above the largest instance are not drawn.
    """
    rows = [0] + ([k for k in range(1, len(table.classes)) if table.n_gt[k].sum() > 0] if per_class else [])
    full = np.flatnonzero(table.n_gt[0] > 0)
    keep = slice(int(full[0]), int(full[-1]) + 1) if len(full) else slice(None)
    labels = table.bin_labels()[keep]
    rec = table.recall[:, keep]
    n_all = table.n_gt[0, keep]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4))
    width = 0.8 / len(rows)
    x = np.arange(len(labels))
    for n, k in enumerate(rows):
        pos = x - 0.4 + width * (n + 0.5)
        vals = np.nan_to_num(rec[k], nan=0.0)
        ax.bar(pos, vals, width, label=table.classes[k], color="black" if k == 0 else None,
               alpha=0.85 if k == 0 else 0.75)
        if k == 0:
            for xi, v, ng in zip(pos, vals, n_all):
                if ng:
                    ax.text(xi, v + 0.02, f"n={ng}", ha="center", fontsize=7)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_xlabel("cell area (px²)")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(rows), 5))
    ax.set_title(title or f"recall by cell size (IoU {table.iou:g}, score >= {table.score_thresh:g})")
    fig.tight_layout()
    return fig


def plot_score_histograms(
    tp_scores: np.ndarray, fp_scores: np.ndarray, bins: int = 20, log: bool = False, title: str = ""
) -> Figure:
    """Overlaid histograms of true- and false-positive scores over [0, 1].

    Args:
        tp_scores, fp_scores: ``(n,)`` float scores, from
            :meth:`cellkit.evaluation.ErrorAnalysis.score_distributions`.
        bins: number of equal-width bins.
        log: counts on a log scale (many low-score false positives at a near-zero threshold).
    """
    fig, ax = plt.subplots(figsize=(6, 3.8))
    edges = np.linspace(0, 1, bins + 1)
    ax.hist(np.asarray(tp_scores), bins=edges, alpha=0.6, color="tab:green", label=f"true positives ({len(tp_scores)})")
    ax.hist(np.asarray(fp_scores), bins=edges, alpha=0.6, color="tab:red", label=f"false positives ({len(fp_scores)})")
    ax.set_xlabel("score")
    ax.set_ylabel("predictions")
    if log and (len(tp_scores) or len(fp_scores)):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "scores of true and false positives")
    fig.tight_layout()
    return fig


def plot_ap_vs_threshold(points: Sequence[ThresholdPoint], title: str = "") -> Figure:
    """AP50 against the score threshold, the predictions kept on a twin axis.

    Args:
        points: from :meth:`cellkit.evaluation.ErrorAnalysis.ap50_vs_score_threshold`.
    """
    fig, ax = plt.subplots(figsize=(6, 3.8))
    thr = [p.threshold for p in points]
    ax.plot(thr, [p.ap50 for p in points], marker="o", color="tab:blue", label="AP50 (segm)")
    ax.set_xlabel("score threshold")
    ax.set_ylabel("AP50", color="tab:blue")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(thr, [p.n_kept for p in points], marker=".", ls="--", color="grey", label="predictions kept")
    ax2.set_ylabel("predictions kept", color="grey")
    ax2.set_ylim(0, max([p.n_kept for p in points] + [1]) * 1.05)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
    ax.set_title(title or "AP50 of the predictions above a score threshold")
    fig.tight_layout()
    return fig


def worst_images_figure(
    images: Sequence[np.ndarray],
    instances_by_image: Sequence[Sequence["MaskRegion"]],
    titles: Sequence[str],
    ncols: int = 3,
    mode: str = "outline",
    panel_size: float = 4.0,
) -> Figure:
    """Static gallery: each image with TP (green), FP (red) and FN (blue) cells outlined.

    Args:
        images: ``(H, W, 3)`` uint8/uint16 images.
        instances_by_image: per image, instances with ``status`` set (from
            :meth:`cellkit.evaluation.ErrorAnalysis.status_entries` through
            :func:`cellkit.viz.overlay.instances_from_coco`).
        titles: one caption per image (e.g. ``ImageScore.title()``).
        ncols: panels per row.
        mode: ``"outline"``, ``"fill"`` or ``"both"`` (see :func:`cellkit.viz.overlay.render`).
    """
    if not (len(images) == len(instances_by_image) == len(titles)):
        raise ValueError("images, instances_by_image and titles must have the same length")
    n = max(len(images), 1)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, insts, title in zip(axes.ravel(), images, instances_by_image, titles):
        ax.imshow(render(image, insts, mode=mode, color_by="status"))
        ax.set_title(title, fontsize=9)
    handles = [Patch(color=np.asarray(STATUS_COLORS[s]) / 255, label=lab)
               for s, lab in (("tp", "true positive"), ("fp", "false positive"), ("fn", "missed (false negative)"))]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def _nz(x: float) -> float:
    return 0.0 if x is None or math.isnan(x) else float(x)


def _fmt(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _iou_label(iou: float) -> str:
    return f"{round(iou * 100):d}"
