"""Cell-tool metrics at one IoU threshold: precision, recall, F1 and TP / (TP + FP + FN).

Cellpose and StarDist report instance segmentation this way rather than with COCO AP:
predictions (above a score threshold) are matched one-to-one to ground-truth instances of the same
class in the same image, a match counting when the mask IoU reaches the threshold. Then

* precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN)
* accuracy = TP / (TP + FP + FN) (what Cellpose and StarDist call "AP" at that threshold).

Matching is an optimal assignment (``scipy.optimize.linear_sum_assignment``) that maximises the
number of pairs with IoU >= threshold and, among those, their total IoU, the definition used by
StarDist's ``matching`` and Cellpose's ``average_precision``. It makes TP independent of the score
order, which is right here because every prediction above the score threshold counts equally. (For
thresholds >= 0.5 and non-overlapping masks each prediction can reach the threshold with at most
one instance, so greedy-by-score matching would give the same counts.)

Ratios whose denominator is 0 (e.g. a class with neither instances nor predictions) are NaN.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from .formatting import fmt, nan_to_none
from .inputs import GroundTruth, gt_rle, prepare

__all__ = ["CellMetrics", "ClassCounts", "cell_metrics", "match_masks"]


@dataclass
class ClassCounts:
    """Matching counts of one class (or of all classes together) and the ratios derived from them."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0
    """Sum of the IoUs of the matched pairs."""

    @property
    def precision(self) -> float:
        """TP / (TP + FP)."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        """TP / (TP + FN)."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN), the harmonic mean of precision and recall."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def accuracy(self) -> float:
        """TP / (TP + FP + FN): Cellpose's and StarDist's "AP" at this IoU threshold."""
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def mean_matched_iou(self) -> float:
        """Mean IoU of the matched pairs (StarDist's ``mean_matched_score``)."""
        return _ratio(self.iou_sum, self.tp)

    def add(self, other: "ClassCounts") -> None:
        """Add ``other``'s counts to these (in place)."""
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum

    def to_dict(self) -> dict[str, Any]:
        """``{tp, fp, fn, precision, recall, f1, accuracy, mean_matched_iou}`` (NaN as None)."""
        return {
            "tp": self.tp, "fp": self.fp, "fn": self.fn,
            "precision": nan_to_none(self.precision), "recall": nan_to_none(self.recall), "f1": nan_to_none(self.f1),
            "accuracy": nan_to_none(self.accuracy), "mean_matched_iou": nan_to_none(self.mean_matched_iou),
        }


@dataclass
class CellMetrics:
    """Cell-tool metrics of a prediction set.

    Attributes:
        iou_threshold: IoU at which a prediction matches an instance.
        score_threshold: predictions scoring below this were left out.
        per_class: class name -> counts.
        overall: counts summed over classes (micro average).
    """

    iou_threshold: float
    score_threshold: float
    per_class: dict[str, ClassCounts] = field(default_factory=dict)
    overall: ClassCounts = field(default_factory=ClassCounts)

    @property
    def precision(self) -> float:
        """Overall (micro-averaged) precision."""
        return self.overall.precision

    @property
    def recall(self) -> float:
        """Overall recall."""
        return self.overall.recall

    @property
    def f1(self) -> float:
        """Overall F1."""
        return self.overall.f1

    @property
    def accuracy(self) -> float:
        """Overall TP / (TP + FP + FN)."""
        return self.overall.accuracy

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: thresholds, ``overall`` and ``per_class`` counts and ratios."""
        return {
            "iou_threshold": self.iou_threshold,
            "score_threshold": self.score_threshold,
            "overall": self.overall.to_dict(),
            "per_class": {k: v.to_dict() for k, v in self.per_class.items()},
        }

    def format(self) -> str:
        """A table with one row per class and an overall row."""
        lines = [
            f"Cell-tool metrics at IoU {self.iou_threshold:g} (predictions with score >= {self.score_threshold:g}, "
            "one-to-one matching within each class)",
            f"  {'class':<10} {'TP':>7} {'FP':>7} {'FN':>7} {'precision':>10} {'recall':>8} {'F1':>7} {'TP/(TP+FP+FN)':>14}",
        ]
        for name, c in [*self.per_class.items(), ("overall", self.overall)]:
            lines.append(
                f"  {name:<10} {c.tp:>7d} {c.fp:>7d} {c.fn:>7d} {fmt(c.precision):>10} {fmt(c.recall):>8} "
                f"{fmt(c.f1):>7} {fmt(c.accuracy):>14}"
            )
        return "\n".join(lines)


def match_masks(
    pred_rles: Sequence[Mapping[str, Any]], gt_rles: Sequence[Mapping[str, Any]], iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching of predicted to ground-truth masks of one image and class.

    Args:
        pred_rles, gt_rles: compressed RLEs (pycocotools form) of the same ``[H, W]`` size.
        iou_threshold: a pair can match only when its IoU is at least this.

    Returns:
        ``(pred_idx, gt_idx, ious)``: ``(n_matches,)`` int indices of the matched pairs and their
        float IoUs. The matching maximises the number of pairs, then their total IoU.
    """
    if not len(pred_rles) or not len(gt_rles):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    iou = np.asarray(mask_utils.iou(list(pred_rles), list(gt_rles), [0] * len(gt_rles)), dtype=np.float64)
    iou = iou.reshape(len(pred_rles), len(gt_rles))
    ok = iou >= iou_threshold
    rows_ok, cols_ok = np.flatnonzero(ok.any(axis=1)), np.flatnonzero(ok.any(axis=0))
    if not rows_ok.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    sub_ok = ok[np.ix_(rows_ok, cols_ok)]
    if (sub_ok.sum(axis=0) == 1).all() and (sub_ok.sum(axis=1) == 1).all():
        # every eligible pair stands alone (the usual case at IoU >= 0.5): they are the matching
        r, c = np.nonzero(sub_ok)
        r, c = rows_ok[r], cols_ok[c]
        return r.astype(np.int64), c.astype(np.int64), iou[r, c]
    sub_iou = iou[np.ix_(rows_ok, cols_ok)]
    # each eligible pair is worth 1 plus a tie-breaking share of its IoU below 1 / n, so that no
    # sum of IoU shares can outweigh one more pair
    n = max(sub_ok.shape)
    cost = -(sub_ok * (1.0 + sub_iou / (2.0 * n)))
    from scipy.optimize import linear_sum_assignment  # here: scipy.optimize takes ~1 s to import

    r, c = linear_sum_assignment(cost)
    keep = sub_ok[r, c]
    r, c = rows_ok[r[keep]], cols_ok[c[keep]]
    return r.astype(np.int64), c.astype(np.int64), iou[r, c]


