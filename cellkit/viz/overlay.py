"""Masks drawn on images: outlines or fills, coloured by class (or by TP/FP/FN status).

Instances are kept as small box-region masks (:class:`~cellkit.structures.MaskRegion`: ground truth
from :meth:`LabelMaps.regions`, predictions from :func:`instances_from_coco`), so drawing 1000 cells
on a large image costs the sum of their boxes, not 1000 full-size masks.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import scipy.ndimage as ndi
from pycocotools import mask as mask_utils

from ..structures.label_maps import MaskRegion

CLASS_COLORS: dict[int, tuple[int, int, int]] = {
    1: (255, 215, 0),  # gold
    2: (0, 230, 118),  # green
    3: (0, 176, 255),  # blue
    4: (255, 23, 68),  # red
}
"""The first four classes' colours; :func:`class_color` continues with matplotlib's tab10."""
_MORE_COLORS = [tuple(int(round(255 * c)) for c in rgb) for rgb in plt.get_cmap("tab10").colors]


def class_color(k: int) -> tuple[int, int, int]:
    """The RGB colour of class ``k`` (1-based; any number of classes)."""
    if k in CLASS_COLORS:
        return CLASS_COLORS[k]
    return _MORE_COLORS[(k - len(CLASS_COLORS) - 1) % len(_MORE_COLORS)]  # type: ignore[return-value]
STATUS_COLORS: dict[str, tuple[int, int, int]] = {"tp": (0, 230, 118), "fp": (255, 23, 68), "fn": (0, 176, 255)}
COMPARE_COLORS: dict[str, tuple[int, int, int]] = {
    "both": (0, 230, 118),  # green: found by both runs
    "a_only": (255, 145, 0),  # orange: found by run A only
    "b_only": (41, 121, 255),  # blue: found by run B only
    "neither": (255, 23, 68),  # red: missed by both
}
"""Colours of a two-run comparison (:mod:`cellkit.evaluation.compare`), by cell category."""


def instances_from_coco(anns: Iterable[dict[str, Any]]) -> list[MaskRegion]:
    """Instances of COCO annotations or results with RLE segmentations (decoded one at a time)."""
    out = []
    for a in anns:
        m = mask_utils.decode(a["segmentation"]).astype(bool)
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if len(rows) == 0:
            continue
        t, b, le, r = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        out.append(MaskRegion(m[t:b, le:r].copy(), int(t), int(le), int(a["category_id"]), float(a.get("score", 1.0)),
                              a.get("status")))
    return out


def render(
    image: np.ndarray,
    instances: Sequence[MaskRegion],
    mode: str = "outline",
    classes: Iterable[int] | None = None,
    color_by: str = "class",
    alpha: float = 0.45,
    min_score: float = 0.0,
    palette: dict[str, tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """Draw instances on an image.

    Args:
        image: ``(H, W, 3)`` uint8 (uint16 is scaled to uint8).
        instances: what to draw.
        mode: "outline", "fill" or "both".
        classes: classes to show (None: all).
        color_by: "class" (:data:`CLASS_COLORS`) or "status" (``palette``, by default
            :data:`STATUS_COLORS`: TP green, FP red, FN blue; :data:`COMPARE_COLORS` for a comparison).
        alpha: fill opacity.
        min_score: hide instances scoring below this.
        palette: status -> colour when ``color_by="status"`` (default :data:`STATUS_COLORS`).

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    out = image.astype(np.float32)
    if image.dtype == np.uint16:
        out /= 257.0
    h, w = out.shape[:2]
    shown = None if classes is None else set(classes)
    by_status = STATUS_COLORS if palette is None else palette
    for inst in instances:
        if (shown is not None and inst.label not in shown) or inst.score < min_score:
            continue
        color = np.asarray(by_status.get(inst.status or "", class_color(inst.label))
                           if color_by == "status" else class_color(inst.label), np.float32)
        mh, mw = inst.mask.shape
        y0, x0 = max(inst.top, 0), max(inst.left, 0)
        y1, x1 = min(inst.top + mh, h), min(inst.left + mw, w)
        if y1 <= y0 or x1 <= x0:
            continue
        m = inst.mask[y0 - inst.top : y1 - inst.top, x0 - inst.left : x1 - inst.left]
        region = out[y0:y1, x0:x1]
        if mode in ("fill", "both"):
            region[m] = (1 - alpha) * region[m] + alpha * color
        if mode in ("outline", "both"):
            edge = m & ~ndi.binary_erosion(m, border_value=0)
            region[edge] = color
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
