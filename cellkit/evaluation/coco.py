"""COCO evaluation of instance predictions: segm AP50 (the scored metric) and its companions.

:func:`coco_evaluate` runs pycocotools' ``COCOeval`` (or faster-coco-eval's drop-in C++ version)
the textbook way and reads the numbers off ``eval["precision"]`` itself:

* the cap on detections per image and class is a parameter (default 1000): pycocotools' default of
  100 silently lowers AP on images with hundreds of cells. One evaluation with
  ``params.maxDets = [1, 10, 100, max_dets]`` gives both the capped-at-``max_dets`` numbers and
  what the standard 100 gives (COCOeval matches detections greedily in score order, so the first
  100 are matched exactly as in a run capped at 100).
* ``COCOeval.summarize()`` is not used: it computes AP@[.5:.95] at maxDets 100 whatever the
  setting (cocoapi issue 584).
* predictions are sanitised *before* ``loadRes`` (NaN/Inf/degenerate boxes, non-finite scores,
  empty masks, unknown image or category ids are dropped and counted); an empty list gives AP 0.
* with ``bootstrap=N`` the AP50, AP and AP75 (overall and per class) get a 95 % interval: the
  images drawn again N times, each draw scored from COCOeval's own per-image matching
  (:mod:`cellkit.evaluation.bootstrap`); the point estimates do not change.

:func:`evaluate_predictions` evaluates segm and bbox at once and adds the cell-tool metrics of
:mod:`cellkit.evaluation.cellmetrics`; it is what ``cellkit evaluate`` prints.
"""
from __future__ import annotations

import contextlib
import gc
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..errors import CellkitError
from .bootstrap import LEVEL, BootstrapScores, ImageMatches, bootstrap_scores
from .cellmetrics import CellMetrics
from .cellmetrics import cell_metrics as compute_cell_metrics
from .formatting import fmt, is_undefined
from .inputs import (
    AREA_RANGES,
    DROP_REASONS,
    GroundTruth,
    check_predictions_match,
    count_beyond_caps,
    load_ground_truth,
    load_predictions,
    sanitize_predictions,
)

__all__ = [
    "BACKENDS",
    "DROP_REASONS",
    "EvalReport",
    "EvalResult",
    "coco_evaluate",
    "evaluate_predictions",
    "faster_coco_eval_available",
    "sanitize_predictions",
]

IouType = Literal["segm", "bbox"]
Backend = Literal["auto", "pycocotools", "faster_coco_eval"]
BACKENDS: tuple[str, ...] = ("auto", "pycocotools", "faster_coco_eval")
STANDARD_MAX_DETS = 100
DEFAULT_BOOTSTRAP = 1000
"""Bootstrap draws of a report by default (as ``eval.bootstrap``)."""


def faster_coco_eval_available() -> bool:
    """Whether the optional ``faster-coco-eval`` package can be imported."""
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# results


