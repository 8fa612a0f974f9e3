"""Typed structures that instances travel in.

* :class:`LabelMaps`: all ground-truth instances of one image as packed label maps, with one walk
  over them (:meth:`LabelMaps.regions`) that COCO conversion, training targets and overlays share.
* :class:`MaskRegion`: one instance as its mask inside its bounding box (what overlays draw).
* :class:`Detections` (torch): a model's detections of one image before pasting, with the image's
  id and size, indexing, ``to(device)``, concatenation and ``to_coco(mask_thresh)``.

``LabelMaps`` and ``MaskRegion`` need only numpy; ``Detections`` is imported on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .label_maps import LabelMaps, MaskRegion

if TYPE_CHECKING:  # pragma: no cover
    from .detections import Detections


def __getattr__(name: str) -> Any:
    if name == "Detections":
        from .detections import Detections

        return Detections
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Detections", "LabelMaps", "MaskRegion"]
