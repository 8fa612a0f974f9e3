"""Cells as GeoJSON that QuPath imports (File > Import objects, or drag the file onto the image).

One ``Feature`` per cell, in the form QuPath 0.4+ writes itself: ``geometry`` the cell's
pixel-edge polygon (:mod:`cellkit.inference.polygons`; QuPath's coordinates are the same
pixel-edge ones, origin at the image's top-left corner), ``properties.objectType``
``"detection"``, ``properties.classification`` ``{name, color [r, g, b]}`` and
``properties.measurements`` a name -> number map (the CSV's numeric columns). Feature ids are
UUIDs (QuPath reads them as object ids), derived from the image name and cell id so a re-run gives
the same file.
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Sequence

import shapely

from ..structures.label_maps import MaskRegion
from ..viz.overlay import class_color
from .polygons import cell_geometry

_NAMESPACE = uuid.UUID("6b1f6f0e-2f4a-4f55-9b7c-1d2e3f405162")
_NOT_MEASURED = ("image", "id", "class", "class_name")


def cell_features(cells: Sequence[MaskRegion], class_names: Sequence[str], rows: Sequence[dict[str, Any]],
                  image_name: str = "") -> dict[str, Any]:
    """A GeoJSON ``FeatureCollection`` of the cells.

    Args:
        cells: box-region masks with ``instance_id``, ``label``.
        class_names: name of class ``k`` at index ``k - 1``.
        rows: their measurements (:func:`cellkit.inference.measure.measure_cells`), matched by id.
        image_name: seeds the feature ids.
    """
    by_id = {r["id"]: r for r in rows}
    features = []
    for c in cells:
        geom = cell_geometry(c)
        if geom.is_empty:
            continue
        row = by_id.get(c.instance_id, {})
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"{image_name}/{c.instance_id}")),
            "geometry": json.loads(shapely.to_geojson(geom)),
            "properties": {
                "objectType": "detection",
                "name": f"{c.instance_id}",
                "classification": {"name": class_names[c.label - 1], "color": list(class_color(c.label))},
                "measurements": {k: v for k, v in row.items() if k not in _NOT_MEASURED},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def geojson_text(collection: dict[str, Any]) -> str:
    """The collection as compact JSON text (coordinates are integers: pixel corners)."""
    return json.dumps(collection, separators=(",", ":"))
