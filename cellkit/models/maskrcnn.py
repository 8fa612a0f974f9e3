"""``build_model``: a torchvision ``MaskRCNN`` assembled from the config, every knob set explicitly.

torchvision's model builders swallow unknown keyword arguments, so a misspelt knob silently
does nothing. Here each ``ModelConfig`` field is passed to the module that uses it (anchor
generator, RPN, RoI heads, poolers, transform), and tests read every value back from the module.
"""
from __future__ import annotations

import math

from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import initLevelMapper

from ..config import Config, ModelConfig, validate_section
from ..errors import ConfigError
from .builders import resize_fpn
from .cascade import CascadeRoIHeads, make_cascade, validate_cascade
from .losses import DiceRoIHeads
from .registry import BackboneSpec, create_backbone
from .roi_heads import MaskRoIHeads
from .transform import ResizeTransform
from .weights import load_coco, load_file, weights_path

BOX_ROI_SIZE = 7


def build_model(cfg: Config | ModelConfig) -> MaskRCNN:
    """Mask R-CNN with an FPN backbone for ``cfg.model`` (or a bare ``ModelConfig``).

    The model is a plain torchvision ``MaskRCNN`` with the standard calling convention: in
    train mode ``model(images, targets)`` returns a dict of losses (``loss_classifier``,
    ``loss_box_reg``, ``loss_mask``, ``loss_objectness``, ``loss_rpn_box_reg``, plus
    ``loss_mask_dice`` with ``mask_loss: bce+dice``); in eval mode ``model(images)`` returns per
    image ``boxes`` ``(N, 4)`` float32 xyxy, ``labels`` ``(N,)`` int64 in 1..num_classes,
    ``scores`` ``(N,)`` float32 and ``masks`` ``(N, 1, H, W)`` float32 probabilities at the input
    size. Images are ``(3, H, W)`` float32 in [0, 1] (the model normalises them itself).
    ``model.transform`` is a :class:`~cellkit.models.transform.ResizeTransform`; ``backbone``
    and ``rpn`` are torchvision's modules, ``roi_heads`` a
    :class:`~cellkit.models.roi_heads.MaskRoIHeads` (torchvision's ``RoIHeads`` whose mask loss
    follows ``model.mask_geometry``, stored as ``roi_heads.mask_geometry`` for prediction; with
    ``model.roi_head: cascade`` a :class:`~cellkit.models.cascade.CascadeRoIHeads`, whose training
    losses are ``loss_classifier_stageK`` / ``loss_box_reg_stageK`` per stage instead). The
    full-size ``masks`` of ``model(images)`` are torchvision's paste whatever the geometry;
    cellkit's prediction (:mod:`cellkit.inference.predict`) pastes in the model's geometry.
    ``model.max_cell_diameter`` (input pixels, or None) is kept as an attribute of the same name
    for the tiles' overlap.

    Weights: ``imagenet`` loads into the backbone while it is built; ``coco`` and a file path load
    every tensor that fits after assembly (predictors always have ``num_classes + 1`` outputs
    and start fresh, as do attention layers). With cascade heads, a file without the later
    stages (COCO's, a standard model's) gives every stage's box head the stage-1 box head it loaded.

    Raises:
        ConfigError: an invalid knob (unknown backbone, anchors not one per FPN level, ...).
        WeightsError: pretrained weights requested but not downloadable (names the local-file option).
        DataError: an unreadable weights file.
    """
    m = cfg.model if isinstance(cfg, Config) else cfg
    validate_model_config(m)
    if m.scale == "auto":
        raise ConfigError("model.scale: auto is measured from the training cells when training starts "
                          "(cellkit.analysis.scale.resolve_auto_scale(cfg)); build_model needs a number")
    if m.num_classes is None:
        raise ConfigError("model.num_classes: not known yet; training reads it from the data "
                          "(cellkit.data.resolve_num_classes(cfg)), or set it")
    path = weights_path(m.weights)
    spec = create_backbone(m)
    model = assemble(spec, m)
    if m.weights == "coco":
        if spec.coco is None:
            raise ConfigError(
                f"model.weights: no COCO Mask R-CNN weights fit backbone {m.backbone}; `cellkit models` lists "
                "the backbones that have them (the resnet50 family), or use weights imagenet or a file"
            )
        report = load_coco(model, spec.coco)  # logs what loaded and what starts fresh
    elif path is not None:
        report = load_file(model, path)
    else:
        return model
    if isinstance(model.roi_heads, CascadeRoIHeads):  # a standard model's box head fits every stage
        model.roi_heads.init_stages_from_first(report.loaded, report.missing)
    return model