@dataclass
class EvalResult:
    """COCO AP of one IoU type at one detection cap.

    AP values are floats in [0, 1]; NaN where undefined (no ground truth in that class or size
    range). ``per_class`` maps the category name to ``{"id", "ap50", "ap", "ap75", "n_gt",
    "n_pred"}``, plus ``"ap50_ci", "ap_ci", "ap75_ci"`` (``(lo, hi)``) with a bootstrap.

    Attributes:
        ap50: AP at IoU 0.5, all sizes, at ``max_dets`` (the scored metric for ``segm``).
        ap, ap75: AP@[.5:.95] and AP at IoU 0.75.
        ap_small, ap_medium, ap_large: AP@[.5:.95] by ground-truth area (<32^2, 32^2-96^2, >96^2 px).
        ar: AR@[.5:.95] at ``max_dets``.
        ap50_at_100, ap_at_100: the same with pycocotools' standard cap of 100.
        n_predictions: predictions evaluated (after sanitising, before the cap).
        n_dropped: predictions dropped before ``loadRes``, by reason (see ``DROP_REASONS``).
        n_beyond_cap, n_beyond_100: predictions COCOeval ignores at ``max_dets`` / at 100
            (those beyond the cap in their image and class, lowest scores first).
        precision: COCOeval's ``eval["precision"]`` at ``max_dets``: ``(T=10, R=101, K, A=4)``
            float64, IoU thresholds .5:.05:.95 x recall 0:.01:1 x categories (the order of
            ``per_class``) x areas (all, small, medium, large); -1 where a class has no ground
            truth (in that area range). ``precision[0, :, k, 0]`` is class k's precision-recall
            curve at IoU 0.5, whose mean is its AP50. Not part of :meth:`to_dict`.
        intervals: ``"ap50"``, ``"ap"``, ``"ap75"`` -> the 95 % bootstrap interval ``(lo, hi)`` over
            images (empty without a bootstrap).
        bootstrap: the draws and every draw's scores (None without a bootstrap). Not part of :meth:`to_dict`.
        matches: COCOeval's per-image matching the draws were scored from, for paired comparisons
            (:mod:`cellkit.evaluation.significance`); None without a bootstrap. Not part of :meth:`to_dict`.
    """

    iou_type: str
    max_dets: int
    ap50: float
    ap: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    ar: float
    ap50_at_100: float
    ap_at_100: float
    per_class: dict[str, dict[str, Any]]
    n_images: int
    n_gt: int
    n_predictions: int
    n_dropped: dict[str, int] = field(default_factory=dict)
    n_beyond_cap: int = 0
    n_beyond_100: int = 0
    backend: str = "pycocotools"
    notes: list[str] = field(default_factory=list)
    precision: np.ndarray | None = field(default=None, repr=False, compare=False)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap: BootstrapScores | None = field(default=None, repr=False, compare=False)
    matches: ImageMatches | None = field(default=None, repr=False, compare=False)

    def interval(self, name: str = "ap50") -> tuple[float, float] | None:
        """The 95 % interval of ``"ap50"``, ``"ap"`` or ``"ap75"`` (None without a bootstrap)."""
        return self.intervals.get(name)

    def with_interval(self, name: str = "ap50", value: float | None = None) -> str:
        """``0.7744 [0.70, 0.83]``: a score and its interval (the score alone without a bootstrap)."""
        return fmt_interval(getattr(self, name) if value is None else value, self.interval(name))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN as None); with a bootstrap, ``ap50_ci``, ``ap_ci``, ``ap75_ci`` as
        ``[lo, hi]`` and ``bootstrap: {"resamples", "seed", "level"}``."""
        return _jsonable({
            "iou_type": self.iou_type, "max_dets": self.max_dets, "backend": self.backend,
            "ap50": self.ap50, "ap": self.ap, "ap75": self.ap75,
            **{f"{k}_ci": list(v) for k, v in self.intervals.items()},
            "bootstrap": ({"resamples": self.bootstrap.n_resamples, "seed": self.bootstrap.seed,
                           "level": self.bootstrap.level} if self.bootstrap is not None else None),
            "ap_small": self.ap_small, "ap_medium": self.ap_medium, "ap_large": self.ap_large, "ar": self.ar,
            "ap50_at_100": self.ap50_at_100, "ap_at_100": self.ap_at_100,
            "per_class": self.per_class,
            "n_images": self.n_images, "n_gt": self.n_gt, "n_predictions": self.n_predictions,
            "n_dropped": dict(self.n_dropped), "n_beyond_cap": self.n_beyond_cap, "n_beyond_100": self.n_beyond_100,
            "notes": list(self.notes),
        })

    def format(self) -> str:
        """A readable table: AP50 headline, AP, AP75, sizes, the cap-100 figures, per-class AP."""
        lines = [
            f"COCO {self.iou_type} AP ({self.backend}; {self.n_images} images, {self.n_gt} ground-truth instances, "
            f"{self.n_predictions} predictions, up to {self.max_dets} per image and class)",
            f"  AP50   {self.with_interval('ap50')}" + ("   <- the scored metric" if self.iou_type == "segm" else ""),
            f"  AP     {self.with_interval('ap')}   AP75 {self.with_interval('ap75')}   AR {fmt(self.ar)}",
            f"  AP by size: small {fmt(self.ap_small)}   medium {fmt(self.ap_medium)}   large {fmt(self.ap_large)}",
        ]
        if self.max_dets != STANDARD_MAX_DETS:
            note = f" ({self.n_beyond_100} predictions beyond that cap ignored)" if self.n_beyond_100 else ""
            lines.append(
                f"  with pycocotools' standard cap of {STANDARD_MAX_DETS}: AP50 {fmt(self.ap50_at_100)}   "
                f"AP {fmt(self.ap_at_100)}{note}"
            )
        if self.n_beyond_cap:
            lines.append(f"  {self.n_beyond_cap} predictions beyond the cap of {self.max_dets} were ignored")
        if self.bootstrap is not None:
            b = self.bootstrap
            lines.append(f"  [lo, hi]: {100 * b.level:g} % interval over images ({b.n_resamples} bootstrap draws of "
                         f"the {self.n_images} images, seed {b.seed})")
        lines.append("")
        ci = self.bootstrap is not None
        lines.append(f"  {'class':<10} {'n_gt':>7} {'n_pred':>8} {'AP50':>7}"
                     + (f" {'95 % interval':>14}" if ci else "") + f" {'AP':>7} {'AP75':>7}")
        for name, c in self.per_class.items():
            lo_hi = f" {fmt_interval(None, c.get('ap50_ci')):>14}" if ci else ""
            lines.append(
                f"  {name:<10} {c['n_gt']:>7d} {c['n_pred']:>8d} {fmt(c['ap50']):>7}{lo_hi} {fmt(c['ap']):>7} "
                f"{fmt(c['ap75']):>7}"
            )
        return "\n".join(lines)


@dataclass
class EvalReport:
    """Everything ``cellkit evaluate`` reports: COCO AP per IoU type, drops, cell-tool metrics.

    Attributes:
        results: ``"segm"`` and/or ``"bbox"`` -> :class:`EvalResult`.
        cells: precision/recall/F1/accuracy at one IoU threshold (None when not computed).
        n_dropped: predictions dropped before evaluation, by reason.
        notes: what was filled into the ground truth, and similar remarks.
    """

    results: dict[str, EvalResult]
    cells: "CellMetrics | None" = None
    n_dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def headline(self) -> float:
        """segm AP50 (the scored metric), else bbox AP50."""
        r = self.results.get("segm") or self.results.get("bbox")
        return r.ap50 if r is not None else float("nan")

    @property
    def headline_interval(self) -> tuple[float, float] | None:
        """The 95 % interval of :attr:`headline` (None without a bootstrap)."""
        r = self.results.get("segm") or self.results.get("bbox")
        return r.interval("ap50") if r is not None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"ap50", "ap50_ci", "segm", "bbox", "cells", "n_dropped", "notes"}``
        (``ap50_ci``: ``[lo, hi]`` or None without a bootstrap)."""
        ci = self.headline_interval
        out: dict[str, Any] = {"ap50": self.headline, "ap50_ci": list(ci) if ci is not None else None}
        for k, r in self.results.items():
            out[k] = r.to_dict()
        out["cells"] = self.cells.to_dict() if self.cells is not None else None
        out["n_dropped"] = dict(self.n_dropped)
        out["notes"] = list(self.notes)
        return _jsonable(out)

    def format(self) -> str:
        """The segm table, a bbox AP line (or table when bbox alone), drops, notes, cell metrics."""
        parts: list[str] = []
        segm, bbox = self.results.get("segm"), self.results.get("bbox")
        if segm is not None:
            parts.append(segm.format())
        if bbox is not None:
            if segm is not None:
                line = (f"COCO bbox AP: AP50 {bbox.with_interval('ap50')}   AP {fmt(bbox.ap)}   "
                        f"AP75 {fmt(bbox.ap75)}")
                if bbox.max_dets != STANDARD_MAX_DETS:
                    line += f"   (cap {STANDARD_MAX_DETS}: AP50 {fmt(bbox.ap50_at_100)}, AP {fmt(bbox.ap_at_100)})"
                parts.append(line)
            else:
                parts.append(bbox.format())
        dropped = {k: v for k, v in self.n_dropped.items() if v}
        if dropped:
            parts.append(
                f"dropped before evaluation: {sum(dropped.values())} prediction(s) ("
                + ", ".join(f"{k} {v}" for k, v in dropped.items()) + ")"
            )
        else:
            parts.append("dropped before evaluation: none")
        parts.extend(f"note: {n}" for n in self.notes)
        if self.cells is not None:
            parts.append("")
            parts.append(self.cells.format())
        return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# evaluation


