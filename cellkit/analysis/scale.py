"""``model.scale: auto``: the fixed input scale that brings the median cell to a target diameter.

Cellpose rescales every image so its cells are about 30 px across; Mask R-CNN frameworks leave
the scale to the user. Here ``model.scale: auto`` with ``model.target_cell_diameter`` measures the
median equivalent diameter (``sqrt(4 * area / pi)``) of the training cells once, when training
starts, and sets ``resize_mode: fixed_scale`` with ``scale = target / median``. The resolved config
(a plain number) is what the run's ``config.yaml`` and checkpoints store, so prediction, TTA and
tiling of the trained model use the same factor.

The same pass records ``model.max_cell_diameter``, the largest cell the model expects (the
99.5th percentile of the cells' longer box side, in the model's input pixels), which
``predict.tile_overlap: auto`` overlaps tiles by: a cell no larger than the overlap is seen whole
by one tile (:mod:`cellkit.inference.tiling`). The longer box side, not the equivalent diameter:
an elongated cell must fit into the overlap along its length.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import scipy.ndimage as ndi
from torch.utils.data import Dataset

from ..config import Config
from ..data import CellDataset, train_val_samples
from ..errors import DataError


def equivalent_diameter(area: np.ndarray) -> np.ndarray:
    """Diameter in px of the disc with the same area: ``sqrt(4 * area / pi)`` (float64, shape of ``area``)."""
    return np.sqrt(4.0 * np.asarray(area, dtype=np.float64) / np.pi)


MAX_CELL_PERCENTILE = 99.5
"""The percentile of the training cells' longer box side recorded as ``model.max_cell_diameter``
(robust to a few outsized annotations, which the tiles' duplicate removal handles)."""


def cell_sizes(ds: CellDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel area, longer box side and class of every cell of ``ds`` (decoded label maps, no augmentation).

    Returns:
        areas ``(n,)`` int64, extents ``(n,)`` int64 (the longer side of each cell's bounding
        box, px) and classes ``(n,)`` int64 (1-based); cells without pixels left out.
    """
    areas, extents, classes = [], [], []
    for i in range(len(ds)):
        _, maps = ds.load(i)
        n = maps.num_instances + 1
        sizes = np.zeros(n, dtype=np.int64)
        extent = np.zeros(n, dtype=np.int64)
        for layer in maps.layers:
            sizes += np.bincount(layer.ravel(), minlength=n)[:n]
            for idx, sl in enumerate(ndi.find_objects(layer, max_label=n - 1), start=1):
                if sl is not None:  # an id lives in one layer: its box is found once
                    extent[idx] = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
        keep = sizes[1:] > 0
        areas.append(sizes[1:][keep])
        extents.append(extent[1:][keep])
        classes.append(maps.labels[1:][keep])
    if not areas:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(areas), np.concatenate(extents), np.concatenate(classes)


def cell_areas(ds: CellDataset) -> tuple[np.ndarray, np.ndarray]:
    """Pixel area and class of every cell of ``ds`` (decoded label maps, no augmentation).

    Returns:
        areas ``(n,)`` int64 and classes ``(n,)`` int64 (1-based), cells without pixels left out.
    """
    areas, _, classes = cell_sizes(ds)
    return areas, classes


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
    return resolve_cell_statistics(cfg, train_set, log)


def resolve_cell_statistics(cfg: Config, train_set: Dataset | None = None,
                            log: Callable[[str], None] | None = print) -> Config:
    """``cfg`` with what training measures on its cells filled in, from one pass over them:
    ``model.scale: auto`` (as :func:`resolve_auto_scale`) and ``model.max_cell_diameter`` when
    it is None (:data:`MAX_CELL_PERCENTILE` of the cells' longer box side, times the input scale
    of a fixed_scale model, rounded up to 0.1 px).

    Args:
        train_set: the training :class:`~cellkit.data.CellDataset`. Another kind of dataset (or
            None) is measured only for ``scale: auto`` (the training split of ``cfg.data``); its
            ``max_cell_diameter`` then stays None (prediction falls back to a fixed overlap).
        log: where the measured values are reported (None: quiet).

    Raises:
        DataError: ``scale: auto`` and the training split has no cells.
    """
    want_scale = cfg.model.scale == "auto"
    want_max = cfg.model.max_cell_diameter is None and isinstance(train_set, CellDataset)
    if not (want_scale or want_max):
        return cfg
    ds = train_set if isinstance(train_set, CellDataset) else CellDataset(
        train_val_samples(cfg.data, cfg.model.num_classes, progress=False)[0], cache=False)
    areas, extents, _ = cell_sizes(ds)
    overrides: dict[str, object] = {}
    if want_scale:
        if len(areas) == 0:
            raise DataError("model.scale: auto needs training cells to measure, but the training split has none")
        median = float(np.median(equivalent_diameter(areas)))
        factor = float(f"{cfg.model.target_cell_diameter / median:.4g}")
        overrides.update({"model.scale": factor, "model.resize_mode": "fixed_scale"})
        if log is not None:
            log(f"model.scale auto: median training-cell diameter {median:.2f} px over {len(ds)} images -> "
                f"scale {factor:g} (target {cfg.model.target_cell_diameter:g} px, resize_mode fixed_scale)")
    if want_max and len(extents):
        fixed = overrides.get("model.resize_mode", cfg.model.resize_mode) == "fixed_scale"
        scale = float(overrides.get("model.scale", cfg.model.scale)) if fixed else 1.0  # type: ignore[arg-type]
        largest = float(np.percentile(extents, MAX_CELL_PERCENTILE))
        overrides["model.max_cell_diameter"] = math.ceil(largest * scale * 10) / 10
        if log is not None:
            log(f"model.max_cell_diameter: {overrides['model.max_cell_diameter']:g} px at the model's input "
                f"({MAX_CELL_PERCENTILE:g}th percentile of the longer box side of {len(extents)} training cells, "
                f"{largest:g} px in the images); predict.tile_overlap auto overlaps tiles by it")
    return cfg.replace(overrides) if overrides else cfg
