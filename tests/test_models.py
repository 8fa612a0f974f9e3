"""cellkit.models: every backbone trains, predicts and round-trips on CPU; knobs reach the modules;
attention runs in the forward pass; weights load from files and fail clearly offline; configs load.

Small inputs (128 px; 96 px for the largest backbones), small RPN/RoI budgets and meta-device builds
where only structure matters keep the whole file well under 4 minutes on 2 cores.
"""
from __future__ import annotations

import io
import json
import math
import time
import urllib.request
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import NARROW_HEADS
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d

from cellkit import load_config
from cellkit.config import Config
from cellkit.errors import CellkitError, ConfigError
from cellkit.models import (
    BackboneSpec,
    ResizeTransform,
    WeightsError,
    assemble,
    backbone_info,
    build_model,
    count_trainable_parameters,
    create_backbone,
    list_backbones,
    load_file,
    load_matching,
    register_backbone,
    registry,
    resize_masks,
)
from cellkit.models.builders import attention_types
from cellkit.models.losses import DiceRoIHeads, dice_loss
from cellkit.models.weights import downloading
from cellkit.structures import LabelMaps

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# the largest backbones run on a smaller image (their cost is mostly the backbone); the rest on 96 px
SIZE = 128
REDUCED = {name: 96 for name in ("resnet101", "convnext_tiny", "efficientnet_b1", "resnext50_32x4d",
                                 "resnext50_32x4d_se", "resnext50_32x4d_cbam", "resnet50_v2_cbam")}
ATTENTION_BACKBONES = [n for n in list_backbones() if n.endswith(("_se", "_cbam"))]
# too heavy to train on 2 CPU cores within the suite's budget: their strides, poolers and parameter
# counts are checked from a real backbone forward and a meta-device build (tests/test_heads.py trains
# the heads they share with the others)
BUILD_ONLY = {"resnet101_dc5": 64, "resnext101_32x8d": 64}

SMALL = {
    "model.num_classes": 4,
    "model.resize_mode": "fixed_scale", "model.scale": 1.0, "model.max_size": 4096,  # no resize: fast, exact
    "model.rpn_pre_nms_top_n_train": 200, "model.rpn_post_nms_top_n_train": 100,
    "model.rpn_pre_nms_top_n_test": 100, "model.rpn_post_nms_top_n_test": 50,
    "model.box_batch_size_per_image": 64, "model.rpn_batch_size_per_image": 64,
    "model.box_detections_per_img": 20,
}
LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


pytestmark = pytest.mark.usefixtures("torch_threads")


def small_cfg(backbone: str = "resnet18", **overrides: Any) -> Config:
    return load_config(overrides={**SMALL, "model.backbone": backbone, **overrides})


def cell_target(size: int, classes: tuple[int, int, int] = (1, 2, 4)) -> dict[str, torch.Tensor]:
    """Three cells (two of them touching) of ``classes`` from a label map, as the dataset builds them."""
    layer = torch.zeros(1, size, size, dtype=torch.int32)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i, (cy, cx, r) in enumerate([(0.3, 0.3, 0.12), (0.3, 0.52, 0.1), (0.7, 0.6, 0.15)], start=1):
        layer[0][(yy - cy * size) ** 2 + (xx - cx * size) ** 2 <= (r * size) ** 2] = i
    return LabelMaps(layer.numpy(), np.array([0, *classes])).to_target()


def image(size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g)


