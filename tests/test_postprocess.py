"""Lean paste + encode against torchvision's own paste (the ``torchvision`` mask geometry; the
``exact`` one is in test_mask_geometry.py), COCO conversion, mask NMS, flips, fusion."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from predict_helpers import gt_detections, tiny_model
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from cellkit.data import image_to_tensor, read_image, scan_train
from cellkit.data.synth import synth_image
from cellkit.inference.postprocess import flip_detections, flip_image, mask_nms, resample_masks, weighted_fusion
from cellkit.inference.predict import raw_detections
from cellkit.structures.coco_results import DropCounts, detections_to_coco, paste_and_encode
from cellkit.structures.detections import Detections
from cellkit.structures.rle import encode_mask, encode_region, rle_areas


def torchvision_rles(boxes: torch.Tensor, probs: torch.Tensor, h: int, w: int, thresh: float) -> list[dict]:
    """The reference: torchvision's full-size paste, ``> thresh``, then RLE."""
    pasted = paste_masks_in_image(probs, boxes, (h, w), padding=1)
    return [encode_mask((m[0] > thresh).numpy()) for m in pasted]


@pytest.fixture(scope="module")
def sample_image(fixture_root) -> torch.Tensor:
    """The real hw3 sample image, cropped to keep the test quick."""
    sample = scan_train(fixture_root)[0]
    return image_to_tensor(read_image(sample.image_path))[:, :180, :200].contiguous()


@pytest.mark.slow
def test_paste_and_encode_equals_torchvision_on_model_output(sample_image):
    model = tiny_model(detections=60)
    h, w = sample_image.shape[-2:]
    out = raw_detections(model, [sample_image])[0]
    assert len(out["boxes"]) == 60 and out["masks"].shape[1:] == (1, 28, 28)
    for thresh in (0.5, 0.3):
        ours = paste_and_encode(out["boxes"], out["masks"], h, w, thresh, geometry="torchvision")
        ref = torchvision_rles(out["boxes"], out["masks"], h, w, thresh)
        assert ours == ref
        assert all(isinstance(r["counts"], str) and r["size"] == [h, w] for r in ours)
    assert sum(mask_utils.area(ours).astype(bool)) > 0  # real content, not all-empty masks


def hand_made_boxes(h: int, w: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(n, 2, generator=g) * 45 + torch.rand(n, 1, generator=g) * 0.8
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) - wh * 0.6  # many cross the top/left border
    boxes = torch.cat([xy, xy + wh], dim=1)
    special = torch.tensor([
        [0.2, 0.3, 0.4, 0.6],  # sub-pixel
        [10.0, 10.0, 10.5, 10.2],  # sub-pixel inside
        [w - 1.1, 10.0, w - 0.1, 20.0],  # one column at the right edge
        [w - 15.0, h - 12.0, w + 9.0, h + 7.0],  # beyond bottom-right
        [-6.0, -5.0, 3.0, 3.0],  # beyond top-left
        [3.0, 4.0, 3.0, 4.0],  # zero size
        [0.0, 0.0, float(w), float(h)],  # the whole image
    ])
    return torch.cat([special, boxes])


@pytest.mark.parametrize("m", [28, 56])
def test_paste_and_encode_equals_torchvision_on_hand_made_boxes(m):
    """The default (and ``model.mask_geometry: torchvision``) paste is torchvision's, bit for bit;
    the exact geometry is tested against an analytic disc in test_mask_geometry.py."""
    h, w = 97, 131
    boxes = hand_made_boxes(h, w, 120, seed=m)
    probs = torch.rand(len(boxes), 1, m, m, generator=torch.Generator().manual_seed(1))
    for thresh in (0.5, 0.7):
        assert paste_and_encode(boxes, probs, h, w, thresh) == torchvision_rles(boxes, probs, h, w, thresh)


def test_paste_and_encode_box_fully_outside_is_empty_and_no_detections_is_empty():
    probs = torch.ones(2, 1, 28, 28)
    boxes = torch.tensor([[-40.0, 5.0, -20.0, 15.0], [50.0, 80.0, 60.0, 95.0]])  # left of / below a 60 x 40 image
    rles = paste_and_encode(boxes, probs, 60, 40)
    assert [r["size"] for r in rles] == [[60, 40]] * 2
    assert list(mask_utils.area(rles)) == [0, 0]
    assert paste_and_encode(torch.zeros(0, 4), torch.zeros(0, 1, 28, 28), 60, 40) == []


