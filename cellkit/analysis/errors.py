"""Error analysis of instance predictions: TIDE-style error decomposition and its companions.

Everything here works on COCO ground truth and COCO result lists (or json paths), read through
:func:`~cellkit.engine.coco_inputs.load_ground_truth` and
:func:`~cellkit.engine.coco_inputs.sanitize_predictions` like :func:`~cellkit.engine.evaluate.coco_evaluate`
reads them; masks are compared with pycocotools' ``mask.iou`` on RLEs. No torch is needed
(only :func:`status_instances` imports :mod:`cellkit.viz.overlay`, on first use).

Two kinds of matching are used, each where it belongs:

* **AP matching** (:func:`match_predictions`, :func:`tide_decomposition`, :func:`pr_curves`,
  :func:`ap50_vs_score_threshold`): every prediction, greedily in descending score order within
  its image and class, as COCOeval matches them (top ``max_dets`` per image and class, the best
  IoU >= threshold among the unmatched ground truth wins). Its true positives are exactly
  COCOeval's, so the decomposition is on the scale of the headline AP50.
* **Operating-point matching** (:func:`confusion_matrix`, :func:`recall_by_size`, :func:`per_image`,
  :func:`status_instances`): predictions scoring at least ``score_thresh``, matched one-to-one
  (optimal assignment, :func:`cellkit.analysis.cellmetrics.match_masks`) at IoU >= ``iou``, the
  cell-tool convention of :mod:`cellkit.analysis.cellmetrics` (same counts as ``cell_metrics``).

TIDE error types (Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection Errors",
ECCV 2020), with foreground IoU ``iou_fg`` (0.5) and background IoU ``iou_bg`` (0.1). A prediction
that is not a true positive is, with ``IoU_same``/``IoU_other`` its largest mask IoU with a ground
truth instance of its own / another class in its image, tested in the order of TIDE's reference
implementation:

1. ``bkg`` when the image has no ground truth at all;
2. ``loc`` (localisation): ``iou_bg <= IoU_same < iou_fg`` (target: that instance);
3. ``cls`` (classification): ``IoU_other >= iou_fg`` (target: that instance);
4. ``dupe`` (duplicate): ``IoU_same >= iou_fg`` - its instance was taken by a higher-scoring prediction;
5. ``bkg`` (background): IoU < ``iou_bg`` with every instance;
6. ``both`` (classification and localisation): what is left, i.e. ``iou_bg <= IoU_other < iou_fg``.

Ground truth matched by no prediction is ``miss`` (missed) unless a ``cls`` or ``loc`` error
targets it: as in TIDE, such an instance is accounted for by that error (fixing the error recovers
it), not counted again as missed. Predictions matching only a crowd region (``iscrowd=1``) are
``ignored`` and those beyond the cap ``beyond_cap``, as COCOeval ignores them.

The oracle of each type (TIDE's fixes), applied to that type alone, the AP recomputed by
:func:`~cellkit.engine.evaluate.coco_evaluate`:

* ``cls``: relabel to the target's class; ``loc``: give it the target's mask (and box). Only the
  highest-scoring ``cls``/``loc`` error targeting an instance that no prediction matched is fixed
  (TIDE's ``BestGTMatch``: one instance is recovered once); the others would be duplicates and are
  dropped - so is every ``cls``/``loc`` error whose target was already matched.
* ``both``, ``dupe``, ``bkg``: drop the prediction.
* ``miss``: remove the missed instances from the ground truth (TIDE lowers the class's positive
  count, the same thing). A class whose instances were all missed and which has no predictions
  then has no ground truth and drops out of the class mean, as in TIDE.

Each fix only removes false positives, turns one into a true positive, or removes unmatched ground
truth, so it never lowers AP. With every type fixed, each remaining prediction is a true positive
of a distinct remaining instance, so AP is 1.0 (for non-overlapping instances such as cell label
maps; relabelled predictions that push a class past ``max_dets`` in an image would be an exception).
Besides, like TIDE, ``false_pos`` drops every false positive and ``false_neg`` removes every
unmatched instance.

Why not tidecv: tidecv 1.0.1 (its only release, 2020) was tried. It imports and runs under numpy 2,
and its per-class AP agrees with COCOeval for classes with ground truth, but (1) its mean averages
every class that has predictions *or* ground truth - a class with false positives and no ground
truth counts as AP 0, where COCOeval leaves it out (real sample, perturbed predictions: tidecv mAP
22.5 against our AP50 45.0) - so its dAP are not on the scale of our AP50; (2) it caps detections
per image (default 100), not per image and class; (3) it skips images without ground truth, whose
predictions COCOeval counts as false positives; (4) it hard-depends on opencv-python, pandas,
seaborn and appdirs (for plotting and dataset downloads). So its definitions are reproduced here
on pycocotools, every AP coming from ``coco_evaluate``; on images with ground truth, where the cap
and ignore regions do not come into play, the error counts are the same (up to IoU exactly at a
threshold, which TIDE counts as ``loc`` and COCOeval, and so this module, as a match);
``tests/test_errors.py`` compares them when tidecv is installed.

APs are NaN where nothing is left to evaluate (e.g. the ``miss`` oracle when every instance was
missed).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from ..engine.coco_inputs import GroundTruth, load_ground_truth, load_predictions, sanitize_predictions, to_rle
from ..errors import CellkitError
from .cellmetrics import ClassCounts, match_masks

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.evaluate import EvalResult
    from ..viz.overlay import Instance

__all__ = [
    "DEFAULT_SIZE_BINS",
    "DEFAULT_SCORE_THRESHOLDS",
    "ERROR_NAMES",
    "ERROR_TYPES",
    "ErrorReport",
    "ImageScore",
    "Matching",
    "PRED_KINDS",
    "SPECIAL_TYPES",
    "SizeRecall",
    "ThresholdPoint",
    "ap50_vs_score_threshold",
    "confusion_matrix",
    "match_predictions",
    "per_image",
    "pr_curves",
    "prepare",
    "recall_by_size",
    "score_distributions",
    "status_instances",
    "tide_decomposition",
]

ERROR_TYPES: tuple[str, ...] = ("cls", "loc", "both", "dupe", "bkg", "miss")
"""TIDE's main error types, in TIDE's order."""
SPECIAL_TYPES: tuple[str, ...] = ("false_pos", "false_neg")
"""TIDE's special oracles: drop every false positive / remove every unmatched instance."""
ERROR_NAMES: dict[str, str] = {
    "cls": "classification", "loc": "localisation", "both": "cls + loc", "dupe": "duplicate",
    "bkg": "background", "miss": "missed", "false_pos": "all false positives", "false_neg": "all false negatives",
}
PRED_KINDS: tuple[str, ...] = ("tp", "cls", "loc", "both", "dupe", "bkg", "ignored", "beyond_cap")
"""What :attr:`Matching.kind` holds per prediction."""
FP_KINDS: tuple[str, ...] = ("cls", "loc", "both", "dupe", "bkg")
DEFAULT_SIZE_BINS: tuple[float, ...] = (0, 64, 128, 256, 512, 1024, 2048, 4096, math.inf)
"""Area bin edges (px^2) of :func:`recall_by_size`: cells here are mostly 100-1000 px^2, where
COCO's small/medium/large split (32^2, 96^2) puts nearly everything in one bin."""
DEFAULT_SCORE_THRESHOLDS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
COCO_IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


