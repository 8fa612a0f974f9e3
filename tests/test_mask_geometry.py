"""Mask geometry: exact targets (RoIAlign aligned=True) and their exact inverse paste, against an
analytic disc, the real sample's cells, torchvision's geometry, and a tiny model trained in each."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import NARROW_HEADS
from predict_helpers import gt_detections, instance_ids, tiny_model
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes
from torchvision.ops import roi_align

from cellkit import load_config
from cellkit.config import PredictConfig
from cellkit.data import CellDataset, image_to_tensor, scan_train
from cellkit.data.synth import synth_image
from cellkit.errors import ConfigError
from cellkit.inference.postprocess import flip_detections
from cellkit.inference.predict import finalize, merge_views, predict_image, raw_detections
from cellkit.inference.tiling import place_tile, tile_grid
from cellkit.models import build_model
from cellkit.models.checkpoint import model_from_checkpoint, save_checkpoint
from cellkit.models.losses import DiceRoIHeads
from cellkit.models.roi_heads import MaskRoIHeads
from cellkit.structures import LabelMaps
from cellkit.structures.coco_results import paste_and_encode
from cellkit.structures.detections import Detections
from cellkit.structures.mask_geometry import (
    exact_mask_targets,
    mask_geometry_of,
    mask_targets,
    paste_masks,
    paste_region,
    pixel_span,
)
from cellkit.structures.rle import encode_mask, rle_areas

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("torch_threads")


@pytest.fixture(scope="module")
def real_cells(fixture_root) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(masks (161, 397, 482) uint8, boxes (161, 4) float32, labels (161,))`` of the real sample."""
    _, target = CellDataset(scan_train(fixture_root), cache=False)[0]
    return target["masks"], target["boxes"], target["labels"]


# --------------------------------------------------------------------------------------------
# analytic: a disc sampled at a known box


def _soft_disc(x: torch.Tensor, y: torch.Tensor, cx: float, cy: float, r: float, ramp: float) -> torch.Tensor:
    """1 inside the disc, 0 outside, linear across a ``ramp``-wide band centred on the circle (float64)."""
    return (0.5 + (r - torch.sqrt((x - cx) ** 2 + (y - cy) ** 2)) / ramp).clamp(0, 1)


@pytest.mark.parametrize("m", [28, 56])
@pytest.mark.parametrize("cx, cy, r", [(41.3, 37.8, 17.6), (20.7, 60.2, 9.35), (50.2, 30.4, 8.3)])
def test_exact_paste_of_a_disc_sampled_at_a_known_box_is_the_disc(m, cx, cy, r):
    h, w, ramp = 80, 90, 4.0
    box = torch.tensor([[cx - r - 2.4, cy - r - 1.3, cx + r + 3.1, cy + r + 2.7]])  # not tight, not integer
    x0, y0, x1, y1 = box[0].double().tolist()
    t = (torch.arange(m, dtype=torch.float64) + 0.5) / m  # cell j's centre: x0 + (j + 0.5) w / M
    target = _soft_disc((x0 + t * (x1 - x0))[None, :], (y0 + t * (y1 - y0))[:, None], cx, cy, r, ramp)
    pasted = paste_masks(target.float()[None, None], box, h, w)[0, 0].double()

    py, px = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                            indexing="ij")
    dist = torch.sqrt((px - cx) ** 2 + (py - cy) ** 2) - r  # signed distance of each pixel centre to the circle
    disc = dist <= 0  # the disc's exact rasterisation (pixel in where its centre is)
    # between the outermost cell centres, the pasted field is the disc's field at the pixel
    # centres (bilinear interpolation of a smooth field): no shift, no scale error
    hx, hy = (x1 - x0) / (2 * m), (y1 - y0) / (2 * m)
    between = (px >= x0 + hx) & (px <= x1 - hx) & (py >= y0 + hy) & (py <= y1 - hy)
    band = (dist.abs() < 1.0) & between
    assert band.sum() > 4 * r
    assert (pasted - _soft_disc(px, py, cx, cy, r, ramp))[band].abs().max() < (0.01 if m == 28 else 0.002)
    # thresholded, it is the rasterisation; only centres within 0.04 px of the circle may flip
    wrong = (pasted > 0.5) != disc
    assert (dist[wrong].abs() < 0.04).all()
    assert wrong.sum() <= 2
    # nothing outside the box, not one extra pixel: a box (2.0, 3.0, 7.0, 9.0) covers pixels 2..6 x 3..8
    outside = (px < x0) | (px > x1) | (py < y0) | (py > y1)
    assert (pasted[outside] == 0).all()
    ones = paste_masks(torch.ones(1, 1, m, m), torch.tensor([[2.0, 3.0, 7.0, 9.0]]), 12, 12)[0, 0]
    assert torch.equal(torch.nonzero(ones > 0.5).unique(dim=0), torch.cartesian_prod(torch.arange(3, 9), torch.arange(2, 7)))
    # torchvision's paste of the same target is shifted and a pixel wider: whole pixels wrong
    tv = paste_masks_in_image(target.float()[None, None], box, (h, w), padding=1)[0, 0] > 0.5
    assert (tv != disc).sum() >= 5 and (dist[tv != disc].abs() > 0.1).any()


