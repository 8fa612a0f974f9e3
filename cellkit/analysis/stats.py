"""Dataset statistics: images, instances per class and per image, instance and image sizes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import DataConfig
from ..data import CellDataset, num_classes_of, resolve_root, scan_train
from ..progress import bar
from .scale import equivalent_diameter


@dataclass
class DatasetStats:
    """Per-image and per-instance numbers of an annotated dataset.

    Attributes:
        names: image folder names, ``(n_images,)``.
        heights, widths: image sizes in px, ``(n_images,)`` int.
        counts: ``(n_images, num_classes)`` int instances per class and image.
        instance_class: ``(n_instances,)`` int class of every instance (1-based).
        instance_area: ``(n_instances,)`` int pixel area of every instance.
        instance_image: ``(n_instances,)`` int index into ``names``.
    """

    names: list[str]
    heights: np.ndarray
    widths: np.ndarray
    counts: np.ndarray
    instance_class: np.ndarray
    instance_area: np.ndarray
    instance_image: np.ndarray
    num_classes: int
    root: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        per_class = {}
        for k in range(1, self.num_classes + 1):
            a = self.instance_area[self.instance_class == k]
            per_class[f"class{k}"] = {
                "instances": int(len(a)),
                "share": float(len(a) / max(1, len(self.instance_area))),
                "images_with": int((self.counts[:, k - 1] > 0).sum()),
                "area_p5_p50_p95": [float(v) for v in np.percentile(a, [5, 50, 95])] if len(a) else None,
                "median_diameter": float(np.median(equivalent_diameter(a))) if len(a) else None,
            }
        per_image = self.counts.sum(1)
        return {
            "root": self.root,
            "images": len(self.names),
            "instances": int(len(self.instance_area)),
            "instances_per_image": {"mean": float(per_image.mean()), "median": float(np.median(per_image)),
                                    "max": int(per_image.max())},
            "image_height_min_median_max": [int(self.heights.min()), float(np.median(self.heights)), int(self.heights.max())],
            "image_width_min_median_max": [int(self.widths.min()), float(np.median(self.widths)), int(self.widths.max())],
            "median_diameter": float(np.median(self.instance_diameter)) if len(self.instance_area) else None,
            "classes": per_class,
        }

    @property
    def instance_diameter(self) -> np.ndarray:
        """``(n_instances,)`` float64 equivalent diameter ``sqrt(4 * area / pi)`` in px of every instance."""
        return equivalent_diameter(self.instance_area)


def dataset_stats(cfg: DataConfig, num_classes: int | None = None, progress: bool = True) -> DatasetStats:
    """Statistics of every annotated image of the dataset ``cfg`` points to (all splits).

    Args:
        num_classes: classes ``1..num_classes`` (None: up to the dataset's highest ``classK.tif``).
    """
    root = resolve_root(cfg, progress)
    ds = CellDataset(scan_train(root, num_classes), cache=False)
    return stats_of(ds, num_classes, progress, str(root))


def stats_of(ds: CellDataset, num_classes: int | None = None, progress: bool = True, root: str = "") -> DatasetStats:
    """Statistics of the images of a :class:`CellDataset` (decoded one at a time; ``num_classes``
    None: up to the highest ``classK.tif`` of its samples)."""
    num_classes = num_classes if num_classes is not None else num_classes_of(ds.samples)
    hs, ws, counts, cls, area, img = [], [], [], [], [], []
    for i in bar(range(len(ds)), desc="reading images", enabled=progress):
        image, maps = ds.load(i)
        hs.append(image.shape[0])
        ws.append(image.shape[1])
        counts.append(maps.class_counts(num_classes))
        sizes = np.zeros(maps.num_instances + 1, dtype=np.int64)
        for layer in maps.layers:
            sizes += np.bincount(layer.ravel(), minlength=maps.num_instances + 1)
        cls.append(maps.labels[1:])
        area.append(sizes[1:])
        img.append(np.full(maps.num_instances, i))
    return DatasetStats(
        names=[s.name for s in ds.samples], heights=np.asarray(hs), widths=np.asarray(ws),
        counts=np.asarray(counts).reshape(-1, num_classes), instance_class=np.concatenate(cls) if cls else np.zeros(0, int),
        instance_area=np.concatenate(area) if area else np.zeros(0, int),
        instance_image=np.concatenate(img) if img else np.zeros(0, int), num_classes=num_classes, root=root,
    )


def format_stats(stats: DatasetStats) -> str:
    """A short human-readable table of :meth:`DatasetStats.to_dict`."""
    d = stats.to_dict()
    lines = [
        f"dataset: {d['root']}",
        f"images: {d['images']}   instances: {d['instances']}   per image: mean {d['instances_per_image']['mean']:.1f}, "
        f"max {d['instances_per_image']['max']}",
        f"image height min/median/max: {d['image_height_min_median_max']}   width: {d['image_width_min_median_max']}",
        f"{'class':<8}{'instances':>10}{'share':>8}{'images':>8}{'median diameter (px)':>22}   area p5/p50/p95 (px)",
    ]
    for name, c in d["classes"].items():
        area = "-" if c["area_p5_p50_p95"] is None else " / ".join(f"{v:.0f}" for v in c["area_p5_p50_p95"])
        diam = "-" if c["median_diameter"] is None else f"{c['median_diameter']:.1f}"
        lines.append(f"{name:<8}{c['instances']:>10}{c['share']:>8.1%}{c['images_with']:>8}{diam:>22}   {area}")
    if d["median_diameter"] is not None:
        lines.append(f"median cell diameter (all classes): {d['median_diameter']:.1f} px "
                     "(model.scale: auto scales it to model.target_cell_diameter)")
    return "\n".join(lines)
