"""Mask R-CNN models: the backbone registry, ``build_model`` and weight loading.

>>> from cellkit import load_config
>>> from cellkit.models import build_model, list_backbones
>>> model = build_model(load_config(overrides={"model.backbone": "resnet18"}))

``cellkit models`` lists the registered backbones with their trainable-parameter counts;
``list_backbones("resnet*", pretrained="coco", tags={"attention": "se"})`` filters them on the
metadata each registration declares (:func:`backbone_info`), without building any.

Only the registry is imported eagerly; torch, torchvision and timm load on first use of anything
else, so importing the package stays fast.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .registry import (
    BackboneInfo,
    BackboneSpec,
    Pretrained,
    backbone_description,
    backbone_info,
    create_backbone,
    get_backbone,
    list_backbones,
    register_backbone,
)

_LAZY = {
    "build_model": "maskrcnn", "assemble": "maskrcnn", "count_trainable_parameters": "maskrcnn",
    "count_parameters": "maskrcnn", "validate_model_config": "maskrcnn",
    "ResizeTransform": "transform", "resize_masks": "transform",
    "LoadReport": "weights", "WeightsError": "weights", "load_file": "weights", "load_matching": "weights",
    "read_state_dict": "weights",
}

if TYPE_CHECKING:  # pragma: no cover
    from .maskrcnn import assemble, build_model, count_parameters, count_trainable_parameters, validate_model_config
    from .transform import ResizeTransform, resize_masks
    from .weights import LoadReport, WeightsError, load_file, load_matching, read_state_dict


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "build_model", "list_backbones", "register_backbone", "count_trainable_parameters", "count_parameters",
    "BackboneSpec", "create_backbone", "get_backbone", "backbone_description", "assemble", "validate_model_config",
    "BackboneInfo", "Pretrained", "backbone_info",
    "ResizeTransform", "resize_masks", "LoadReport", "WeightsError", "load_file", "load_matching", "read_state_dict",
]
