"""The uncertainty of a COCO score: a bootstrap over images, re-accumulated from COCOeval's own matching.

A validation split of a few images gives a score that moves with the choice of images. Drawing
the images again with replacement (the bootstrap) and scoring each draw shows how much: the
2.5 and 97.5 percentiles of the drawn scores are the 95 % interval (the percentile bootstrap).

Scoring a draw does not match anything again. ``COCOeval.evaluate()`` matches every image once
(``evalImgs``: per image and class, each detection's score and, per IoU threshold, whether it
found a ground-truth cell); an image drawn twice contributes its detections and its cells twice.
:class:`ImageMatches` holds that matching for the area range "all", and
:meth:`ImageMatches.class_ap` re-runs ``COCOeval.accumulate()``'s computation (the detections of
the drawn images in descending score order, the precision envelope, precision at the 101 recall
thresholds) for a whole batch of draws at once with numpy:

* detections are weighted by how often their image was drawn, in one global order (score
  descending, then image, then rank in the image: accumulate's stable sort), so each draw is a
  weighted cumulative sum instead of a new sort;
* the interpolated precision at a recall threshold is the largest precision at or after the first
  detection that reaches it, and that largest precision is always at a true positive, so only the
  true positives' cumulative counts are formed, per IoU threshold.

For an image drawn ``c`` times the result is what COCOeval gives on a dataset holding ``c``
copies of it (new image ids, in the order of the draw), to rounding (tests/test_bootstrap.py
checks that for every draw). The one exception is a tie in score between detections of the same
image that is drawn more than once: COCOeval orders such ties copy by copy, the weights
detection by detection; with continuous scores it does not occur.

The draws are made here (``numpy.random.default_rng(seed)``), not by ``scipy.stats.bootstrap``:
the same draws must score two runs for a paired comparison (:mod:`cellkit.evaluation.significance`),
seeds and images are drawn in two stages for replicated runs, and the tests replay each draw with
COCOeval.

No torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import CellkitError

__all__ = [
    "LEVEL", "BootstrapScores", "ImageMatches", "bootstrap_scores", "counts_of", "draw_resamples", "nanmean",
    "percentile_interval", "scores_of_class_ap",
]

LEVEL = 0.95
"""The confidence level of every interval cellkit prints."""

_CHUNK = 1_000_000
"""Draws are processed in batches of about this many (draw, detection) pairs (32 MB per array)."""


@dataclass
class ImageMatches:
    """COCOeval's matching of every image (area range "all", the top ``max_dets`` detections per
    image and class), in the order ``COCOeval.accumulate()`` reads it.

    Attributes:
        image_ids: ``(I,)`` int64, COCOeval's images (sorted ids).
        category_ids: ``(K,)`` int64, COCOeval's categories.
        iou_thresholds: ``(T,)`` float64 (.5:.05:.95).
        recall_thresholds: ``(R,)`` float64 (0:.01:1).
        max_dets: detections per image and class.
        n_gt: ``(K, I)`` int64, ground-truth cells COCOeval counts (not ignored) per class and image.
        image_index: per class, ``(N_k,)`` int64: the image (index into ``image_ids``) of each
            detection, in descending score order (stable over images, then rank within an image).
        tp, ignored: per class, ``(T, N_k)`` bool in that order: found a cell at threshold t;
            ignored at threshold t (matched to a crowd region). The rest are false positives.
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    max_dets: int
    n_gt: np.ndarray
    image_index: list[np.ndarray] = field(repr=False)
    tp: list[np.ndarray] = field(repr=False)
    ignored: list[np.ndarray] = field(repr=False)

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    # -- from COCOeval ------------------------------------------------------------------------
    @classmethod
    def from_cocoeval(cls, E: Any, max_dets: int) -> "ImageMatches":
        """Read the matching of a ``COCOeval`` after ``evaluate()``.

        pycocotools keeps it in ``E.evalImgs`` (a dict or None per class, area and image);
        faster-coco-eval keeps it only when built with ``separate_eval=True``, as C++ objects
        whose pickled state is ``(detection matches (T*D), ground-truth matches (T*G), detection
        scores (D), ground-truth ignores (G), detection ignores (T*D), ...)``.

        Args:
            E: a pycocotools ``COCOeval`` or a faster-coco-eval ``COCOeval_faster`` (``separate_eval=True``)
                on which ``evaluate()`` ran, with the default area ranges (the first is "all").
            max_dets: keep the top this many detections per image and class (at most ``E.params.maxDets[-1]``).

        Raises:
            CellkitError: ``evaluate()`` has not run, or faster-coco-eval's per-image results
                are not in the layout above.
        """
        p = E.params
        cat_ids = np.asarray(p.catIds if p.useCats else [-1], dtype=np.int64)
        img_ids = np.asarray(p.imgIds, dtype=np.int64)
        n_thr = len(p.iouThrs)
        K, I, A = len(cat_ids), len(img_ids), len(p.areaRng)
        if max_dets > max(p.maxDets):
            raise CellkitError(f"max_dets {max_dets} is above COCOeval's largest maxDets {max(p.maxDets)}")
        cpp = getattr(E, "_evalImgs_cpp", None)
        if cpp is not None:
            entries = cpp
            read = _read_faster
        else:
            entries = E.evalImgs
            read = _read_pycocotools
        if not isinstance(entries, list) or len(entries) != K * A * I:
            raise CellkitError("COCOeval's per-image results are missing (evaluate() not run, or faster-coco-eval "
                               "without separate_eval=True)")
        n_gt = np.zeros((K, I), dtype=np.int64)
        image_index, tp, ignored = [], [], []
        for k in range(K):
            scores, images, matched, ign = [], [], [], []
            for i in range(I):
                e = entries[k * A * I + i]  # area range 0: all
                if e is None:
                    continue
                s, dtm, dti, gti = read(e, n_thr)
                s, dtm, dti = s[:max_dets], dtm[:, :max_dets], dti[:, :max_dets]
                n_gt[k, i] = int(np.count_nonzero(gti == 0))
                scores.append(s)
                images.append(np.full(len(s), i, dtype=np.int64))
                matched.append(dtm != 0)
                ign.append(dti)
            if scores:
                s = np.concatenate(scores)
                order = np.argsort(-s, kind="mergesort")  # accumulate()'s order
                image_index.append(np.concatenate(images)[order])
                ig = np.concatenate(ign, axis=1)[:, order]
                tp.append(np.concatenate(matched, axis=1)[:, order] & ~ig)
                ignored.append(ig)
            else:
                image_index.append(np.zeros(0, dtype=np.int64))
                tp.append(np.zeros((n_thr, 0), dtype=bool))
                ignored.append(np.zeros((n_thr, 0), dtype=bool))
        return cls(img_ids, cat_ids, np.asarray(p.iouThrs, dtype=np.float64),
                   np.asarray(p.recThrs, dtype=np.float64), int(max_dets), n_gt, image_index, tp, ignored)

    # -- re-accumulation ----------------------------------------------------------------------
    def class_ap(self, counts: np.ndarray) -> np.ndarray:
        """Per-class AP at every IoU threshold for each draw of images.

        Args:
            counts: ``(B, I)`` non-negative integers: how often draw b holds image i (all ones:
                COCOeval's own numbers).

        Returns:
            ``(B, K, T)`` float64: the mean interpolated precision over the recall thresholds (what
            ``accumulate()`` puts into ``eval["precision"]``, averaged over recall); NaN where
            the draw holds no ground truth of the class.
        """
        counts = np.asarray(counts)
        if counts.ndim != 2 or counts.shape[1] != self.n_images:
            raise CellkitError(f"counts must have shape (draws, {self.n_images}), got {counts.shape}")
        B, K, T = counts.shape[0], len(self.category_ids), len(self.iou_thresholds)
        out = np.full((B, K, T), np.nan)
        npig = counts.astype(np.int64) @ self.n_gt.T  # (B, K)
        weights = counts.astype(np.float64)
        rec = self.recall_thresholds
        for k in range(K):
            rows_k = np.flatnonzero(npig[:, k] > 0)
            if rows_k.size == 0:
                continue
            img, tp, ign = self.image_index[k], self.tp[k], self.ignored[k]
            N = len(img)
            if N == 0:
                out[rows_k, k, :] = 0.0
                continue
            chunk = max(1, _CHUNK // N)
            for start in range(0, rows_k.size, chunk):
                rows = rows_k[start:start + chunk]
                w = weights[rows][:, img]  # (b, N): each detection weighted by how often its image was drawn
                n = npig[rows, k].astype(np.float64)  # (b,)
                need = _min_true_positives(n, rec)  # (b, R)
                b = len(rows)
                row = np.arange(b)[:, None]
                offset = (n.max() + 2.0) * row  # makes the rows of tps one sorted array for one searchsorted
                counted_by_mask: dict[bytes, np.ndarray] = {}
                for t in range(T):
                    valid = ~ign[t]
                    key = valid.tobytes()
                    if key not in counted_by_mask:  # detections counted so far (not ignored); the same for most t
                        counted_by_mask[key] = np.cumsum(w if valid.all() else w * valid, axis=1)
                    pos = np.flatnonzero(tp[t])
                    P = pos.size
                    if P == 0:
                        out[rows, k, t] = 0.0
                        continue
                    tps = np.cumsum(w[:, pos], axis=1)  # (b, P): true positives so far, at each true positive
                    # precision tp / (fp + tp + eps) as accumulate() forms it (fp + tp: every counted
                    # detection so far), with a column of zeros after the last true positive
                    pr = np.zeros((b, P + 1))
                    np.divide(tps, counted_by_mask[key][:, pos] + np.spacing(1), out=pr[:, :P])
                    # first true positive whose recall tps / n reaches each recall threshold (tps >= need)
                    first = np.searchsorted((tps + offset).ravel(), (need + offset).ravel(), side="left")
                    first = first.reshape(b, -1) - P * row  # (b, R) in [0, P]; P: never reached
                    # interpolated precision: the largest precision from there on (the envelope): the
                    # maxima between consecutive thresholds' first positions (the last one up to the
                    # zero column, which an extra boundary per row closes), then a running max from the end
                    bounds = np.concatenate([first, np.full((b, 1), P)], axis=1) + (P + 1) * row
                    seg = np.maximum.reduceat(pr.ravel(), bounds.ravel()).reshape(b, -1)[:, :-1]
                    q = np.maximum.accumulate(seg[:, ::-1], axis=1)[:, ::-1]
                    out[rows, k, t] = q.mean(axis=1)
        return out


def _min_true_positives(n: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``(b, R)``: the least integer m with ``m / n >= threshold`` in float64 division, as
    accumulate() compares recall ``tp / npig`` with each recall threshold."""
    n = n[:, None]
    m = np.ceil(thresholds[None, :] * n)
    m = np.where((m >= 1) & ((m - 1) / n >= thresholds), m - 1, m)
    return np.where(m / n < thresholds, m + 1, m)


# --------------------------------------------------------------------------------------------
# draws and intervals


def draw_resamples(n_images: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """``(n_resamples, n_images)`` int64: image indices drawn with replacement, sorted within each draw
    (the order COCOeval would see copies numbered in the order of the draw)."""
    if n_images < 1 or n_resamples < 1:
        raise CellkitError(f"a bootstrap needs at least one image and one draw, got {n_images} and {n_resamples}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.integers(0, n_images, size=(n_resamples, n_images)), axis=1)


def counts_of(draws: np.ndarray, n_images: int) -> np.ndarray:
    """``(B, n_images)`` int64: how often each draw holds each image (``draws``: ``(B, n)`` indices)."""
    draws = np.asarray(draws, dtype=np.int64)
    B = draws.shape[0]
    flat = draws + n_images * np.arange(B)[:, None]
    return np.bincount(flat.ravel(), minlength=B * n_images).reshape(B, n_images)


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of ``samples`` (NaNs left out;
    ``(nan, nan)`` when nothing is left)."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(x, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


@dataclass
class BootstrapScores:
    """AP50, AP and AP75 (overall and per class) of every draw, and their intervals.

    Attributes:
        n_resamples, seed, level: how the draws were made and the interval's level.
        draws: ``(B, I)`` the drawn image indices (sorted within a draw).
        samples: ``"ap50"``, ``"ap"``, ``"ap75"`` -> ``(B,)`` float64 (NaN: no ground truth in the draw).
        class_samples: the same per class, ``(B, K)`` (NaN: no ground truth of the class in the draw).
        intervals: ``"ap50"``, ``"ap"``, ``"ap75"`` -> ``(lo, hi)``.
        class_intervals: ``"ap50"``, ... -> one ``(lo, hi)`` per class (the order of ``category_ids``).
    """

    n_resamples: int
    seed: int
    level: float
    draws: np.ndarray = field(repr=False)
    samples: dict[str, np.ndarray] = field(repr=False)
    class_samples: dict[str, np.ndarray] = field(repr=False)
    intervals: dict[str, tuple[float, float]]
    class_intervals: dict[str, list[tuple[float, float]]]


def scores_of_class_ap(class_ap: np.ndarray, t50: int = 0, t75: int = 5) -> tuple[dict[str, np.ndarray],
                                                                                     dict[str, np.ndarray]]:
    """Overall and per-class AP50, AP, AP75 from :meth:`ImageMatches.class_ap`'s ``(B, K, T)``:
    means over the classes that have ground truth (as COCO's mean over valid entries)."""
    per_class = {"ap50": class_ap[:, :, t50], "ap": nanmean(class_ap, axis=2), "ap75": class_ap[:, :, t75]}
    overall = {name: nanmean(v, axis=1) for name, v in per_class.items()}
    return overall, per_class


def nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` of the finite entries; NaN where there is none (without numpy's warning)."""
    ok = np.isfinite(x)
    n = ok.sum(axis=axis)
    total = np.where(ok, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def bootstrap_scores(matches: ImageMatches, n_resamples: int, seed: int = 0, level: float = LEVEL,
                     draws: np.ndarray | None = None) -> BootstrapScores:
    """Draw the images ``n_resamples`` times and score every draw (see the module docstring).

    Args:
        matches: the matching of one evaluation.
        n_resamples: draws (1000 gives percentiles stable to about 0.005 on AP50).
        seed: the draws' seed (the same seed, images and predictions give the same interval).
        level: of the intervals.
        draws: ``(B, I)`` image indices to use instead of drawing (e.g. a paired comparison's).
    """
    if draws is None:
        draws = draw_resamples(matches.n_images, n_resamples, seed)
    class_ap = matches.class_ap(counts_of(draws, matches.n_images))
    thr = matches.iou_thresholds
    overall, per_class = scores_of_class_ap(class_ap, int(np.argmin(np.abs(thr - 0.5))),
                                            int(np.argmin(np.abs(thr - 0.75))))
    return BootstrapScores(
        n_resamples=len(draws), seed=int(seed), level=float(level), draws=draws, samples=overall,
        class_samples=per_class,
        intervals={k: percentile_interval(v, level) for k, v in overall.items()},
        class_intervals={k: [percentile_interval(v[:, j], level) for j in range(v.shape[1])]
                         for k, v in per_class.items()},
    )


# --------------------------------------------------------------------------------------------
# reading COCOeval's per-image results


def _read_pycocotools(e: dict[str, Any], n_thr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(e["dtScores"], dtype=np.float64)
    dtm = np.asarray(e["dtMatches"]).reshape(n_thr, len(s))
    dti = np.asarray(e["dtIgnore"], dtype=bool).reshape(n_thr, len(s))
    return s, dtm, dti, np.asarray(e["gtIgnore"]).astype(np.int64)


def _read_faster(e: Any, n_thr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    state: Sequence[Any] = e.__getstate__()
    try:
        dtm, _, scores, gt_ignores, dt_ignores = state[:5]
        s = np.asarray(scores, dtype=np.float64)
        d = len(s)
        if len(dtm) != n_thr * d or len(dt_ignores) != n_thr * d:
            raise ValueError("lengths")
        return (s, np.asarray(dtm, dtype=np.float64).reshape(n_thr, d),
                np.asarray(dt_ignores, dtype=bool).reshape(n_thr, d), np.asarray(gt_ignores).astype(np.int64))
    except (ValueError, TypeError) as err:
        raise CellkitError("faster-coco-eval's per-image results are not in the layout cellkit reads "
                           f"({err}); use eval.backend pycocotools for intervals") from None