def eval_outputs(model: nn.Module, img: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model([img])[0]


# --------------------------------------------------------------------------------------------
# every registered backbone


@pytest.mark.slow
@pytest.mark.parametrize("name", list_backbones())
def test_backbone_trains_predicts_and_round_trips(name: str) -> None:
    if name in BUILD_ONLY:
        return check_strides_and_size(name, BUILD_ONLY[name])
    size = REDUCED.get(name, SIZE)
    cfg = small_cfg(name, **NARROW_HEADS)  # the backbone under test; the heads' widths are another test's
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, MaskRCNN)
    assert 0 < count_trainable_parameters(model) < 200_000_000
    # the RoI poolers' fixed scales must be the backbone's real strides
    spec = create_backbone(cfg.model)
    with torch.no_grad():
        feats = model.eval().backbone(torch.zeros(1, 3, size, size))
    assert [feats[k].shape[-1] for k in spec.featmap_names] == [size // s for s in spec.strides]
    assert model.roi_heads.box_roi_pool.scales == [1 / s for s in spec.strides]

    model.train()
    losses = model([image(size)], [cell_target(size)])
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"trainable parameters outside the graph: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)

    out = eval_outputs(model, image(size, seed=1))
    n = len(out["boxes"])
    assert 0 < n <= 20
    assert out["masks"].shape == (n, 1, size, size) and out["masks"].dtype == torch.float32
    assert out["labels"].min() >= 1 and out["labels"].max() <= 4
    assert torch.isfinite(out["boxes"]).all()

    torch.manual_seed(1)
    fresh = build_model(cfg)
    fresh.load_state_dict(model.state_dict())
    again = eval_outputs(fresh, image(size, seed=1))
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(out[key], again[key]), key


def check_strides_and_size(name: str, size: int) -> None:
    """The strides and poolers of a backbone too heavy to train here: a real backbone forward at
    ``size`` px, the whole model assembled on the meta device (parameters under 200M)."""
    cfg = small_cfg(name)
    torch.manual_seed(0)
    spec = create_backbone(cfg.model)
    with torch.no_grad():
        feats = spec.module.eval()(torch.zeros(1, 3, size, size))
    assert [feats[k].shape[-1] for k in spec.featmap_names] == [size // s for s in spec.strides]
    assert len(feats) == spec.num_levels
    assert all(f.shape[1] == spec.module.out_channels for f in feats.values())
    with torch.device("meta"):
        model = assemble(create_backbone(cfg.model), cfg.model)
    assert model.roi_heads.box_roi_pool.scales == [1 / s for s in spec.strides]
    assert model.roi_heads.mask_roi_pool.scales == [1 / s for s in spec.strides]
    assert model.rpn.head.cls_logits.out_channels == model.rpn.anchor_generator.num_anchors_per_location()[0]
    assert 0 < count_trainable_parameters(model) < 200_000_000


def test_a_tiny_first_image_does_not_break_later_predictions() -> None:
    # torchvision's pooler infers its scales from the first batch and keeps them; a 33 x 35 px
    # first image (the real test set has one) made it pool every later image from the wrong level
    torch.manual_seed(0)
    cfg = small_cfg("resnet18")
    model = build_model(cfg).eval()
    fresh = build_model(cfg).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        model([torch.rand(3, 33, 35)])
        after_tiny = model([image(160, seed=3)])[0]
        direct = fresh([image(160, seed=3)])[0]
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(after_tiny[key], direct[key]), key


def test_registry_lists_the_ablation_rows_and_small_backbones() -> None:
    names = set(list_backbones())
    rows = {"resnet50", "resnet50_se", "resnet50_cbam", "resnet50_v2", "resnet50_v2_se", "resnet50_v2_cbam",
            "resnext50_32x4d", "resnext50_32x4d_se", "resnext50_32x4d_cbam", "resnet101", "efficientnet_b0",
            "efficientnet_b1", "convnext_tiny", "resnet18", "mobilenet_v3_large",
            "resnet101_dc5", "resnext101_32x8d"}  # the leaderboard's #1 and #2 backbones
    assert rows <= names


def test_every_backbone_declares_its_metadata() -> None:
    for name in list_backbones():
        info = backbone_info(name)
        assert info.name == name and info.description
        assert set(info.tags) == set(registry.TAG_KEYS), name
        assert info.imagenet is not None and info.imagenet.library == info.tags["library"]
        assert info.tags["attention"] == (name.rsplit("_", 1)[1] if name.endswith(("_se", "_cbam")) else "none")
    # sources are data: a torchvision enum member (with its url) or timm's arch.tag
    r50 = backbone_info("resnet50")
    assert r50.imagenet.weights.url.startswith("https://") and str(r50.imagenet).startswith("torchvision ResNet50_Weights")
    assert backbone_info("resnet50_cbam").imagenet == registry.Pretrained("timm", "resnet50.tv_in1k")
    assert r50.coco is not None and r50.coco.weights.url.endswith(".pth")


def test_list_backbones_filters_on_metadata_without_building_any(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    import torchvision

    def no_build(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was built")

    list_backbones()  # the built-in registrations, loaded
    for name in list(registry._REGISTRY):
        monkeypatch.setitem(registry._REGISTRY, name, no_build)
    monkeypatch.setattr(timm, "create_model", no_build)
    for arch in ("resnet18", "resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x8d", "mobilenet_v3_large"):
        monkeypatch.setattr(torchvision.models, arch, no_build)

    coco = {"resnet50", "resnet50_se", "resnet50_cbam", "resnet50_v2", "resnet50_v2_se", "resnet50_v2_cbam"}
    assert set(list_backbones(pretrained="coco")) == coco
    assert list_backbones(tags={"attention": "se"}) == ["resnet50_se", "resnet50_v2_se", "resnext50_32x4d_se"]
    assert list_backbones("resnet50*", tags={"head": "v2", "attention": ["se", "cbam"]}) == [
        "resnet50_v2_cbam", "resnet50_v2_se"]
    assert list_backbones(tags={"neck": "dc5"}) == ["resnet101_dc5"]
    assert list_backbones(["efficientnet_*", "convnext*"], tags={"library": "timm"}) == [
        "convnext_tiny", "efficientnet_b0", "efficientnet_b1"]
    assert list_backbones(tags={"family": "mobilenet"}, pretrained="coco") == []
    assert len(list_backbones(pretrained="imagenet")) == len(list_backbones("*")) == len(registry._REGISTRY)
    with pytest.raises(ConfigError, match="did you mean 'attention'"):
        list_backbones(tags={"atention": "se"})
    with pytest.raises(ConfigError, match="not one of imagenet, coco"):
        list_backbones(pretrained="cocoa")

    from cellkit.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["models", "--names", "--json", "--pretrained", "coco", "--tag", "attention=cbam"]) == 0
    rows = json.loads(buf.getvalue())
    assert [r["name"] for r in rows] == ["resnet50_cbam", "resnet50_v2_cbam"]
    assert rows[0]["pretrained"] == ["imagenet", "coco"] and rows[1]["tags"]["head"] == "v2"


def test_a_registration_that_contradicts_its_build_is_caught() -> None:
    from torchvision.models import ResNet18_Weights, ResNet34_Weights

    from cellkit.models.builders import tv_resnet

    @register_backbone(family="resnet", head="v2", imagenet=ResNet18_Weights.IMAGENET1K_V1)
    def resnet34(cfg: Any) -> BackboneSpec:
        """ResNet-34 + FPN declared with the wrong head and weights (a test registration)."""
        return tv_resnet("resnet34", ResNet34_Weights.IMAGENET1K_V1, cfg)

    try:
        assert backbone_info("resnet34").tags == {"family": "resnet", "head": "v2", "library": "torchvision"}
        with torch.device("meta"), pytest.raises(ValueError, match="imagenet: declared torchvision ResNet18_Weights.*head: declared v2, built v1"):
            create_backbone(small_cfg("resnet34").model)
    finally:
        registry._REGISTRY.pop("resnet34")
        registry._INFO.pop("resnet34")


def test_unknown_backbone_suggests_the_nearest_name() -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'resnet5_cbam'.*did you mean 'resnet50_cbam'"):
        build_model(small_cfg("resnet5_cbam"))


def test_adding_a_backbone_is_one_function() -> None:
    from torchvision.models import ResNet34_Weights

    from cellkit.models.builders import tv_resnet

    def resnet34(cfg: Any) -> BackboneSpec:
        """ResNet-34 + FPN (a test registration)."""
        return tv_resnet("resnet34", ResNet34_Weights.IMAGENET1K_V1, cfg)

    register_backbone(resnet34)
    try:
        assert "resnet34" in list_backbones()
        with torch.device("meta"):
            model = build_model(small_cfg("resnet34"))
        assert isinstance(model, MaskRCNN)

        def other(cfg: Any) -> BackboneSpec:
            return resnet34(cfg)

        other.__name__ = "resnet34"
        with pytest.raises(ValueError, match="already registered"):
            register_backbone(other)
    finally:
        registry._REGISTRY.pop("resnet34")
        registry._INFO.pop("resnet34")


@pytest.mark.slow
def test_models_command_lists_every_backbone_under_200m() -> None:
    from cellkit.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["models", "--json", "--set", "model.num_classes=4"]) == 0
    rows = json.loads(buf.getvalue())
    assert [r["name"] for r in rows] == list_backbones()
    for r in rows:
        assert 1_000_000 < r["trainable_params"] < 200_000_000, r
        assert r["imagenet"] == str(backbone_info(r["name"]).imagenet) and r["tags"] == backbone_info(r["name"]).tags
    coco = {r["name"] for r in rows if r["coco"]}
    assert coco == {"resnet50", "resnet50_se", "resnet50_cbam", "resnet50_v2", "resnet50_v2_se", "resnet50_v2_cbam"}
    # the meta-device count equals a real build's
    real = build_model(small_cfg("resnet18"))
    assert next(r for r in rows if r["name"] == "resnet18")["trainable_params"] == count_trainable_parameters(real)


# --------------------------------------------------------------------------------------------
# heads and knobs


@pytest.mark.parametrize("name, design", [("resnet50", "v1"), ("resnet50_v2", "v2")])
def test_predictors_have_num_classes_plus_one_outputs(name: str, design: str) -> None:
    with torch.device("meta"):
        spec = create_backbone(small_cfg(name).model)
        model = assemble(spec, small_cfg(name).model)
    assert spec.head == design
    heads = model.roi_heads
    assert heads.box_predictor.cls_score.out_features == 5
    assert heads.box_predictor.bbox_pred.out_features == 20
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 5
    if design == "v2":  # torchvision's maskrcnn_resnet50_fpn_v2 design
        assert len(model.rpn.head.conv) == 2
        assert any(isinstance(m, nn.BatchNorm2d) for m in heads.box_head.modules())
        assert any(isinstance(m, nn.BatchNorm2d) for m in heads.mask_head.modules())
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.fpn.modules())
    else:
        assert len(model.rpn.head.conv) == 1
        assert not any(isinstance(m, nn.BatchNorm2d) for m in heads.mask_head.modules())


def test_every_knob_reaches_the_model() -> None:
    cfg = load_config(overrides={
        "model.backbone": "resnet18", "model.num_classes": 3,
        "model.box_detections_per_img": 321, "model.box_score_thresh": 0.07, "model.box_nms_thresh": 0.33,
        "model.rpn_pre_nms_top_n_train": 1111, "model.rpn_pre_nms_top_n_test": 222,
        "model.rpn_post_nms_top_n_train": 333, "model.rpn_post_nms_top_n_test": 44, "model.rpn_nms_thresh": 0.6,
        "model.rpn_batch_size_per_image": 128, "model.box_batch_size_per_image": 96,
        "model.anchor_sizes": [4, 12, 24, 48, 96], "model.aspect_ratios": [0.25, 0.5, 1.0, 2.0],
        "model.mask_roi_size": 28, "model.min_size": 640, "model.max_size": 1000,
        "model.image_mean": [0.1, 0.2, 0.3], "model.image_std": [0.4, 0.5, 0.6],
        "model.resize_mode": "fixed_scale", "model.scale": 1.5,
        "model.trainable_layers": 2, "model.norm": "gn", "model.mask_loss": "bce+dice", "model.dice_weight": 0.7,
    })
    torch.manual_seed(0)
    model = build_model(cfg)
    rh, rpn, tr = model.roi_heads, model.rpn, model.transform
    assert (rh.detections_per_img, rh.score_thresh, rh.nms_thresh) == (321, 0.07, 0.33)
    assert rpn._pre_nms_top_n == {"training": 1111, "testing": 222}
    assert rpn._post_nms_top_n == {"training": 333, "testing": 44}
    assert rpn.nms_thresh == 0.6
    assert rpn.fg_bg_sampler.batch_size_per_image == 128 and rh.fg_bg_sampler.batch_size_per_image == 96
    assert rpn.anchor_generator.sizes == ((4,), (12,), (24,), (48,), (96,))
    assert rpn.anchor_generator.aspect_ratios == ((0.25, 0.5, 1.0, 2.0),) * 5
    assert rpn.head.cls_logits.out_channels == 4
    assert rh.mask_roi_pool.output_size == (28, 28) and rh.box_roi_pool.output_size == (7, 7)
    assert rh.box_predictor.cls_score.out_features == 4 and rh.mask_predictor.mask_fcn_logits.out_channels == 4
    assert isinstance(tr, ResizeTransform) and isinstance(tr, GeneralizedRCNNTransform)
    assert (tr.min_size, tr.max_size, tr.resize_mode, tr.scale) == ((640,), 1000, "fixed_scale", 1.5)
    assert tr.image_mean == [0.1, 0.2, 0.3] and tr.image_std == [0.4, 0.5, 0.6]
    assert isinstance(rh, DiceRoIHeads) and rh.dice_weight == 0.7
    body = model.backbone.body
    for stage in ("conv1", "layer1", "layer2"):
        assert not any(p.requires_grad for p in getattr(body, stage).parameters()), stage
    for stage in ("layer3", "layer4"):
        assert all(p.requires_grad for p in getattr(body, stage).parameters()), stage
    norms = {type(m) for m in body.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, FrozenBatchNorm2d))}
    assert norms == {nn.GroupNorm}

    # the mask head's output: 56 x 56 logits with mask_roi_size 28 (captured during a training step)
    shapes: list[tuple[int, ...]] = []
    rh.mask_predictor.register_forward_hook(lambda _m, _i, o: shapes.append(tuple(o.shape)))
    model.train()
    losses = model([image(96)], [cell_target(96, classes=(1, 2, 3))])
    assert shapes and shapes[0][1:] == (4, 56, 56)
    assert {"loss_mask", "loss_mask_dice"} <= set(losses)


