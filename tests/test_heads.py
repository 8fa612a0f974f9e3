"""Cascade Mask R-CNN, the weights EMA hook and the leaderboard backbones' single-level anchors.

A tiny cascade model (ResNet-18, weights none) trains two steps on the synthetic fixture data,
validates, predicts with TTA and tiles and has its score averaging recomputed from its heads;
EMA runs train two epochs straight and one epoch plus a resume; the heavy backbones are only
assembled (on the meta device) here: tests/test_models.py checks their strides.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.ops import boxes as box_ops

import cellkit
from cellkit.config import PredictConfig
from cellkit.engine.defaults import DefaultTrainer
from cellkit.engine.ema import EMAHook
from cellkit.engine.hooks import VALIDATION
from cellkit.errors import ConfigError
from cellkit.inference.predict import predict_image
from cellkit.inference.split import predict_split
from cellkit.inference.tune import tune_thresholds
from cellkit.models import assemble, build_model, count_trainable_parameters, create_backbone, load_matching
from cellkit.models.cascade import CascadeRoIHeads
from cellkit.models.checkpoint import load_checkpoint, model_from_checkpoint

STAGE_LOSSES = {f"loss_{kind}_stage{k}" for kind in ("classifier", "box_reg") for k in (1, 2, 3)}


pytestmark = pytest.mark.usefixtures("torch_threads")


def tiny(synth_root: Path, **overrides: Any) -> cellkit.Config:
    """ResNet-18 from scratch on the 8 synthetic fixture images (2 for validation), 96 px crops;
    small RPN/RoI budgets and narrow heads (the mask head's cost grows with the RoIs it sees)."""
    return cellkit.load_config(overrides={
        "name": "heads", "data.root": str(synth_root), "data.val_fraction": 0.25, "data.augment.crop_size": 96,
        "model.backbone": "resnet18", "model.weights": "none", "model.resize_mode": "fixed_scale",
        "model.rpn_pre_nms_top_n_train": 200, "model.rpn_post_nms_top_n_train": 100,
        "model.rpn_pre_nms_top_n_test": 100, "model.rpn_post_nms_top_n_test": 8,  # <= 32 masks per image
        "model.box_batch_size_per_image": 32, "model.rpn_batch_size_per_image": 64,
        "model.box_detections_per_img": 1000,
        "model.fpn_channels": 64, "model.box_head_dim": 256, "model.mask_head_channels": 64,  # cheap heads
        "train.epochs": 1, "train.batch_size": 2, "train.iters_per_epoch": 2, "train.lr": 5e-4,
        "train.tensorboard": False, "train.tensorboard_images": 0,
        **overrides,
    })


@pytest.fixture(scope="module")
def cascade_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[DefaultTrainer, Path]:
    cfg = tiny(synth_root, **{"model.roi_head": "cascade"})
    run = tmp_path_factory.mktemp("cascade") / "run"
    trainer = DefaultTrainer(cfg, run, progress=False)
    trainer.fit()
    return trainer, run


# --------------------------------------------------------------------------------------------
# cascade


@pytest.mark.slow
def test_cascade_trains_every_stage_and_validates(cascade_run: tuple[DefaultTrainer, Path]) -> None:
    trainer, run = cascade_run
    heads = trainer.model.roi_heads
    assert isinstance(heads, CascadeRoIHeads) and heads.num_stages == 3
    assert heads.iou_thresholds == (0.5, 0.6, 0.7) and heads.stage_weights == (1.0, 0.5, 0.25)
    assert [c.weights for c in heads.stage_coders] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert heads.box_predictor.bbox_pred.out_features == 4  # class-agnostic regression at every stage
    assert all(s["box_predictor"].bbox_pred.out_features == 4 for s in heads.cascade_stages)
    (epoch,) = trainer.history
    assert STAGE_LOSSES | {"loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(epoch)
    assert "loss_classifier" not in epoch
    assert all(math.isfinite(epoch[k]) and epoch[k] > 0 for k in STAGE_LOSSES | {"loss_mask"}), epoch
    assert epoch["steps"] == 2 and epoch["val_ap50"] is not None and 0 <= epoch["val_ap50"] <= 1
    # each stage's loss trains its own box head and no earlier stage's (the boxes between stages are detached)
    model = copy.deepcopy(trainer.model).train()
    img, target = trainer.train_set[0]
    losses = model([img], [target])
    for k in range(3):
        model.zero_grad()
        (losses[f"loss_classifier_stage{k + 1}"] + losses[f"loss_box_reg_stage{k + 1}"]).backward(retain_graph=True)
        moved = [any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                     for p in model.roi_heads.stage_modules(j)[0].parameters())
                 for j in range(3)]
        assert moved == [j == k for j in range(3)], (k, moved)
    # best.pth rebuilds the cascade and predicts the same
    model, cfg, _ = model_from_checkpoint(run / "checkpoints" / "best.pth")
    assert isinstance(model.roi_heads, CascadeRoIHeads) and cfg.model.roi_head == "cascade"
    img = trainer.val_set[0][0]
    with torch.no_grad():
        a, b = trainer.model.eval()([img])[0], model([img])[0]
    assert len(a["scores"]) > 0 and torch.equal(a["scores"], b["scores"]) and torch.equal(a["boxes"], b["boxes"])


def test_cascade_scores_are_the_mean_of_the_stage_scores(cascade_run: tuple[DefaultTrainer, Path]) -> None:
    """Each stage scored by hand from its own head and predictor on the boxes the stage before
    regressed: every detection's score is the mean over stages for its box's class, not any one
    stage's score, and its box is the last stage's."""
    trainer, _ = cascade_run
    model = trainer.model.eval()
    rh = model.roi_heads
    img = trainer.val_set[1][0]
    with torch.no_grad():
        batch, _ = model.transform([img])
        feats = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, feats)
        boxes, probs = proposals, []
        for k in range(3):
            head = rh.box_head if k == 0 else rh.cascade_stages[k - 1]["box_head"]
            predictor = rh.box_predictor if k == 0 else rh.cascade_stages[k - 1]["box_predictor"]
            logits, deltas = predictor(head(rh.box_roi_pool(feats, boxes, batch.image_sizes)))
            probs.append(torch.softmax(logits, -1))
            decoded = rh.stage_coders[k].decode(deltas, boxes).reshape(-1, 4)
            boxes = [box_ops.clip_boxes_to_image(decoded, batch.image_sizes[0])]
        mean = torch.stack(probs).mean(0)
        (det,), _ = rh(feats, proposals, batch.image_sizes)
    final = boxes[0]
    assert 0 < len(det["scores"]) <= 4 * len(final)
    assert det["masks"].shape[1:] == (1, 28, 28)
    differs = 0
    for box, label, score in zip(det["boxes"], det["labels"], det["scores"]):
        rows = torch.where((final == box).all(1))[0]
        assert len(rows) >= 1, "a detection whose box is not a last-stage box"
        r = min(rows.tolist(), key=lambda i: abs(float(mean[i, label] - score)))
        assert torch.isclose(mean[r, label], score, rtol=1e-6, atol=0), (float(mean[r, label]), float(score))
        differs += all(abs(float(p[r, label] - score)) > 1e-7 for p in probs)
    assert differs == len(det["scores"])


