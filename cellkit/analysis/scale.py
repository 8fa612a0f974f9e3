"""``model.scale: auto``: the fixed input scale that brings the median cell to a target diameter.

Cellpose rescales every image so its cells are about 30 px across; Mask R-CNN frameworks leave
the scale to the user. Here ``model.scale: auto`` with ``model.target_cell_diameter`` measures the
median equivalent diameter (``sqrt(4 * area / pi)``) of the training cells once, when training
starts, and sets ``resize_mode: fixed_scale`` with ``scale = target / median``. The resolved config
(a plain number) is what the run's ``config.yaml`` and checkpoints store, so prediction, TTA and
tiling of the trained model use the same factor.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from ..config import Config
from ..data import CellDataset, train_val_samples
from ..errors import DataError


def equivalent_diameter(area: np.ndarray) -> np.ndarray:
    """Diameter in px of the disc with the same area: ``sqrt(4 * area / pi)`` (float64, shape of ``area``)."""
    return np.sqrt(4.0 * np.asarray(area, dtype=np.float64) / np.pi)


def cell_areas(ds: CellDataset) -> tuple[np.ndarray, np.ndarray]:
    """Pixel area and class of every cell of ``ds`` (decoded label maps, no augmentation).

    Returns:
        areas ``(n,)`` int64 and classes ``(n,)`` int64 (1-based), cells without pixels left out.
    """
    areas, classes = [], []
    for i in range(len(ds)):
        _, maps = ds.load(i)
        sizes = np.zeros(maps.num_instances + 1, dtype=np.int64)
        for layer in maps.layers:
            sizes += np.bincount(layer.ravel(), minlength=maps.num_instances + 1)[: maps.num_instances + 1]
        keep = sizes[1:] > 0
        areas.append(sizes[1:][keep])
        classes.append(maps.labels[1:][keep])
    if not areas:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(areas), np.concatenate(classes)


def median_cell_diameter(ds: CellDataset) -> float:
    """Median equivalent diameter (px) of the cells of ``ds``.

    Raises:
        DataError: the dataset has no cells.
    """
    areas, _ = cell_areas(ds)
    if len(areas) == 0:
        raise DataError("model.scale: auto needs training cells to measure, but the training split has none")
    return float(np.median(equivalent_diameter(areas)))


def resolve_auto_scale(cfg: Config, train_set: Dataset | None = None,
                       log: Callable[[str], None] | None = print) -> Config:
    """``cfg`` with ``model.scale: auto`` replaced by ``target_cell_diameter / median diameter``.

    Args:
        cfg: the configuration; returned unchanged unless ``model.scale`` is ``auto``.
        train_set: the training :class:`~cellkit.data.CellDataset` to measure (other datasets, or
            None: the training split of ``cfg.data``, decoded without caching).
        log: where the chosen factor is reported (None: quiet).

    Returns:
        a new config with ``model.resize_mode: fixed_scale`` and ``model.scale`` a number
        (rounded to 4 significant digits).
    """
    if cfg.model.scale != "auto":
        return cfg
    ds = train_set if isinstance(train_set, CellDataset) else CellDataset(
        train_val_samples(cfg.data, cfg.model.num_classes, progress=False)[0], cache=False)
    median = median_cell_diameter(ds)
    factor = float(f"{cfg.model.target_cell_diameter / median:.4g}")
    if log is not None:
        log(f"model.scale auto: median training-cell diameter {median:.2f} px over {len(ds)} images -> "
            f"scale {factor:g} (target {cfg.model.target_cell_diameter:g} px, resize_mode fixed_scale)")
    return cfg.replace({"model.scale": factor, "model.resize_mode": "fixed_scale"})