def test_head_width_knobs_reach_the_model() -> None:
    """The Demo issue's cost knobs: FPN width, box head width, mask head depth/width, positive fraction."""
    cfg = load_config(overrides={
        "model.backbone": "resnet18", "model.num_classes": 4, "model.fpn_channels": 64, "model.box_head_dim": 200,
        "model.mask_head_layers": 2, "model.mask_head_channels": 48, "model.box_positive_fraction": 0.5,
    })
    torch.manual_seed(0)
    model = build_model(cfg)
    bb, rh = model.backbone, model.roi_heads
    assert bb.out_channels == 64
    assert all(b[0].out_channels == 64 for b in bb.fpn.layer_blocks)
    assert [b[0].in_channels for b in bb.fpn.inner_blocks] == [64, 128, 256, 512]  # the body is untouched
    assert model.rpn.head.conv[0][0].in_channels == 64
    assert rh.box_head.fc6.in_features == 64 * 7 * 7 and rh.box_head.fc7.out_features == 200
    assert rh.box_predictor.cls_score.in_features == 200
    convs = [m for m in rh.mask_head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(64, 48), (48, 48)]
    assert rh.mask_predictor.conv5_mask.in_channels == 48
    assert rh.fg_bg_sampler.positive_fraction == 0.5
    model.train()
    losses = model([image(96)], [cell_target(96, classes=(1, 2, 3))])
    assert all(torch.isfinite(v) for v in losses.values())
    # the v2 design keeps BatchNorm in its resized FPN
    with torch.device("meta"):
        v2 = build_model(small_cfg("resnet50_v2", **{"model.fpn_channels": 96}))
    assert v2.backbone.out_channels == 96
    assert any(isinstance(m, nn.BatchNorm2d) for m in v2.backbone.fpn.modules())
    with pytest.raises(ConfigError, match="model.fpn_channels"):
        load_config(overrides={"model.fpn_channels": 0})