def coco_evaluate(
    gt: Any,
    predictions: Any,
    iou_type: IouType = "segm",
    max_dets: int = 1000,
    backend: Backend = "pycocotools",
    num_classes: int | None = None,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
) -> EvalResult:
    """COCO AP of ``predictions`` against ``gt`` with up to ``max_dets`` detections per image and class.

    Args:
        gt: COCO ground truth: a json path, a dict, a pycocotools ``COCO`` or a
            :class:`~cellkit.evaluation.inputs.GroundTruth`.
        predictions: a list of COCO result dicts ``{image_id, category_id, score, bbox [x, y, w, h],
            segmentation (RLE)}`` or a json path to one.
        iou_type: ``"segm"`` (mask IoU, the scored metric) or ``"bbox"``.
        max_dets: detections kept per image and class, highest scores first (>= 1).
        backend: ``"pycocotools"`` or ``"faster_coco_eval"`` (same numbers, C++ matching; needs
            the optional ``faster-coco-eval`` package); ``"auto"`` takes the latter when installed.
        num_classes: categories are ``1..num_classes``.
        bootstrap: draws of the images for the 95 % intervals (0: none; see
            :mod:`cellkit.evaluation.bootstrap`).
        bootstrap_seed: seed of the draws.

    Returns:
        An :class:`EvalResult`; all APs 0.0 for an empty prediction list (NaN where there is no
        ground truth to find).

    Raises:
        DataError: unreadable or invalid ground truth or prediction file.
        CellkitError: unknown iou type or backend, backend not installed, ``max_dets < 1``.
    """
    return _evaluate(gt, predictions, (iou_type,), max_dets, backend, num_classes,
                     bootstrap=bootstrap, bootstrap_seed=bootstrap_seed).results[iou_type]


