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

As timm's registry does, the decorator may also record what the backbone *is*, as data, without
building it: tags (``family``, ``head`` design, ``attention``, ``neck``) and the pretrained
sources (``imagenet``: a torchvision ``WeightsEnum`` member or a timm ``arch.tag``; ``coco``: the
torchvision Mask R-CNN weights that fit)::

    @register_backbone(family="resnet", imagenet=ResNet34_Weights.IMAGENET1K_V1)
    def resnet34(cfg: ModelConfig) -> BackboneSpec: ...

:func:`list_backbones` filters on that (``list_backbones("resnet50*", pretrained="coco",
tags={"attention": "se"})``) and :func:`backbone_info` returns it; neither builds a model.
:func:`create_backbone` checks that what the function builds agrees with what it declared.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence, overload

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

Library = Literal["torchvision", "timm"]
PRETRAINED_SOURCES = ("imagenet", "coco")
"""What ``list_backbones(pretrained=...)`` accepts."""
TAG_KEYS = ("family", "head", "attention", "neck", "library")
"""The tags every built-in backbone declares (``library``: who builds the body, from its ImageNet source)."""


@dataclass(frozen=True)
class Pretrained:
    """One downloadable set of weights, as data.

    Attributes:
        library: ``"torchvision"`` or ``"timm"``.
        weights: a torchvision ``WeightsEnum`` member (``ResNet50_Weights.IMAGENET1K_V1``), or a
            timm pretrained name ``"arch.tag"`` (``"resnet50.tv_in1k"``).
    """

    library: Library
    weights: Any

    @classmethod
    def of(cls, weights: Any) -> "Pretrained":
        """A torchvision ``WeightsEnum`` member, or a timm ``"arch.tag"`` string."""
        if isinstance(weights, str):
            if "." not in weights:
                raise ValueError(f"timm pretrained weights are named 'arch.tag', got {weights!r}")
            return cls("timm", weights)
        if not hasattr(weights, "url") or not hasattr(weights, "name"):
            raise ValueError(f"not a torchvision WeightsEnum member or a timm 'arch.tag' name: {weights!r}")
        return cls("torchvision", weights)

    @property
    def name(self) -> str:
        """``ResNet50_Weights.IMAGENET1K_V1`` (torchvision) or ``resnet50.tv_in1k`` (timm)."""
        if self.library == "timm":
            return str(self.weights)
        return f"{type(self.weights).__name__}.{self.weights.name}"

    def __str__(self) -> str:
        return f"{self.library} {self.name}"


@dataclass(frozen=True)
class BackboneInfo:
    """What a registered backbone is, declared at registration (nothing is built to answer).

    Attributes:
        name: the registered name.
        description: first line of the function's docstring.
        family: architecture family (``resnet``, ``resnext``, ``efficientnet``, ``convnext``,
            ``mobilenet``); None where the registration declared none.
        head: Mask R-CNN head design, ``v1`` or ``v2`` (:class:`BackboneSpec`).
        attention: attention in every block: ``none``, ``se`` or ``cbam``.
        neck: ``fpn`` (feature pyramid, strides 4-32 + pool) or ``dc5`` (one dilated stride-16 map).
        imagenet: the ImageNet weights ``model.weights: imagenet`` loads (None: none).
        coco: the torchvision Mask R-CNN weights ``model.weights: coco`` loads (None: none fit).
    """

    name: str
    description: str = ""
    family: str | None = None
    head: Literal["v1", "v2"] | None = None
    attention: Literal["none", "se", "cbam"] | None = None
    neck: Literal["fpn", "dc5"] | None = None
    imagenet: Pretrained | None = None
    coco: Pretrained | None = None

    @property
    def tags(self) -> dict[str, str]:
        """The declared tags (of :data:`TAG_KEYS`) as ``{key: value}``."""
        values = {"family": self.family, "head": self.head, "attention": self.attention, "neck": self.neck,
                  "library": self.imagenet.library if self.imagenet else None}
        return {k: v for k, v in values.items() if v is not None}

    @property
    def pretrained(self) -> tuple[str, ...]:
        """The sources with weights: a subset of ``("imagenet", "coco")``."""
        return tuple(k for k in PRETRAINED_SOURCES if getattr(self, k) is not None)


_REGISTRY: dict[str, BackboneFn] = {}
_INFO: dict[str, BackboneInfo] = {}


@overload
def register_backbone(fn: BackboneFn, /) -> BackboneFn: ...
@overload
def register_backbone(
    *, family: str | None = None, head: Literal["v1", "v2"] | None = None,
    attention: Literal["none", "se", "cbam"] | None = None, neck: Literal["fpn", "dc5"] | None = None,
    imagenet: Any = None, coco: Any = None,
) -> Callable[[BackboneFn], BackboneFn]: ...


