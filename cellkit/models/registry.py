"""The backbone registry: a name maps to one small typed function (timm's ``register_model`` pattern).

A backbone function takes the :class:`~cellkit.config.ModelConfig` and returns a
:class:`BackboneSpec`: the feature-pyramid module plus what the Mask R-CNN assembly needs to know
about it (head design, which torchvision COCO weights fit, which ImageNet weights it loads).
Adding a backbone is one decorated function in :mod:`cellkit.models.backbones` (or anywhere)::

    @register_backbone
    def resnet34(cfg: ModelConfig) -> BackboneSpec:
        \"\"\"ResNet-34 + FPN (torchvision).\"\"\"
        return tv_resnet("resnet34", ResNet34_Weights.IMAGENET1K_V1, cfg)

The function's name is the backbone's name (``model.backbone: resnet34``).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from ..config import ModelConfig
from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn
    from torchvision.models import WeightsEnum


@dataclass
class BackboneSpec:
    """What a backbone function returns.

    Attributes:
        module: the feature pyramid. ``forward(x)`` takes ``(B, 3, H, W)`` float32 (normalised)
            and returns an ``OrderedDict[str, Tensor]`` of ``(B, out_channels, H / s, W / s)``
            maps, finest first, named ``featmap_names`` plus ``"pool"`` (torchvision's
            ``LastLevelMaxPool``) unless ``pool_level`` is False. It has an ``out_channels``
            attribute (256 for an FPN; 2048 for ``resnet101_dc5``'s res5 map).
        head: ``"v1"`` (maskrcnn_resnet50_fpn heads: one-conv RPN, two-MLP box head, plain mask
            head) or ``"v2"`` (maskrcnn_resnet50_fpn_v2: two-conv RPN, 4-conv + FC box head and
            mask head with BatchNorm).
        coco: torchvision Mask R-CNN weights whose matching tensors ``weights: coco`` loads
            (None: no COCO weights fit this backbone).
        imagenet: the ImageNet weights ``weights: imagenet`` loads, in words (None: none exist).
        featmap_names: the maps the box and mask RoI poolers read (every level but ``"pool"``).
        strides: the stride (input px per feature px) of each of ``featmap_names``, finest first.
        pool_level: the module also returns torchvision's ``"pool"`` map (an FPN's
            ``LastLevelMaxPool``), which only the RPN sees. False for a single-map backbone
            (``resnet101_dc5``), whose RPN and RoI poolers all read its one map.
    """

    module: "nn.Module"
    head: Literal["v1", "v2"] = "v1"
    coco: "WeightsEnum | None" = None
    imagenet: str | None = None
    featmap_names: tuple[str, ...] = ("0", "1", "2", "3")
    strides: tuple[int, ...] = (4, 8, 16, 32)
    pool_level: bool = True

    @property
    def num_levels(self) -> int:
        """Feature levels the RPN sees (the RoI levels plus ``"pool"`` if any): one anchor size each
        (a single level takes all of ``model.anchor_sizes``)."""
        return len(self.featmap_names) + (1 if self.pool_level else 0)


BackboneFn = Callable[[ModelConfig], BackboneSpec]

_REGISTRY: dict[str, BackboneFn] = {}


def register_backbone(fn: BackboneFn) -> BackboneFn:
    """Decorator: register ``fn`` under its own name (``fn.__name__``).

    Raises:
        ValueError: the name is already registered.
    """
    name = fn.__name__
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn


def list_backbones() -> list[str]:
    """Names of the registered backbones, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneFn:
    """The function registered as ``name``.

    Raises:
        ConfigError: unknown name (suggesting the nearest registered one).
    """
    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; registered: {', '.join(sorted(_REGISTRY))}"
    raise ConfigError(f"model.backbone: unknown backbone '{name}'{hint} (`cellkit models` lists them)")


def create_backbone(cfg: ModelConfig) -> BackboneSpec:
    """Build the backbone ``cfg.backbone`` names (ImageNet weights loaded when ``cfg.weights == "imagenet"``)."""
    return get_backbone(cfg.backbone)(cfg)


def backbone_description(name: str) -> str:
    """First line of the backbone function's docstring."""
    doc = (get_backbone(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def _load_builtin() -> None:
    from . import backbones  # noqa: F401  (registers the built-in backbones on import)
