"""The registered backbones: one small typed function each (``cellkit models`` lists them).

The rows of the original ablation (resnet50, resnet50_v2 and resnext50_32x4d, each without
attention, with SE and with CBAM; resnet101; efficientnet_b0/b1), a strong modern backbone
(convnext_tiny), the leaderboard's large ones (resnet101_dc5: ResNet-101 with a dilated last
stage in Detectron2's DC5 form; resnext101_32x8d + FPN) and small CPU-friendly ones for tests and
the demo (resnet18, mobilenet_v3_large).

Rows without attention use torchvision's builders; ``_se`` / ``_cbam`` rows use timm ResNets
built with ``block_args=dict(attn_layer=...)``, whose blocks call the attention module in their
forward pass (the original code attached modules that were never called).
"""
from __future__ import annotations

from torchvision.models import (
    MobileNet_V3_Large_Weights,
    ResNet18_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    ResNeXt50_32X4D_Weights,
    ResNeXt101_32X8D_Weights,
)
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, MaskRCNN_ResNet50_FPN_Weights

from ..config import ModelConfig
from .builders import timm_fpn, timm_resnet, tv_mobilenet, tv_resnet, tv_resnet_dc5
from .registry import BackboneSpec, register_backbone

COCO_V1 = MaskRCNN_ResNet50_FPN_Weights.COCO_V1
COCO_V2 = MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1

# --------------------------------------------------------------------------------------------
# ResNet-50, the design of torchvision's maskrcnn_resnet50_fpn (v1 heads)


@register_backbone
def resnet50(cfg: ModelConfig) -> BackboneSpec:
    """ResNet-50 + FPN, v1 heads (torchvision maskrcnn_resnet50_fpn; COCO weights fit)."""
    return tv_resnet("resnet50", ResNet50_Weights.IMAGENET1K_V1, cfg, coco=COCO_V1)


@register_backbone
def resnet50_se(cfg: ModelConfig) -> BackboneSpec:
    """ResNet-50 with SE in every bottleneck (timm) + FPN, v1 heads."""
    return timm_resnet("resnet50", "tv_in1k", cfg, attn="se", coco=COCO_V1)


@register_backbone
def resnet50_cbam(cfg: ModelConfig) -> BackboneSpec:
    """ResNet-50 with CBAM in every bottleneck (timm) + FPN, v1 heads."""
    return timm_resnet("resnet50", "tv_in1k", cfg, attn="cbam", coco=COCO_V1)


# --------------------------------------------------------------------------------------------
# ResNet-50, the design of torchvision's maskrcnn_resnet50_fpn_v2


@register_backbone
def resnet50_v2(cfg: ModelConfig) -> BackboneSpec:
    """ResNet-50 + FPN with BatchNorm, v2 heads (torchvision maskrcnn_resnet50_fpn_v2; COCO weights fit)."""
    return tv_resnet("resnet50", ResNet50_Weights.IMAGENET1K_V1, cfg, design="v2", coco=COCO_V2)


@register_backbone
def resnet50_v2_se(cfg: ModelConfig) -> BackboneSpec:
    """ResNet-50 with SE in every bottleneck (timm) + FPN with BatchNorm, v2 heads."""
    return timm_resnet("resnet50", "tv_in1k", cfg, attn="se", design="v2", coco=COCO_V2)


@register_backbone
def resnet50_v2_cbam(cfg: ModelConfig) -> BackboneSpec:
    """ResNet-50 with CBAM in every bottleneck (timm) + FPN with BatchNorm, v2 heads."""
    return timm_resnet("resnet50", "tv_in1k", cfg, attn="cbam", design="v2", coco=COCO_V2)


# --------------------------------------------------------------------------------------------
# ResNeXt-50 32x4d, ResNet-101


@register_backbone
def resnext50_32x4d(cfg: ModelConfig) -> BackboneSpec:
    """ResNeXt-50 32x4d + FPN, v1 heads (torchvision)."""
    return tv_resnet("resnext50_32x4d", ResNeXt50_32X4D_Weights.IMAGENET1K_V1, cfg)