def test_pixel_span_is_the_pixels_whose_centres_are_in_the_interval():
    assert pixel_span(2.0, 7.0, 100) == (2, 7)  # centres 2.5 .. 6.5
    assert pixel_span(2.5, 6.5, 100) == (2, 7)  # edges included
    assert pixel_span(2.51, 6.49, 100) == (3, 6)
    assert pixel_span(-3.0, 4.2, 3) == (0, 3)  # clipped to the image
    assert pixel_span(3.0, 3.0, 10)[1] <= pixel_span(3.0, 3.0, 10)[0]  # empty box
    assert pixel_span(3.2, 3.4, 10)[1] <= pixel_span(3.2, 3.4, 10)[0]  # no centre inside


# --------------------------------------------------------------------------------------------
# targets


@pytest.mark.slow
def test_exact_targets_are_roi_align_aligned_true_and_torchvisions_are_its_own(real_cells):
    masks, boxes, _ = real_cells
    g = torch.Generator().manual_seed(0)
    matched = torch.randint(0, len(masks), (300,), generator=g)  # proposals around ground-truth boxes
    jitter = (torch.rand(300, 4, generator=g) - 0.5) * 8
    props = boxes[matched] + jitter
    for m in (28, 56):
        ref = roi_align(masks[:, None].float(), torch.cat([matched[:, None].float(), props], 1), (m, m), 1.0,
                        aligned=True)[:, 0]
        ours = exact_mask_targets(masks, props, matched, m)
        assert ours.shape == (300, m, m) and ours.dtype == torch.float32
        assert torch.equal(ours, ref)
        assert torch.equal(mask_targets(masks, props, matched, m, "exact"), ref)
        assert torch.equal(mask_targets(masks, props, matched, m, "torchvision"),
                           project_masks_on_boxes(masks, props, matched, m))
    assert exact_mask_targets(masks, props[:0], matched[:0], 28).shape == (0, 28, 28)
    with pytest.raises(ValueError, match="mask geometry"):
        mask_targets(masks, props, matched, 28, "aligned")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# round trip of the real cells


@pytest.mark.parametrize("m", [28, 56])
def test_real_cells_round_trip_through_exact_targets_and_paste(real_cells, m):
    masks, boxes, labels = real_cells
    n, h, w = masks.shape
    gt = [encode_mask(mk.numpy().astype(bool)) for mk in masks]
    ious = {}
    for geometry in ("exact", "torchvision"):
        targets = mask_targets(masks, boxes, torch.arange(n), m, geometry)
        rles = paste_and_encode(boxes, targets[:, None], h, w, 0.5, geometry=geometry)
        ious[geometry] = np.array([mask_utils.iou([p], [q], [0])[0][0] for p, q in zip(rles, gt)])
    class2 = (labels == 2).numpy()
    assert class2.sum() == 159
    assert ious["exact"].mean() >= 0.98 and ious["exact"][class2].mean() >= 0.98
    # torchvision's geometry loses 6 % (28) and 12 % (56) of IoU on these cells
    assert ious["torchvision"][class2].mean() == pytest.approx({28: 0.936, 56: 0.884}[m], abs=0.002)


