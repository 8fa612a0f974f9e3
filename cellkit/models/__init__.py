"""Mask R-CNN models: the backbone registry, ``build_model``, weights and checkpoints.

>>> from cellkit import load_config
>>> from cellkit.models import build_model, list_backbones
>>> model = build_model(load_config(overrides={"model.backbone": "resnet18"}))

``cellkit models`` lists the registered backbones with their trainable-parameter counts;
``list_backbones("resnet*", pretrained="coco", tags={"attention": "se"})`` filters them on the
metadata each registration declares (:func:`backbone_info`), without building any.

As in timm, the registry (:mod:`~cellkit.models.registry`) is a leaf that knows no backbone; the
families register themselves when this package imports them (:mod:`~cellkit.models.backbones`).
"""
from __future__ import annotations

from . import backbones  # noqa: F401  (the built-in backbones register on import)
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .maskrcnn import assemble, build_model, count_parameters, count_trainable_parameters, validate_model_config
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
from .transform import ResizeTransform, resize_masks
from .weights import LoadReport, WeightsError, load_file, load_matching, read_state_dict

__all__ = [
    "build_model", "list_backbones", "register_backbone", "count_trainable_parameters", "count_parameters",
    "BackboneSpec", "create_backbone", "get_backbone", "backbone_description", "assemble", "validate_model_config",
    "BackboneInfo", "Pretrained", "backbone_info",
    "ResizeTransform", "resize_masks", "LoadReport", "WeightsError", "load_file", "load_matching", "read_state_dict",
    "load_checkpoint", "model_from_checkpoint", "save_checkpoint",
]
