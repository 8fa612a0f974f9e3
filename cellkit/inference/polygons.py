"""Cell masks as polygons along pixel edges (shapely), for the ImageJ ROI and GeoJSON exports.

The one-pixel trap (Cellpose issue 757: exported ROIs one pixel smaller than the masks): a contour
traced through pixel *centres* (OpenCV's ``findContours``, ``skimage.measure.find_contours``)
cuts every boundary pixel in half, so a 20 px cell loses about a fifth of its area and a one-pixel
wide part vanishes. Here the polygon is the union of the mask's pixels as unit squares
(``[x, x + 1] x [y, y + 1]``, merged row run by row run with ``shapely.union_all``): its vertices
are pixel corners, a pixel lies inside exactly when it belongs to the mask, and ImageJ and QuPath
fill it back (pixel centres inside) to the very same pixels. Holes and separate parts are kept
(a ``MultiPolygon`` or a polygon with interiors); rings are oriented (exterior counter-clockwise
in x-right/y-up terms, holes clockwise) so even-odd and non-zero filling agree.
"""
from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from ..structures.label_maps import MaskRegion


def mask_geometry(mask: np.ndarray, top: int = 0, left: int = 0) -> BaseGeometry:
    """The pixels of a box-region mask as one valid shapely geometry in image pixel-edge coordinates.

    Args:
        mask: ``(h, w)`` bool, the mask inside its box.
        top, left: image row and column of ``mask[0, 0]``.

    Returns:
        a ``Polygon`` or ``MultiPolygon`` whose area equals ``mask.sum()``; an empty geometry
        for an empty mask.
    """
    m = np.asarray(mask, dtype=bool)
    padded = np.zeros((m.shape[0], m.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = m
    change = np.diff(padded, axis=1)
    rows, x0 = np.nonzero(change == 1)  # row-major, so starts and ends pair up in order
    _, x1 = np.nonzero(change == -1)
    if not len(rows):
        return shapely.Polygon()
    squares = shapely.box(left + x0, top + rows, left + x1, top + rows + 1)
    merged = shapely.union_all(squares)
    # union leaves the run corners on straight edges; a zero-tolerance simplify drops only those
    return shapely.orient_polygons(shapely.simplify(merged, 0.0))


def cell_geometry(cell: MaskRegion) -> BaseGeometry:
    """:func:`mask_geometry` of one cell."""
    return mask_geometry(cell.mask, cell.top, cell.left)


def polygons_of(geometry: BaseGeometry) -> list[shapely.Polygon]:
    """The polygons of a ``Polygon`` / ``MultiPolygon`` (largest first)."""
    parts = list(geometry.geoms) if hasattr(geometry, "geoms") else [geometry]
    return sorted((p for p in parts if not p.is_empty), key=lambda p: -p.area)