def evaluate_predictions(
    gt: Any,
    predictions: Any,
    iou_types: Sequence[IouType] = ("segm", "bbox"),
    max_dets: int = 1000,
    backend: Backend = "pycocotools",
    num_classes: int | None = None,
    cell_metrics: bool = True,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    bootstrap_seed: int = 0,
) -> EvalReport:
    """Evaluate segm and bbox AP in one go (ground truth read and predictions sanitised once) and
    add the cell-tool metrics (precision, recall, F1, TP/(TP+FP+FN) at ``iou_threshold`` for
    predictions scoring at least ``score_threshold``; masks, so only when ``"segm"`` is asked for).

    Arguments as in :func:`coco_evaluate` (a report has intervals by default: ``bootstrap``
    1000 draws); see :func:`cellkit.evaluation.cellmetrics.cell_metrics` for ``iou_threshold``
    and ``score_threshold``.
    """
    return _evaluate(gt, predictions, tuple(iou_types), max_dets, backend, num_classes,
                     cell_metrics=cell_metrics, iou_threshold=iou_threshold, score_threshold=score_threshold,
                     bootstrap=bootstrap, bootstrap_seed=bootstrap_seed)


def _evaluate(
    gt: Any,
    predictions: Any,
    iou_types: tuple[str, ...],
    max_dets: int,
    backend: str,
    num_classes: int,
    cell_metrics: bool = False,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
) -> EvalReport:
    if not iou_types or any(t not in ("segm", "bbox") for t in iou_types):
        raise CellkitError(f"iou_type must be 'segm' or 'bbox', got {', '.join(map(str, iou_types)) or 'nothing'}")
    if backend not in BACKENDS:
        raise CellkitError(f"unknown evaluation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":  # the same numbers; faster-coco-eval is about 15x faster when installed
        backend = "faster_coco_eval" if faster_coco_eval_available() else "pycocotools"
    if backend == "faster_coco_eval" and not faster_coco_eval_available():
        raise CellkitError("backend faster_coco_eval needs the faster-coco-eval package (pip install faster-coco-eval)")
    if isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 1:
        raise CellkitError(f"max_dets must be a positive integer, got {max_dets!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise CellkitError(f"bootstrap must be a number of draws >= 0 (0: no intervals), got {bootstrap!r}")
    with gc_paused():  # the inputs, the predictions and the COCO indices are freed before it ends
        return _evaluate_inputs(gt, predictions, iou_types, max_dets, backend, num_classes, cell_metrics,
                                iou_threshold, score_threshold, bootstrap, bootstrap_seed)


def _evaluate_inputs(gt: Any, predictions: Any, iou_types: tuple[str, ...], max_dets: int, backend: str,
                     num_classes: int | None, cell_metrics: bool, iou_threshold: float, score_threshold: float,
                     bootstrap: int, bootstrap_seed: int) -> EvalReport:
    ground = load_ground_truth(gt, num_classes, need_masks="segm" in iou_types)
    raw = load_predictions(predictions)
    kept, dropped = sanitize_predictions(  # a list read from a file here is nobody else's: kept without copies
        raw, ground.images, num_classes, "segm" if "segm" in iou_types else "bbox", ground.category_ids,
        copy=not isinstance(predictions, (str, os.PathLike)),
    )
    check_predictions_match(raw, ground, dropped, _source(predictions))
    runner = _Runner(ground, kept, backend, bootstrap, bootstrap_seed)
    results = {t: runner.result(t, max_dets, dropped) for t in iou_types}
    cells = None
    if cell_metrics and "segm" in iou_types:
        cells = compute_cell_metrics(ground, kept, iou_threshold=iou_threshold, score_threshold=score_threshold,
                                     num_classes=num_classes, checked=True)  # kept: checked above
    return EvalReport(results, cells, dropped, list(ground.notes))


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cycle collector off while the evaluation builds its hundreds of thousands of
    small dicts and lists (json, sanitising, COCO indices): each full collection walks all of
    them, which made up a third of the time of 100 images x 1000 detections. Nothing here makes
    reference cycles; the collector runs again (if it ran before) when the evaluation ends, after
    the evaluation has dropped those objects (else the first collection would walk them all)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _source(predictions: Any) -> str:
    return str(predictions) if isinstance(predictions, (str, os.PathLike)) else "<predictions>"


class _Runner:
    """COCO indices of the ground truth and the (sanitised) results, built once per backend."""

    def __init__(self, ground: GroundTruth, kept: list[dict[str, Any]], backend: str, bootstrap: int = 0,
                 bootstrap_seed: int = 0) -> None:
        self.ground, self.kept, self.backend = ground, kept, backend
        self.bootstrap, self.bootstrap_seed = bootstrap, bootstrap_seed
        self._gt: Any = None
        self._dt: Any = None

    def _indices(self) -> tuple[Any, Any]:
        if self._gt is None:
            with contextlib.redirect_stdout(io.StringIO()):
                if self.backend == "pycocotools":
                    self._gt = self.ground.pycoco()
                else:
                    import faster_coco_eval  # optional backend (pip install faster-coco-eval)

                    self._gt = faster_coco_eval.COCO(self.ground.dataset)
                # loadRes writes id/area/iscrowd into the entries: these are sanitize_predictions'
                # own copies, never the caller's dicts
                self._dt = self._gt.loadRes(self.kept) if self.kept else self._no_results()
        return self._gt, self._dt

    def _no_results(self) -> Any:
        """An empty result index, so COCOeval itself says what no detections score: precision 0
        where a class has ground truth in an area range, -1 (no ground truth) elsewhere.
        pycocotools' ``loadRes([])`` fails (it reads the first entry), so its ``COCO()`` is built
        directly on the ground truth's images and categories; faster-coco-eval's takes ``[]``."""
        if self.backend != "pycocotools":
            return self._gt.loadRes([])
        dt = COCO()
        dt.dataset = {"images": list(self.ground.dataset["images"]),
                      "categories": list(self.ground.dataset["categories"]), "annotations": []}
        dt.createIndex()
        return dt

    def result(self, iou_type: str, max_dets: int, dropped: dict[str, int]) -> EvalResult:
        ground = self.ground
        cat_ids = ground.category_ids
        names = ground.category_names
        anns = ground.dataset["annotations"]
        n_gt = {k: 0 for k in cat_ids}
        for a in anns:
            if not a.get("iscrowd", 0):
                n_gt[int(a["category_id"])] += 1
        n_pred = {k: 0 for k in cat_ids}
        for p in self.kept:
            n_pred[p["category_id"]] += 1
        max_list = sorted({1, 10, STANDARD_MAX_DETS, max_dets})
        beyond = count_beyond_caps(self.kept, (max_dets, STANDARD_MAX_DETS))
        # no predictions: COCOeval on an empty result
        precision, recall, matches = self._run(iou_type, max_list, max_dets if self.bootstrap else None)
        stats = _read_precision(precision, recall, max_list.index(max_dets), max_list.index(STANDARD_MAX_DETS))
        kept_precision = precision[..., max_list.index(max_dets)].copy()
        boot = bootstrap_scores(matches, self.bootstrap, self.bootstrap_seed, LEVEL) if matches is not None else None
        per_class = {}
        for k_idx, k in enumerate(cat_ids):
            per_class[names[k]] = {
                "id": k, "ap50": stats["class_ap50"][k_idx], "ap": stats["class_ap"][k_idx],
                "ap75": stats["class_ap75"][k_idx], "n_gt": n_gt[k], "n_pred": n_pred[k],
            }
            if boot is not None:
                for name, cis in boot.class_intervals.items():
                    per_class[names[k]][f"{name}_ci"] = cis[k_idx]
        return EvalResult(
            iou_type=iou_type, max_dets=max_dets,
            ap50=stats["ap50"], ap=stats["ap"], ap75=stats["ap75"],
            ap_small=stats["ap_small"], ap_medium=stats["ap_medium"], ap_large=stats["ap_large"], ar=stats["ar"],
            ap50_at_100=stats["ap50_at_100"], ap_at_100=stats["ap_at_100"],
            per_class=per_class, n_images=len(ground.dataset["images"]), n_gt=sum(n_gt.values()),
            n_predictions=len(self.kept), n_dropped=dict(dropped),
            n_beyond_cap=beyond[0], n_beyond_100=beyond[1],
            backend=self.backend, notes=list(ground.notes), precision=kept_precision,
            intervals=dict(boot.intervals) if boot is not None else {}, bootstrap=boot, matches=matches,
        )

    def _run(self, iou_type: str, max_list: list[int],
             matches_at: int | None = None) -> tuple[np.ndarray, np.ndarray, ImageMatches | None]:
        """COCOeval's precision ``(T, R, K, A, M)`` and recall ``(T, K, A, M)``, and (``matches_at``:
        a detection cap) its per-image matching at that cap for the bootstrap."""
        gt, dt = self._indices()
        with contextlib.redirect_stdout(io.StringIO()):
            if self.backend == "pycocotools":
                E = COCOeval(gt, dt, iou_type)
            else:
                from faster_coco_eval import COCOeval_faster  # optional backend (pip install faster-coco-eval)

                # separate_eval keeps the per-image results the bootstrap reads (the same numbers)
                E = COCOeval_faster(gt, dt, iou_type, print_function=_quiet, separate_eval=matches_at is not None)
            E.params.maxDets = list(max_list)
            E.evaluate()
            E.accumulate()
        if list(E.params.areaRngLbl) != list(AREA_RANGES):  # pragma: no cover - guards a changed default
            raise CellkitError(f"unexpected COCOeval area ranges {E.params.areaRngLbl}")
        iou_thrs = np.asarray(E.params.iouThrs)
        if not (np.isclose(iou_thrs[0], 0.5) and np.isclose(iou_thrs[5], 0.75)):  # pragma: no cover
            raise CellkitError(f"unexpected COCOeval IoU thresholds {iou_thrs}")
        matches = ImageMatches.from_cocoeval(E, matches_at) if matches_at is not None else None
        return np.asarray(E.eval["precision"]), np.asarray(E.eval["recall"]), matches


def _quiet(*args: Any, **kwargs: Any) -> None:
    return None


def mean_valid(x: np.ndarray) -> float:
    """Mean of the entries > -1 (pycocotools' "no ground truth" marker); NaN when none."""
    v = x[x > -1]
    return float(np.mean(v)) if v.size else float("nan")


def _read_precision(precision: np.ndarray, recall: np.ndarray, m: int, m100: int) -> dict[str, Any]:
    """The reported numbers from COCOeval's accumulated arrays.

    Args:
        precision: ``(T, R, K, A, M)`` float, -1 where a class has no ground truth; T = 10 IoU
            thresholds .5:.05:.95, R = 101 recall points, K classes, A = 4 area ranges
            (all, small, medium, large), M = the maxDets settings.
        recall: ``(T, K, A, M)`` float.
        m, m100: indices into M of the chosen cap and of 100.
    """
    t50, t75 = 0, 5
    out: dict[str, Any] = {
        "ap50": mean_valid(precision[t50, :, :, 0, m]),
        "ap": mean_valid(precision[:, :, :, 0, m]),
        "ap75": mean_valid(precision[t75, :, :, 0, m]),
        "ap_small": mean_valid(precision[:, :, :, 1, m]),
        "ap_medium": mean_valid(precision[:, :, :, 2, m]),
        "ap_large": mean_valid(precision[:, :, :, 3, m]),
        "ar": mean_valid(recall[:, :, 0, m]),
        "ap50_at_100": mean_valid(precision[t50, :, :, 0, m100]),
        "ap_at_100": mean_valid(precision[:, :, :, 0, m100]),
    }
    K = precision.shape[2]
    out["class_ap50"] = [mean_valid(precision[t50, :, k, 0, m]) for k in range(K)]
    out["class_ap"] = [mean_valid(precision[:, :, k, 0, m]) for k in range(K)]
    out["class_ap75"] = [mean_valid(precision[t75, :, k, 0, m]) for k in range(K)]
    return out


# --------------------------------------------------------------------------------------------
# formatting helpers


def fmt_interval(value: float | None, interval: Sequence[float] | None) -> str:
    """``0.7744 [0.70, 0.83]`` (``value`` None: ``[0.70, 0.83]`` alone; no interval: the value alone)."""
    if interval is not None and any(is_undefined(v) for v in interval):
        interval = None  # no ground truth in the draws: no interval
    ci = "" if interval is None else f"[{fmt(interval[0], '.2f')}, {fmt(interval[1], '.2f')}]"
    if value is None:
        return ci or "-"
    return f"{fmt(value)} {ci}".rstrip()


def _jsonable(x: Any) -> Any:
    """Plain JSON types: NaN/Inf -> None, numpy scalars -> Python numbers, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x
