"""Per-cell measurements of one segmented image: one row per cell, columns a pandas user can use
as they are (``pd.read_csv``; every image's file has the same columns, so ``pd.concat`` of many works).

Coordinates are pixel-edge coordinates, as ImageJ, QuPath and the exported polygons use: pixel
``(x, y)`` covers ``[x, x + 1] x [y, y + 1]``, so a one-pixel cell at column 5, row 7 has its
centroid at ``(5.5, 7.5)`` and its box ``x0 = 5, x1 = 6``.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Sequence

import numpy as np

from ..structures.label_maps import MaskRegion

COLUMNS = (
    "image", "id", "class", "class_name", "score", "area_px", "centroid_x", "centroid_y",
    "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "equivalent_diameter_px",
    "mean_intensity", "mean_red", "mean_green", "mean_blue",
)
"""The CSV's columns. ``mean_*`` are in the image's raw units (0-255 or 0-65535): ``mean_intensity``
over the cell's pixels and the three channels, ``mean_red/green/blue`` per channel (all equal
for a grey image)."""


def measure_cells(image: np.ndarray, cells: Sequence[MaskRegion], class_names: Sequence[str],
                  image_name: str = "") -> list[dict[str, Any]]:
    """One row of :data:`COLUMNS` per cell.

    Args:
        image: ``(H, W, 3)`` raw image (uint8 / uint16) the intensities are read from.
        cells: non-overlapping cells (:func:`cellkit.inference.cells.claim_pixels`), ids in ``instance_id``.
        class_names: name of class ``k`` at index ``k - 1``.
        image_name: written in the ``image`` column.
    """
    rows = []
    for c in cells:
        ys, xs = np.nonzero(c.mask)
        area = len(ys)
        if area == 0:
            continue
        pixels = image[c.top + ys, c.left + xs].astype(np.float64)  # (area, 3)
        channel_means = pixels.mean(axis=0)
        x0, y0, x1, y1 = c.box
        rows.append({
            "image": image_name, "id": c.instance_id, "class": c.label, "class_name": class_names[c.label - 1],
            "score": round(float(c.score), 6), "area_px": area,
            "centroid_x": round(float(c.left + xs.mean() + 0.5), 3), "centroid_y": round(float(c.top + ys.mean() + 0.5), 3),
            "bbox_x0": x0, "bbox_y0": y0, "bbox_x1": x1, "bbox_y1": y1,
            "equivalent_diameter_px": round(math.sqrt(4 * area / math.pi), 3),
            "mean_intensity": round(float(channel_means.mean()), 3),
            "mean_red": round(float(channel_means[0]), 3), "mean_green": round(float(channel_means[1]), 3),
            "mean_blue": round(float(channel_means[2]), 3),
        })
    return rows


def measurements_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV text with a header of :data:`COLUMNS` (header only when there are no cells)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
