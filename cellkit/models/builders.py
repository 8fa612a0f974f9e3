"""Generic builders the registered backbone functions call: torchvision ResNets and MobileNet
(torchvision's own FPN builders, so torchvision's COCO weights fit), and timm ``features_only``
models under a torchvision ``FeaturePyramidNetwork``.

Each builder resolves three config knobs the same way:

- ``weights``: ``imagenet`` loads the backbone's ImageNet weights here; ``coco`` and file paths
  are loaded later into the whole model (:mod:`cellkit.models.weights`).
- ``norm``: ``auto`` is frozen BatchNorm with pretrained weights (BatchNorm for the v2 design,
  as torchvision's maskrcnn_resnet50_fpn_v2 has it) and BatchNorm from scratch.
- ``trainable_layers``: None is 3 with pretrained weights and every stage from scratch.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Literal, Sequence

import timm
import torch
import torchvision
from timm.layers import freeze_batch_norm_2d, get_attn
from timm.utils import freeze
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, mobilenet_backbone
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..config import ModelConfig
from ..errors import ConfigError
from .registry import BackboneSpec
from .weights import downloading, is_pretrained, timm_pretrained, torchvision_weights

Design = Literal["v1", "v2"]
NormName = Literal["frozen_bn", "bn", "gn"]

RESNET_STAGES: tuple[tuple[str, ...], ...] = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
"""Parameter-name prefixes of a ResNet's five stages, input first (torchvision and timm name them alike)."""

FPN_CHANNELS = 256
ATTENTION_LAYERS = ("se", "cbam")
"""timm ``attn_layer`` names the attention backbones use."""


# --------------------------------------------------------------------------------------------
# knobs


def resolve_norm(cfg: ModelConfig, design: Design = "v1") -> NormName:
    """The backbone normalisation ``cfg.norm`` asks for, with ``auto`` resolved (see the module docstring).

    Raises:
        ConfigError: GroupNorm with ImageNet or COCO weights (those were trained with BatchNorm).
    """
    if cfg.norm == "auto":
        if not is_pretrained(cfg.weights) or design == "v2":
            return "bn"
        return "frozen_bn"
    if cfg.norm == "gn" and cfg.weights in ("imagenet", "coco"):
        raise ConfigError(
            f"model.norm: gn cannot use {cfg.weights} weights (trained with BatchNorm); "
            "use norm auto/frozen_bn/bn, or weights none or a file trained with GroupNorm"
        )
    return cfg.norm


def norm_layer(norm: NormName, bn_eps: float = 1e-5) -> Callable[..., nn.Module]:
    """``f(num_channels) -> nn.Module`` for ``norm``.

    GroupNorm uses ``gcd(32, channels)`` groups, so narrow layers (16, 24, 40 channels) work too.
    Extra keyword arguments (timm passes ``device``/``dtype``) are accepted.
    """
    def frozen_bn(num_features: int, **_: Any) -> nn.Module:
        return FrozenBatchNorm2d(num_features, eps=bn_eps)

    def bn(num_features: int, **kw: Any) -> nn.Module:
        return nn.BatchNorm2d(num_features, eps=bn_eps, **kw)

    def gn(num_channels: int, **kw: Any) -> nn.Module:
        return nn.GroupNorm(math.gcd(32, num_channels), num_channels, **kw)

    layers: dict[str, Callable[..., nn.Module]] = {"frozen_bn": frozen_bn, "bn": bn, "gn": gn}
    return layers[norm]


def resolve_trainable(cfg: ModelConfig, num_stages: int = 5) -> int:
    """Stages that train, counted from the output end (``trainable_layers``, None resolved).

    Raises:
        ConfigError: outside 0..num_stages.
    """
    n = cfg.trainable_layers
    if n is None:
        return 3 if is_pretrained(cfg.weights) else num_stages
    if not 0 <= n <= num_stages:
        raise ConfigError(f"model.trainable_layers: {n} is outside 0..{num_stages} for backbone {cfg.backbone}")
    return n