# --------------------------------------------------------------------------------------------
# inputs


def prepare(gt: Any, predictions: Any, num_classes: int = 4) -> tuple[GroundTruth, list[dict[str, Any]]]:
    """Ground truth and sanitised predictions, read once (every function here accepts them again).

    Args:
        gt: COCO ground truth with masks (json path, dict, pycocotools ``COCO`` or ``GroundTruth``).
        predictions: COCO result dicts with RLE ``segmentation``, or a json path to a list of them.
        num_classes: categories ``1..num_classes``.

    Returns:
        ``(ground, kept)``: the validated ground truth and the predictions ``sanitize_predictions``
        keeps (fresh dicts; NaN boxes, empty masks, unknown ids are left out).
    """
    ground, kept, _ = _prepare(gt, predictions, num_classes)
    return ground, kept


def _prepare(gt: Any, predictions: Any, num_classes: int) -> tuple[GroundTruth, list[dict[str, Any]], dict[str, int]]:
    ground = load_ground_truth(gt, num_classes, need_masks=True)
    kept, dropped = sanitize_predictions(load_predictions(predictions), ground.images, num_classes, "segm",
                                         ground.category_ids)
    return ground, kept, dropped


def _gt_rle(ann: Mapping[str, Any], images: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    im = images[int(ann["image_id"])]
    rle = to_rle(ann["segmentation"], int(im["height"]), int(im["width"]))
    if isinstance(rle.get("counts"), bytes):
        rle = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    return rle


def _iou(dts: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]], crowd: bool = False) -> np.ndarray:
    """``(len(dts), len(gts))`` float64 mask IoU (pycocotools; ``crowd``: intersection / prediction area)."""
    if not len(dts) or not len(gts):
        return np.zeros((len(dts), len(gts)))
    iou = mask_utils.iou(list(dts), list(gts), [int(crowd)] * len(gts))
    return np.asarray(iou, dtype=np.float64).reshape(len(dts), len(gts))


# --------------------------------------------------------------------------------------------
# TIDE matching