def test_cascade_predicts_with_tta_tiles_and_tuned_thresholds(cascade_run: tuple[DefaultTrainer, Path]) -> None:
    trainer, run = cascade_run
    img = trainer.val_set[0][0]
    h, w = int(img.shape[-2]), int(img.shape[-1])
    tile = max(h, w) // 2 + 16  # 2 x 2 tiles (or 2 x 1), 2 views each
    cfg = PredictConfig(tta=True, tta_flips=("h",), tta_merge="wbf", tile_size=tile, tile_overlap=32,
                        tile_above=max(h, w) - 1)
    entries = predict_image(trainer.model, img, cfg, image_id=7)
    assert entries, "no detections"
    for e in entries:
        x, y, bw, bh = e["bbox"]
        assert e["image_id"] == 7 and 1 <= e["category_id"] <= 4 and 0 <= e["score"] <= 1
        assert e["segmentation"]["size"] == [h, w] and -1e-3 <= x and x + bw <= w + 1e-3 and y + bh <= h + 1e-3
    # tune-thresholds on the cascade's cached validation detections
    shard = predict_split(trainer.model, trainer.cfg, dataset=trainer.val_set, progress=False)
    result = tune_thresholds(shard.detections, trainer.val_gt, score_grid=(0.0, 0.3), mask_grid=(0.5,),
                             nms_grid=(None,), progress=False)
    assert len(result.table) == 2 and all(0 <= r["ap50"] <= 1 for r in result.table)


