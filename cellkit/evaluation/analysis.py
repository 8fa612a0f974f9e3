"""One object for the whole error analysis of a set of predictions (notebook 04).

:class:`ErrorAnalysis` reads and sanitises the inputs once, runs the TIDE matching once, the base
COCO evaluation once, and each operating-point matching once per ``(iou, score_thresh)``; every
question of the error analysis is then answered from those::

    ea = ErrorAnalysis("run/val_gt.json", "run/val_predictions.json", max_dets=1000)
    ea.tide()                       # TIDE decomposition (the oracles' evaluations, once)
    ea.pr_curves()                  # read off the base evaluation's precision array
    ea.confusion_matrix(0.5)        # operating point score >= 0.5, IoU 0.5
    ea.recall_by_size(0.5); ea.per_image(0.5); ea.status_entries(image_id, 0.5)
    ea.score_distributions(); ea.ap50_vs_score_threshold()

No torch.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .coco import DEFAULT_BOOTSTRAP, EvalResult, coco_evaluate
from .curves import DEFAULT_SCORE_THRESHOLDS, ThresholdPoint, pr_curves_from, score_distributions
from .inputs import prepare
from .operating import (
    DEFAULT_SIZE_BINS,
    ImageScore,
    OperatingMatch,
    SizeRecall,
    confusion_from,
    operating_match,
    per_image_from,
    recall_by_size_from,
    status_entries_from,
)
from .tide import ErrorReport, Matching, decompose, match_prepared

__all__ = ["ErrorAnalysis"]


class ErrorAnalysis:
    """The error analysis of COCO predictions against COCO ground truth (segm, masks as RLE).

    Args:
        gt: COCO ground truth with masks (json path, dict, pycocotools ``COCO`` or
            :class:`~cellkit.evaluation.inputs.GroundTruth`).
        predictions: COCO result dicts with RLE ``segmentation``, or a json path to a list of them.
        num_classes: categories ``1..num_classes`` (None: the ground truth's categories).
        max_dets: detections per image and class that COCOeval keeps (as ``eval.max_dets``).
        backend: COCOeval implementation (``"auto"``, ``"pycocotools"``, ``"faster_coco_eval"``).
        iou_fg, iou_bg: TIDE's foreground and background IoU (0.5 / 0.1).
        bootstrap, bootstrap_seed: draws of the images for the intervals of :attr:`result` (0: none).

    Attributes:
        ground: the validated ground truth.
        predictions: the sanitised predictions (fresh dicts).
        n_dropped: predictions dropped by sanitising, by reason.
    """

    def __init__(
        self,
        gt: Any,
        predictions: Any,
        num_classes: int | None = None,
        max_dets: int = 1000,
        backend: str = "auto",
        iou_fg: float = 0.5,
        iou_bg: float = 0.1,
        bootstrap: int = DEFAULT_BOOTSTRAP,
        bootstrap_seed: int = 0,
    ) -> None:
        self.ground, self.predictions, self.n_dropped = prepare(gt, predictions, num_classes)
        self.bootstrap, self.bootstrap_seed = bootstrap, bootstrap_seed
        self.num_classes: int = self.ground.num_classes
        self.max_dets = max_dets
        self.backend = backend
        self.iou_fg, self.iou_bg = iou_fg, iou_bg
        self._matching: Matching | None = None
        self._base: EvalResult | None = None
        self._report: ErrorReport | None = None
        self._operating: dict[tuple[float, float, bool], OperatingMatch] = {}

    # -- computed once ---------------------------------------------------------------------
    @property
    def matching(self) -> Matching:
        """TIDE's verdict on every prediction and instance (computed on first use)."""
        if self._matching is None:
            self._matching = match_prepared(self.ground, self.predictions, self.n_dropped, self.iou_fg, self.iou_bg,
                                            self.max_dets)
        return self._matching

    @property
    def result(self) -> EvalResult:
        """The segm COCO evaluation of the predictions, with its 95 % intervals over images (``bootstrap``
        draws; computed on first use)."""
        if self._base is None:
            self._base = coco_evaluate(self.ground, self.predictions, "segm", self.max_dets, self.backend,  # type: ignore[arg-type]
                                       self.num_classes, bootstrap=self.bootstrap, bootstrap_seed=self.bootstrap_seed)
        return self._base

    @property
    def ap50(self) -> float:
        """segm AP50 of the predictions (the scored metric)."""
        return self.result.ap50

    def operating(self, score_thresh: float = 0.5, iou: float = 0.5, same_class: bool = True) -> OperatingMatch:
        """The one-to-one matching at an operating point (computed once per setting)."""
        key = (float(iou), float(score_thresh), bool(same_class))
        if key not in self._operating:
            self._operating[key] = operating_match(self.ground, self.predictions, iou, score_thresh, same_class)
        return self._operating[key]

    # -- the questions ---------------------------------------------------------------------
    def tide(self) -> ErrorReport:
        """TIDE decomposition: AP50 gained by fixing each error type (see :mod:`cellkit.evaluation.tide`)."""
        if self._report is None:
            base = self.result if self.iou_fg == 0.5 else None
            self._report = decompose(self.matching, self.backend, self.num_classes, base=base)
        return self._report

    def pr_curves(self, iou: float = 0.5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Class name -> ``(recall, precision)`` ``(101,)`` float64 at COCO IoU ``iou``."""
        return pr_curves_from(self.result, iou)

    def score_distributions(self) -> tuple[np.ndarray, np.ndarray]:
        """``(tp_scores, fp_scores)`` float64 of the TIDE matching."""
        return score_distributions(self.matching)

    def ap50_vs_score_threshold(self, thresholds: Sequence[float] = DEFAULT_SCORE_THRESHOLDS) -> list[ThresholdPoint]:
        """segm AP50 of the predictions kept at each score threshold (one evaluation per threshold,
        the ground truth indexed once)."""
        out = []
        for thr in thresholds:
            sub = [p for p in self.predictions if p["score"] >= thr]
            if len(sub) == len(self.predictions):
                ap50 = self.ap50
            else:
                ap50 = coco_evaluate(self.ground, sub, "segm", self.max_dets, self.backend,  # type: ignore[arg-type]
                                     self.num_classes).ap50
            out.append(ThresholdPoint(float(thr), ap50, len(sub)))
        return out

    def confusion_matrix(self, score_thresh: float = 0.5, iou: float = 0.5) -> np.ndarray:
        """``(C + 1, C + 1)`` int64 class confusion of matched cells (see
        :func:`cellkit.evaluation.operating.confusion_matrix`)."""
        return confusion_from(self.operating(score_thresh, iou, same_class=False), self.num_classes)

    def recall_by_size(self, score_thresh: float = 0.5, iou: float = 0.5,
                       bins: Sequence[float] = DEFAULT_SIZE_BINS) -> SizeRecall:
        """Recall of the instances by area bin, over all classes and per class."""
        return recall_by_size_from(self.operating(score_thresh, iou), bins)

    def per_image(self, score_thresh: float = 0.5, iou: float = 0.5) -> list[ImageScore]:
        """TP/FP/FN and F1 of every image, worst first."""
        return per_image_from(self.operating(score_thresh, iou))

    def status_entries(self, image_id: int, score_thresh: float = 0.5, iou: float = 0.5) -> list[dict[str, Any]]:
        """The cells of one image by status (``fn`` ground truth, ``fp`` and ``tp`` predictions)."""
        return status_entries_from(self.operating(score_thresh, iou), image_id)
