"""The typed structures instances travel in: LabelMaps and its one walk (COCO, targets, overlays),
Detections (indexing, devices, concatenation, COCO entries)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from predict_helpers import gt_detections
from pycocotools import mask as mask_utils

from cellkit.data import load_sample, scan_train
from cellkit.structures import LabelMaps, MaskRegion
from cellkit.structures.coco_results import DropCounts, detections_to_coco, paste_and_encode
from cellkit.structures.detections import Detections


@pytest.fixture(scope="module")
def real_maps(fixture_root: Path) -> LabelMaps:
    return load_sample(scan_train(fixture_root)[0])[1]


def test_one_walk_feeds_coco_targets_and_overlays(real_maps: LabelMaps, real_gt: dict) -> None:
    regions = list(real_maps.regions())
    assert len(regions) == 161 == real_maps.num_instances
    assert [r.instance_id for r in regions] == sorted(r.instance_id for r in regions)
    layer = real_maps.layers[0]
    for r in regions[:20]:
        x0, y0, x1, y1 = r.box
        assert np.array_equal(r.mask, layer[y0:y1, x0:x1] == r.instance_id)
        assert r.area == int((layer == r.instance_id).sum()) and r.label == real_maps.labels[r.instance_id]
    # COCO: the same instances, in the same order, with their areas and classes
    anns = real_maps.to_coco(image_id=1)
    assert anns == real_gt["annotations"]
    assert [a["area"] for a in anns] == [float(r.area) for r in regions]
    decoded = mask_utils.decode(anns[7]["segmentation"]).astype(bool)
    assert np.array_equal(decoded, layer == regions[7].instance_id)
    # targets: the same masks at full size, boxes from the regions
    target = real_maps.to_target()
    assert target["masks"].shape == (161, *real_maps.shape) and target["masks"].dtype == torch.uint8
    assert torch.equal(target["masks"].amax(0).bool(), torch.from_numpy(layer > 0))
    assert target["boxes"][7].tolist() == list(regions[7].box)
    assert target["instance_ids"].tolist() == [r.instance_id for r in regions]
    assert torch.equal(target["area"], torch.tensor([float(r.area) for r in regions]))


def test_regions_of_two_layers_come_in_id_order() -> None:
    # overlapping classes sit in two layers; the walk still goes by id across layers
    a = np.zeros((6, 6), np.int64)
    a[0:3, 0:3] = 5
    b = np.zeros((6, 6), np.int64)
    b[1:4, 1:4] = 2
    b[4:6, 4:6] = 9
    maps = LabelMaps.from_class_maps({1: a, 3: b}, (6, 6))
    assert maps.layers.shape[0] == 2
    regions = list(maps.regions())
    assert [r.label for r in regions] == [1, 3, 3] and [r.instance_id for r in regions] == [1, 2, 3]
    assert [r.box for r in regions] == [(0, 0, 3, 3), (1, 1, 4, 4), (4, 4, 6, 6)]
    anns = maps.to_coco(3, first_ann_id=10)
    assert [a["id"] for a in anns] == [10, 11, 12] and {a["image_id"] for a in anns} == {3}
    empty = LabelMaps(np.zeros((1, 4, 5), np.uint16), np.zeros(1, np.int64))
    assert list(empty.regions()) == [] and empty.to_coco(1) == []
    assert empty.to_target()["masks"].shape == (0, 4, 5)


def test_mask_region_is_what_overlays_draw(real_maps: LabelMaps) -> None:
    from cellkit.viz.overlay import render

    image = np.zeros((*real_maps.shape, 3), np.uint8)
    out = render(image, list(real_maps.regions()), mode="fill", alpha=1.0)
    assert np.array_equal(out.any(-1), real_maps.layers[0] > 0)
    assert isinstance(next(real_maps.regions()), MaskRegion)


@pytest.fixture(scope="module")
def dets() -> Detections:
    from cellkit.data.synth import synth_image

    _, owner, classes = synth_image(np.random.default_rng(4), 120, 140)
    return gt_detections(owner, classes, image_id=7)


def test_detections_indexing_keeps_the_image(dets: Detections) -> None:
    n = len(dets)
    assert n > 3 and dets.image_id == 7 and dets.image_size == (120, 140)
    for idx in (torch.tensor([2, 0]), dets.scores > dets.scores.median(), slice(1, 3), [0, 1]):
        sub = dets[idx]
        assert (sub.image_id, sub.image_size) == (7, (120, 140))
        assert torch.equal(sub.boxes, dets.boxes[idx if not isinstance(idx, list) else torch.tensor(idx)])
        assert len(sub.masks) == len(sub.labels) == len(sub.scores) == len(sub)
    assert dets.to("meta").boxes.device.type == "meta" and dets.to("meta").image_id == 7
    assert dets.finite().all() and not dets.replace(scores=dets.scores * float("nan")).finite().any()


def test_detections_cat_resamples_masks_and_refuses_other_images(dets: Detections) -> None:
    from cellkit.structures.detections import resize_masks

    big = dets.replace(masks=resize_masks(dets.masks, 56))
    both = Detections.cat([dets, big])
    assert both.mask_size == 56 and len(both) == 2 * len(dets) and both.image_id == 7
    assert both.tile is None
    with pytest.raises(ValueError, match="images"):
        Detections.cat([dets, dets.replace(image_id=8)])
    assert len(Detections.cat([])) == 0


def test_to_coco_pastes_at_the_image_size_and_counts_drops(dets: Detections) -> None:
    bad = dets.replace(boxes=dets.boxes.clone())
    bad.boxes[0, 0] = float("nan")
    bad.masks = bad.masks.clone()
    bad.masks[1] = 0  # an empty mask
    counts = DropCounts()
    entries = bad.to_coco(0.5, counts=counts)
    assert counts.nonfinite == 1 and counts.empty == 1 and len(entries) == len(dets) - 2
    ok = bad[torch.arange(2, len(dets))]
    rles = paste_and_encode(ok.boxes, ok.masks, 120, 140, 0.5, geometry=ok.geometry)
    assert entries == detections_to_coco(7, ok.boxes, ok.labels, ok.scores, rles)
    assert all(e["image_id"] == 7 and e["segmentation"]["size"] == [120, 140] for e in entries)