def freeze_stages(module: nn.Module, stages: Sequence[Sequence[str]], trainable: int) -> None:
    """Freeze the parameters of all but the last ``trainable`` of ``stages`` (lists of submodule
    names, input first) with ``timm.utils.freeze``.

    Only ``requires_grad`` changes (``include_bn_running_stats=False``): how BatchNorm behaves is
    the ``model.norm`` knob's business, fixed when the layers are built (``frozen_bn`` everywhere,
    or ``bn`` updating its statistics in every stage, as torchvision's own extractors leave a
    frozen stage). Letting timm also swap the BatchNorm of frozen stages for its FrozenBatchNorm2d
    would make ``norm: bn`` mean different things per stage and per ``trainable_layers``.

    Raises:
        AttributeError: a stage names a submodule ``module`` does not have.
    """
    frozen = [name for stage in stages[: len(stages) - trainable] for name in stage]
    if frozen:  # timm freezes the whole module for an empty list
        freeze(module, frozen, include_bn_running_stats=False)


def attention_types() -> tuple[type[nn.Module], ...]:
    """The timm attention modules the ``_se`` / ``_cbam`` backbones insert (SE, CBAM)."""
    return tuple(get_attn(name) for name in ATTENTION_LAYERS)


def imagenet_requested(cfg: ModelConfig) -> bool:
    """Whether the backbone builder itself loads ImageNet weights (``weights: imagenet``)."""
    return cfg.weights == "imagenet"


# --------------------------------------------------------------------------------------------
# timm features + FPN