@dataclass
class Matching:
    """Every prediction and ground-truth instance with its TIDE verdict.

    Per-prediction arrays have shape ``(N,)`` and follow :attr:`entries` (the sanitised
    predictions, input order); per-instance arrays have shape ``(G,)`` and follow
    :attr:`gt_annotations` (the non-crowd annotations, dataset order).

    Attributes:
        ground: the ground truth.
        entries: the sanitised predictions.
        n_dropped: predictions dropped by sanitising, by reason.
        iou_fg, iou_bg, max_dets: the settings.
        image_id, category_id: int64 ids.
        score: float64.
        kind: ``<U10`` str, one of :data:`PRED_KINDS`.
        gt_index: int64 index into the instance arrays: the matched instance (``tp``), the target
            (``cls``, ``loc``, ``both``: the other-class instance of largest IoU; ``dupe``: the
            instance already taken); -1 for ``bkg``, ``ignored`` and ``beyond_cap``.
        iou: float64 IoU with ``gt_index`` (0 where it is -1).
        best_iou: float64 largest IoU with any instance of the image, any class (0 if none).
        best_gt_class: int64 class of that instance (0 if none).
        recovers: bool, the ``cls``/``loc`` errors the oracle turns into true positives.
        gt_annotations: the non-crowd ground-truth annotation dicts.
        gt_image_id, gt_category_id: int64; gt_area: float64 (the annotation's ``area``, px^2).
        gt_kind: ``<U4`` str: ``tp`` (matched), ``cls``/``loc`` (accounted for by that error) or ``miss``.
        gt_pred_index: int64 index of the matching (``tp``) or recovering (``cls``/``loc``)
            prediction, -1 for ``miss``.
    """

    ground: GroundTruth
    entries: list[dict[str, Any]]
    n_dropped: dict[str, int]
    iou_fg: float
    iou_bg: float
    max_dets: int
    image_id: np.ndarray
    category_id: np.ndarray
    score: np.ndarray
    kind: np.ndarray
    gt_index: np.ndarray
    iou: np.ndarray
    best_iou: np.ndarray
    best_gt_class: np.ndarray
    recovers: np.ndarray
    gt_annotations: list[dict[str, Any]] = field(repr=False)
    gt_image_id: np.ndarray = field(repr=False)
    gt_category_id: np.ndarray = field(repr=False)
    gt_area: np.ndarray = field(repr=False)
    gt_kind: np.ndarray = field(repr=False)
    gt_pred_index: np.ndarray = field(repr=False)

    def counts(self) -> dict[str, int]:
        """``{"tp", "cls", "loc", "both", "dupe", "bkg", "miss", "ignored", "beyond_cap"}`` -> count."""
        out = {"tp": int(np.sum(self.kind == "tp"))}
        for t in ERROR_TYPES:
            out[t] = int(np.sum(self.gt_kind == "miss")) if t == "miss" else int(np.sum(self.kind == t))
        out["ignored"] = int(np.sum(self.kind == "ignored"))
        out["beyond_cap"] = int(np.sum(self.kind == "beyond_cap"))
        return out

    def counts_by_class(self) -> dict[str, dict[str, int]]:
        """Class name -> :meth:`counts` restricted to predictions / instances of that class."""
        names = self.ground.category_names
        out = {}
        for k in self.ground.category_ids:
            p, g = self.category_id == k, self.gt_category_id == k
            row = {"tp": int(np.sum(self.kind[p] == "tp"))}
            for t in ERROR_TYPES:
                row[t] = int(np.sum(self.gt_kind[g] == "miss")) if t == "miss" else int(np.sum(self.kind[p] == t))
            out[names[k]] = row
        return out


