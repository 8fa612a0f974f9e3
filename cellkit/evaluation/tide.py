"""TIDE-style error decomposition of instance predictions (the AP matching of the error analysis).

Everything here works on COCO ground truth and COCO result lists (or json paths), read through
:func:`~cellkit.evaluation.inputs.load_ground_truth` and
:func:`~cellkit.evaluation.inputs.sanitize_predictions` like :func:`~cellkit.evaluation.coco.coco_evaluate`
reads them; masks are compared with pycocotools' ``mask.iou`` on RLEs. No torch.
:class:`cellkit.evaluation.analysis.ErrorAnalysis` answers every question of the error analysis
from one matching.

Two kinds of matching are used, each where it belongs:

* **AP matching** (:func:`match_predictions`, :func:`tide_decomposition`, and in
  :mod:`~cellkit.evaluation.curves` the PR curves and AP50 against the score threshold): every prediction, greedily in descending score order within
  its image and class, as COCOeval matches them (top ``max_dets`` per image and class, the best
  IoU >= threshold among the unmatched ground truth wins). Its true positives are exactly
  COCOeval's, so the decomposition is on the scale of the headline AP50.
* **Operating-point matching** (:mod:`cellkit.evaluation.operating`: confusion matrix, recall by
  size, per image, cells by status): predictions scoring at least ``score_thresh``, matched
  one-to-one (optimal assignment, :func:`cellkit.evaluation.cellmetrics.match_masks`) at IoU >=
  ``iou``, the cell-tool convention of :mod:`cellkit.evaluation.cellmetrics` (same counts as
  ``cell_metrics``).

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
:func:`~cellkit.evaluation.coco.coco_evaluate`:

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
``tests/test_errors.py`` compares them (tidecv is in the dev extra and the lock).

APs are NaN where nothing is left to evaluate (e.g. the ``miss`` oracle when every instance was
missed).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import CellkitError
from ..structures.rle import mask_iou
from .coco import EvalResult, coco_evaluate, mean_valid
from .formatting import fmt, nan_to_none
from .inputs import GroundTruth, gt_rle, prepare

__all__ = ["COCO_IOU_THRESHOLDS", "ERROR_NAMES", "ERROR_TYPES", "ErrorReport", "FP_KINDS", "Matching", "PRED_KINDS",
           "SPECIAL_TYPES", "decompose", "iou_index", "match_predictions", "match_prepared",
           "tide_decomposition"]

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
"""The error types that are false positives."""
COCO_IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))

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
    num_classes: int | None = None,
) -> Matching:
    """TIDE's classification of every prediction and ground-truth instance (see the module docstring).

    Args:
        gt: COCO ground truth with masks (json path, dict, pycocotools ``COCO``, ``GroundTruth``).
        predictions: COCO result dicts with RLE ``segmentation``, or a json path; sanitised first.
        iou_fg: mask IoU at which a prediction matches (0.5 for AP50).
        iou_bg: below this IoU with every instance a prediction is background.
        max_dets: predictions kept per image and class, highest scores first (as COCOeval).
        num_classes: categories ``1..num_classes`` (None: the ground truth's categories).

    Returns:
        A :class:`Matching`; its true positives are COCOeval's at IoU ``iou_fg``.
    """
    ground, kept, dropped = prepare(gt, predictions, num_classes)
    return match_prepared(ground, kept, dropped, iou_fg, iou_bg, max_dets)


def match_prepared(
    ground: GroundTruth,
    kept: list[dict[str, Any]],
    dropped: dict[str, int] | None = None,
    iou_fg: float = 0.5,
    iou_bg: float = 0.1,
    max_dets: int = 1000,
) -> Matching:
    """:func:`match_predictions` of inputs already read by :func:`cellkit.evaluation.inputs.prepare`."""
    if not 0.0 <= iou_bg <= iou_fg <= 1.0:
        raise CellkitError(f"need 0 <= iou_bg <= iou_fg <= 1, got iou_bg={iou_bg}, iou_fg={iou_fg}")
    if isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 1:
        raise CellkitError(f"max_dets must be a positive integer, got {max_dets!r}")
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
        gt_rles = [gt_rle(anns[j], images) for j in gidx]
        ious = mask_iou([kept[i]["segmentation"] for i in act], gt_rles)  # (len(act), len(gidx))
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
            c_rles = [gt_rle(a, images) for a in crowd_of[img]]
            c_cat = np.array([int(a["category_id"]) for a in crowd_of[img]])
            open_ = act[kind[act] != "tp"]
            if len(open_):
                cious = mask_iou([kept[i]["segmentation"] for i in open_], c_rles, crowd=True)
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
        ground=ground, entries=kept, n_dropped=dict(dropped or {}), iou_fg=float(iou_fg), iou_bg=float(iou_bg),
        max_dets=int(max_dets), image_id=image, category_id=cat, score=score, kind=kind, gt_index=gt_index,
        iou=iou_out, best_iou=best_iou, best_gt_class=best_cls, recovers=recovers, gt_annotations=anns,
        gt_image_id=gt_image, gt_category_id=gt_cat, gt_area=gt_area, gt_kind=gt_kind, gt_pred_index=gt_pred,
    )


# --------------------------------------------------------------------------------------------
# TIDE decomposition


@dataclass
class ErrorReport:
    """TIDE-style decomposition: what fixing each error type alone would add to AP.

    All APs are :func:`~cellkit.evaluation.coco.coco_evaluate`'s segm AP at IoU ``iou_fg`` (AP50
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
        nn = nan_to_none
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
            f"  AP {fmt(self.base_ap)}   ({self.counts['tp']} true positives; with every error fixed: "
            f"{fmt(self.fixed_ap['all'])})",
            f"  {'error':<22} {'count':>7} {'dAP':>8}",
        ]
        for t in ERROR_TYPES:
            lines.append(f"  {t + ' (' + ERROR_NAMES[t] + ')':<22} {self.counts[t]:>7d} {fmt(self.delta[t], '+.4f'):>8}")
        for t in SPECIAL_TYPES:
            lines.append(f"  {t:<22} {'':>7} {fmt(self.delta[t], '+.4f'):>8}")
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
    num_classes: int | None = None,
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
    iou_index(iou_fg)
    return decompose(match_predictions(gt, predictions, iou_fg, iou_bg, max_dets, num_classes), backend, num_classes)


def decompose(m: Matching, backend: str = "auto", num_classes: int | None = None, base: "EvalResult | None" = None) -> ErrorReport:
    """:func:`tide_decomposition` of an existing :class:`Matching`.

    Args:
        base: the segm :class:`~cellkit.evaluation.coco.EvalResult` of the same predictions at the
            matching's ``max_dets`` when already computed (saves one evaluation).
    """
    t_idx = iou_index(m.iou_fg)
    max_dets = m.max_dets
    if base is None or base.max_dets != max_dets:
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
        iou_fg=m.iou_fg, iou_bg=m.iou_bg, max_dets=int(max_dets), base_ap=base_ap, fixed_ap=fixed,
        per_class_ap=base_cls, per_class_fixed_ap=fixed_cls, counts=m.counts(), backend=base.backend, matching=m,
    )


def iou_index(iou: float) -> int:
    """Index of ``iou`` among COCO's IoU thresholds 0.5, 0.55 ... 0.95 (the T axis of ``precision``)."""
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
    per = {name: mean_valid(prec[:, k]) for k, name in enumerate(res.per_class)}
    return mean_valid(prec), per


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
                rle = gt_rle(a, m.ground.images)
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
# helpers