# --------------------------------------------------------------------------------------------
# the lean per-box paste is the full-size paste


def _boxes(h: int, w: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(n, 2, generator=g) * 45 + torch.rand(n, 1, generator=g) * 0.8
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) - wh * 0.6  # many cross the top/left border
    special = torch.tensor([
        [0.2, 0.3, 0.4, 0.6], [10.0, 10.0, 10.5, 10.2], [10.5, 10.5, 11.5, 11.5],  # sub-pixel; centre on edges
        [w - 1.1, 10.0, w - 0.1, 20.0], [w - 15.0, h - 12.0, w + 9.0, h + 7.0], [-6.0, -5.0, 3.0, 3.0],
        [3.0, 4.0, 3.0, 4.0], [0.0, 0.0, float(w), float(h)], [-40.0, 5.0, -20.0, 15.0],  # empty, whole, outside
    ])
    return torch.cat([special, torch.cat([xy, xy + wh], dim=1)])


@pytest.mark.parametrize("m", [28, 56])
def test_lean_exact_paste_equals_the_full_size_exact_paste_bit_for_bit(m):
    h, w = 97, 131
    boxes = _boxes(h, w, 120, seed=m)
    probs = torch.rand(len(boxes), 1, m, m, generator=torch.Generator().manual_seed(1))
    full = paste_masks(probs, boxes, h, w)
    assert full.shape == (len(boxes), 1, h, w)
    for thresh in (0.5, 0.3, 0.0):
        ref = [encode_mask((p[0] > thresh).numpy()) for p in full]
        assert paste_and_encode(boxes, probs, h, w, thresh, geometry="exact") == ref
    # the region itself: the box's part of the full-size paste, at its top-left
    for i in (0, 2, 4, 5, 20):
        region, top, left = paste_region(probs[i, 0], boxes[i], h, w, 0.5)
        assert np.array_equal(region, (full[i, 0, top : top + region.shape[0], left : left + region.shape[1]] > 0.5).numpy())
        assert not (full[i, 0] > 0.5).numpy().sum() - region.sum()  # nothing outside the region
    assert list(rle_areas(paste_and_encode(boxes[6:9], torch.ones(3, 1, m, m), h, w, geometry="exact"))) == [0, w * h, 0]
    assert paste_and_encode(boxes[:0], probs[:0], h, w, geometry="exact") == []


# --------------------------------------------------------------------------------------------
# downstream: TTA flips and fusion, NMS merge, tiles, all in the exact geometry


def _cell_ious(entries: list[dict], owner: np.ndarray) -> np.ndarray:
    """Best mask IoU of each ground-truth cell among ``entries``."""
    gt = [encode_mask(owner == i) for i in instance_ids(owner)]
    return mask_utils.iou([e["segmentation"] for e in entries], gt, [0] * len(gt)).max(axis=0)