@pytest.mark.parametrize(
    "name, weights, norm, trainable, frozen, trained, norm_type",
    [
        # torchvision ResNet: torchvision's stage rule; auto = frozen BN with pretrained weights
        ("resnet50", "coco", "auto", None, ["conv1", "layer1"], ["layer2", "layer3", "layer4"], FrozenBatchNorm2d),
        ("resnet50", "none", "auto", None, [], ["conv1", "layer1", "layer4"], nn.BatchNorm2d),
        ("resnet50_v2", "coco", "auto", None, ["conv1", "layer1"], ["layer2"], nn.BatchNorm2d),
        # timm ResNet with attention: same stage names, same rule
        ("resnet50_cbam", "coco", "frozen_bn", 1, ["conv1", "layer1", "layer2", "layer3"], ["layer4"], FrozenBatchNorm2d),
        ("resnet50_se", "none", "bn", 0, ["conv1", "layer1", "layer4"], [], nn.BatchNorm2d),
        # timm EfficientNet and ConvNeXt, torchvision MobileNet
        ("efficientnet_b0", "none", "bn", 2, ["conv_stem", "blocks.0", "blocks.2"], ["blocks.3", "blocks.6"], None),
        ("convnext_tiny", "none", "auto", 4, ["stem_0"], ["stages_0", "stages_3"], None),
        ("mobilenet_v3_large", "none", "frozen_bn", 2, ["0", "4", "7"], ["13"], FrozenBatchNorm2d),
    ],
)
def test_trainable_stages_and_norm_reach_the_backbone(
    name: str, weights: str, norm: str, trainable: int | None, frozen: list[str], trained: list[str], norm_type: Any
) -> None:
    m = small_cfg(name, **{"model.weights": "none", "model.norm": norm, "model.trainable_layers": trainable}).model
    if weights != "none":  # resolve as with pretrained weights, without loading any (meta device)
        m = small_cfg(name, **{"model.weights": weights, "model.norm": norm, "model.trainable_layers": trainable}).model
    with torch.device("meta"):
        body = create_backbone(m).module.body
    attn = attention_types()
    attention_params = {id(p) for mod in body.modules() if isinstance(mod, attn) for p in mod.parameters()}

    def params(prefix: str) -> list[torch.nn.Parameter]:
        return [p for n, p in body.named_parameters() if n.startswith(prefix + ".") and id(p) not in attention_params]

    for prefix in frozen:
        assert params(prefix) and not any(p.requires_grad for p in params(prefix)), prefix
    for prefix in trained:
        assert params(prefix) and all(p.requires_grad for p in params(prefix)), prefix
    assert all(p.requires_grad for mod in body.modules() if isinstance(mod, attn) for p in mod.parameters())
    if norm_type is not None:
        types = {type(x) for x in body.modules() if isinstance(x, (nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm))
                 and not any(x is y for a in body.modules() if isinstance(a, attn) for y in a.modules())}
        assert types == {norm_type}


