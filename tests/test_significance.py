"""Holm's correction on published reference values, the bootstrap p-value, the seed stage of the
hierarchical bootstrap, and paired differences of real evaluations."""
from __future__ import annotations

import numpy as np
import pytest
from perturb import perturb_predictions

from cellkit.errors import CellkitError
from cellkit.evaluation.coco import coco_evaluate
from cellkit.evaluation.significance import (
    NOT_DISTINGUISHABLE,
    bootstrap_p_value,
    compare_results,
    difference,
    holm,
    replicate_draws,
)

# R multtest's mt.rawp2adjp, as statsmodels tests multipletests(method="holm") against it:
# statsmodels/stats/tests/test_multi.py, pval0 and res_multtest1 (columns rawp, Bonferroni, Holm, ...)
PVAL0 = [0.838541367553, 0.642193923795, 0.680845947633, 0.967833824309, 0.71626938238, 0.177096952723,
         5.23656777208e-005, 0.0202732688798, 0.00028140506198, 0.0149877310796]
RAW_SORTED = [5.2365677720800003e-05, 2.8140506198000000e-04, 1.4987731079600001e-02, 2.0273268879800001e-02,
              1.7709695272300000e-01, 6.4219392379499995e-01, 6.8084594763299999e-01, 7.1626938238000004e-01,
              8.3854136755300002e-01, 9.6783382430900000e-01]
HOLM_SORTED = [5.2365677720800005e-04, 2.5326455578199999e-03, 1.1990184863680001e-01, 1.4191288215860001e-01,
               1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_holm_reproduces_the_published_values() -> None:
    assert holm(RAW_SORTED) == pytest.approx(HOLM_SORTED, abs=1e-15)
    # in the input order, whatever it is
    adjusted = holm(PVAL0)
    order = np.argsort(PVAL0)
    assert adjusted[order] == pytest.approx(HOLM_SORTED, abs=1e-15)
    # the textbook example (Holm 1979 as Wikipedia works it): 0.01, 0.04, 0.03, 0.005 at alpha 0.05
    # rejects the hypotheses of 0.005 and 0.01 only; adjusted 4 * 0.005, 3 * 0.01, then max(2 * 0.03, 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert list(holm([0.01, 0.04, 0.03, 0.005]) < 0.05) == [True, False, False, True]
    # NaN stays out of the count
    assert holm([0.01, float("nan"), 0.02]) == pytest.approx([0.02, float("nan"), 0.02], nan_ok=True)
    assert holm([0.02]) == pytest.approx([0.02]) and holm([]).shape == (0,)


def test_bootstrap_p_value() -> None:
    assert bootstrap_p_value(np.zeros(1000)) == 1.0  # identical: no evidence at all
    assert bootstrap_p_value(np.full(999, 0.1)) == pytest.approx(2 / 1000)  # never below 0: the smallest possible
    d = np.concatenate([np.full(30, -0.01), np.full(970, 0.05)])
    assert bootstrap_p_value(d) == pytest.approx(2 * 31 / 1001)
    assert bootstrap_p_value(-d) == bootstrap_p_value(d)  # two-sided
    assert np.isnan(bootstrap_p_value(np.array([np.nan])))


def test_the_seed_stage_of_the_hierarchical_bootstrap() -> None:
    rng = np.random.default_rng(0)
    runs = rng.normal(size=(3, 4000)) * 0.01 + np.array([[0.5], [0.6], [0.7]])  # 3 seeds, 4000 image draws
    one = replicate_draws(runs[:1], seed=1)
    assert np.array_equal(one, runs[0])  # one seed: the image draws alone
    mixed = replicate_draws(runs, seed=1)
    assert mixed.mean() == pytest.approx(0.6, abs=0.005)
    # the seeds' spread is in it: the variance of a mean of 3 seeds drawn from (0.5, 0.6, 0.7)
    seed_var = np.var([0.5, 0.6, 0.7]) / 3
    assert mixed.var() == pytest.approx(seed_var + 0.01**2 / 3, rel=0.15)
    assert np.array_equal(replicate_draws(runs, seed=1), mixed)  # seeded
    with pytest.raises(CellkitError):
        replicate_draws(np.zeros(5))


def test_paired_differences_of_real_evaluations(synth_gt: dict) -> None:
    a = perturb_predictions(synth_gt, seed=1, fp_per_image=5)
    rng = np.random.default_rng(0)
    worse = [p for p in a if rng.random() < 0.5]  # half the predictions dropped
    ra = coco_evaluate(synth_gt, a, bootstrap=500)
    rb = coco_evaluate(synth_gt, worse, bootstrap=500)
    d = compare_results(ra, rb)
    assert d.estimate == pytest.approx(rb.ap50 - ra.ap50) and d.estimate < 0
    assert d.interval[1] < 0 and d.p_value < 0.05 and d.verdict(("full", "half")) == "full better"
    # pairing: the interval of the difference is narrower than the two intervals side by side suggest
    assert d.interval[1] - d.interval[0] < (ra.interval()[1] - ra.interval()[0]) + (rb.interval()[1] - rb.interval()[0])
    same = compare_results(ra, coco_evaluate(synth_gt, a, bootstrap=500))
    assert same.interval == (0.0, 0.0) and same.p_value == 1.0 and same.verdict() == NOT_DISTINGUISHABLE
    # a Holm-adjusted p-value decides when there is one
    d.p_adjusted = 0.2
    assert d.verdict() == NOT_DISTINGUISHABLE
    with pytest.raises(CellkitError, match="same bootstrap draws"):
        compare_results(ra, coco_evaluate(synth_gt, a, bootstrap=500, bootstrap_seed=1))
    with pytest.raises(CellkitError, match="bootstrapped"):
        compare_results(ra, coco_evaluate(synth_gt, a))
    with pytest.raises(CellkitError, match="same draws"):
        difference(0.1, 0.2, np.zeros(3), np.zeros(4))
