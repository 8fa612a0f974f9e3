"""Cells as an ImageJ / Fiji ROI set (``RoiSet.zip``, opened by the ROI Manager), through ``roifile``.

Each cell is a polygon ROI along its pixel edges (:mod:`cellkit.inference.polygons`), so ImageJ's
mask of the ROI is exactly the cell's pixels. A cell with a hole or of several parts (a model's
mask may have both) becomes a composite ROI (ImageJ's ``ShapeRoi``: a path of all its rings,
filled even-odd). The ROI's name is ``<id>-<class name>``, its group the class (ImageJ 1.52+
shows groups in colour), its stroke colour the class colour of the overlays.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from roifile import ROI_TYPE, ImagejRoi, roiwrite

from ..structures.label_maps import MaskRegion
from ..viz.overlay import class_color
from .polygons import cell_geometry, polygons_of

PathLike = str | os.PathLike[str]


def _argb(rgb: tuple[int, int, int]) -> bytes:
    return bytes((255, *rgb))


def cell_roi(cell: MaskRegion, name: str) -> ImagejRoi:
    """One cell as an :class:`roifile.ImagejRoi` (polygon, or composite with holes / parts)."""
    parts = polygons_of(cell_geometry(cell))
    if len(parts) == 1 and not parts[0].interiors:
        roi = ImagejRoi.frompoints(np.asarray(parts[0].exterior.coords[:-1], dtype=np.int32), name=name)
        roi.roitype = ROI_TYPE.POLYGON
    else:
        path: list[float] = []
        for poly in parts:
            for ring in (poly.exterior, *poly.interiors):
                pts = np.asarray(ring.coords[:-1], dtype=np.float32)
                path += [0.0, float(pts[0, 0]), float(pts[0, 1])]  # MOVETO
                for x, y in pts[1:]:
                    path += [1.0, float(x), float(y)]  # LINETO
                path.append(4.0)  # CLOSE
        x0, y0, x1, y1 = cell.box
        roi = ImagejRoi(roitype=ROI_TYPE.RECT, name=name, left=x0, top=y0, right=x1, bottom=y1,
                        shape_roi_size=len(path), multi_coordinates=np.asarray(path, dtype=np.float32))
    roi.group = int(cell.label)
    roi.stroke_color = _argb(class_color(cell.label))
    return roi


def write_imagej_rois(cells: Sequence[MaskRegion], path: PathLike, class_names: Sequence[str]) -> Path:
    """Write the cells as an ImageJ ROI zip at ``path`` (replaced if present).

    Args:
        cells: box-region masks with ``instance_id`` and ``label``.
        class_names: name of class ``k`` at index ``k - 1``.
    """
    path = Path(path)
    rois = [cell_roi(c, f"{c.instance_id:05d}-{class_names[c.label - 1]}") for c in cells if c.mask.any()]
    if not rois:  # roifile writes no zip for no ROIs; an empty ROI set is still a valid answer
        with zipfile.ZipFile(path, "w"):
            pass
        return path
    roiwrite(path, rois, mode="w")
    return path