@pytest.mark.slow
def test_cascade_keys_and_what_coco_weights_fit(tmp_path: Path) -> None:
    base = {"model.backbone": "resnet18", "model.num_classes": 4, "model.roi_head": "cascade"}
    with pytest.raises(ConfigError, match="model.cascade_stage_weights: 2 entries"):
        build_model(cellkit.load_config(overrides={**base, "model.cascade_stage_weights": [1.0, 0.5]}))
    two = cellkit.load_config(overrides={**base, "model.cascade_iou_thresholds": [0.5, 0.65],
                                         "model.cascade_stage_weights": [1, 1],
                                         "model.cascade_box_coder_weights": [[10, 10, 5, 5], [20, 20, 10, 10]]})
    torch.manual_seed(0)
    model = build_model(two)
    assert model.roi_heads.num_stages == 2 and model.roi_heads.stage_matchers[1].high_threshold == 0.65
    # a standard model's weights (as COCO's) fill stage 1's box head, the mask head and the rest;
    # the class-agnostic predictors and the later stages start fresh
    standard = build_model(cellkit.load_config(overrides={"model.backbone": "resnet18", "model.num_classes": 4}))
    report = load_matching(model, standard.state_dict(), "standard")
    assert "roi_heads.box_head.fc6.weight" in report.loaded and "roi_heads.mask_head.0.0.weight" in report.loaded
    assert torch.equal(model.roi_heads.box_head.fc6.weight, standard.roi_heads.box_head.fc6.weight)
    assert set(report.mismatched) == {"roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"}
    assert report.missing and all(k.startswith("roi_heads.cascade_stages.0.") for k in report.missing)
    # through build_model (weights: a file, as weights: coco): the later stages' box heads get stage 1's
    torch.save(standard.state_dict(), tmp_path / "standard.pth")
    loaded = build_model(two.replace({"model.weights": str(tmp_path / "standard.pth")})).roi_heads
    for head in (loaded.box_head, loaded.cascade_stages[0]["box_head"]):
        assert torch.equal(head.fc6.weight, standard.roi_heads.box_head.fc6.weight)
    assert not torch.equal(loaded.cascade_stages[0]["box_predictor"].bbox_pred.weight, loaded.box_predictor.bbox_pred.weight)


@pytest.mark.parametrize("name", ["resnet50_v2", "resnet101_dc5", "convnext_tiny"])
def test_cascade_assembles_on_other_backbones(name: str) -> None:
    """Other head designs (v2 conv box heads), the single 2048-channel DC5 map, timm bodies."""
    m = cellkit.load_config(overrides={"model.backbone": name, "model.num_classes": 4, "model.roi_head": "cascade"}).model
    with torch.device("meta"):
        model = assemble(create_backbone(m), m)
    rh = model.roi_heads
    assert isinstance(rh, CascadeRoIHeads) and len(rh.cascade_stages) == 2
    assert type(rh.cascade_stages[0]["box_head"]) is type(rh.box_head)
    n = count_trainable_parameters(model)
    if name == "resnet101_dc5":  # two more 2048 x 7 x 7 box heads: over the task's 200M rule
        assert n > 200_000_000
    else:
        assert n < 200_000_000


# --------------------------------------------------------------------------------------------
# single-level anchors (resnet101_dc5)


def test_single_level_backbone_takes_every_anchor_size() -> None:
    m = cellkit.load_config(overrides={"model.backbone": "resnet101_dc5", "model.num_classes": 4, "model.anchor_sizes": [16, 32, 64]}).model
    with torch.device("meta"):
        model = assemble(create_backbone(m), m)
    assert model.rpn.anchor_generator.sizes == ((16, 32, 64),)
    assert model.rpn.head.cls_logits.out_channels == 9  # 3 sizes x 3 aspect ratios on the one map
    assert model.roi_heads.box_roi_pool.featmap_names == ["0"] and model.roi_heads.box_roi_pool.scales == [1 / 16]
    fpn = cellkit.load_config(overrides={"model.backbone": "resnet18", "model.num_classes": 4, "model.anchor_sizes": [16, 32, 64]}).model
    with pytest.raises(ConfigError, match=r"model.anchor_sizes: backbone resnet18 has 5 FPN levels.*single-level"):
        with torch.device("meta"):
            assemble(create_backbone(fpn), fpn)


