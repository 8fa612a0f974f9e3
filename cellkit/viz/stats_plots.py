"""Dataset statistics as figures: instances per class and image, instance and image sizes, examples."""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ..analysis.stats import DatasetStats
from .overlay import class_color, render


def _color(k: int) -> tuple[float, ...]:
    return tuple(c / 255 for c in class_color(k))


def plot_dataset_stats(stats: DatasetStats) -> Figure:
    """Four panels: instances per class, instances per image, instance area per class, image sizes."""
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.8))
    classes = range(1, stats.num_classes + 1)
    totals = stats.counts.sum(0)
    bars = ax[0].bar([f"class {k}" for k in classes], totals, color=[_color(k) for k in classes], edgecolor="k")
    for b, n in zip(bars, totals):
        ax[0].annotate(f"{n}\n{n / max(1, totals.sum()):.1%}", (b.get_x() + b.get_width() / 2, b.get_height()),
                       ha="center", va="bottom", fontsize=8)
    ax[0].set_title("instances per class")
    ax[0].set_ylim(0, max(1, totals.max()) * 1.25)
    per_image = stats.counts.sum(1)
    ax[1].hist(per_image, bins=min(30, max(5, len(per_image) // 2)), color="grey", edgecolor="k")
    ax[1].set_title(f"instances per image (mean {per_image.mean():.0f}, max {per_image.max()})")
    ax[1].set_xlabel("instances")
    ax[1].set_ylabel("images")
    areas = stats.instance_area if len(stats.instance_area) else np.array([1, 2])
    bins = np.logspace(np.log10(max(1, areas.min())), np.log10(max(2, areas.max())), 30)
    for k in classes:
        a = stats.instance_area[stats.instance_class == k]
        if len(a):
            ax[2].hist(a, bins=bins, histtype="step", lw=2, color=_color(k), label=f"class {k} (median {np.median(a):.0f})")
    ax[2].set_xscale("log")
    ax[2].set_title("instance area (px)")
    ax[2].legend(fontsize=7)
    ax[3].scatter(stats.widths, stats.heights, s=12 + per_image / max(1, per_image.max()) * 60, alpha=0.6, c="C0")
    ax[3].set_xlabel("width (px)")
    ax[3].set_ylabel("height (px)")
    ax[3].set_title("image sizes (dot size ~ instances)")
    fig.tight_layout()
    return fig


def extreme_images(stats: DatasetStats) -> dict[str, int]:
    """Indices of the smallest, the largest and the most crowded image (instances per px)."""
    area = stats.heights * stats.widths
    density = stats.counts.sum(1) / np.maximum(area, 1)
    return {"smallest": int(np.argmin(area)), "largest": int(np.argmax(area)), "most crowded": int(np.argmax(density))}


def plot_examples(dataset: Any, picks: dict[str, int] | Sequence[int], mode: str = "outline") -> Figure:
    """Images of a :class:`~cellkit.data.CellDataset` with their instances outlined by class.

    Args:
        picks: ``{title: index}`` or a list of indices.
    """
    if not isinstance(picks, dict):
        picks = {dataset.samples[i].name[:13]: i for i in picks}
    fig, axes = plt.subplots(1, len(picks), figsize=(5.2 * len(picks), 5.2), squeeze=False)
    for ax, (title, i) in zip(axes[0], picks.items()):
        image, maps = dataset.load(i)
        ax.imshow(render(image, list(maps.regions()), mode=mode))
        counts = maps.class_counts(max(int(maps.labels.max()), 1))
        ax.set_title(f"{title}: {image.shape[0]}x{image.shape[1]} px, {counts.sum()} cells\n"
                     + " ".join(f"c{k + 1}:{n}" for k, n in enumerate(counts)), fontsize=9)
        ax.axis("off")
    classes = sorted({int(k) for i in picks.values() for k in dataset.load(i)[1].labels[1:]}) or [1]
    handles = [plt.Line2D([], [], color=_color(k), lw=3, label=f"class {k}") for k in classes]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