def assemble(spec: BackboneSpec, m: ModelConfig) -> MaskRCNN:
    """The Mask R-CNN around ``spec.module`` with ``spec.head``'s head design and the knobs of ``m`` (no weight loading)."""
    levels = spec.num_levels
    if levels == 1:  # a single feature map (resnet101_dc5): every anchor size on it, as Detectron2's DC5
        sizes: tuple[tuple[int, ...], ...] = (tuple(m.anchor_sizes),)
    elif len(m.anchor_sizes) != levels:
        raise ConfigError(
            f"model.anchor_sizes: backbone {m.backbone} has {levels} FPN levels, so it needs {levels} anchor sizes "
            f"(one per level, finest first), got {len(m.anchor_sizes)}: {list(m.anchor_sizes)} "
            "(a single-level backbone such as resnet101_dc5 takes any number of sizes, all on its one map)"
        )
    else:
        sizes = tuple((s,) for s in m.anchor_sizes)
    if m.fpn_channels is not None:
        resize_fpn(spec.module, m.fpn_channels, m.backbone)
    out = spec.module.out_channels
    if m.num_classes is None:
        raise ConfigError("model.num_classes: not known yet; set it (training reads it from the data)")
    n_out = m.num_classes + 1
    v2 = spec.head == "v2"
    anchors = AnchorGenerator(sizes, (tuple(m.aspect_ratios),) * levels)
    rpn_head = RPNHead(out, anchors.num_anchors_per_location()[0], conv_depth=2 if v2 else 1)
    names = list(spec.featmap_names)
    box_roi_pool = fixed_scale_pooler(names, spec.strides, BOX_ROI_SIZE)
    mask_roi_pool = fixed_scale_pooler(names, spec.strides, m.mask_roi_size)
    mask_layers = [m.mask_head_channels] * m.mask_head_layers

    def new_box_head() -> nn.Module:
        if v2:
            return FastRCNNConvFCHead(
                (out, BOX_ROI_SIZE, BOX_ROI_SIZE), [256, 256, 256, 256], [m.box_head_dim], norm_layer=nn.BatchNorm2d
            )
        return TwoMLPHead(out * BOX_ROI_SIZE**2, m.box_head_dim)

    box_head = new_box_head()
    if v2:
        mask_head = MaskRCNNHeads(out, mask_layers, 1, norm_layer=nn.BatchNorm2d)
    else:
        mask_head = MaskRCNNHeads(out, mask_layers, 1)
    model = MaskRCNN(
        spec.module,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
        rpn_nms_thresh=m.rpn_nms_thresh,
        rpn_batch_size_per_image=m.rpn_batch_size_per_image,
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(m.box_head_dim, n_out),
        box_score_thresh=m.box_score_thresh,
        box_nms_thresh=m.box_nms_thresh,
        box_detections_per_img=m.box_detections_per_img,
        box_batch_size_per_image=m.box_batch_size_per_image,
        box_positive_fraction=m.box_positive_fraction,
        mask_roi_pool=mask_roi_pool,
        mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(m.mask_head_channels, m.mask_head_channels, n_out),
    )
    model.transform = ResizeTransform(
        m.min_size, m.max_size, m.image_mean, m.image_std, resize_mode=m.resize_mode, scale=m.scale
    )
    # the largest cell it expects (input px; None: not measured): prediction overlaps tiles by it
    model.max_cell_diameter = m.max_cell_diameter
    if m.roi_head == "cascade":  # stage 1 keeps box_head; masks, geometry and Dice as the standard heads
        dice = m.dice_weight if m.mask_loss == "bce+dice" else None
        model.roi_heads = make_cascade(model.roi_heads, m, new_box_head, m.box_head_dim, dice)
    elif m.mask_loss == "bce+dice":
        model.roi_heads = DiceRoIHeads.from_roi_heads(model.roi_heads, m.dice_weight, m.mask_geometry)
    else:  # the mask loss follows mask_geometry; prediction reads roi_heads.mask_geometry to paste
        model.roi_heads = MaskRoIHeads.from_roi_heads(model.roi_heads, mask_geometry=m.mask_geometry)
    return model


def fixed_scale_pooler(names: list[str], strides: tuple[int, ...], output_size: int) -> MultiScaleRoIAlign:
    """A ``MultiScaleRoIAlign`` whose level scales are set from the backbone's strides.

    torchvision's pooler infers the scales from the first batch it sees and keeps them: a first
    image of 33 x 35 px (the real test set has one) makes it infer 1/16 for the stride-32 map,
    and every later prediction of the model pools from the wrong place. Setting the scales up
    front makes them independent of the inputs.
    """
    if len(strides) != len(names):
        raise ValueError(f"{len(names)} feature maps but {len(strides)} strides")
    pool = MultiScaleRoIAlign(featmap_names=names, output_size=output_size, sampling_ratio=2)
    pool.scales = [1.0 / s for s in strides]
    pool.map_levels = initLevelMapper(
        int(math.log2(strides[0])), int(math.log2(strides[-1])),
        canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level,
    )
    return pool


def validate_model_config(m: ModelConfig) -> None:
    """Check every ``model.*`` key against its type and valid range (declared once, in
    :mod:`cellkit.config`); a config from :func:`~cellkit.load_config` has passed this already,
    a ``ModelConfig`` built or changed by hand is checked here.

    Raises:
        ConfigError: the first invalid value, naming its key.
    """
    validate_section(m, "model")
    if m.roi_head == "cascade":
        validate_cascade(m)


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad`` (what the 200M rule counts)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, trainable or not."""
    return sum(p.numel() for p in model.parameters())