def test_frozen_stages_keep_their_norm_layers_and_bn_statistics() -> None:
    # freeze_stages (timm.utils.freeze) only stops gradients: with norm bn a frozen stage keeps
    # nn.BatchNorm2d, whose running statistics still follow the data in train mode, as in
    # torchvision's extractors; FrozenBatchNorm2d comes from model.norm alone
    from cellkit.models.builders import freeze_stages

    m = small_cfg("resnet18", **{"model.norm": "bn", "model.trainable_layers": 2}).model
    body = create_backbone(m).module.body
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer3.parameters())
    bn = body.layer1[0].bn1
    assert type(bn) is nn.BatchNorm2d
    before = bn.running_mean.clone()
    body.train()(torch.rand(1, 3, 64, 64))
    assert not torch.equal(before, bn.running_mean)
    with pytest.raises(AttributeError):
        freeze_stages(body, (("no_such_stage",), ("layer1",)), 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.anchor_sizes": [8, 16, 32, 64]}, "5 FPN levels, so it needs 5 anchor sizes"),
        ({"model.anchor_sizes": [8, 16, 32, 64, 128, 256]}, "needs 5 anchor sizes"),
        ({"model.trainable_layers": 6}, "outside 0..5"),
        ({"model.backbone": "mobilenet_v3_large", "model.num_classes": 4, "model.trainable_layers": 7}, "outside 0..6"),
        ({"model.norm": "gn", "model.weights": "imagenet"}, "gn cannot use imagenet"),
        ({"model.backbone": "convnext_tiny", "model.num_classes": 4, "model.norm": "bn"}, "supports auto"),
        ({"model.scale": 0.0}, "model.scale"),
        ({"model.box_score_thresh": 1.5}, "model.box_score_thresh"),
        ({"model.rpn_post_nms_top_n_test": 0}, "model.rpn_post_nms_top_n_test"),
        ({"model.weights": "imagnet"}, "did you mean 'imagenet'"),
        ({"model.weights": "/no/such/file.pth"}, "not none, imagenet, coco or an existing file"),
        ({"model.backbone": "resnet101", "model.num_classes": 4, "model.weights": "coco"}, "no COCO Mask R-CNN weights fit backbone resnet101"),
    ],
)
def test_invalid_knobs_are_config_errors(overrides: dict[str, Any], message: str) -> None:
    with torch.device("meta"), pytest.raises(ConfigError, match=message):
        build_model(small_cfg(**overrides))


# --------------------------------------------------------------------------------------------
# attention in the forward path


@pytest.mark.parametrize("name", ATTENTION_BACKBONES)
def test_attention_runs_in_every_forward_pass_and_changes_the_output(name: str) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(small_cfg(name).model).module.eval()
    from timm.layers import get_attn

    kind = name.rsplit("_", 1)[1]
    modules = [m for m in backbone.modules() if isinstance(m, attention_types())]
    assert len(modules) == 16 and all(type(m) is get_attn(kind) for m in modules)  # one per bottleneck block
    calls = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_hook(lambda _m, _i, _o, i=i: calls.__setitem__(i, calls[i] + 1))
    x = image(64)[None]
    with torch.no_grad():
        before = backbone(x)
        backbone(x)
    assert calls == [2] * len(modules)

    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.zero_()  # every gate becomes sigmoid(0) = 0.5
        after = backbone(x)
    for level in before:
        assert not torch.allclose(before[level], after[level], atol=1e-4), level


# --------------------------------------------------------------------------------------------
# the resize policy