def test_exact_geometry_survives_flips_fusion_nms_merge_and_tiles():
    _, owner, classes = synth_image(np.random.default_rng(11), 200, 230)
    h, w = owner.shape
    det = gt_detections(owner, classes)  # masks: RoIAlign aligned=True of each cell at its own box
    plain = PredictConfig(tile_size=None)
    ious = {g: _cell_ious(finalize(det.replace(geometry=g), plain), owner) for g in ("exact", "torchvision")}
    assert ious["exact"].min() > 0.99 and ious["exact"].mean() > ious["torchvision"].mean() + 0.01
    # views seen flipped and flipped back, merged by weighted fusion or mask NMS: the cells stay exact
    views = [flip_detections(flip_detections(det, f, h, w), f, h, w) if f else det for f in ("", "h", "v", "hv")]
    for merge in ("wbf", "nms"):
        cfg = PredictConfig(tile_size=None, tta_merge=merge, tta_iou=0.55)
        merged = merge_views(views, cfg, h, w)
        assert len(merged) == len(det) and merged.geometry == "exact"
        assert _cell_ious(finalize(merged, cfg), owner).min() > 0.99
    # the paste commutes with a flip: the flipped detections paste to the flipped cells
    flipped = flip_detections(det, "hv", h, w)
    entries = finalize(flipped, plain)
    assert _cell_ious(entries, owner[::-1, ::-1].copy()).min() > 0.99
    # tiles: each tile's detections placed into the image, duplicates removed, pasted exactly
    parts, tiles = [], tile_grid(h, w, 128, 64)
    for k, t in enumerate(tiles):
        parts.append(place_tile(gt_detections(owner[t.y0 : t.y1, t.x0 : t.x1], classes, seed=k), t, k))
    placed = Detections.cat(parts).replace(image_id=1, image_size=(h, w))
    tiled = finalize(placed, PredictConfig(tile_size=128, tile_overlap=64))
    assert len(tiled) == len(det) and np.median(_cell_ious(tiled, owner)) > 0.99


# --------------------------------------------------------------------------------------------
# models: the knob, training in each geometry, prediction pastes in the model's geometry


def _tiny_cfg(geometry: str, **extra: Any):
    return load_config(overrides={
        "model.backbone": "resnet18", "model.weights": "none", "model.mask_geometry": geometry, "model.num_classes": 4,
        "model.resize_mode": "fixed_scale", "model.scale": 1.0, "model.max_size": 160, "model.min_size": 128,
        "model.rpn_pre_nms_top_n_train": 200, "model.rpn_post_nms_top_n_train": 100,
        "model.rpn_pre_nms_top_n_test": 100, "model.rpn_post_nms_top_n_test": 50,
        "model.box_batch_size_per_image": 64, "model.rpn_batch_size_per_image": 64,
        "model.box_detections_per_img": 25,
        "model.trainable_layers": 0,  # frozen backbone: the heads train, the step stays cheap on CPU
        **NARROW_HEADS, **extra,
    })