def register_backbone(
    fn: BackboneFn | None = None,
    /,
    *,
    family: str | None = None,
    head: Literal["v1", "v2"] | None = None,
    attention: Literal["none", "se", "cbam"] | None = None,
    neck: Literal["fpn", "dc5"] | None = None,
    imagenet: Any = None,
    coco: Any = None,
) -> Any:
    """Decorator: register ``fn`` under its own name (``fn.__name__``), with its metadata.

    ``@register_backbone`` alone registers without tags; ``@register_backbone(family=..., ...)``
    records the :class:`BackboneInfo` fields (``imagenet``/``coco``: a torchvision ``WeightsEnum``
    member or a timm ``"arch.tag"``, or None).

    Raises:
        ValueError: the name is already registered (to another function), or a weights value is
            neither a ``WeightsEnum`` member nor a timm name.
    """
    meta = dict(family=family, head=head, attention=attention, neck=neck,
                imagenet=Pretrained.of(imagenet) if imagenet is not None else None,
                coco=Pretrained.of(coco) if coco is not None else None)

    def register(f: BackboneFn) -> BackboneFn:
        name = f.__name__
        if name in _REGISTRY and _REGISTRY[name] is not f:
            raise ValueError(f"backbone {name!r} is already registered")
        doc = (f.__doc__ or "").strip()
        _REGISTRY[name] = f
        _INFO[name] = BackboneInfo(name, doc.splitlines()[0] if doc else "", **meta)  # type: ignore[arg-type]
        return f

    return register(fn) if fn is not None else register


def list_backbones(
    filter: str | Sequence[str] = "*",
    *,
    pretrained: str | None = None,
    tags: Mapping[str, str | Sequence[str]] | None = None,
) -> list[str]:
    """Names of the registered backbones, sorted, answered from the metadata alone (nothing is built).

    Args:
        filter: ``fnmatch`` pattern(s) on the name (``"resnet50*"``); a name matching any passes.
        pretrained: only backbones with these weights: ``"imagenet"`` or ``"coco"``.
        tags: ``{key: value}`` (or ``{key: [values]}``) every backbone must have, keys of
            :data:`TAG_KEYS`: ``{"attention": "se"}``, ``{"head": "v2", "family": "resnet"}``.

    Raises:
        ConfigError: an unknown ``pretrained`` source or tag key.
    """
    patterns = [filter] if isinstance(filter, str) else list(filter)
    if pretrained is not None and pretrained not in PRETRAINED_SOURCES:
        raise ConfigError(f"pretrained: {pretrained!r} is not one of {', '.join(PRETRAINED_SOURCES)}")
    wanted: dict[str, set[str]] = {}
    for key, value in (tags or {}).items():
        if key not in TAG_KEYS:
            close = difflib.get_close_matches(key, TAG_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown backbone tag '{key}'{hint} (tags: {', '.join(TAG_KEYS)})")
        wanted[key] = {value} if isinstance(value, str) else set(value)
    out = []
    for name in sorted(_REGISTRY):
        info = _INFO[name]
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if pretrained is not None and pretrained not in info.pretrained:
            continue
        have = info.tags
        if all(have.get(k) in v for k, v in wanted.items()):
            out.append(name)
    return out


def backbone_info(name: str) -> BackboneInfo:
    """The metadata registered with ``name`` (nothing is built).

    Raises:
        ConfigError: unknown name (suggesting the nearest registered one).
    """
    get_backbone(name)
    return _INFO[name]


def get_backbone(name: str) -> BackboneFn:
    """The function registered as ``name``.

    Raises:
        ConfigError: unknown name (suggesting the nearest registered one).
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; registered: {', '.join(sorted(_REGISTRY))}"
    raise ConfigError(f"model.backbone: unknown backbone '{name}'{hint} (`cellkit models` lists them)")


def create_backbone(cfg: ModelConfig) -> BackboneSpec:
    """Build the backbone ``cfg.backbone`` names (ImageNet weights loaded when ``cfg.weights == "imagenet"``).

    Raises:
        ValueError: the built spec contradicts the registered metadata (head design, ImageNet or
            COCO weights): a registration to fix, caught the first time the backbone is built.
    """
    spec = get_backbone(cfg.backbone)(cfg)
    _check_agrees(_INFO[cfg.backbone], spec)
    return spec


def _check_agrees(info: BackboneInfo, spec: BackboneSpec) -> None:
    """A registration with metadata declares its weights (None: none); head and neck where given."""
    if not (info.tags or info.pretrained):  # registered without metadata
        return
    checks = [("imagenet", str(info.imagenet) if info.imagenet else None, spec.imagenet),
              ("coco", info.coco.weights if info.coco else None, spec.coco)]
    if info.head is not None:
        checks.append(("head", info.head, spec.head))
    if info.neck is not None:
        checks.append(("neck", info.neck, "fpn" if spec.pool_level else "dc5"))
    wrong = [f"{k}: declared {d}, built {b}" for k, d, b in checks if d != b]
    if wrong:
        raise ValueError(f"backbone {info.name}: its registration disagrees with what it builds ({'; '.join(wrong)})")


def backbone_description(name: str) -> str:
    """First line of the backbone function's docstring."""
    return backbone_info(name).description