def _masks_and_boxes(h: int, w: int, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(n, h, w, generator=g) > 0.7).to(torch.uint8)
    boxes = torch.tensor([[1.0, 2.0, w - 3.0, h - 1.0]] * n)
    return {"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64), "masks": masks}


@pytest.mark.parametrize("training", [False, True])
def test_min_size_mode_equals_torchvision(training: bool) -> None:
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ours = ResizeTransform(256, 400, mean, std).train(training)
    ref = GeneralizedRCNNTransform(256, 400, mean, std).train(training)
    for h, w in [(33, 35), (97, 130), (300, 180), (500, 620)]:
        img = image(max(h, w))[:, :h, :w].contiguous()
        a_img, a_t = ours([img], [_masks_and_boxes(h, w)])
        b_img, b_t = ref([img], [_masks_and_boxes(h, w)])
        assert a_img.image_sizes == b_img.image_sizes
        assert torch.equal(a_img.tensors, b_img.tensors)
        assert torch.equal(a_t[0]["boxes"], b_t[0]["boxes"])
        assert a_t[0]["masks"].dtype == torch.uint8
        assert torch.equal(a_t[0]["masks"], b_t[0]["masks"])  # nearest on uint8 == torchvision's float detour


def test_fixed_scale_gives_every_image_the_same_factor() -> None:
    tr = ResizeTransform(800, 2000, [0.0] * 3, [1.0] * 3, resize_mode="fixed_scale", scale=2.0).eval()
    sizes = {}
    for h, w in [(256, 256), (500, 377), (33, 35)]:
        out, t = tr([image(max(h, w))[:, :h, :w]], [_masks_and_boxes(h, w)])
        sizes[(h, w)] = out.image_sizes[0]
        assert torch.allclose(t[0]["boxes"], _masks_and_boxes(h, w)["boxes"] * 2.0)
        assert t[0]["masks"].shape[-2:] == (2 * h, 2 * w)
    assert sizes == {(256, 256): (512, 512), (500, 377): (1000, 754), (33, 35): (66, 70)}
    # the longer side is still capped
    capped = ResizeTransform(800, 800, [0.0] * 3, [1.0] * 3, resize_mode="fixed_scale", scale=2.0).eval()
    out, _ = capped([image(500)[:, :500, :400]])
    assert out.image_sizes[0] == (800, 640)


def test_scale_one_leaves_tensors_untouched() -> None:
    tr = ResizeTransform(800, 4096, [0.0] * 3, [1.0] * 3, resize_mode="fixed_scale", scale=1.0)
    img, target = image(150)[:, :150, :120], _masks_and_boxes(150, 120)
    out_img, out_t = tr.resize(img, dict(target))
    assert out_img is img and out_t is not None
    assert out_t["masks"] is target["masks"] and out_t["boxes"] is target["boxes"]
    batch, t = tr.train()([img], [target])
    assert batch.image_sizes == [(150, 120)] and torch.equal(t[0]["masks"], target["masks"])
    assert torch.equal(batch.tensors[0, :, :150, :120], img)


def test_resize_masks_keeps_uint8_and_handles_bool_and_empty() -> None:
    m = torch.rand(2, 20, 30) > 0.5
    out = resize_masks(m, 1.5)
    assert out.dtype == torch.uint8 and out.shape == (2, 30, 45)
    assert resize_masks(torch.zeros(0, 20, 30, dtype=torch.uint8), 2.0).shape == (0, 40, 60)


# --------------------------------------------------------------------------------------------
# Dice + BCE


def test_dice_loss_is_zero_for_a_perfect_mask_and_near_one_for_its_inverse() -> None:
    masks = torch.zeros(1, 32, 32, dtype=torch.uint8)
    masks[0, 8:24, 8:24] = 1
    box = [torch.tensor([[10.0, 10.0, 22.0, 22.0]])]  # inside the cell: every target pixel is 1
    logits = torch.full((1, 2, 16, 16), 20.0)
    args = (box, [masks], [torch.tensor([1])], [torch.tensor([0])])
    assert dice_loss(logits, *args).item() < 1e-3
    assert dice_loss(-logits, *args).item() > 0.9


def test_dice_adds_a_term_and_leaves_bce_unchanged() -> None:
    torch.manual_seed(0)
    plain = build_model(small_cfg("resnet18"))
    dice = build_model(small_cfg("resnet18", **{"model.mask_loss": "bce+dice", "model.dice_weight": 2.0}))
    dice.load_state_dict(plain.state_dict())
    out = {}
    for name, model in (("plain", plain), ("dice", dice)):
        model.train()
        torch.manual_seed(5)
        out[name] = model([image(96)], [cell_target(96)])
    assert set(out["dice"]) == LOSSES | {"loss_mask_dice"}
    assert torch.allclose(out["plain"]["loss_mask"], out["dice"]["loss_mask"])
    assert 0 < out["dice"]["loss_mask_dice"].item() <= 2.0
    out["dice"]["loss_mask_dice"].backward()
    assert dice.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    # inference is RoIHeads' own
    assert torch.equal(eval_outputs(plain, image(96, 2))["scores"], eval_outputs(dice, image(96, 2))["scores"])


# --------------------------------------------------------------------------------------------
# weights


@pytest.mark.slow
def test_weights_from_a_local_file_and_from_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = build_model(small_cfg("resnet18"))
    sd = tmp_path / "model.pth"
    torch.save(src.state_dict(), sd)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict(), "epoch": 3, "config": {}}, ckpt)
    expected = eval_outputs(src, image(96))
    for path in (sd, ckpt):
        torch.manual_seed(2)
        # norm bn as in the source (auto would pick frozen BN for a pretrained file: same values, no counter)
        model = build_model(small_cfg("resnet18", **{"model.weights": str(path), "model.norm": "bn"}))
        got = model.state_dict()
        assert all(torch.equal(v, got[k]) for k, v in src.state_dict().items())
        assert torch.equal(eval_outputs(model, image(96))["scores"], expected["scores"])


