"""Cell-tool metrics: cases whose counts are known by construction, from real masks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from perturb import prediction

from cellkit.data.coco import build_coco, categories
from cellkit.data.layout import scan_train
from cellkit.evaluation.cellmetrics import cell_metrics, match_masks
from cellkit.structures.rle import encode_mask

H, W = 96, 128
CENTRES = [(20, 20), (20, 64), (20, 108), (70, 30), (70, 90)]


def disk(cy: float, cx: float, r: float = 9.0) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def gt_of(masks: list[tuple[int, np.ndarray]]) -> dict:
    """COCO ground truth of one H x W image holding ``(class, mask)`` instances."""
    anns = []
    for i, (k, m) in enumerate(masks, start=1):
        ys, xs = np.nonzero(m)
        anns.append({"id": i, "image_id": 1, "category_id": k, "segmentation": encode_mask(m), "iscrowd": 0,
                     "area": float(m.sum()), "bbox": [float(xs.min()), float(ys.min()),
                                                      float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]})
    return {"images": [{"id": 1, "height": H, "width": W, "file_name": "x.tif"}], "annotations": anns,
            "categories": categories(4)}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_three_matches_one_fp_two_fn() -> None:
    gts = [disk(*c) for c in CENTRES]
    gt = gt_of([(1, m) for m in gts])
    preds = [prediction(1, 1, 0.9, m) for m in gts[:3]] + [prediction(1, 1, 0.8, disk(50, 60, 6))]
    r = cell_metrics(gt, preds)
    c = r.per_class["class1"]
    assert (c.tp, c.fp, c.fn) == (3, 1, 2)
    assert c.precision == pytest.approx(3 / 4) and c.recall == pytest.approx(3 / 5)
    assert c.f1 == pytest.approx(2 * 3 / (2 * 3 + 1 + 2)) and c.accuracy == pytest.approx(3 / 6)
    assert c.mean_matched_iou == pytest.approx(1.0)
    assert (r.overall.tp, r.overall.fp, r.overall.fn) == (3, 1, 2)
    assert math.isnan(r.per_class["class2"].precision)  # no instances, no predictions: undefined
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["overall"]["precision"] == pytest.approx(0.75) and d["per_class"]["class2"]["recall"] is None
    assert "TP/(TP+FP+FN)" in r.format()


def test_iou_threshold_decides() -> None:
    g = disk(48, 64, 12)
    p = disk(48, 66, 11)  # smaller and shifted: IoU somewhere between 0.5 and 1
    expected = iou(g, p)
    assert 0.5 < expected < 0.95
    gt, preds = gt_of([(1, g)]), [prediction(1, 1, 0.9, p)]
    hit = cell_metrics(gt, preds, iou_threshold=expected - 0.01)
    miss = cell_metrics(gt, preds, iou_threshold=expected + 0.01)
    assert (hit.overall.tp, hit.overall.fp, hit.overall.fn) == (1, 0, 0)
    assert hit.overall.mean_matched_iou == pytest.approx(expected, abs=1e-9)
    assert (miss.overall.tp, miss.overall.fp, miss.overall.fn) == (0, 1, 1)


def test_classes_and_score_threshold() -> None:
    a, b = disk(*CENTRES[0]), disk(*CENTRES[1])
    gt = gt_of([(1, a), (3, b)])
    preds = [prediction(1, 2, 0.9, a),  # right mask, wrong class: FP of class 2 and FN of class 1
             prediction(1, 3, 0.3, b)]  # right mask and class, low score
    r = cell_metrics(gt, preds)
    assert (r.per_class["class1"].fn, r.per_class["class2"].fp) == (1, 1)
    assert (r.per_class["class3"].tp, r.per_class["class3"].fn) == (0, 1)  # score 0.3 < 0.5
    low = cell_metrics(gt, preds, score_threshold=0.2)
    assert (low.per_class["class3"].tp, low.per_class["class3"].fp) == (1, 0)


def test_matching_maximises_pairs_not_score_order() -> None:
    # two side-by-side stripes; A straddles both (IoU ~0.41 with each), B lies inside the first (IoU 0.8)
    g1, g2, pa, pb = (np.zeros((H, W), bool) for _ in range(4))
    g1[:10, 0:10] = True
    g2[:10, 10:20] = True
    pa[:10, 3:17] = True
    pb[:10, 0:8] = True
    assert iou(pa, g1) >= 0.4 and iou(pa, g2) >= 0.4 and iou(pb, g1) == 0.8 and iou(pb, g2) == 0
    gt = gt_of([(1, g1), (1, g2)])
    # greedy by score would give A (the higher score) the first stripe and leave B unmatched: 1 TP
    r = cell_metrics(gt, [prediction(1, 1, 0.9, pa), prediction(1, 1, 0.6, pb)], iou_threshold=0.4)
    assert (r.overall.tp, r.overall.fp, r.overall.fn) == (2, 0, 0)
    assert r.overall.mean_matched_iou == pytest.approx((iou(pa, g2) + iou(pb, g1)) / 2)


def test_match_masks_prefers_higher_iou_among_equal_counts() -> None:
    g_good, g_poor, p = disk(48, 40, 10), disk(48, 58, 10), disk(48, 42, 10)
    assert iou(p, g_good) > iou(p, g_poor) > 0
    pi, gi, ious = match_masks([encode_mask(p)], [encode_mask(g_poor), encode_mask(g_good)], iou_threshold=0.0)
    assert list(pi) == [0] and list(gi) == [1] and ious[0] == pytest.approx(iou(p, g_good))


def test_synthetic_dataset_exact_and_dropped(synth_root: Path) -> None:
    from pycocotools import mask as mask_utils

    gt = build_coco(scan_train(synth_root), 4, progress=False)
    preds, dropped = [], {k: 0 for k in range(1, 5)}
    for i, a in enumerate(gt["annotations"]):
        if i % 3 == 0:
            dropped[a["category_id"]] += 1
            continue
        preds.append(prediction(a["image_id"], a["category_id"], 0.9, mask_utils.decode(a["segmentation"])))
    r = cell_metrics(gt, preds)
    for k in range(1, 5):
        c = r.per_class[f"class{k}"]
        n_gt = sum(a["category_id"] == k for a in gt["annotations"])
        assert (c.tp, c.fp, c.fn) == (n_gt - dropped[k], 0, dropped[k])
    assert r.overall.tp == len(preds) and r.overall.recall == pytest.approx(len(preds) / len(gt["annotations"]))
