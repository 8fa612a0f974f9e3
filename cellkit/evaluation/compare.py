"""Two runs on the same validation split, cell by cell: which ground-truth cells each one finds.

Detection frameworks compare runs by their AP; this says *which cells* make the difference. Each
run's predictions are matched to the ground truth as COCOeval matches them at IoU 0.5 (the AP
matching of :mod:`cellkit.evaluation.tide`: every prediction, greedily in descending score order
within its image and class, top ``max_dets``), and every ground-truth cell gets one of four
categories::

    both      found by A and by B
    a_only    found by A, missed by B
    b_only    found by B, missed by A
    neither   missed by both

counted per image, per class and per image and class (:meth:`RunComparison.table`).

**The AP50 difference these cells explain.** With ``diff = AP50(B) - AP50(A)``, both runs are
evaluated again on the *common* ground truth: the cells found by exactly one run removed, and with
them the predictions that found them (A's matches of ``a_only`` cells and their duplicates, B's of
``b_only`` cells).
What is left differs only in how the two runs rank and how many false positives they make on the
cells they agree about: ``rest = AP50'(B) - AP50'(A)``. Per class, ``explained = diff - rest``;
the total is the mean over the classes (the mean AP50 is a mean over classes, so the parts add
up; a class with no common cell left has ``rest = 0``). When B is A without its predictions of
some cells (their matches and duplicates), ``explained == diff`` exactly.

**Is the difference real?** Both runs are scored on the same bootstrap draws of the images
(:mod:`cellkit.evaluation.significance`): the difference gets its 95 % interval and a verdict,
``B better``, ``A better`` or ``not distinguishable`` (the interval holds 0).

No torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from .coco import DEFAULT_BOOTSTRAP, EvalResult, coco_evaluate
from .inputs import GroundTruth, load_ground_truth, load_predictions, sanitize_predictions
from .significance import NOT_DISTINGUISHABLE, Difference, compare_results
from .tide import Matching, match_prepared

__all__ = ["CATEGORIES", "ImageDiff", "RunComparison", "compare_predictions", "same_split"]

CATEGORIES: tuple[str, ...] = ("both", "a_only", "b_only", "neither")
"""The four categories of a ground-truth cell, in display order."""


@dataclass
class ImageDiff:
    """The four counts of one image (all classes, or one class when ``category_id`` is set)."""

    image_id: int
    file_name: str
    category_id: int | None
    both: int
    a_only: int
    b_only: int
    neither: int

    @property
    def n_gt(self) -> int:
        return self.both + self.a_only + self.b_only + self.neither

    @property
    def n_diff(self) -> int:
        """Cells found by exactly one of the two runs."""
        return self.a_only + self.b_only


@dataclass
class RunComparison:
    """Two runs' predictions against one ground truth, cell by cell (see the module docstring).

    Per-cell arrays have shape ``(G,)`` and follow :attr:`gt_annotations` (the non-crowd
    ground-truth annotations, dataset order).

    Attributes:
        names: the two runs' names (A, B).
        ground: the ground truth.
        gt_annotations: the non-crowd annotations.
        image_id, category_id: int64 per cell.
        found_a, found_b: bool per cell, matched by a prediction of A / B at ``iou``.
        pred_a, pred_b: int64 index of the matching prediction in :attr:`matching_a`/``_b``'s
            entries (-1 when not found).
        result_a, result_b: the COCO segm evaluations of A and B.
        common_a, common_b: their evaluations on the common ground truth.
        matching_a, matching_b: the AP matchings.
        difference: AP50 ``B - A`` with its paired-bootstrap 95 % interval and p-value (None
            without a bootstrap); :meth:`verdict` reads it.
    """

    names: tuple[str, str]
    iou: float
    max_dets: int
    ground: GroundTruth
    gt_annotations: list[dict[str, Any]] = field(repr=False)
    image_id: np.ndarray = field(repr=False)
    category_id: np.ndarray = field(repr=False)
    found_a: np.ndarray = field(repr=False)
    found_b: np.ndarray = field(repr=False)
    pred_a: np.ndarray = field(repr=False)
    pred_b: np.ndarray = field(repr=False)
    result_a: EvalResult = field(repr=False)
    result_b: EvalResult = field(repr=False)
    common_a: EvalResult = field(repr=False)
    common_b: EvalResult = field(repr=False)
    matching_a: Matching = field(repr=False)
    matching_b: Matching = field(repr=False)
    difference: Difference | None = None

    # -- the verdict ------------------------------------------------------------------------
    def verdict(self) -> str:
        """``"<B> better"``, ``"<A> better"`` (the runs' names) or ``"not distinguishable"``: whether
        the paired 95 % interval of the AP50 difference excludes 0 (without a bootstrap: not distinguishable)."""
        return self.difference.verdict(self.names) if self.difference is not None else NOT_DISTINGUISHABLE

    # -- per cell -------------------------------------------------------------------------
    @property
    def category(self) -> np.ndarray:
        """``(G,)`` ``<U7`` str: ``both``, ``a_only``, ``b_only`` or ``neither`` per cell."""
        out = np.full(len(self.found_a), "neither", dtype="<U7")
        out[self.found_a & self.found_b] = "both"
        out[self.found_a & ~self.found_b] = "a_only"
        out[~self.found_a & self.found_b] = "b_only"
        return out

    def cells(self, image_id: int) -> list[dict[str, Any]]:
        """The ground-truth annotations of one image, each with ``status`` set to its category
        (fresh dicts, ready for :func:`cellkit.viz.overlay.instances_from_coco`)."""
        cat = self.category
        return [{**a, "status": str(cat[j]), "score": 1.0} for j, a in enumerate(self.gt_annotations)
                if int(self.image_id[j]) == int(image_id)]

    # -- counts ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """``{"both", "a_only", "b_only", "neither"}`` -> cells over the whole split."""
        cat = self.category
        return {c: int(np.sum(cat == c)) for c in CATEGORIES}

    def counts_by_class(self) -> dict[str, dict[str, int]]:
        """Class name -> :meth:`counts` of that class's cells."""
        cat = self.category
        return {name: {c: int(np.sum((cat == c) & (self.category_id == k))) for c in CATEGORIES}
                for k, name in self.ground.category_names.items() if k in self.ground.category_ids}

    def by_image(self, per_class: bool = False) -> list[ImageDiff]:
        """The counts of every image (and class, with ``per_class``), most differing cells first."""
        cat = self.category
        out = []
        for im in self.ground.dataset["images"]:
            iid = int(im["id"])
            on = self.image_id == iid
            for k in (self.ground.category_ids if per_class else [None]):
                sel = on if k is None else on & (self.category_id == k)
                if k is not None and not sel.any():
                    continue
                n = {c: int(np.sum(cat[sel] == c)) for c in CATEGORIES}
                out.append(ImageDiff(iid, str(im.get("file_name", iid)), k, **n))
        return sorted(out, key=lambda d: (-d.n_diff, -d.n_gt, d.image_id, d.category_id or 0))

    def table(self) -> list[dict[str, Any]]:
        """One row per image and class that has cells: ``image_id, file_name, class, n_gt, both,
        a_only, b_only, neither`` (most differing first)."""
        names = self.ground.category_names
        return [{"image_id": d.image_id, "file_name": d.file_name, "class": names[d.category_id], "n_gt": d.n_gt,
                 "both": d.both, "a_only": d.a_only, "b_only": d.b_only, "neither": d.neither}
                for d in self.by_image(per_class=True)]

    # -- AP50 -----------------------------------------------------------------------------
    @property
    def ap50_a(self) -> float:
        return self.result_a.ap50

    @property
    def ap50_b(self) -> float:
        return self.result_b.ap50

    @property
    def ap50_diff(self) -> float:
        """``AP50(B) - AP50(A)``."""
        return self.ap50_b - self.ap50_a

    def per_class(self) -> dict[str, dict[str, float]]:
        """Class name -> ``{"ap50_a", "ap50_b", "diff", "rest", "explained"}`` (NaN where the class
        has no ground truth)."""
        out = {}
        for name, row in self.result_a.per_class.items():
            a, b = row["ap50"], self.result_b.per_class[name]["ap50"]
            ca = self.common_a.per_class.get(name, {}).get("ap50", float("nan"))
            cb = self.common_b.per_class.get(name, {}).get("ap50", float("nan"))
            diff = b - a
            rest = cb - ca if math.isfinite(ca) and math.isfinite(cb) else 0.0
            out[name] = {"ap50_a": a, "ap50_b": b, "diff": diff, "rest": rest if math.isfinite(diff) else float("nan"),
                         "explained": diff - rest}
        return out

    @property
    def explained(self) -> float:
        """The part of :attr:`ap50_diff` the cells found by only one run account for."""
        vals = [v["explained"] for v in self.per_class().values() if math.isfinite(v["explained"])]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def rest(self) -> float:
        """The rest of the difference: ranking and false positives on the cells both agree on."""
        return self.ap50_diff - self.explained

    # -- output ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain numbers (JSON): names, AP50s, difference, explained part, counts, per class, per image."""
        return {
            "names": list(self.names), "iou": self.iou, "max_dets": self.max_dets,
            "ap50_a": self.ap50_a, "ap50_b": self.ap50_b, "ap50_diff": self.ap50_diff,
            "ap50_a_ci": _ci(self.result_a.interval("ap50")), "ap50_b_ci": _ci(self.result_b.interval("ap50")),
            "ap50_diff_ci": _ci(self.difference.interval) if self.difference is not None else None,
            "p_value": self.difference.p_value if self.difference is not None else None,
            "verdict": self.verdict(), "n_images": self.result_a.n_images,
            "explained": self.explained, "rest": self.rest, "counts": self.counts(),
            "counts_by_class": self.counts_by_class(), "per_class": self.per_class(), "table": self.table(),
        }

    def format(self, max_images: int = 10) -> str:
        """A text summary: AP50s, the explained difference, counts per class, the most differing images."""
        a, b = self.names
        c = self.counts()
        d = self.difference
        diff = f"{self.ap50_diff:+.4f}" + (f" [{d.interval[0]:+.2f}, {d.interval[1]:+.2f}]" if d is not None else "")
        lines = [
            f"A = {a}: AP50 {self.result_a.with_interval('ap50')}    "
            f"B = {b}: AP50 {self.result_b.with_interval('ap50')}",
            f"B - A = {diff}: {self.verdict()}"
            + (f" (paired bootstrap over the same {self.result_a.n_images} images, {len(d.samples)} draws, "
               f"p = {d.p_value:.3f})" if d is not None else " (no bootstrap: eval.bootstrap is 0)"),
            f"cells found by one run only explain {self.explained:+.4f}; ranking and false positives on the "
            f"cells both find or miss: {self.rest:+.4f}",
            f"{sum(c.values())} cells: both {c['both']}, {a} only {c['a_only']}, {b} only {c['b_only']}, "
            f"neither {c['neither']}",
            "",
            f"{'class':<10} {'both':>6} {'A only':>7} {'B only':>7} {'neither':>8} {'AP50 A':>8} {'AP50 B':>8} "
            f"{'explained':>10}",
        ]
        per = self.per_class()
        for name, n in self.counts_by_class().items():
            if not sum(n.values()):
                continue
            p = per.get(name, {})
            lines.append(f"{name:<10} {n['both']:>6} {n['a_only']:>7} {n['b_only']:>7} {n['neither']:>8} "
                         f"{_f(p.get('ap50_a')):>8} {_f(p.get('ap50_b')):>8} {_f(p.get('explained'), '+.4f'):>10}")
        diffs = [d for d in self.by_image() if d.n_diff][:max_images]
        if diffs:
            lines += ["", "images with the most cells found by one run only:"]
            lines += [f"  {d.file_name}: {a} only {d.a_only}, {b} only {d.b_only} (of {d.n_gt})" for d in diffs]
        return "\n".join(lines)


def compare_predictions(
    gt: Any,
    predictions_a: Any,
    predictions_b: Any,
    names: Sequence[str] = ("A", "B"),
    num_classes: int | None = None,
    max_dets: int = 1000,
    backend: str = "auto",
    iou: float = 0.5,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    bootstrap_seed: int = 0,
) -> RunComparison:
    """Compare two sets of predictions of the same images cell by cell (see the module docstring).

    Args:
        gt: COCO ground truth with masks (json path, dict, pycocotools ``COCO``, ``GroundTruth``).
        predictions_a, predictions_b: COCO result dicts with RLE masks, or json paths to lists of them.
        names: what to call the two runs.
        num_classes: categories ``1..num_classes`` (None: the ground truth's categories).
        max_dets: detections per image and class COCOeval keeps (as ``eval.max_dets``).
        backend: COCOeval implementation (``"auto"``, ``"pycocotools"``, ``"faster_coco_eval"``).
        iou: the IoU at which a prediction finds a cell (0.5: the scored metric).
        bootstrap, bootstrap_seed: draws of the images (the same for both runs) for the intervals
            and the verdict (0: none), and their seed.

    Raises:
        DataError: unreadable ground truth or predictions.
    """
    ground = load_ground_truth(gt, num_classes, need_masks=True)
    kept = []
    for preds in (predictions_a, predictions_b):
        k, dropped = sanitize_predictions(load_predictions(preds), ground.images, num_classes, "segm",
                                          ground.category_ids)
        kept.append((k, dropped))
    ma = match_prepared(ground, kept[0][0], kept[0][1], iou_fg=iou, iou_bg=min(0.1, iou), max_dets=max_dets)
    mb = match_prepared(ground, kept[1][0], kept[1][1], iou_fg=iou, iou_bg=min(0.1, iou), max_dets=max_dets)
    found_a, found_b = ma.gt_kind == "tp", mb.gt_kind == "tp"
    pred_a = np.where(found_a, ma.gt_pred_index, -1)
    pred_b = np.where(found_b, mb.gt_pred_index, -1)
    only_a, only_b = found_a & ~found_b, found_b & ~found_a

    def ap(g: Any, p: list[dict[str, Any]], draws: int = 0) -> EvalResult:
        return coco_evaluate(g, p, "segm", max_dets, backend, num_classes,  # type: ignore[arg-type]
                             bootstrap=draws, bootstrap_seed=bootstrap_seed)

    result_a, result_b = ap(ground, ma.entries, bootstrap), ap(ground, mb.entries, bootstrap)
    diff = compare_results(result_a, result_b) if bootstrap else None
    removed = {id(a) for a, gone in zip(ma.gt_annotations, only_a | only_b) if gone}
    data = ground.dataset
    common = {"images": data["images"], "categories": data["categories"],
              "annotations": [a for a in data["annotations"] if id(a) not in removed]}
    drop_a, drop_b = _finders(ma, only_a), _finders(mb, only_b)
    common_a = ap(common, [e for i, e in enumerate(ma.entries) if i not in drop_a])
    common_b = ap(common, [e for i, e in enumerate(mb.entries) if i not in drop_b])
    return RunComparison(
        names=(str(names[0]), str(names[1])), iou=float(iou), max_dets=int(max_dets), ground=ground,
        gt_annotations=ma.gt_annotations, image_id=ma.gt_image_id, category_id=ma.gt_category_id,
        found_a=found_a, found_b=found_b, pred_a=pred_a, pred_b=pred_b, result_a=result_a, result_b=result_b,
        common_a=common_a, common_b=common_b, matching_a=ma, matching_b=mb, difference=diff,
    )


def _finders(m: Matching, cells: np.ndarray) -> set[int]:
    """Predictions that found one of ``cells`` (its match) or repeat it (its duplicates)."""
    hit = (m.gt_index >= 0) & np.isin(m.kind, ("tp", "dupe"))
    return {int(i) for i in np.flatnonzero(hit) if cells[m.gt_index[i]]}


def same_split(gt_a: GroundTruth, gt_b: GroundTruth) -> str | None:
    """Why two ground truths are not the same validation split (None when they are): image ids,
    sizes, and each image's cells (class and area) must agree."""
    def key(g: GroundTruth) -> tuple[Any, Any]:
        images = sorted((int(im["id"]), int(im["height"]), int(im["width"])) for im in g.dataset["images"])
        cells = sorted((int(a["image_id"]), int(a["category_id"]), round(float(a["area"]), 3))
                       for a in g.dataset["annotations"] if not a.get("iscrowd", 0))
        return images, cells

    (ia, ca), (ib, cb) = key(gt_a), key(gt_b)
    if ia != ib:
        only_a = sorted({i[0] for i in ia} - {i[0] for i in ib})[:5]
        only_b = sorted({i[0] for i in ib} - {i[0] for i in ia})[:5]
        return (f"different images ({len(ia)} vs {len(ib)}; only in A: {only_a or '-'}, only in B: {only_b or '-'}, "
                f"or the same ids with other sizes)")
    if ca != cb:
        return f"the same images with different cells ({len(ca)} vs {len(cb)} annotations)"
    return None


def _ci(interval: Any) -> list[float] | None:
    return None if interval is None else [float(v) for v in interval]


def _f(x: Any, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def check_same_split(gt_a: GroundTruth, gt_b: GroundTruth, where_a: str, where_b: str) -> None:
    """Raise :class:`DataError` unless the two ground truths are the same split."""
    why = same_split(gt_a, gt_b)
    if why:
        raise DataError(where_b, f"not the validation split of {where_a}: {why}; compare runs validated on the "
                                 "same images (same data.root, data.val_fraction, data.split_seed)")