def test_backbone_only_file_loads_into_the_body(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = build_model(small_cfg("resnet18"))
    path = tmp_path / "resnet18_imagenet_like.pth"
    body = {k: v for k, v in src.backbone.body.state_dict().items()}
    body["fc.weight"] = torch.zeros(1000, 512)  # an ImageNet file has a classifier the detector drops
    torch.save(body, path)
    torch.manual_seed(2)
    model = build_model(small_cfg("resnet18", **{"model.weights": "none"}))
    report = load_file(model, path)
    assert report.unexpected == ["backbone.body.fc.weight"]
    assert all(k.startswith("backbone.body.") for k in report.loaded)
    assert len(report.loaded) == len(src.backbone.body.state_dict())
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, src.backbone.body.layer4[1].conv2.weight)
    assert any(k.startswith("backbone.fpn.") for k in report.missing)


@pytest.fixture
def torch_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch hub cache (TORCH_HOME) whose checkpoints folder a test fills."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "ours, theirs",
    [("resnet50", "maskrcnn_resnet50_fpn"), ("resnet50_v2", "maskrcnn_resnet50_fpn_v2"),
     ("resnet50_v2_se", "maskrcnn_resnet50_fpn_v2")],
)
def test_coco_weights_fit_everything_but_predictors_and_attention(torch_hub_cache: Path, ours: str, theirs: str) -> None:
    """``weights: coco`` end to end, offline: a torchvision Mask R-CNN state dict (91 classes, random
    values) planted where torch hub caches the COCO file loads into every layer but the predictors
    (rebuilt for 4 + 1 classes) and the attention layers (fresh)."""
    import os
    from urllib.parse import urlparse

    import torchvision.models.detection as tvd

    from cellkit.models.backbones import COCO_V1, COCO_V2

    enum = COCO_V2 if "v2" in ours else COCO_V1
    torch.manual_seed(0)
    tv = getattr(tvd, theirs)(weights=None, weights_backbone=None, num_classes=91)
    torch.save(tv.state_dict(), torch_hub_cache / os.path.basename(urlparse(enum.url).path))
    model = build_model(small_cfg(ours, **{"model.weights": "coco"}))

    heads = model.roi_heads
    assert heads.box_predictor.cls_score.out_features == 5 and heads.box_predictor.bbox_pred.out_features == 20
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 5
    assert torch.equal(model.backbone.body.layer3[2].conv2.weight, tv.backbone.body.layer3[2].conv2.weight)
    assert torch.equal(model.rpn.head.cls_logits.weight, tv.rpn.head.cls_logits.weight)
    assert torch.equal(model.roi_heads.mask_head[3][0].weight, tv.roi_heads.mask_head[3][0].weight)
    if enum is COCO_V1:  # torchvision's v1 COCO weights want BatchNorm eps 0, as its own builder sets
        assert all(m.eps == 0.0 for m in model.modules() if isinstance(m, FrozenBatchNorm2d))

    report = load_matching(model, tv.state_dict(), theirs)  # what the load did, key by key
    predictors = {f"roi_heads.box_predictor.{a}.{b}" for a in ("cls_score", "bbox_pred") for b in ("weight", "bias")}
    predictors |= {"roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.bias"}
    assert set(report.mismatched) == predictors
    if ours.endswith("_se"):
        assert len(report.missing) == 16 * 4 and all(".se." in k for k in report.missing)  # fc1/fc2 w+b per block
    else:
        assert report.missing == []


def test_imagenet_weights_torchvision(torch_hub_cache: Path) -> None:
    """``weights: imagenet`` through torchvision's weight enum, served from a planted cache file."""
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), torch_hub_cache / "resnet18-f37072fd.pth")  # ResNet18_Weights.IMAGENET1K_V1
    body = build_model(small_cfg("resnet18", **{"model.weights": "imagenet"})).backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert isinstance(body.bn1, FrozenBatchNorm2d)  # auto: frozen BN with pretrained weights
    assert not any(p.requires_grad for p in body.layer1.parameters())  # trainable_layers null -> 3