@pytest.mark.parametrize("h,w", [(5, 4), (61, 47), (300, 280)])
def test_encode_region_equals_pycocotools_on_the_full_mask(h, w):
    rng = np.random.default_rng(h)
    cases = [(np.ones((h, w), bool), 0, 0), (np.zeros((h, w), bool), 0, 0), (np.ones((h, 2), bool), 0, 1),
             (np.ones((3, 3), bool), h - 3, w - 3), (np.ones((2, 2), bool), -1, -1), (np.ones((4, 4), bool), h, 0)]
    for _ in range(300):
        rh, rw = (int(v) for v in rng.integers(1, min(h, w) + 6, 2))
        top = int(rng.choice([rng.integers(-5, h), 0, h - rh]))
        left = int(rng.integers(-5, w))
        cases.append((rng.random((rh, rw)) < rng.random(), top, left))
    for region, top, left in cases:
        full = np.zeros((h, w), bool)
        rh, rw = region.shape
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + rh, h), min(left + rw, w)
        if y1 > y0 and x1 > x0:
            full[y0:y1, x0:x1] = region[y0 - top : y1 - top, x0 - left : x1 - left]
        assert encode_region(region, top, left, h, w) == encode_mask(full)


def test_rle_areas_beyond_255_masks():
    rles = [encode_mask((np.arange(600).reshape(20, 30) < k).astype(np.uint8)) for k in range(300)]
    assert rle_areas(rles).tolist() == list(range(300)) and rle_areas([]).shape == (0,)


def test_detections_to_coco_filters_and_counts():
    h, w = 40, 50
    boxes = torch.tensor([[2.0, 3.0, 12.0, 15.0], [float("nan"), 1, 5, 5], [20, 20, 30, 30], [5, 5, 9, 9],
                          [1.0, 1.0, 4.0, 4.0]])
    scores = torch.tensor([0.9, 0.8, float("inf"), 0.7, 0.6])
    labels = torch.tensor([1, 2, 3, 4, 2])
    full = np.zeros((h, w), np.uint8)
    full[3:15, 2:12] = 1
    rles = [encode_mask(full), encode_mask(full), encode_mask(full), encode_mask(np.zeros((h, w), np.uint8)),
            encode_mask(full)]
    counts = DropCounts()
    out = detections_to_coco(7, boxes, labels, scores, rles, counts)
    assert [e["category_id"] for e in out] == [1, 2]
    assert (counts.nonfinite, counts.empty, counts.by_image) == (2, 1, {7: 3})
    e = out[0]
    assert e["image_id"] == 7 and isinstance(e["category_id"], int) and isinstance(e["score"], float)
    assert e["bbox"] == [2.0, 3.0, 10.0, 12.0] and all(math.isfinite(v) for v in e["bbox"])
    assert e["segmentation"]["size"] == [h, w] and isinstance(e["segmentation"]["counts"], str)
    assert mask_utils.decode(e["segmentation"]).sum() == full.sum()


def brute_force_nms(masks: np.ndarray, scores: np.ndarray, labels: np.ndarray, thresh: float) -> list[int]:
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    for i in order:
        ok = True
        for k in keep:
            if labels[k] != labels[i]:
                continue
            inter = np.logical_and(masks[i], masks[k]).sum()
            union = np.logical_or(masks[i], masks[k]).sum()
            if union and inter / union > thresh:
                ok = False
                break
        if ok:
            keep.append(int(i))
    return keep


def test_mask_nms_matches_brute_force_on_real_masks():
    rng = np.random.default_rng(5)
    _, owner, classes = synth_image(rng, 120, 140)
    ids = np.unique(owner)[1:]
    masks = [owner == i for i in ids]
    labels = [classes[i - 1] for i in ids]
    # duplicates: each cell once more shifted by 1-3 px, some with a different class
    for i in range(0, len(ids), 2):
        masks.append(np.roll(masks[i], int(rng.integers(1, 4)), axis=int(rng.integers(0, 2))))
        labels.append(labels[i] if i % 4 == 0 else 5 - labels[i])
    masks_np = np.stack(masks)
    scores = rng.uniform(0, 1, len(masks)).astype(np.float32)
    labels_np = np.asarray(labels)
    rles = [encode_mask(m) for m in masks_np]
    for thresh in (0.3, 0.5):
        keep = mask_nms(rles, torch.from_numpy(scores), thresh, labels=torch.from_numpy(labels_np))
        assert keep.tolist() == brute_force_nms(masks_np, scores, labels_np, thresh)
    agnostic = mask_nms(rles, torch.from_numpy(scores), 0.5)
    assert len(agnostic) == len(ids)  # every duplicate gone, every cell kept once