def cell_metrics(
    gt: Any,
    predictions: Any,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
    num_classes: int | None = None,
    checked: bool = False,
) -> CellMetrics:
    """Precision, recall, F1 and TP/(TP+FP+FN) per class and overall at one IoU threshold.

    Args:
        gt: COCO ground truth (json path, dict, pycocotools ``COCO`` or ``GroundTruth``) with masks.
        predictions: COCO result dicts with RLE ``segmentation`` (or a json path); sanitised like
            for COCO evaluation (NaN boxes, empty masks, unknown ids are left out).
        iou_threshold: mask IoU at which a prediction matches an instance (``EvalConfig.iou_threshold``).
        score_threshold: predictions scoring below this are left out (default 0.5: cell tools
            report a fixed operating point, unlike AP, which ranks all scores; a near-zero
            threshold, right for AP, would count every low-confidence detection as a FP here).
        num_classes: categories ``1..num_classes`` (None: the ground truth's categories).
        checked: ``gt`` is a :class:`~cellkit.evaluation.inputs.GroundTruth` and ``predictions``
            the list :func:`~cellkit.evaluation.inputs.sanitize_predictions` kept against it (as
            :func:`cellkit.evaluation.coco.evaluate_predictions` hands them over): not checked again.

    Returns:
        A :class:`CellMetrics`. Crowd instances (``iscrowd=1``) are left out of the ground truth.
    """
    if checked and isinstance(gt, GroundTruth) and isinstance(predictions, list):
        ground, kept = gt, predictions
    else:
        ground, kept, _ = prepare(gt, predictions, num_classes)
    gts: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for a in ground.dataset["annotations"]:
        if not a.get("iscrowd", 0):
            gts[int(a["image_id"]), int(a["category_id"])].append(gt_rle(a, ground.images))
    preds: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for p in kept:
        if p["score"] >= score_threshold:
            preds[p["image_id"], p["category_id"]].append(p["segmentation"])
    names = ground.category_names
    per_class = {names[k]: ClassCounts() for k in ground.category_ids}
    for key in set(gts) | set(preds):
        g, d = gts.get(key, []), preds.get(key, [])
        pi, _, ious = match_masks(d, g, iou_threshold)
        tp = len(pi)
        per_class[names[key[1]]].add(ClassCounts(tp, len(d) - tp, len(g) - tp, float(ious.sum())))
    overall = ClassCounts()
    for c in per_class.values():
        overall.add(c)
    return CellMetrics(float(iou_threshold), float(score_threshold), per_class, overall)


def _ratio(a: float, b: float) -> float:
    return float(a) / b if b else float("nan")
