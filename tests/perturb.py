"""Test helpers: predictions made by perturbing real ground-truth masks, and COCOeval run by hand.

Not a test module (no ``test_`` prefix); imported by test_evaluate.py and test_cellmetrics.py.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cellkit.structures.rle import encode_mask


def prediction(image_id: int, category_id: int, score: float, mask: np.ndarray) -> dict[str, Any]:
    """A COCO result entry (RLE with str counts, bbox of the mask as x, y, w, h)."""
    rle = encode_mask(mask)
    return {"image_id": int(image_id), "category_id": int(category_id), "score": float(score),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "segmentation": rle}


def perturb_predictions(
    gt: dict[str, Any], seed: int = 0, p_drop: float = 0.15, p_wrong_class: float = 0.1,
    fp_per_image: int = 20, p_duplicate: float = 0.1,
) -> list[dict[str, Any]]:
    """Predictions from ground-truth masks: each instance kept, eroded, dilated or shifted (some
    dropped, some given a wrong class, some duplicated), plus random false-positive disks, all with
    random scores."""
    rng = np.random.default_rng(seed)
    preds: list[dict[str, Any]] = []
    for a in gt["annotations"]:
        if rng.random() < p_drop:
            continue
        m = mask_utils.decode(a["segmentation"]).astype(bool)
        op = int(rng.integers(4))
        if op == 1:
            m = ndi.binary_erosion(m, iterations=int(rng.integers(1, 3)))
        elif op == 2:
            m = ndi.binary_dilation(m, iterations=int(rng.integers(1, 3)))
        elif op == 3:
            m = ndi.shift(m.astype(np.uint8), (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), order=0) > 0
        cat = a["category_id"] if rng.random() >= p_wrong_class else int(rng.integers(1, 5))
        if m.any():
            preds.append(prediction(a["image_id"], cat, rng.random(), m))
            if rng.random() < p_duplicate:
                preds.append(prediction(a["image_id"], cat, 0.5 * rng.random(), ndi.binary_dilation(m)))
    for im in gt["images"]:
        h, w = im["height"], im["width"]
        yy, xx = np.mgrid[:h, :w]
        for _ in range(fp_per_image):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 12)
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            if m.any():
                preds.append(prediction(im["id"], int(rng.integers(1, 5)), 0.8 * rng.random(), m))
    return preds


def write(obj: Any, path: Path) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def textbook_cocoeval(gt_path: str, pred_path: str, iou_type: str, max_dets: int | None) -> dict[str, Any]:
    """COCOeval by hand, straight from the pycocotools README.

    ``max_dets=None``: default parameters and ``summarize()`` (stats at 100 detections).
    Otherwise ``params.maxDets = [1, 10, max_dets]`` and the numbers read off ``eval['precision']``
    (summarize() would report AP@[.5:.95] at 100; cocoapi issue 584).
    """
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        coco_dt = coco_gt.loadRes(pred_path)
        E = COCOeval(coco_gt, coco_dt, iou_type)
        if max_dets is not None:
            E.params.maxDets = [1, 10, max_dets]
        E.evaluate()
        E.accumulate()
        if max_dets is None:
            E.summarize()
            return {"stats": list(E.stats), "cat_ids": list(E.params.catIds)}
    p = E.eval["precision"]  # [T, R, K, A, M]
    r = E.eval["recall"]  # [T, K, A, M]
    t50 = np.where(E.params.iouThrs == 0.5)[0]
    t75 = np.where(E.params.iouThrs == 0.75)[0]
    m = E.params.maxDets.index(max_dets)

    def mean(s: np.ndarray) -> float:
        return float(np.mean(s[s > -1])) if (s > -1).any() else -1.0

    out = {
        "ap": mean(p[:, :, :, 0, m]), "ap50": mean(p[t50][:, :, :, 0, m]), "ap75": mean(p[t75][:, :, :, 0, m]),
        "ap_small": mean(p[:, :, :, 1, m]), "ap_medium": mean(p[:, :, :, 2, m]), "ap_large": mean(p[:, :, :, 3, m]),
        "ar": mean(r[:, :, 0, m]), "cat_ids": list(E.params.catIds),
    }
    out["class_ap50"] = [mean(p[t50][:, :, k, 0, m]) for k in range(p.shape[2])]
    out["class_ap"] = [mean(p[:, :, k, 0, m]) for k in range(p.shape[2])]
    return out


def same(ours: float | None, theirs: float, tol: float = 1e-9) -> bool:
    """Our number (NaN/None where undefined) against pycocotools' (-1 where undefined)."""
    if theirs == -1:
        return ours is None or ours != ours
    return ours is not None and abs(ours - theirs) <= tol
