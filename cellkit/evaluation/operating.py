"""Operating-point analysis: the predictions scoring at least a threshold, matched one-to-one to the
ground truth at one IoU (the cell-tool convention of :mod:`cellkit.evaluation.cellmetrics`):
confusion matrix, recall by cell size, per-image counts and the cells of one image by status.
No torch."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import CellkitError
from .cellmetrics import ClassCounts, match_masks
from .formatting import fmt, nan_to_none
from .inputs import GroundTruth, gt_rle, prepare

__all__ = ["DEFAULT_SIZE_BINS", "ImageScore", "OperatingMatch", "SizeRecall", "confusion_matrix", "operating_match",
           "per_image", "recall_by_size", "status_entries", "confusion_from", "recall_by_size_from", "per_image_from",
           "status_entries_from"]

DEFAULT_SIZE_BINS: tuple[float, ...] = (0, 64, 128, 256, 512, 1024, 2048, 4096, math.inf)
"""Area bin edges (px^2) of :func:`recall_by_size`: cells here are mostly 100-1000 px^2, where
COCO's small/medium/large split (32^2, 96^2) puts nearly everything in one bin."""


@dataclass
class OperatingMatch:
    """Predictions scoring at least ``score_thresh`` matched one-to-one to the non-crowd instances.

    Attributes:
        ground: the ground truth.
        gt_anns: the non-crowd annotations considered (dataset order).
        gt_found: ``(G,)`` bool, matched by a prediction.
        preds: the predictions considered (score >= ``score_thresh``), input order.
        pred_gt: ``(P,)`` int64 index into ``gt_anns`` of each prediction's match, -1 unmatched.
        iou, score_thresh, same_class: the settings.
    """

    ground: GroundTruth
    gt_anns: list[dict[str, Any]]
    gt_found: np.ndarray
    preds: list[dict[str, Any]]
    pred_gt: np.ndarray
    iou: float
    score_thresh: float
    same_class: bool


def operating_match(
    ground: GroundTruth,
    kept: Sequence[dict[str, Any]],
    iou: float = 0.5,
    score_thresh: float = 0.5,
    same_class: bool = True,
    image_ids: set[int] | None = None,
) -> OperatingMatch:
    """Predictions scoring >= ``score_thresh`` matched one-to-one to non-crowd instances at IoU >=
    ``iou`` (optimal assignment per image, and per class when ``same_class``).

    Args:
        ground, kept: from :func:`cellkit.evaluation.inputs.prepare`.
        image_ids: only these images (None: all).
    """
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
        r, c, _ = match_masks([preds[i]["segmentation"] for i in pi], [gt_rle(gt_anns[j], images) for j in gi], iou)
        for a, b in zip(r, c):
            pred_gt[pi[a]] = gi[b]
            gt_found[gi[b]] = True
    return OperatingMatch(ground, gt_anns, gt_found, preds, pred_gt, float(iou), float(score_thresh), same_class)


def confusion_matrix(
    gt: Any,
    predictions: Any,
    iou: float = 0.5,
    score_thresh: float = 0.5,
    num_classes: int | None = None,
) -> np.ndarray:
    """Class confusion of matched cells: predictions matched to instances of *any* class.

    Predictions scoring at least ``score_thresh`` are matched one-to-one to the instances of their
    image, whatever the classes, at mask IoU >= ``iou`` (optimal assignment, as
    :func:`cellkit.evaluation.cellmetrics.match_masks`).

    Returns:
        ``(C + 1, C + 1)`` int64, ``C = num_classes``: ``[g - 1, p - 1]`` counts instances of
        class g matched by a prediction of class p; the last row (``background``) counts unmatched
        predictions by predicted class, the last column (``missed``) unmatched instances by class.
        Row ``g - 1`` sums to the instances of class g, column ``p - 1`` to the predictions of
        class p; the corner is 0.
    """
    ground, kept, _ = prepare(gt, predictions, num_classes)
    return confusion_from(operating_match(ground, kept, iou, score_thresh, same_class=False), ground.num_classes)


def confusion_from(om: OperatingMatch, num_classes: int) -> np.ndarray:
    """:func:`confusion_matrix` of a class-agnostic :class:`OperatingMatch` (``same_class=False``)."""
    if om.same_class:
        raise CellkitError("a confusion matrix needs a class-agnostic matching (same_class=False)")
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
                 "n_gt": int(self.n_gt[k, b]), "n_found": int(self.n_found[k, b]), "recall": nan_to_none(rec[k, b])}
                for k, c in enumerate(self.classes) for b in range(len(labels))]

    def format(self) -> str:
        """A table: one row per bin, recall (and instance count) per class."""
        labels, rec = self.bin_labels(), self.recall
        lines = [f"Recall by cell area (px^2) at IoU {self.iou:g}, score >= {self.score_thresh:g}",
                 "  " + f"{'area':<12}" + "".join(f"{c:>16}" for c in self.classes)]
        for b, lab in enumerate(labels):
            lines.append("  " + f"{lab:<12}" + "".join(
                f"{fmt(rec[k, b], '.3f'):>8} ({self.n_gt[k, b]:>4d})" for k in range(len(self.classes))))
        return "\n".join(lines)


