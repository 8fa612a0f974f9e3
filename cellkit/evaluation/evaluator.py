"""An evaluator that collects predictions piece by piece (and rank by rank) before scoring them.

The pattern of Detectron2's ``DatasetEvaluator``: ``reset()``, then ``process(entries)`` for every
batch of COCO result entries a process predicts, then ``evaluate()``. Under DDP each rank predicts
its own shard of the validation images; ``evaluate()`` gathers every rank's entries on rank 0,
scores them there and hands the same :class:`~cellkit.evaluation.coco.EvalReport` to every rank (so
schedulers and early stopping agree). A rank that failed calls :meth:`COCOEvaluator.fail`: then
every rank raises instead of waiting forever for it.

This module imports no torch; when ``torch.distributed`` is already imported and initialised it
gathers through it, otherwise it works on its own process.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Sequence

from ..errors import CellkitError
from .coco import EvalReport, evaluate_predictions
from .inputs import GroundTruth, load_ground_truth

__all__ = ["COCOEvaluator", "EvaluationError"]


class EvaluationError(CellkitError):
    """Prediction or evaluation failed on some rank (the message says which and why)."""


class COCOEvaluator:
    """COCO segm (and bbox) AP of predictions collected with :meth:`process`.

    Args:
        gt: COCO ground truth of the images the processes predict (path, dict, ``COCO`` or
            :class:`~cellkit.evaluation.inputs.GroundTruth`); read and validated once.
        iou_types: ``("segm",)``, ``("bbox",)`` or both.
        max_dets: detections per image and class COCOeval keeps.
        backend: COCOeval implementation.
        num_classes: categories ``1..num_classes`` (None: the ground truth's categories).
        cell_metrics: add precision/recall/F1 at ``iou_threshold`` (scores >= ``score_threshold``).
        bootstrap, bootstrap_seed: draws of the images for the 95 % intervals (0: none), and their seed.
    """

    def __init__(
        self,
        gt: Any,
        iou_types: Sequence[str] = ("segm",),
        max_dets: int = 1000,
        backend: str = "auto",
        num_classes: int | None = None,
        cell_metrics: bool = False,
        iou_threshold: float = 0.5,
        score_threshold: float = 0.5,
        bootstrap: int = 0,
        bootstrap_seed: int = 0,
    ) -> None:
        self.ground: GroundTruth = load_ground_truth(gt, num_classes, need_masks="segm" in iou_types)
        self.iou_types = tuple(iou_types)
        self.max_dets = max_dets
        self.backend = backend
        self.num_classes = num_classes
        self.cell_metrics = cell_metrics
        self.iou_threshold = iou_threshold
        self.score_threshold = score_threshold
        self.bootstrap, self.bootstrap_seed = bootstrap, bootstrap_seed
        self.predictions: list[dict[str, Any]] = []
        """Every rank's entries after :meth:`evaluate` (this rank's alone before)."""
        self._error: str | None = None

    def reset(self) -> None:
        """Forget what was processed (call before each evaluation round)."""
        self.predictions = []
        self._error = None

    def process(self, entries: Iterable[dict[str, Any]]) -> None:
        """Add COCO result entries (``image_id, category_id, score, bbox, segmentation``)."""
        self.predictions.extend(entries)

    def fail(self, message: str) -> None:
        """Record that this rank could not predict its share; :meth:`evaluate` then raises on every rank."""
        self._error = message

    def evaluate(self) -> EvalReport:
        """Gather every rank's entries, score them on rank 0, and return the report on every rank.

        Raises:
            EvaluationError: some rank called :meth:`fail`, or the evaluation itself failed.
        """
        dist = _distributed()
        payload = {"entries": self.predictions, "error": self._error}
        parts = [payload] if dist is None else _all_gather(dist, payload)
        errors = [f"rank {r}: {p['error']}" for r, p in enumerate(parts) if p["error"]]
        if errors:
            raise EvaluationError("validation failed on " + "; ".join(errors))
        rank = 0 if dist is None else dist.get_rank()
        result: dict[str, Any] = {}
        if rank == 0:
            self.predictions = [e for p in parts for e in p["entries"]]
            try:
                result["report"] = evaluate_predictions(
                    self.ground, self.predictions, iou_types=self.iou_types,  # type: ignore[arg-type]
                    max_dets=self.max_dets, backend=self.backend, num_classes=self.num_classes,  # type: ignore[arg-type]
                    cell_metrics=self.cell_metrics, iou_threshold=self.iou_threshold,
                    score_threshold=self.score_threshold, bootstrap=self.bootstrap,
                    bootstrap_seed=self.bootstrap_seed,
                )
            except Exception as e:  # every rank waits in the broadcast below: tell them, then fail together
                result["error"] = f"{type(e).__name__}: {e}"
        if dist is not None:
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        if "error" in result:
            raise EvaluationError(f"evaluation failed on rank 0: {result['error']}")
        return result["report"]


def _distributed() -> Any:
    """``torch.distributed`` when it is imported and initialised with more than one process, else None
    (never imports torch itself)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return dist


def _all_gather(dist: Any, obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