def match_predictions(
    gt: Any,
    predictions: Any,
    iou_fg: float = 0.5,
    iou_bg: float = 0.1,
    max_dets: int = 1000,
    num_classes: int = 4,
) -> Matching:
    """TIDE's classification of every prediction and ground-truth instance (see the module docstring).

    Args:
        gt: COCO ground truth with masks (json path, dict, pycocotools ``COCO``, ``GroundTruth``).
        predictions: COCO result dicts with RLE ``segmentation``, or a json path; sanitised first.
        iou_fg: mask IoU at which a prediction matches (0.5 for AP50).
        iou_bg: below this IoU with every instance a prediction is background.
        max_dets: predictions kept per image and class, highest scores first (as COCOeval).
        num_classes: categories ``1..num_classes``.

    Returns:
        A :class:`Matching`; its true positives are COCOeval's at IoU ``iou_fg``.
    """
    if not 0.0 <= iou_bg <= iou_fg <= 1.0:
        raise CellkitError(f"need 0 <= iou_bg <= iou_fg <= 1, got iou_bg={iou_bg}, iou_fg={iou_fg}")
    if isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 1:
        raise CellkitError(f"max_dets must be a positive integer, got {max_dets!r}")
    ground, kept, dropped = _prepare(gt, predictions, num_classes)
    images = ground.images
    anns = [a for a in ground.dataset["annotations"] if not a.get("iscrowd", 0)]
    crowd = [a for a in ground.dataset["annotations"] if a.get("iscrowd", 0)]
    G, N = len(anns), len(kept)
    gt_image = np.array([int(a["image_id"]) for a in anns], np.int64)
    gt_cat = np.array([int(a["category_id"]) for a in anns], np.int64)
    gt_area = np.array([float(a["area"]) for a in anns], np.float64)
    gt_kind = np.full(G, "miss", dtype="<U4")
    gt_pred = np.full(G, -1, np.int64)
    image = np.array([p["image_id"] for p in kept], np.int64)
    cat = np.array([p["category_id"] for p in kept], np.int64)
    score = np.array([p["score"] for p in kept], np.float64)
    kind = np.full(N, "beyond_cap", dtype="<U10")
    gt_index = np.full(N, -1, np.int64)
    iou_out = np.zeros(N)
    best_iou = np.zeros(N)
    best_cls = np.zeros(N, np.int64)
    recovers = np.zeros(N, bool)

    gts_of: dict[int, list[int]] = defaultdict(list)
    for j, a in enumerate(anns):
        gts_of[int(a["image_id"])].append(j)
    crowd_of: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in crowd:
        crowd_of[int(a["image_id"])].append(a)
    preds_of: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(kept):
        preds_of[p["image_id"]].append(i)
    # COCOeval's threshold (it caps it just below 1 so that IoU 1 always matches at t = 1)
    thr = min(iou_fg, 1 - 1e-10)

    for img, pidx in preds_of.items():
        pidx_arr = np.asarray(pidx, np.int64)
        # within each class: descending score, stable in input order, top max_dets (COCOeval)
        active: list[int] = []
        for c in np.unique(cat[pidx_arr]):
            members = pidx_arr[cat[pidx_arr] == c]
            members = members[np.argsort(-score[members], kind="mergesort")]
            active.extend(members[:max_dets].tolist())
        act = np.asarray(active, np.int64)
        gidx = np.asarray(gts_of.get(img, []), np.int64)
        gt_rles = [_gt_rle(anns[j], images) for j in gidx]
        ious = _iou([kept[i]["segmentation"] for i in act], gt_rles)  # (len(act), len(gidx))
        row_of = {int(i): r for r, i in enumerate(act)}
        g_cat = gt_cat[gidx]
        used = np.zeros(len(gidx), bool)
        # greedy matching per class in score order, as COCOeval (ties: the last best instance)
        for c in np.unique(cat[act]):
            members = act[cat[act] == c]
            members = members[np.argsort(-score[members], kind="mergesort")]
            same = g_cat == c
            for i in members:
                row = ious[row_of[int(i)]]
                cand = same & ~used & (row >= thr)
                if cand.any():
                    vals = np.where(cand, row, -1.0)
                    j = len(vals) - 1 - int(np.argmax(vals[::-1]))
                    used[j] = True
                    kind[i], gt_index[i], iou_out[i] = "tp", gidx[j], row[j]
                    gt_kind[gidx[j]], gt_pred[gidx[j]] = "tp", i
        # crowd regions: an unmatched prediction covering one of its class is ignored (COCOeval)
        if crowd_of.get(img):
            c_rles = [_gt_rle(a, images) for a in crowd_of[img]]
            c_cat = np.array([int(a["category_id"]) for a in crowd_of[img]])
            open_ = act[kind[act] != "tp"]
            if len(open_):
                cious = _iou([kept[i]["segmentation"] for i in open_], c_rles, crowd=True)
                hit = ((cious >= thr) & (c_cat[None, :] == cat[open_][:, None])).any(axis=1)
                kind[open_[hit]] = "ignored"
        # TIDE's error types, highest scores first (its BestGTMatch keeps the first it sees)
        order = act[np.argsort(-score[act], kind="mergesort")]
        best_score_of: dict[int, int] = {}  # instance -> the cls/loc error that recovers it
        for i in order:
            row = ious[row_of[int(i)]]
            if len(row):
                b = int(np.argmax(row))
                best_iou[i], best_cls[i] = row[b], g_cat[b]
            if kind[i] in ("tp", "ignored"):
                continue
            if not len(gidx):
                kind[i] = "bkg"
                continue
            same = g_cat == cat[i]
            s_row = np.where(same, row, -1.0)
            o_row = np.where(~same, row, -1.0)
            s_j, o_j = int(np.argmax(s_row)), int(np.argmax(o_row))
            s_max, o_max = s_row[s_j], o_row[o_j]
            if iou_bg <= s_max < iou_fg:
                kind[i], j = "loc", s_j
            elif o_max >= iou_fg:
                kind[i], j = "cls", o_j
            elif s_max >= iou_fg:
                kind[i], j = "dupe", s_j
            elif row.max() < iou_bg:
                kind[i], j = "bkg", -1
            else:
                kind[i], j = "both", o_j
            if j >= 0:
                gt_index[i], iou_out[i] = gidx[j], row[j]
                if kind[i] in ("cls", "loc") and not used[j] and gidx[j] not in best_score_of:
                    best_score_of[int(gidx[j])] = int(i)
        for g, i in best_score_of.items():
            recovers[i] = True
            gt_kind[g], gt_pred[g] = kind[i], i

    return Matching(
        ground=ground, entries=kept, n_dropped=dict(dropped), iou_fg=float(iou_fg), iou_bg=float(iou_bg),
        max_dets=int(max_dets), image_id=image, category_id=cat, score=score, kind=kind, gt_index=gt_index,
        iou=iou_out, best_iou=best_iou, best_gt_class=best_cls, recovers=recovers, gt_annotations=anns,
        gt_image_id=gt_image, gt_category_id=gt_cat, gt_area=gt_area, gt_kind=gt_kind, gt_pred_index=gt_pred,
    )


# --------------------------------------------------------------------------------------------
# TIDE decomposition