def recall_by_size(
    gt: Any,
    predictions: Any,
    bins: Sequence[float] = DEFAULT_SIZE_BINS,
    iou: float = 0.5,
    score_thresh: float = 0.5,
    num_classes: int | None = None,
) -> SizeRecall:
    """Recall of ground-truth instances by their area (the annotation's ``area``, px^2).

    An instance is found when a prediction of its class scoring at least ``score_thresh`` matches
    it one-to-one at mask IoU >= ``iou`` (the matching of ``cell_metrics``).

    Args:
        bins: increasing bin edges; areas outside ``[bins[0], bins[-1])`` are not counted.
    """
    ground, kept, _ = prepare(gt, predictions, num_classes)
    return recall_by_size_from(operating_match(ground, kept, iou, score_thresh), bins)


def recall_by_size_from(om: OperatingMatch, bins: Sequence[float] = DEFAULT_SIZE_BINS) -> SizeRecall:
    """:func:`recall_by_size` of a same-class :class:`OperatingMatch`."""
    edges = np.asarray(bins, np.float64)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise CellkitError(f"bins must be at least two increasing edges, got {list(bins)}")
    ground = om.ground
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
    return SizeRecall(edges, ["all", *(names[k] for k in cat_ids)], n_gt, n_found, om.iou, om.score_thresh)


# --------------------------------------------------------------------------------------------
# per image


@dataclass(kw_only=True)
class ImageScore(ClassCounts):
    """Operating-point counts of one image (one-to-one matching within each class): ``tp``, ``fp``,
    ``fn`` and the ratios of :class:`~cellkit.evaluation.cellmetrics.ClassCounts` (NaN where undefined)."""

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
        return f"{head}\nF1 {fmt(self.f1, '.2f')}: TP {self.tp}, FP {self.fp}, FN {self.fn}"


def per_image(
    gt: Any,
    predictions: Any,
    iou: float = 0.5,
    score_thresh: float = 0.5,
    num_classes: int | None = None,
) -> list[ImageScore]:
    """TP/FP/FN, precision, recall and F1 of every ground-truth image, worst first.

    Matching as in ``cell_metrics`` (same-class, one-to-one, IoU >= ``iou``, score >=
    ``score_thresh``), so the counts sum to its overall counts.

    Returns:
        One :class:`ImageScore` per image, sorted by F1 ascending, ties by more errors (FP + FN)
        first, then by image id; images with neither instances nor predictions (F1 NaN) last.
    """
    ground, kept, _ = prepare(gt, predictions, num_classes)
    return per_image_from(operating_match(ground, kept, iou, score_thresh))


def per_image_from(om: OperatingMatch) -> list[ImageScore]:
    """:func:`per_image` of a same-class :class:`OperatingMatch`."""
    ground = om.ground
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


def status_entries(
    gt: Any,
    predictions: Any,
    image_id: int,
    iou: float = 0.5,
    score_thresh: float = 0.5,
    num_classes: int | None = None,
) -> list[dict[str, Any]]:
    """The cells of one image by status: TP and FP predictions, FN ground truth.

    Matching as in :func:`per_image`. Draw them with ``cellkit.viz.overlay.instances_from_coco``
    and ``render(image, instances, color_by="status")`` (TP green, FP red, FN blue).

    Returns:
        COCO-style dicts (``segmentation`` RLE, ``category_id``, ``score``, ``status``) with status
        ``"fn"`` (ground truth, score 1), ``"fp"`` and ``"tp"`` (predictions), in that order.
    """
    ground, kept, _ = prepare(gt, predictions, num_classes)
    om = operating_match(ground, kept, iou, score_thresh, image_ids={int(image_id)})
    return status_entries_from(om, image_id)


def status_entries_from(om: OperatingMatch, image_id: int) -> list[dict[str, Any]]:
    """:func:`status_entries` of one image from a same-class :class:`OperatingMatch`."""
    images = om.ground.images
    if int(image_id) not in images:
        raise CellkitError(f"image id {image_id} is not in the ground truth")
    img = int(image_id)
    fn = [{"segmentation": gt_rle(a, images), "category_id": int(a["category_id"]), "score": 1.0, "status": "fn"}
          for j, a in enumerate(om.gt_anns) if not om.gt_found[j] and int(a["image_id"]) == img]
    fp = [dict(p, status="fp") for i, p in enumerate(om.preds) if om.pred_gt[i] < 0 and p["image_id"] == img]
    tp = [dict(p, status="tp") for i, p in enumerate(om.preds) if om.pred_gt[i] >= 0 and p["image_id"] == img]
    return fn + fp + tp


# --------------------------------------------------------------------------------------------
# helpers