@pytest.mark.slow
def test_imagenet_weights_timm_with_attention_starting_fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``weights: imagenet`` through timm (pretrained, non-strict) for an attention row, from a planted HF cache."""
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "models--timm--resnet50.tv_in1k"
    (repo / "snapshots" / "0").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0")
    torch.manual_seed(0)
    ref = timm.create_model("resnet50")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(repo / "snapshots" / "0" / "model.safetensors"))
    body = build_model(small_cfg("resnet50_cbam", **{"model.weights": "imagenet"})).backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert not body.layer1[0].conv1.weight.requires_grad  # frozen stage
    assert all(p.requires_grad for p in body.layer1[0].se.parameters())  # its fresh attention still trains


def test_frozen_bn_and_bn_checkpoints_are_interchangeable() -> None:
    """model_from_checkpoint rebuilds with weights none (norm auto -> bn) a model trained with frozen BN."""
    torch.manual_seed(0)
    frozen = build_model(small_cfg("resnet18", **{"model.norm": "frozen_bn"}))
    bn = build_model(small_cfg("resnet18", **{"model.norm": "bn"}))
    bn.load_state_dict(frozen.state_dict())
    frozen.load_state_dict(bn.state_dict())
    assert torch.allclose(eval_outputs(frozen, image(96))["scores"], eval_outputs(bn, image(96))["scores"], atol=1e-5)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No cached torch hub weights, and every HTTP(S) request sent to a closed local port."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    urllib.request.install_opener(None)  # urllib builds its proxy handler anew from the environment
    yield
    urllib.request.install_opener(None)


@pytest.mark.parametrize("name, weights", [("resnet18", "imagenet"), ("resnet50", "coco"), ("efficientnet_b0", "imagenet"),
                                           ("resnet101_dc5", "imagenet"), ("resnext101_32x8d", "imagenet")])
def test_offline_download_is_a_clear_error_naming_the_local_file_option(offline: None, name: str, weights: str) -> None:
    if name.startswith("efficientnet"):
        from huggingface_hub import try_to_load_from_cache

        if any(isinstance(try_to_load_from_cache("timm/efficientnet_b0.ra_in1k", f), str)
               for f in ("model.safetensors", "pytorch_model.bin")):
            pytest.skip("timm weights are cached here: they load without a download")
    t0 = time.time()
    with pytest.raises(WeightsError, match=r"--set model\.weights=/path/to/file\.pth") as err:
        build_model(small_cfg(name, **{"model.weights": weights}))
    assert isinstance(err.value, CellkitError)
    assert time.time() - t0 < 30


def test_a_failed_download_becomes_a_weights_error() -> None:
    t0 = time.time()
    with pytest.raises(WeightsError, match="could not download test file.*model.weights="):
        with downloading("test file"):
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open("http://127.0.0.1:9/x.pth", timeout=5)
    assert time.time() - t0 < 10


# --------------------------------------------------------------------------------------------
# configs/


# configs/grids/ holds ablation grids (cellkit ablate), not configs; tests/test_ablation.py checks them
ALL_YAML = sorted(p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] != "grids")


def test_configs_exist() -> None:
    names = {p.relative_to(CONFIGS).as_posix() for p in ALL_YAML}
    for required in ("leaderboard.yaml", "cascade.yaml", "report004.yaml", "report004_no_scheduler.yaml", "demo.yaml",
                     "ablation/_base.yaml", "ablation/resnet50.yaml", "ablation/resnet50_cbam.yaml",
                     "ablation/resnet50_v2_se.yaml", "ablation/resnext50_32x4d_cbam.yaml",
                     "ablation/efficientnet_b0.yaml", "ablation/resnet101.yaml"):
        assert required in names, required


@pytest.mark.parametrize("path", ALL_YAML, ids=[p.relative_to(CONFIGS).as_posix() for p in ALL_YAML])
def test_every_config_loads_and_assembles(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.backbone in list_backbones()
    if not path.name.startswith("_"):
        text = path.read_text()
        assert text.startswith("#"), "each config starts with a comment saying what it reproduces"
    m = cfg.replace({"model.weights": "none", "model.num_classes": 4}).model
    with torch.device("meta"):  # every knob validated and assembled, no memory, no weights
        assemble(create_backbone(m), m)


def test_ablation_rows_follow_the_report() -> None:
    plateau = load_config(CONFIGS / "ablation" / "resnet50_cbam.yaml")
    assert plateau.model.backbone == "resnet50_cbam" and plateau.model.weights == "imagenet"
    t = plateau.train
    assert (t.optimizer, t.lr, t.scheduler, t.plateau_factor, t.plateau_patience) == ("adamw", 1e-3, "plateau", 0.2, 30)
    assert (t.warmup_epochs, t.warmup_factor, t.early_stop_decays) == (3, 0.1, 3)
    assert plateau.predict.score_thresh == 0.05
    constant = load_config(CONFIGS / "ablation" / "resnext50_32x4d_cbam.yaml").train
    assert constant.scheduler == "constant" and constant.early_stop_decays is None
    r4 = load_config(CONFIGS / "report004.yaml")
    assert (r4.model.backbone, r4.model.weights, r4.train.optimizer, r4.train.lr) == ("resnet50_v2", "coco", "sgd", 0.005)
    assert (r4.train.scheduler, r4.train.milestones, r4.train.epochs, r4.train.batch_size) == ("multistep", (0.8, 0.9), 100, 2)
    assert load_config(CONFIGS / "report004_no_scheduler.yaml").train.scheduler == "constant"
    lb = load_config(CONFIGS / "leaderboard.yaml").model
    assert (lb.weights, lb.box_detections_per_img, lb.mask_roi_size, lb.box_score_thresh) == ("coco", 1000, 28, 0.0)
    assert max(lb.anchor_sizes) <= 128 and lb.resize_mode == "fixed_scale" and lb.scale > 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo.yaml", "leaderboard.yaml"])
def test_configs_build_real_models(name: str) -> None:
    cfg = load_config(CONFIGS / name, {"model.weights": "none", "model.num_classes": 4})
    model = build_model(cfg)
    assert isinstance(model, MaskRCNN)
    assert math.isclose(model.transform.scale, cfg.model.scale)
    assert count_trainable_parameters(model) < 200_000_000
    if name == "leaderboard.yaml":
        assert model.roi_heads.mask_roi_pool.output_size == (28, 28)
        assert model.roi_heads.detections_per_img == 1000
