"""Curves read off COCOeval: per-class precision-recall, AP50 against the score threshold, and the
score distributions of true and false positives. No torch."""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from .coco import EvalResult, coco_evaluate
from .inputs import prepare
from .tide import FP_KINDS, Matching, iou_index

__all__ = ["DEFAULT_SCORE_THRESHOLDS", "ThresholdPoint", "ap50_vs_score_threshold", "pr_curves", "pr_curves_from",
           "score_distributions"]

DEFAULT_SCORE_THRESHOLDS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def pr_curves(
    gt: Any,
    predictions: Any,
    iou: float = 0.5,
    max_dets: int = 1000,
    num_classes: int | None = None,
    backend: str = "auto",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-class precision-recall curves, straight from COCOeval's ``eval["precision"]``.

    Args:
        gt, predictions, max_dets, num_classes, backend: as in ``coco_evaluate``.
        iou: one of COCO's IoU thresholds (0.5 for the curves behind AP50).

    Returns:
        Class name -> ``(recall, precision)``, both ``(101,)`` float64: recall 0, 0.01 ... 1 and
        COCO's interpolated precision there (area "all", ``max_dets``); its mean is the class's AP
        at ``iou``. Precision is NaN for a class without ground truth.
    """
    return pr_curves_from(coco_evaluate(gt, predictions, "segm", max_dets, backend, num_classes), iou)  # type: ignore[arg-type]


def pr_curves_from(res: "EvalResult", iou: float = 0.5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """:func:`pr_curves` read off an existing segm :class:`~cellkit.evaluation.coco.EvalResult`."""
    t = iou_index(iou)
    assert res.precision is not None
    recall = np.linspace(0.0, 1.0, res.precision.shape[1])
    out = {}
    for k, name in enumerate(res.per_class):
        p = res.precision[t, :, k, 0].astype(np.float64)
        out[name] = (recall.copy(), np.where(p > -1, p, np.nan))
    return out


class ThresholdPoint(NamedTuple):
    """AP50 of the predictions scoring at least ``threshold``."""

    threshold: float
    ap50: float
    n_kept: int


def ap50_vs_score_threshold(
    gt: Any,
    predictions: Any,
    thresholds: Sequence[float] = DEFAULT_SCORE_THRESHOLDS,
    max_dets: int = 1000,
    num_classes: int | None = None,
    backend: str = "auto",
) -> list[ThresholdPoint]:
    """segm AP50 (``coco_evaluate``) of the predictions kept at each score threshold.

    AP ranks every score, so cutting low scores can only lose recall: the curve shows what a
    score threshold (as in report 004, which dropped scores below 0.5) costs.

    Returns:
        ``[(threshold, ap50, n_kept), ...]`` in the order of ``thresholds``.
    """
    ground, kept, _ = prepare(gt, predictions, num_classes)
    out = []
    for thr in thresholds:
        sub = [p for p in kept if p["score"] >= thr]
        res = coco_evaluate(ground, sub, "segm", max_dets, backend, num_classes)  # type: ignore[arg-type]
        out.append(ThresholdPoint(float(thr), res.ap50, len(sub)))
    return out


def score_distributions(matching: Matching) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the true and of the false positives of a :class:`Matching`.

    Returns:
        ``(tp_scores, fp_scores)``, float64 arrays; false positives are every error type
        (``cls``, ``loc``, ``both``, ``dupe``, ``bkg``); ignored and beyond-cap predictions are in neither.
    """
    tp = matching.score[matching.kind == "tp"]
    fp = matching.score[np.isin(matching.kind, FP_KINDS)]
    return tp.astype(np.float64), fp.astype(np.float64)


