"""Is a difference real? Paired bootstrap comparisons, replicated runs (seeds), and Holm's correction.

Two sets of predictions of the same images are compared on the *same* bootstrap draws of those
images (:mod:`cellkit.evaluation.bootstrap`): each draw scores both, and the differences of the
draws give the 95 % interval of the difference and a two-sided p-value. Pairing removes what the
choice of images does to both alike, so a real difference shows with far fewer images than the
two separate intervals would need.

Runs that repeat a configuration with other seeds are replicates: a configuration's score is the
mean over its seeds, and its uncertainty holds both sources at once by a two-stage (hierarchical)
bootstrap: each draw takes the images (shared by every configuration, so comparisons stay
paired) and, per configuration, its seeds with replacement (:func:`replicate_draws`). With three
seeds the seed stage resamples only three values, so its spread is a little too narrow
(``(S - 1) / S`` of the variance); with one seed it holds no seed variation at all.

Comparing several configurations with a baseline makes several tests at once; :func:`holm`
corrects their p-values (Holm 1979, step-down) so that the chance of calling any equal pair
different stays at most ``alpha``. statsmodels' ``multipletests(method="holm")`` computes the
same; it is not a dependency for these few lines.

No torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import CellkitError
from .bootstrap import LEVEL, nanmean, percentile_interval
from .coco import EvalResult

__all__ = [
    "ALPHA", "BETTER", "NOT_DISTINGUISHABLE", "Difference", "bootstrap_p_value", "compare_results", "difference",
    "holm", "replicate_draws",
]

ALPHA = 1.0 - LEVEL
"""The error rate of a verdict (0.05): a 95 % interval that excludes 0, or a (corrected) p-value below it."""
NOT_DISTINGUISHABLE = "not distinguishable"
BETTER = "{} better"


@dataclass
class Difference:
    """``B - A`` of one score, with its bootstrap distribution over paired draws.

    Attributes:
        a, b: the two point estimates (A and B on all images; means over seeds for replicates).
        estimate: ``b - a``.
        interval: the 95 % interval of the difference ``(lo, hi)``.
        p_value: two-sided bootstrap p-value of "no difference" (:func:`bootstrap_p_value`).
        p_adjusted: the p-value after a correction for several comparisons (None: one comparison).
        samples: ``(B,)`` the difference in every draw.
    """

    a: float
    b: float
    estimate: float
    interval: tuple[float, float]
    p_value: float
    p_adjusted: float | None = None
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def p(self) -> float:
        """The p-value a verdict uses: the adjusted one when there is one."""
        return self.p_value if self.p_adjusted is None else self.p_adjusted

    @property
    def distinguishable(self) -> bool:
        """Whether the difference is real at :data:`ALPHA`: the interval excludes 0 (one comparison)
        or the corrected p-value is below :data:`ALPHA` (several)."""
        if not np.isfinite(self.estimate):
            return False
        if self.p_adjusted is not None:
            return self.p_adjusted < ALPHA
        lo, hi = self.interval
        return bool(lo > 0 or hi < 0)

    def verdict(self, names: Sequence[str] = ("A", "B")) -> str:
        """``"B better"``, ``"A better"`` (with the given names) or ``"not distinguishable"``."""
        if not self.distinguishable:
            return NOT_DISTINGUISHABLE
        return BETTER.format(names[1] if self.estimate > 0 else names[0])

    def to_dict(self) -> dict[str, float | list[float] | None]:
        """Plain numbers: ``a, b, diff, diff_ci [lo, hi], p_value, p_adjusted``."""
        return {"a": _num(self.a), "b": _num(self.b), "diff": _num(self.estimate),
                "diff_ci": [_num(v) for v in self.interval], "p_value": _num(self.p_value),
                "p_adjusted": _num(self.p_adjusted)}


def _num(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def difference(a: float, b: float, samples_a: np.ndarray, samples_b: np.ndarray, level: float = LEVEL) -> Difference:
    """``B - A`` from the two scores' values on the same draws.

    Args:
        a, b: the point estimates.
        samples_a, samples_b: ``(B,)`` float64, the scores of A and B in the same draws (NaN: a
            draw without ground truth, left out).
        level: of the interval.
    """
    sa, sb = np.asarray(samples_a, dtype=np.float64), np.asarray(samples_b, dtype=np.float64)
    if sa.shape != sb.shape:
        raise CellkitError(f"paired samples must have the same draws, got {sa.shape} and {sb.shape}")
    d = sb - sa
    return Difference(float(a), float(b), float(b) - float(a), percentile_interval(d, level), bootstrap_p_value(d),
                      samples=d)


def compare_results(result_a: EvalResult, result_b: EvalResult, score: str = "ap50") -> Difference:
    """``B - A`` of ``score`` (``"ap50"``, ``"ap"``, ``"ap75"``) between two evaluations of the same
    images that were bootstrapped with the same draws (the same number of draws and seed:
    :func:`~cellkit.evaluation.coco.coco_evaluate` with ``bootstrap`` and ``bootstrap_seed``).

    Raises:
        CellkitError: an evaluation without a bootstrap, other images, or other draws.
    """
    ba, bb = result_a.bootstrap, result_b.bootstrap
    if ba is None or bb is None or result_a.matches is None or result_b.matches is None:
        raise CellkitError("a paired comparison needs both evaluations bootstrapped (bootstrap > 0)")
    if not np.array_equal(result_a.matches.image_ids, result_b.matches.image_ids):
        raise CellkitError("a paired comparison needs the same images in both evaluations")
    if ba.draws.shape != bb.draws.shape or not np.array_equal(ba.draws, bb.draws):
        raise CellkitError("a paired comparison needs the same bootstrap draws (the same bootstrap and seed)")
    return difference(getattr(result_a, score), getattr(result_b, score), ba.samples[score], bb.samples[score],
                      ba.level)


def bootstrap_p_value(diff_samples: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from the bootstrap distribution of a difference:
    twice the smaller share of draws at or beyond 0 on either side, each counted as
    ``(k + 1) / (B + 1)`` so that it is never 0; at most 1.

    The 95 % percentile interval excludes 0 about when this is below 0.05.
    """
    d = np.asarray(diff_samples, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    n = d.size
    below = (np.count_nonzero(d <= 0) + 1) / (n + 1)
    above = (np.count_nonzero(d >= 0) + 1) / (n + 1)
    return float(min(1.0, 2.0 * min(below, above)))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979): sorted ascending, the i-th smallest (from 0)
    is multiplied by ``m - i``, made non-decreasing and capped at 1; a hypothesis is rejected at
    ``alpha`` when its adjusted p-value is below it. NaN stays NaN and does not count in ``m``.

    Args:
        p_values: ``m`` p-values in any order.

    Returns:
        ``(m,)`` float64, the adjusted p-values in the input order.
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="mergesort")]
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adjusted, 1.0)
    return out


def replicate_draws(run_samples: np.ndarray, seed: int = 0) -> np.ndarray:
    """The mean over replicated runs (seeds) in each draw, with the seeds drawn again with replacement
    in every draw (the second stage of a hierarchical bootstrap; the images are the first).

    Args:
        run_samples: ``(S, B)`` one row per seed: that run's score in each of the B image draws.
        seed: of the seed draws.

    Returns:
        ``(B,)`` float64 (the row itself for ``S = 1``).
    """
    x = np.asarray(run_samples, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise CellkitError(f"run_samples must be (seeds, draws), got {x.shape}")
    S, B = x.shape
    if S == 1:
        return x[0].copy()
    pick = np.random.default_rng(seed).integers(0, S, size=(B, S))
    return nanmean(x[pick, np.arange(B)[:, None]], axis=1)