# --------------------------------------------------------------------------------------------
# EMA


def ema_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["hooks"]["EMAHook"]["module"]


@pytest.mark.slow
def test_ema_resumes_exactly(synth_root: Path, tmp_path: Path) -> None:
    """Two epochs straight and one epoch + resume end with the same EMA weights, bit for bit."""
    over = {"train.ema_decay": 0.9, "train.eval_every": 0, "train.iters_per_epoch": 1}
    straight, split = tmp_path / "straight", tmp_path / "split"
    DefaultTrainer(tiny(synth_root, **over, **{"train.epochs": 2}), straight, progress=False).fit()
    DefaultTrainer(tiny(synth_root, **over, **{"train.epochs": 1}), split, progress=False).fit()
    once = ema_tensors(split / "checkpoints" / "last.pth")
    resumed = DefaultTrainer(tiny(synth_root, **over, **{"train.epochs": 2}), split, progress=False)
    resumed.fit(resume=True)
    a, b = ema_tensors(straight / "checkpoints" / "last.pth"), ema_tensors(split / "checkpoints" / "last.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(once[k], b[k]) for k in b if b[k].is_floating_point())  # epoch 2 moved it
    model = load_checkpoint(split / "checkpoints" / "last.pth")["model"]
    assert any(not torch.equal(model[k], b[k]) for k in b)  # the average is not the training weights
    hook = next(h for h in resumed.hooks if isinstance(h, EMAHook))
    assert hook.updates == 2 and resumed.eval_model is hook.module


@pytest.mark.slow
def test_validation_and_best_use_the_ema_weights(synth_root: Path, tmp_path: Path) -> None:
    cfg = tiny(synth_root, **{"train.ema_decay": 0.5, "train.ema_warmup": False})
    trainer = DefaultTrainer(cfg, tmp_path / "run", progress=False)
    trainer.fit()
    hook = next(h for h in trainer.hooks if isinstance(h, EMAHook))
    ema = hook.module
    assert trainer.eval_model is ema and ema is not trainer.model
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pth")["model"]
    own = ema.state_dict()
    assert all(torch.equal(best[k], own[k]) for k in own)
    raw = trainer.model.state_dict()
    assert any(not torch.equal(raw[k], own[k]) for k in own if "weight" in k)
    # buffers are copied (ema_buffers: copy): BatchNorm statistics are the training model's
    bn = [k for k in own if k.endswith("running_mean")]
    assert bn and all(torch.equal(raw[k], own[k]) for k in bn)
    # the validation predictions are the averaged model's, not the training weights'
    val = trainer.storage[VALIDATION]  # what the last epoch's validation handed the other hooks
    scores = lambda model: sorted(e["score"] for e in predict_split(  # noqa: E731
        model, cfg, dataset=trainer.val_set, progress=False).entries())
    assert sorted(e["score"] for e in val.predictions) == pytest.approx(scores(ema), abs=1e-6)
    assert scores(trainer.model) != pytest.approx(scores(ema), abs=1e-6)


def test_ema_decay_warms_up_and_buffers_copy_or_average() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    hooks = {}
    for mode in ("copy", "average"):
        hooks[mode] = h = EMAHook(0.99, warmup=True, warmup_power=0.75, buffers=mode)
        h.trainer = SimpleNamespace(model=net, eval_model=net)  # the two attributes the hook uses
        assert h.module is h.trainer.eval_model
    h = hooks["copy"]
    assert h.current_decay(1) == 0.0  # the first step copies
    assert h.current_decay(2) == pytest.approx(1 - 2 ** -0.75)
    assert h.current_decay(10**7) == 0.99
    start = {k: v.clone() for k, v in net.state_dict().items()}
    for it in (1, 2):
        net.train()(torch.randn(2, 3, 8, 8) + it)  # moves the BatchNorm running statistics
        with torch.no_grad():
            net[0].weight.add_(1.0)
        for hook in hooks.values():
            hook.after_step({"iteration": it})
    d = 1 - 2 ** -0.75
    w = net[0].weight
    for hook in hooks.values():
        assert torch.allclose(hook.module[0].weight, d * (w - 1) + (1 - d) * w)
    assert torch.equal(hooks["copy"].module[1].running_mean, net[1].running_mean)
    avg = hooks["average"].module[1].running_mean
    assert not torch.equal(avg, net[1].running_mean) and not torch.equal(avg, start["1.running_mean"])
