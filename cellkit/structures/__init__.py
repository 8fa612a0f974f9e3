"""Typed structures that instances travel in: the ground floor every other layer builds on.

* :class:`LabelMaps`: all ground-truth instances of one image as packed label maps, with one walk
  over them (:meth:`LabelMaps.regions`) that COCO conversion, training targets and overlays share.
* :class:`MaskRegion`: one instance as its mask inside its bounding box (what overlays draw).
* :mod:`~cellkit.structures.rle`: the COCO run-length codec (encode masks and box regions, read and
  check RLEs, areas, IoU).
* :class:`~cellkit.structures.detections.Detections` (torch): a model's detections of one image before
  pasting, with the image's id and size, indexing, ``to(device)``, concatenation and ``to_coco``;
  :mod:`~cellkit.structures.coco_results` pastes and encodes them;
  :mod:`~cellkit.structures.mask_geometry` says how a box-relative mask maps onto its box.

This face imports only the numpy parts (the evaluation, which never needs torch, goes through
it); ``from cellkit.structures.detections import Detections`` for the torch ones.
"""
from __future__ import annotations

from .label_maps import LabelMaps, MaskRegion
from .rle import RLE, encode_mask, encode_region, rle_areas

__all__ = ["RLE", "LabelMaps", "MaskRegion", "encode_mask", "encode_region", "rle_areas"]
