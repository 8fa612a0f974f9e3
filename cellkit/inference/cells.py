"""One image's predicted cells as the training layout holds them: one cell per pixel, and per-class
label maps (``classK.tif``: 0 background, each distinct value one cell).

A model's masks may overlap (two classes for one cell, neighbours sharing an edge pixel). A label
map holds one cell per pixel, so :func:`claim_pixels` gives each contested pixel to the higher
score and drops a cell left with less than ``min_kept`` of its mask (a duplicate). Every output
of ``cellkit segment`` (label maps, measurements, ROIs, GeoJSON, overlay) is drawn from the cells
it returns, so they agree with each other and a label map read back gives exactly these masks.
Cells stay box-region masks (:class:`~cellkit.structures.MaskRegion`) throughout; the only
full-size arrays are the ``int32`` label image and one class map at a time.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..structures.label_maps import MaskRegion
from ..structures.rle import decode_region


def cells_from_coco(entries: Iterable[dict[str, Any]]) -> list[MaskRegion]:
    """COCO result entries (RLE ``segmentation``) as box-region masks, decoded box by box.

    Returns:
        one :class:`MaskRegion` per non-empty entry (``label`` = ``category_id``, ``score``).
    """
    out = []
    for e in entries:
        region, top, left = decode_region(e["segmentation"])
        if region.size:
            out.append(MaskRegion(region, top, left, int(e["category_id"]), float(e.get("score", 1.0))))
    return out


def claim_pixels(cells: Sequence[MaskRegion], shape: tuple[int, int],
                 min_kept: float = 0.5) -> tuple[list[MaskRegion], np.ndarray]:
    """Give every pixel to at most one cell: by descending score, each cell keeps the pixels no
    better cell took; a cell that keeps less than ``min_kept`` of its mask (or nothing) is dropped.

    Args:
        cells: box-region masks with ``label`` and ``score``.
        shape: ``(H, W)`` of the image.
        min_kept: in [0, 1] (``predict.min_kept``).

    Returns:
        (the kept cells, their masks trimmed to what they keep and their boxes shrunk to fit,
        numbered 1..N by descending score in ``instance_id``; the ``(H, W)`` int32 label image,
        0 background, ``n`` where cell ``n`` is).
    """
    owner = np.zeros(shape, dtype=np.int32)
    kept: list[MaskRegion] = []
    order = sorted(range(len(cells)), key=lambda i: -cells[i].score)  # stable: ties keep model order
    for i in order:
        c = cells[i]
        h, w = c.mask.shape
        view = owner[c.top : c.top + h, c.left : c.left + w]
        mask = c.mask[: view.shape[0], : view.shape[1]]  # clipped to the image
        free = mask & (view == 0)
        n_free = int(free.sum())
        if n_free == 0 or n_free < min_kept * int(c.mask.sum()):
            continue
        new_id = len(kept) + 1
        view[free] = new_id
        rows, cols = np.flatnonzero(free.any(1)), np.flatnonzero(free.any(0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        kept.append(MaskRegion(free[r0:r1, c0:c1].copy(), c.top + int(r0), c.left + int(c0), c.label, c.score,
                               instance_id=new_id))
    return kept, owner


def class_label_maps(owner: np.ndarray, cells: Sequence[MaskRegion],
                     dtype: type = np.float64) -> Iterator[tuple[int, np.ndarray]]:
    """The per-class label maps of a label image, one class at a time (classes with cells only).

    Args:
        owner: ``(H, W)`` int32 label image from :func:`claim_pixels`.
        cells: its cells (``instance_id`` -> ``label``).
        dtype: of the maps; float64 as the hw3 data stores them.

    Yields:
        ``(class k, (H, W) map)``: the cell's id where a class-``k`` cell is, else 0.
    """
    if not cells:
        return
    class_of = np.zeros(max(c.instance_id for c in cells) + 1, dtype=np.int32)
    for c in cells:
        class_of[c.instance_id] = c.label
    classes_img = class_of[owner]
    for k in sorted({c.label for c in cells}):
        yield k, np.where(classes_img == k, owner, 0).astype(dtype)