@register_backbone
def resnext50_32x4d_se(cfg: ModelConfig) -> BackboneSpec:
    """ResNeXt-50 32x4d with SE in every bottleneck (timm) + FPN, v1 heads."""
    return timm_resnet("resnext50_32x4d", "tv_in1k", cfg, attn="se")


@register_backbone
def resnext50_32x4d_cbam(cfg: ModelConfig) -> BackboneSpec:
    """ResNeXt-50 32x4d with CBAM in every bottleneck (timm) + FPN, v1 heads."""
    return timm_resnet("resnext50_32x4d", "tv_in1k", cfg, attn="cbam")


@register_backbone
def resnet101(cfg: ModelConfig) -> BackboneSpec:
    """ResNet-101 + FPN, v1 heads (torchvision)."""
    return tv_resnet("resnet101", ResNet101_Weights.IMAGENET1K_V1, cfg)


@register_backbone
def resnet101_dc5(cfg: ModelConfig) -> BackboneSpec:
    """ResNet-101 with dilated C5, its stride-16 res5 map the only level (Detectron2 R101-DC5 form, the #1 leaderboard result), v1 heads."""
    return tv_resnet_dc5("resnet101", ResNet101_Weights.IMAGENET1K_V1, cfg)


@register_backbone
def resnext101_32x8d(cfg: ModelConfig) -> BackboneSpec:
    """ResNeXt-101 32x8d + FPN, v1 heads (torchvision; the #2 leaderboard result's backbone)."""
    return tv_resnet("resnext101_32x8d", ResNeXt101_32X8D_Weights.IMAGENET1K_V1, cfg)


# --------------------------------------------------------------------------------------------
# timm features_only + FPN

EFFICIENTNET_STAGES = (
    ("conv_stem", "bn1", "blocks.0"), ("blocks.1",), ("blocks.2",), ("blocks.3", "blocks.4"), ("blocks.5", "blocks.6")
)
CONVNEXT_STAGES = (("stem_0", "stem_1"), ("stages_0",), ("stages_1",), ("stages_2",), ("stages_3",))


@register_backbone
def efficientnet_b0(cfg: ModelConfig) -> BackboneSpec:
    """EfficientNet-B0 (timm features_only) + FPN, v1 heads."""
    return timm_fpn("efficientnet_b0", "ra_in1k", cfg, EFFICIENTNET_STAGES)


@register_backbone
def efficientnet_b1(cfg: ModelConfig) -> BackboneSpec:
    """EfficientNet-B1 (timm features_only) + FPN, v1 heads."""
    return timm_fpn("efficientnet_b1", "ft_in1k", cfg, EFFICIENTNET_STAGES)


@register_backbone
def convnext_tiny(cfg: ModelConfig) -> BackboneSpec:
    """ConvNeXt-T (timm features_only, LayerNorm: model.norm must be auto) + FPN, v1 heads."""
    return timm_fpn("convnext_tiny", "fb_in1k", cfg, CONVNEXT_STAGES, out_indices=(0, 1, 2, 3), norms=("auto",))


# --------------------------------------------------------------------------------------------
# small, CPU-friendly


@register_backbone
def resnet18(cfg: ModelConfig) -> BackboneSpec:
    """ResNet-18 + FPN, v1 heads (torchvision; small, for CPU tests and the demo)."""
    return tv_resnet("resnet18", ResNet18_Weights.IMAGENET1K_V1, cfg)


@register_backbone
def mobilenet_v3_large(cfg: ModelConfig) -> BackboneSpec:
    """MobileNetV3-Large + FPN on strides 4-32, v1 heads (torchvision; small, for CPU)."""
    return tv_mobilenet("mobilenet_v3_large", MobileNet_V3_Large_Weights.IMAGENET1K_V1, cfg)