@dataclass
class ErrorReport:
    """TIDE-style decomposition: what fixing each error type alone would add to AP.

    All APs are :func:`~cellkit.engine.evaluate.coco_evaluate`'s segm AP at IoU ``iou_fg`` (AP50
    at the default 0.5) with ``max_dets`` detections per image and class, i.e. on the scale of the
    headline AP50; NaN where undefined.

    Attributes:
        base_ap: AP of the predictions as they are.
        fixed_ap: AP with one oracle applied, for each of :data:`ERROR_TYPES`, :data:`SPECIAL_TYPES`
            and ``"all"`` (every main type fixed at once: 1.0 but for the exceptions of the module
            docstring).
        per_class_ap: class name -> base AP.
        per_class_fixed_ap: oracle -> class name -> AP.
        counts: ``tp``, the error types, ``ignored`` and ``beyond_cap`` -> count (``miss`` counts
            instances, the others predictions).
        matching: the :class:`Matching` behind it.
    """

    iou_fg: float
    iou_bg: float
    max_dets: int
    base_ap: float
    fixed_ap: dict[str, float]
    per_class_ap: dict[str, float]
    per_class_fixed_ap: dict[str, dict[str, float]]
    counts: dict[str, int]
    backend: str
    matching: Matching = field(repr=False)

    @property
    def delta(self) -> dict[str, float]:
        """AP gained by each oracle of :data:`ERROR_TYPES` and :data:`SPECIAL_TYPES` (>= 0)."""
        return {t: self.fixed_ap[t] - self.base_ap for t in (*ERROR_TYPES, *SPECIAL_TYPES)}

    def per_class_delta(self) -> dict[str, dict[str, float]]:
        """Oracle -> class name -> AP gained in that class (NaN where the class has no ground truth)."""
        return {t: {c: v - self.per_class_ap[c] for c, v in self.per_class_fixed_ap[t].items()}
                for t in (*ERROR_TYPES, *SPECIAL_TYPES)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN as None), without the matching."""
        nn = _nan_none
        return {
            "iou_fg": self.iou_fg, "iou_bg": self.iou_bg, "max_dets": self.max_dets, "backend": self.backend,
            "base_ap": nn(self.base_ap), "fixed_ap": {k: nn(v) for k, v in self.fixed_ap.items()},
            "delta": {k: nn(v) for k, v in self.delta.items()},
            "per_class_ap": {k: nn(v) for k, v in self.per_class_ap.items()},
            "per_class_delta": {t: {c: nn(v) for c, v in d.items()} for t, d in self.per_class_delta().items()},
            "counts": dict(self.counts),
        }

    def format(self) -> str:
        """A table: AP, then per error type its count and the AP gained by fixing it."""
        lines = [
            f"TIDE error decomposition (segm AP at IoU {self.iou_fg:g}, background below IoU {self.iou_bg:g}, "
            f"up to {self.max_dets} detections per image and class)",
            f"  AP {_f(self.base_ap)}   ({self.counts['tp']} true positives; with every error fixed: "
            f"{_f(self.fixed_ap['all'])})",
            f"  {'error':<22} {'count':>7} {'dAP':>8}",
        ]
        for t in ERROR_TYPES:
            lines.append(f"  {t + ' (' + ERROR_NAMES[t] + ')':<22} {self.counts[t]:>7d} {_f(self.delta[t], '+.4f'):>8}")
        for t in SPECIAL_TYPES:
            lines.append(f"  {t:<22} {'':>7} {_f(self.delta[t], '+.4f'):>8}")
        extra = [f"{self.counts[k]} {k.replace('_', ' ')}" for k in ("ignored", "beyond_cap") if self.counts[k]]
        if extra:
            lines.append("  predictions not evaluated: " + ", ".join(extra))
        return "\n".join(lines)


def tide_decomposition(
    gt: Any,
    predictions: Any,
    iou_fg: float = 0.5,
    iou_bg: float = 0.1,
    max_dets: int = 1000,
    num_classes: int = 4,
    backend: str = "auto",
) -> ErrorReport:
    """TIDE's main and special error oracles, each AP computed by ``coco_evaluate``.

    Args:
        gt, predictions, iou_bg, max_dets, num_classes: as in :func:`match_predictions`.
        iou_fg: one of COCO's IoU thresholds 0.5, 0.55 ... 0.95 (0.5: AP50, the scored metric).
        backend: ``coco_evaluate``'s backend (``"auto"``: faster-coco-eval when installed).

    Returns:
        An :class:`ErrorReport` (11 evaluations: the base, 6 main oracles, 2 special, all fixed).
    """
    from ..engine.evaluate import coco_evaluate

    t_idx = _iou_index(iou_fg)
    m = match_predictions(gt, predictions, iou_fg, iou_bg, max_dets, num_classes)
    base = coco_evaluate(m.ground, _fixed_predictions(m, ()), "segm", max_dets,
                         backend, num_classes)  # type: ignore[arg-type]
    base_ap, base_cls = _ap_at(base, t_idx)
    fixed, fixed_cls = {}, {}
    oracles: dict[str, tuple[str, ...]] = {t: (t,) for t in ERROR_TYPES}
    oracles.update({t: (t,) for t in SPECIAL_TYPES})
    oracles["all"] = ERROR_TYPES
    for name, fix in oracles.items():
        res = coco_evaluate(_fixed_ground(m, fix), _fixed_predictions(m, fix), "segm", max_dets,
                            backend, num_classes)  # type: ignore[arg-type]
        fixed[name], fixed_cls[name] = _ap_at(res, t_idx)
    return ErrorReport(
        iou_fg=float(iou_fg), iou_bg=float(iou_bg), max_dets=int(max_dets), base_ap=base_ap, fixed_ap=fixed,
        per_class_ap=base_cls, per_class_fixed_ap=fixed_cls, counts=m.counts(), backend=base.backend, matching=m,
    )


def _iou_index(iou: float) -> int:
    for t, v in enumerate(COCO_IOU_THRESHOLDS):
        if abs(iou - v) < 1e-9:
            return t
    raise CellkitError(f"AP is read at COCO's IoU thresholds 0.5, 0.55 ... 0.95; got {iou}")


def _ap_at(res: "EvalResult", t: int) -> tuple[float, dict[str, float]]:
    """AP over classes and per class at IoU threshold index ``t`` (area all, the result's cap)."""
    if t == 0:
        return res.ap50, {name: row["ap50"] for name, row in res.per_class.items()}
    assert res.precision is not None
    prec = res.precision[t, :, :, 0]  # (R, K)
    per = {name: _mean_valid(prec[:, k]) for k, name in enumerate(res.per_class)}
    return _mean_valid(prec), per


def _mean_valid(x: np.ndarray) -> float:
    v = x[x > -1]
    return float(np.mean(v)) if v.size else float("nan")


def _fixed_predictions(m: Matching, fix: Sequence[str]) -> list[dict[str, Any]]:
    """The predictions after the oracles of ``fix`` (predictions beyond the cap left out)."""
    fix = set(fix)
    out = []
    for i, e in enumerate(m.entries):
        k = str(m.kind[i])
        if k == "beyond_cap" or ("false_pos" in fix and k in FP_KINDS):
            continue
        if k in fix:
            if k in ("both", "dupe", "bkg") or not m.recovers[i]:
                continue
            a = m.gt_annotations[int(m.gt_index[i])]
            e = dict(e)
            if k == "cls":
                e["category_id"] = int(a["category_id"])
            else:  # loc: the target's mask
                rle = _gt_rle(a, m.ground.images)
                e["segmentation"] = rle
                e["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
        out.append(e)
    return out


def _fixed_ground(m: Matching, fix: Sequence[str]) -> GroundTruth | dict[str, Any]:
    """The ground truth after the oracles of ``fix`` (missed or all unmatched instances removed)."""
    if "miss" in fix:
        gone = m.gt_kind == "miss"
    elif "false_neg" in fix:
        gone = m.gt_kind != "tp"
    else:
        return m.ground
    removed = {id(a) for a, g in zip(m.gt_annotations, gone) if g}
    data = m.ground.dataset
    return {"images": data["images"], "categories": data["categories"],
            "annotations": [a for a in data["annotations"] if id(a) not in removed]}


# --------------------------------------------------------------------------------------------
# curves read off COCOeval


def pr_curves(
    gt: Any,
    predictions: Any,
    iou: float = 0.5,
    max_dets: int = 1000,
    num_classes: int = 4,
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
    from ..engine.evaluate import coco_evaluate

    t = _iou_index(iou)
    res = coco_evaluate(gt, predictions, "segm", max_dets, backend, num_classes)  # type: ignore[arg-type]
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
    num_classes: int = 4,
    backend: str = "auto",
) -> list[ThresholdPoint]:
    """segm AP50 (``coco_evaluate``) of the predictions kept at each score threshold.

    AP ranks every score, so cutting low scores can only lose recall: the curve shows what a
    score threshold (as in report 004, which dropped scores below 0.5) costs.

    Returns:
        ``[(threshold, ap50, n_kept), ...]`` in the order of ``thresholds``.
    """
    from ..engine.evaluate import coco_evaluate

    ground, kept = prepare(gt, predictions, num_classes)
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


# --------------------------------------------------------------------------------------------
# operating point: one-to-one matching of the predictions above a score threshold


@dataclass
class _OpMatch:
    gt_anns: list[dict[str, Any]]
    gt_found: np.ndarray  # (G,) bool
    preds: list[dict[str, Any]]
    pred_gt: np.ndarray  # (P,) int64 index into gt_anns, -1 unmatched


def _op_match(
    ground: GroundTruth,
    kept: Sequence[dict[str, Any]],
    iou: float,
    score_thresh: float,
    same_class: bool = True,
    image_ids: set[int] | None = None,
) -> _OpMatch:
    """Predictions scoring >= ``score_thresh`` matched one-to-one to non-crowd instances at IoU >=
    ``iou`` (optimal assignment per image, and per class when ``same_class``)."""
    images = ground.images
    gt_anns = [a for a in ground.dataset["annotations"]
               if not a.get("iscrowd", 0) and (image_ids is None or int(a["image_id"]) in image_ids)]
    preds = [p for p in kept if p["score"] >= score_thresh and (image_ids is None or p["image_id"] in image_ids)]
    key = (lambda img, c: (img, c)) if same_class else (lambda img, c: (img, 0))
    g_groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for j, a in enumerate(gt_anns):
        g_groups[key(int(a["image_id"]), int(a["category_id"]))].append(j)
    p_groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, p in enumerate(preds):
        p_groups[key(p["image_id"], p["category_id"])].append(i)
    gt_found = np.zeros(len(gt_anns), bool)
    pred_gt = np.full(len(preds), -1, np.int64)
    for k in set(g_groups) & set(p_groups):
        gi, pi = g_groups[k], p_groups[k]
        r, c, _ = match_masks([preds[i]["segmentation"] for i in pi], [_gt_rle(gt_anns[j], images) for j in gi], iou)
        for a, b in zip(r, c):
            pred_gt[pi[a]] = gi[b]
            gt_found[gi[b]] = True
    return _OpMatch(gt_anns, gt_found, preds, pred_gt)


def confusion_matrix(
    gt: Any,
    predictions: Any,
    iou: float = 0.5,
    score_thresh: float = 0.5,
    num_classes: int = 4,
) -> np.ndarray:
    """Class confusion of matched cells: predictions matched to instances of *any* class.

    Predictions scoring at least ``score_thresh`` are matched one-to-one to the instances of their
    image, whatever the classes, at mask IoU >= ``iou`` (optimal assignment, as
    :func:`cellkit.analysis.cellmetrics.match_masks`).

    Returns:
        ``(C + 1, C + 1)`` int64, ``C = num_classes``: ``[g - 1, p - 1]`` counts instances of
        class g matched by a prediction of class p; the last row (``background``) counts unmatched
        predictions by predicted class, the last column (``missed``) unmatched instances by class.
        Row ``g - 1`` sums to the instances of class g, column ``p - 1`` to the predictions of
        class p; the corner is 0.
    """
    ground, kept = prepare(gt, predictions, num_classes)
    om = _op_match(ground, kept, iou, score_thresh, same_class=False)
    C = num_classes
    out = np.zeros((C + 1, C + 1), np.int64)
    for i, p in enumerate(om.preds):
        j = om.pred_gt[i]
        row = C if j < 0 else int(om.gt_anns[j]["category_id"]) - 1
        out[row, p["category_id"] - 1] += 1
    for j, a in enumerate(om.gt_anns):
        if not om.gt_found[j]:
            out[int(a["category_id"]) - 1, C] += 1
    return out


@dataclass
class SizeRecall:
    """Recall of ground-truth instances by area bin, over all classes and per class.

    Attributes:
        edges: ``(B + 1,)`` float64 bin edges in px^2; bin b is ``[edges[b], edges[b + 1])``.
        classes: ``["all", class names...]``, the rows of the arrays.
        n_gt: ``(len(classes), B)`` int64 instances per bin.
        n_found: ``(len(classes), B)`` int64 of them matched by a same-class prediction.
        iou, score_thresh: the operating point.
    """

    edges: np.ndarray
    classes: list[str]
    n_gt: np.ndarray
    n_found: np.ndarray
    iou: float
    score_thresh: float

    @property
    def recall(self) -> np.ndarray:
        """``(len(classes), B)`` float64 ``n_found / n_gt``, NaN for empty bins."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_gt > 0, self.n_found / np.maximum(self.n_gt, 1), np.nan)

    def bin_labels(self) -> list[str]:
        """``"0-64"``, ..., ``">=4096"``."""
        e = self.edges
        return [f">={e[b]:g}" if math.isinf(e[b + 1]) else f"{e[b]:g}-{e[b + 1]:g}" for b in range(len(e) - 1)]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per class and bin: ``{class, bin, lo, hi, n_gt, n_found, recall}``."""
        rec, labels = self.recall, self.bin_labels()
        return [{"class": c, "bin": labels[b], "lo": float(self.edges[b]), "hi": float(self.edges[b + 1]),
                 "n_gt": int(self.n_gt[k, b]), "n_found": int(self.n_found[k, b]), "recall": _nan_none(rec[k, b])}
                for k, c in enumerate(self.classes) for b in range(len(labels))]

    def format(self) -> str:
        """A table: one row per bin, recall (and instance count) per class."""
        labels, rec = self.bin_labels(), self.recall
        lines = [f"Recall by cell area (px^2) at IoU {self.iou:g}, score >= {self.score_thresh:g}",
                 "  " + f"{'area':<12}" + "".join(f"{c:>16}" for c in self.classes)]
        for b, lab in enumerate(labels):
            lines.append("  " + f"{lab:<12}" + "".join(
                f"{_f(rec[k, b], '.3f'):>8} ({self.n_gt[k, b]:>4d})" for k in range(len(self.classes))))
        return "\n".join(lines)


def recall_by_size(
    gt: Any,
    predictions: Any,
    bins: Sequence[float] = DEFAULT_SIZE_BINS,
    iou: float = 0.5,
    score_thresh: float = 0.5,
    num_classes: int = 4,
) -> SizeRecall:
    """Recall of ground-truth instances by their area (the annotation's ``area``, px^2).

    An instance is found when a prediction of its class scoring at least ``score_thresh`` matches
    it one-to-one at mask IoU >= ``iou`` (the matching of ``cell_metrics``).

    Args:
        bins: increasing bin edges; areas outside ``[bins[0], bins[-1])`` are not counted.
    """
    edges = np.asarray(bins, np.float64)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise CellkitError(f"bins must be at least two increasing edges, got {list(bins)}")
    ground, kept = prepare(gt, predictions, num_classes)
    om = _op_match(ground, kept, iou, score_thresh)
    names = ground.category_names
    cat_ids = ground.category_ids
    B = len(edges) - 1
    n_gt = np.zeros((len(cat_ids) + 1, B), np.int64)
    n_found = np.zeros_like(n_gt)
    row_of = {k: r + 1 for r, k in enumerate(cat_ids)}
    for j, a in enumerate(om.gt_anns):
        b = int(np.searchsorted(edges, float(a["area"]), side="right")) - 1
        if not 0 <= b < B:
            continue
        for r in (0, row_of[int(a["category_id"])]):
            n_gt[r, b] += 1
            n_found[r, b] += int(om.gt_found[j])
    return SizeRecall(edges, ["all", *(names[k] for k in cat_ids)], n_gt, n_found, float(iou), float(score_thresh))


# --------------------------------------------------------------------------------------------
# per image


@dataclass(kw_only=True)
class ImageScore(ClassCounts):
    """Operating-point counts of one image (one-to-one matching within each class): ``tp``, ``fp``,
    ``fn`` and the ratios of :class:`~cellkit.analysis.cellmetrics.ClassCounts` (NaN where undefined)."""

    image_id: int
    file_name: str
    n_gt: int

    @property
    def errors(self) -> int:
        """FP + FN."""
        return self.fp + self.fn

    def title(self) -> str:
        """A two-line caption: a short image name (the folder of ``<uuid>/image.tif``, cut to 13
        characters) with the id, then F1 and the counts."""
        parts = [q for q in str(self.file_name).replace("\\", "/").split("/") if q]
        name = (parts[-2] if len(parts) > 1 and parts[-1].startswith("image.") else parts[-1]) if parts else ""
        name = name if len(name) <= 13 else name[:12] + "\u2026"
        head = f"{name} (id {self.image_id})" if name else f"image {self.image_id}"
        return f"{head}\nF1 {_f(self.f1, '.2f')}: TP {self.tp}, FP {self.fp}, FN {self.fn}"


def per_image(
    gt: Any,
    predictions: Any,
    iou: float = 0.5,
    score_thresh: float = 0.5,
    num_classes: int = 4,
) -> list[ImageScore]:
    """TP/FP/FN, precision, recall and F1 of every ground-truth image, worst first.

    Matching as in ``cell_metrics`` (same-class, one-to-one, IoU >= ``iou``, score >=
    ``score_thresh``), so the counts sum to its overall counts.

    Returns:
        One :class:`ImageScore` per image, sorted by F1 ascending, ties by more errors (FP + FN)
        first, then by image id; images with neither instances nor predictions (F1 NaN) last.
    """
    ground, kept = prepare(gt, predictions, num_classes)
    om = _op_match(ground, kept, iou, score_thresh)
    tp: dict[int, int] = defaultdict(int)
    fp: dict[int, int] = defaultdict(int)
    fn: dict[int, int] = defaultdict(int)
    n_gt: dict[int, int] = defaultdict(int)
    for i, p in enumerate(om.preds):
        (tp if om.pred_gt[i] >= 0 else fp)[p["image_id"]] += 1
    for j, a in enumerate(om.gt_anns):
        n_gt[int(a["image_id"])] += 1
        if not om.gt_found[j]:
            fn[int(a["image_id"])] += 1
    out = [ImageScore(image_id=int(im["id"]), file_name=str(im.get("file_name", "")), tp=tp[int(im["id"])],
                      fp=fp[int(im["id"])], fn=fn[int(im["id"])], n_gt=n_gt[int(im["id"])]) for im in ground.dataset["images"]]
    out.sort(key=lambda s: (math.isnan(s.f1), 0.0 if math.isnan(s.f1) else s.f1, -s.errors, s.image_id))
    return out


def status_instances(
    gt: Any,
    predictions: Any,
    image_id: int,
    iou: float = 0.5,
    score_thresh: float = 0.5,
    num_classes: int = 4,
) -> list["Instance"]:
    """The cells of one image to draw by status: TP and FP predictions, FN ground truth.

    Matching as in :func:`per_image`. Use with ``cellkit.viz.overlay.render(image, instances,
    color_by="status")`` (TP green, FP red, FN blue).

    Returns:
        :class:`cellkit.viz.overlay.Instance` s with ``status`` ``"fn"`` (ground truth, score 1),
        ``"fp"`` and ``"tp"`` (predictions, with their scores), in that order.
    """
    from ..viz.overlay import instances_from_coco

    ground, kept = prepare(gt, predictions, num_classes)
    if int(image_id) not in ground.images:
        raise CellkitError(f"image id {image_id} is not in the ground truth")
    om = _op_match(ground, kept, iou, score_thresh, image_ids={int(image_id)})
    images = ground.images
    fn = [{"segmentation": _gt_rle(a, images), "category_id": int(a["category_id"]), "score": 1.0, "status": "fn"}
          for j, a in enumerate(om.gt_anns) if not om.gt_found[j]]
    fp = [dict(p, status="fp") for i, p in enumerate(om.preds) if om.pred_gt[i] < 0]
    tp = [dict(p, status="tp") for i, p in enumerate(om.preds) if om.pred_gt[i] >= 0]
    return instances_from_coco(fn + fp + tp)


# --------------------------------------------------------------------------------------------
# helpers


def _nan_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _f(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, spec)