def test_flip_round_trip_and_paste_commutes_with_flip():
    rng = np.random.default_rng(2)
    _, owner, classes = synth_image(rng, 90, 110)
    det = gt_detections(owner, classes)
    h, w = owner.shape
    for flip in ("h", "v", "hv"):
        back = flip_detections(flip_detections(det, flip, h, w), flip, h, w)
        assert torch.allclose(back.boxes, det.boxes) and torch.equal(back.masks, det.masks)
        flipped = flip_detections(det, flip, h, w)  # the same cells, seen in the flipped image
        ours = paste_and_encode(flipped.boxes, flipped.masks, h, w)
        image = torch.from_numpy(owner)[None]
        ref = gt_detections(flip_image(image, flip)[0].numpy(), classes)
        ious = np.diag(mask_utils.iou(ours, paste_and_encode(ref.boxes, ref.masks, h, w), [0] * len(ref)))
        assert len(ref) == len(det) and ious.min() > 0.8 and ious.mean() > 0.95


def test_resample_masks_identity_and_sub_box():
    probs = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0.0, 0.0, 28.0, 28.0], [5.0, 7.0, 33.0, 20.0], [1.5, 2.5, 8.0, 9.0]])
    assert torch.allclose(resample_masks(probs, boxes, boxes), probs, atol=1e-5)
    # the left half of box 0 at 28 cells: odd cells sit a quarter of a source cell right of a source centre
    half = torch.tensor([[0.0, 0.0, 14.0, 28.0]])
    out = resample_masks(probs[:1], boxes[:1], half, size=28)[0, 0]
    p = probs[0, 0]
    assert torch.allclose(out[:, 1::2], 0.75 * p[:, 0:14] + 0.25 * p[:, 1:15], atol=1e-5)
    assert torch.allclose(out[:, 2::2], 0.25 * p[:, 0:13] + 0.75 * p[:, 1:14], atol=1e-5)


def test_weighted_fusion_of_identical_views_is_the_single_view():
    rng = np.random.default_rng(3)
    _, owner, classes = synth_image(rng, 100, 120)
    det = gt_detections(owner, classes)
    fused = weighted_fusion(Detections.cat([det, det, det]), n_views=3, iou_thresh=0.55)
    order = torch.argsort(det.scores, descending=True)
    assert len(fused) == len(det)
    assert torch.allclose(fused.boxes, det.boxes[order], atol=1e-4)
    assert torch.allclose(fused.scores, det.scores[order], atol=1e-6)
    assert torch.equal(fused.labels, det.labels[order])
    assert torch.allclose(fused.masks, det.masks[order], atol=1e-4)


def test_weighted_fusion_averages_by_score_and_penalises_missing_views():
    masks = torch.zeros(3, 1, 28, 28)
    masks[0] = 1.0
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [12.0, 10.0, 32.0, 30.0], [60.0, 60.0, 70.0, 70.0]])
    det = Detections(boxes, torch.tensor([1, 1, 1]), torch.tensor([0.75, 0.25, 0.6]), masks)
    fused = weighted_fusion(det, n_views=2, iou_thresh=0.5)
    assert len(fused) == 2
    assert torch.allclose(fused.boxes[0], torch.tensor([10.5, 10.0, 30.5, 30.0]))
    assert torch.allclose(fused.scores, torch.tensor([0.5, 0.3]))  # (0.75 + 0.25) / 2 and 0.6 / 2 (one view)
    # the fused mask is 0.75 where only the first (weight 0.75) had 1, away from the box edges
    assert torch.allclose(fused.masks[0, 0, 10, 10], torch.tensor(0.75), atol=1e-5)
    # a different class never fuses
    det2 = Detections(boxes[:2], torch.tensor([1, 2]), torch.tensor([0.75, 0.25]), masks[:2])
    assert len(weighted_fusion(det2, n_views=2, iou_thresh=0.5)) == 2