class TimmFeaturePyramid(nn.Module):
    """A timm ``features_only`` model under torchvision's FPN, laid out like ``BackboneWithFPN``.

    ``body(x)`` returns the C2..C5 maps as a list; ``fpn`` turns them into ``"0".."3"`` plus
    ``"pool"``. The attribute names (``body``, ``fpn``) match torchvision's, so a torchvision
    checkpoint's ``backbone.body.*`` and ``backbone.fpn.*`` tensors load where the layers match.

    Args:
        body: timm model created with ``features_only=True`` (four feature maps).
        norm_layer: normalisation inside the FPN convolutions (the v2 design uses BatchNorm).

    forward: ``(B, 3, H, W)`` float32 -> ``OrderedDict`` of ``(B, 256, H/s, W/s)``, s = 4, 8, 16, 32, 64.
    """

    def __init__(self, body: nn.Module, norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        self.body = body
        channels = list(body.feature_info.channels())  # type: ignore[union-attr, operator]
        self.fpn = FeaturePyramidNetwork(channels, FPN_CHANNELS, extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer)
        self.out_channels = FPN_CHANNELS

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _fpn_norm(design: Design) -> Callable[..., nn.Module] | None:
    return nn.BatchNorm2d if design == "v2" else None


# --------------------------------------------------------------------------------------------
# builders


def tv_resnet(arch: str, imagenet: Any, cfg: ModelConfig, design: Design = "v1", coco: Any = None) -> BackboneSpec:
    """A torchvision ResNet/ResNeXt + FPN through torchvision's own ``_resnet_fpn_extractor``.

    The private extractor, not the public ``resnet_fpn_backbone``: only the extractor takes the
    FPN's ``norm_layer`` (BatchNorm in the FPN is what the v2 design and torchvision's
    ``maskrcnn_resnet50_fpn_v2`` COCO weights need), and it takes a network we built, so the
    ImageNet download runs inside :func:`~cellkit.models.weights.downloading` with our errors.

    Args:
        arch: torchvision builder name (``resnet50``, ``resnext50_32x4d`` ...).
        imagenet: its ImageNet ``WeightsEnum`` member (loaded when ``cfg.weights == "imagenet"``).
        design: head design (``v2`` also puts BatchNorm in the FPN, as maskrcnn_resnet50_fpn_v2).
        coco: torchvision COCO Mask R-CNN weights of the same architecture, if any.
    """
    norm = resolve_norm(cfg, design)
    trainable = resolve_trainable(cfg, 5)
    what = f"ImageNet weights of {arch} ({type(imagenet).__name__}.{imagenet.name})"
    weights = torchvision_weights(imagenet, what) if imagenet_requested(cfg) else None
    with downloading(what):
        net = getattr(torchvision.models, arch)(weights=weights, norm_layer=norm_layer(norm))
    module = _resnet_fpn_extractor(net, trainable, norm_layer=_fpn_norm(design))
    return BackboneSpec(module, head=design, coco=coco, imagenet=f"torchvision {type(imagenet).__name__}.{imagenet.name}")


class DilatedC5(nn.Module):
    """A ResNet's res5 map alone, at stride 16 (Detectron2's DC5): ``layer4`` dilated, no FPN.

    ``body`` is torchvision's ``IntermediateLayerGetter`` up to ``layer4`` (so torchvision
    checkpoints' ``backbone.body.*`` tensors load).

    forward: ``(B, 3, H, W)`` float32 -> ``OrderedDict`` ``{"0": (B, 2048, ceil(H/16), ceil(W/16))}``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.body = IntermediateLayerGetter(net, {"layer4": "0"})
        self.out_channels = net.fc.in_features  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.body(x)


def tv_resnet_dc5(arch: str, imagenet: Any, cfg: ModelConfig) -> BackboneSpec:
    """A torchvision ResNet with a dilated last stage (``replace_stride_with_dilation=[False, False,
    True]``), its stride-16 res5 map the only feature map: the Detectron2 ``R101-DC5`` form.

    The RPN and both RoI poolers read that one 2048-channel map (so the RPN head's 3 x 3 conv and
    the box head's first layer are 2048 channels wide, as in Detectron2's DC5 models); every
    ``model.anchor_sizes`` entry is an anchor size on it. ``trainable_layers`` and ``norm`` as
    :func:`tv_resnet`.
    """
    norm = resolve_norm(cfg, "v1")
    trainable = resolve_trainable(cfg, 5)
    what = f"ImageNet weights of {arch} ({type(imagenet).__name__}.{imagenet.name})"
    weights = torchvision_weights(imagenet, what) if imagenet_requested(cfg) else None
    with downloading(what):
        net = getattr(torchvision.models, arch)(
            weights=weights, norm_layer=norm_layer(norm), replace_stride_with_dilation=[False, False, True]
        )
    freeze_stages(net, RESNET_STAGES, trainable)
    return BackboneSpec(DilatedC5(net), featmap_names=("0",), strides=(16,), pool_level=False,
                        imagenet=f"torchvision {type(imagenet).__name__}.{imagenet.name}")


def timm_resnet(
    arch: str, tag: str, cfg: ModelConfig, attn: str | None, design: Design = "v1", coco: Any = None
) -> BackboneSpec:
    """A timm ResNet/ResNeXt whose every bottleneck block applies ``attn`` (timm's ``se`` or ``cbam``) + FPN.

    timm's Bottleneck calls its attention module in ``forward`` (after ``bn3``, before the
    residual sum), and its parameter names equal torchvision's, so torchvision ImageNet and COCO
    tensors load into the non-attention layers. Attention layers start fresh and always train,
    even inside frozen stages (a frozen random gate would only add noise).

    Args:
        tag: timm pretrained tag for ``imagenet`` (``tv_in1k``: torchvision's own ImageNet weights,
            so the rows with and without attention start from the same weights).
    """
    norm = resolve_norm(cfg, design)
    trainable = resolve_trainable(cfg, 5)
    kwargs: dict[str, Any] = dict(
        features_only=True,
        out_indices=(1, 2, 3, 4),
        block_args=dict(attn_layer=attn) if attn else None,
        norm_layer=norm_layer(norm),
        zero_init_last=False,  # as torchvision: a zeroed bn3 would also silence the attention
    )
    what = f"ImageNet weights of {arch} (timm {arch}.{tag})"
    if imagenet_requested(cfg):
        kwargs.update(timm_pretrained(f"{arch}.{tag}", what), pretrained_strict=False)
    with downloading(what):
        body = timm.create_model(f"{arch}.{tag}", **kwargs)
    freeze_stages(body, RESNET_STAGES, trainable)
    for m in body.modules():
        if isinstance(m, attention_types()):
            m.requires_grad_(True)
    return BackboneSpec(
        TimmFeaturePyramid(body, _fpn_norm(design)), head=design, coco=coco, imagenet=f"timm {arch}.{tag}"
    )


def timm_fpn(
    arch: str,
    tag: str,
    cfg: ModelConfig,
    stages: Sequence[Sequence[str]],
    out_indices: tuple[int, ...] = (1, 2, 3, 4),
    norms: tuple[str, ...] = ("auto", "frozen_bn", "bn"),
) -> BackboneSpec:
    """Any timm ``features_only`` model (strides 4-32) + FPN, v1 heads.

    Args:
        stages: parameter-name prefixes of the model's five stages, input first (for ``trainable_layers``).
        out_indices: timm feature indices of the stride 4, 8, 16 and 32 maps.
        norms: the ``model.norm`` values this model supports (``frozen_bn`` freezes timm's
            BatchNorm layers with ``timm.layers.freeze_batch_norm_2d``).
    """
    if cfg.norm not in norms:
        raise ConfigError(f"model.norm: {cfg.backbone} supports {', '.join(norms)}, not {cfg.norm}")
    norm = resolve_norm(cfg, "v1") if "frozen_bn" in norms else None
    trainable = resolve_trainable(cfg, len(stages))
    kwargs: dict[str, Any] = dict(features_only=True, out_indices=out_indices)
    what = f"ImageNet weights of {arch} (timm {arch}.{tag})"
    if imagenet_requested(cfg):
        kwargs.update(timm_pretrained(f"{arch}.{tag}", what))
    with downloading(what):
        body = timm.create_model(f"{arch}.{tag}", **kwargs)
    if norm == "frozen_bn":
        body = freeze_batch_norm_2d(body)
    freeze_stages(body, stages, trainable)
    return BackboneSpec(TimmFeaturePyramid(body), imagenet=f"timm {arch}.{tag}")


def tv_mobilenet(arch: str, imagenet: Any, cfg: ModelConfig) -> BackboneSpec:
    """A torchvision MobileNetV3 + FPN through torchvision's public ``mobilenet_backbone``.

    The four FPN inputs are the first blocks of the stride 4, 8, 16 and 32 stages
    (``returned_layers=[1, 2, 3, 4]``; torchvision's detection default keeps only the two
    coarsest, too coarse for cells). ``trainable_layers`` ranges over 0..6 as in torchvision.
    """
    norm = resolve_norm(cfg, "v1")
    trainable = resolve_trainable(cfg, 6)
    what = f"ImageNet weights of {arch} ({type(imagenet).__name__}.{imagenet.name})"
    weights = torchvision_weights(imagenet, what) if imagenet_requested(cfg) else None
    layer = norm_layer(norm, bn_eps=1e-3)  # MobileNetV3 was trained with eps 0.001
    if norm == "bn":
        layer = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)  # torchvision's MobileNetV3 default
    with downloading(what):
        module = mobilenet_backbone(backbone_name=arch, weights=weights, fpn=True, norm_layer=layer,
                                    trainable_layers=trainable, returned_layers=[1, 2, 3, 4])
    return BackboneSpec(module, imagenet=f"torchvision {type(imagenet).__name__}.{imagenet.name}")


def resize_fpn(module: nn.Module, channels: int, backbone: str = "") -> None:
    """Give the feature pyramid of ``module`` ``channels`` output channels (``model.fpn_channels``).

    Replaces ``module.fpn`` (torchvision's ``BackboneWithFPN`` and :class:`TimmFeaturePyramid`
    both keep it there) by a fresh ``FeaturePyramidNetwork`` with the same input channels, extra
    block and normalisation, and sets ``module.out_channels``. The backbone body is untouched, so
    ImageNet weights loaded into it stay. Forward then returns ``(B, channels, H / s, W / s)`` maps.

    Raises:
        ConfigError: the backbone has no FPN of that form.
    """
    fpn = getattr(module, "fpn", None)
    if not isinstance(fpn, FeaturePyramidNetwork):
        raise ConfigError(f"model.fpn_channels: backbone {backbone} has no feature pyramid to resize; leave it unset")
    if channels == module.out_channels:
        return
    in_channels = [block[0].in_channels for block in fpn.inner_blocks]
    normed = any(isinstance(layer, nn.BatchNorm2d) for layer in fpn.inner_blocks[0])
    module.fpn = FeaturePyramidNetwork(
        in_channels, channels, extra_blocks=fpn.extra_blocks, norm_layer=nn.BatchNorm2d if normed else None
    )
    module.out_channels = channels
