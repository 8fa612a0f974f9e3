"""Evaluation without torch: COCO segm/bbox AP, cell-tool metrics, error analysis, submissions.

================ ==================================================================================
module           what it holds
================ ==================================================================================
``coco``         :func:`coco_evaluate` / :func:`evaluate_predictions` (segm AP50, the scored metric)
``evaluator``    :class:`COCOEvaluator`: ``process()`` per batch (and rank), ``evaluate()`` once
``bootstrap``    the 95 % interval of AP50/AP/AP75: images drawn again, re-accumulated from COCOeval's matching
``significance`` paired bootstrap differences and verdicts, Holm's correction, replicated seeds
``inputs``       reading and sanitising ground truth and predictions (before ``loadRes``)
``rle``          COCO run-length encoding helpers (encode masks and box regions, check RLEs)
``cellmetrics``  precision, recall, F1, TP / (TP + FP + FN) at one IoU (Cellpose / StarDist)
``tide``         TIDE-style error decomposition (the AP matching)
``operating``    confusion matrix, recall by size, per-image counts (one-to-one matching)
``curves``       precision-recall curves, AP50 against the score threshold
``analysis``     :class:`ErrorAnalysis`: every question of notebook 04 from one matching
``submission``   checking and writing ``test-results.json`` (+ zip)
================ ==================================================================================

``cellkit evaluate`` and ``cellkit check-submission`` use only this package, so they start without
importing torch.
"""
from __future__ import annotations

from .analysis import ErrorAnalysis
from .cellmetrics import CellMetrics, cell_metrics
from .coco import EvalReport, EvalResult, coco_evaluate, evaluate_predictions, faster_coco_eval_available
from .evaluator import COCOEvaluator, EvaluationError
from .inputs import GroundTruth, load_ground_truth, prepare, sanitize_predictions
from .submission import check_submission, write_submission

__all__ = [
    "COCOEvaluator", "CellMetrics", "ErrorAnalysis", "EvalReport", "EvalResult", "EvaluationError", "GroundTruth",
    "cell_metrics", "check_submission", "coco_evaluate", "evaluate_predictions", "faster_coco_eval_available",
    "load_ground_truth", "prepare", "sanitize_predictions", "write_submission",
]