@pytest.fixture(scope="module")
def synth_sample() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A 128 x 140 synthetic image and its target (as CellDataset builds them)."""
    rgba, owner, classes = synth_image(np.random.default_rng(4), 128, 140)
    target = LabelMaps(owner[None].astype(np.int32), np.array([0, *classes], dtype=np.int64)).to_target()
    assert len(target["boxes"]) >= 5
    return image_to_tensor(rgba[..., :3]), target


class RecordingHeads(MaskRoIHeads):
    """``MaskRoIHeads`` that keeps what it sampled and the mask logits of its last training step."""

    def select_training_samples(self, proposals: Any, targets: Any) -> Any:
        out = super().select_training_samples(proposals, targets)
        self.recorded = out
        return out


@pytest.mark.slow
@pytest.mark.parametrize("geometry", ["exact", "torchvision"])
def test_tiny_model_trains_in_each_geometry_and_predicts_in_it(synth_sample, geometry):
    img, target = synth_sample
    torch.manual_seed(0)
    model = build_model(_tiny_cfg(geometry))
    assert isinstance(model.roi_heads, MaskRoIHeads) and model.roi_heads.mask_geometry == geometry
    assert mask_geometry_of(model) == geometry
    model.roi_heads = RecordingHeads.from_roi_heads(model.roi_heads, mask_geometry=geometry)
    logits: list[torch.Tensor] = []
    model.roi_heads.mask_predictor.register_forward_hook(lambda _m, _i, out: logits.append(out.detach()))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    model.train()
    for _ in range(2):
        logits.clear()
        losses = model([img], [target])
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
        assert all(torch.isfinite(v) for v in losses.values())
        # loss_mask is the BCE against this geometry's targets (native scale: the targets are the dataset's)
        props, matched, labels, _ = model.roi_heads.recorded
        pos = torch.where(labels[0] > 0)[0]
        goal = mask_targets(target["masks"], props[0][pos], matched[0][pos], 28, geometry)
        picked = logits[0][torch.arange(len(pos)), target["labels"][matched[0][pos]]]
        assert len(pos) > 0
        assert torch.allclose(losses["loss_mask"], F.binary_cross_entropy_with_logits(picked, goal))
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()

    model.eval()
    with torch.no_grad():  # torchvision's own eval forward (full-size masks) still works
        out = model([img])[0]
    assert out["masks"].shape[1:] == (1, 128, 140)
    # cellkit's prediction pastes in the model's geometry
    cfg = PredictConfig(score_thresh=0.0, nms_thresh=None, tile_size=None, mask_thresh=0.5)
    entries = predict_image(model, img, cfg, image_id=7)
    raw = raw_detections(model, [img])[0]
    own = paste_and_encode(raw["boxes"], raw["masks"], 128, 140, 0.5, geometry=geometry)
    other = paste_and_encode(raw["boxes"], raw["masks"], 128, 140, 0.5,
                             geometry="torchvision" if geometry == "exact" else "exact")
    assert len(own) > 0
    assert [e["segmentation"]["counts"] for e in entries] == [r["counts"] for r in own if rle_areas([r])[0] > 0]
    assert [r["counts"] for r in own] != [r["counts"] for r in other]


def test_geometry_knob_reaches_dice_heads_and_ensembles_must_agree(synth_sample):
    img, target = synth_sample
    torch.manual_seed(0)
    dice = build_model(_tiny_cfg("exact", **{"model.mask_loss": "bce+dice", "model.dice_weight": 0.5}))
    assert isinstance(dice.roi_heads, DiceRoIHeads) and dice.roi_heads.mask_geometry == "exact"
    torch.manual_seed(0)
    tv = build_model(_tiny_cfg("torchvision", **{"model.mask_loss": "bce+dice", "model.dice_weight": 0.5}))
    tv.load_state_dict(dice.state_dict())
    out = {}
    for name, model in (("exact", dice), ("torchvision", tv)):
        model.train()
        torch.manual_seed(3)
        with torch.no_grad():
            out[name] = model([img], [target])
    # same sampling, same logits: only the mask terms differ
    for key in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        assert torch.equal(out["exact"][key], out["torchvision"][key])
    assert not torch.equal(out["exact"]["loss_mask"], out["torchvision"]["loss_mask"])
    assert not torch.equal(out["exact"]["loss_mask_dice"], out["torchvision"]["loss_mask_dice"])
    assert mask_geometry_of([dice, dice]) == "exact"
    assert mask_geometry_of(tiny_model()) == "torchvision"  # a plain torchvision Mask R-CNN
    with pytest.raises(ConfigError, match="mask geometr"):
        mask_geometry_of([dice, tv])


@pytest.mark.slow
def test_checkpoints_from_before_the_knob_keep_torchvisions_geometry(tmp_path):
    cfg = _tiny_cfg("exact")
    model = build_model(cfg)
    stored = cfg.to_dict()
    save_checkpoint({"model": model.state_dict(), "config": stored}, tmp_path / "new.pth")
    del stored["model"]["mask_geometry"]
    save_checkpoint({"model": model.state_dict(), "config": stored}, tmp_path / "old.pth")
    assert mask_geometry_of(model_from_checkpoint(tmp_path / "new.pth")[0]) == "exact"
    old, old_cfg, _ = model_from_checkpoint(tmp_path / "old.pth")
    assert mask_geometry_of(old) == "torchvision" and old_cfg.model.mask_geometry == "torchvision"


# --------------------------------------------------------------------------------------------
# the benchmark


@pytest.mark.slow
def test_mask_roundtrip_benchmark_smoke_run():
    script = REPO / "benchmarks" / "mask_roundtrip.py"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in done.stdout.splitlines()
            if line.startswith("| 28 |")}
    assert set(rows) == {("28", "torchvision"), ("28", "exact")}
    exact_all = float(rows[("28", "exact")].split("|")[3])
    assert exact_all >= 0.98
    assert "command: python benchmarks/mask_roundtrip.py --quick" in done.stdout
