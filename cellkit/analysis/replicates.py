"""Configurations with replicated runs (seeds), each compared with a baseline: the numbers behind a grid's table.

::

    from cellkit.analysis.replicates import compare_configurations

    results = compare_configurations({"resnet18": [("resnet18-seed=0", "OUT/resnet18-seed=0/run"), ...],
                                      "mobilenet": [...]}, baseline="resnet18")
    for c in results:
        print(c.name, c.mean, c.sd, c.interval, c.verdict(), c.difference)

Every run is scored on its split (``val``: the best epoch's ``val_predictions.json``, the split
that chose that epoch; ``holdout``: ``holdout_predictions.json``, scored once) with the same
bootstrap draws of the images, so runs and configurations are paired over images. A
configuration's score is the mean over its runs (seeds); its 95 % interval comes from a two-stage
bootstrap, images then seeds (:func:`cellkit.evaluation.significance.replicate_draws`), so it
holds both sources of variation. Each configuration's difference to the baseline gets a paired
interval and a p-value; the p-values of all comparisons are corrected together with Holm's method,
and a verdict (better, worse, not distinguishable) is claimed only below 0.05 after the correction.

No torch.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..config import EvalConfig, load_config
from ..errors import CellkitError
from ..evaluation.bootstrap import LEVEL, percentile_interval
from ..evaluation.coco import EvalResult, coco_evaluate
from ..evaluation.compare import same_split
from ..evaluation.inputs import load_ground_truth
from ..evaluation.significance import ALPHA, Difference, difference, holm, replicate_draws
from ..progress import bar
from ..runs import RunDir

__all__ = ["ALPHA", "BASELINE", "BETTER", "NOT_COMPARED", "SPLITS", "WORSE", "ConfigurationResult", "RunResult",
           "compare_configurations", "run_files"]

BASELINE, BETTER, WORSE, NOT_COMPARED = "baseline", "better", "worse", "not compared"
SPLITS = ("val", "holdout")


@dataclass
class RunResult:
    """One run scored on a split: its AP50, its own interval over images, and its AP50 in every draw."""

    name: str
    result: EvalResult = field(repr=False)

    @property
    def ap50(self) -> float:
        return self.result.ap50

    @property
    def interval(self) -> tuple[float, float] | None:
        return self.result.interval("ap50")


@dataclass
class ConfigurationResult:
    """One configuration on one split: its runs, the mean over seeds and the comparison with the baseline.

    Attributes:
        name: the configuration.
        split: ``"val"`` or ``"holdout"``.
        runs: its scored runs (seeds), in grid order.
        mean: mean AP50 over the runs; sd: their standard deviation (ddof 1; None with one run).
        interval: 95 % interval of the mean: images and seeds resampled (one run: images only).
        difference: ``this - baseline`` with its paired interval, p-value and Holm-adjusted p-value
            (None for the baseline and for a configuration evaluated on other images).
        is_baseline: whether this is the baseline.
        note: why it was not compared, when it was not.
        samples: ``(B,)`` the mean in every draw.
    """

    name: str
    split: str
    runs: list[RunResult]
    mean: float
    sd: float | None
    interval: tuple[float, float]
    difference: Difference | None = None
    is_baseline: bool = False
    note: str = ""
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def n_seeds(self) -> int:
        return len(self.runs)

    def verdict(self) -> str:
        """``baseline``, ``better``, ``worse``, ``not distinguishable`` (Holm-corrected) or ``not compared``."""
        if self.is_baseline:
            return BASELINE
        d = self.difference
        if d is None:
            return NOT_COMPARED
        if not d.distinguishable:
            return "not distinguishable"
        return BETTER if d.estimate > 0 else WORSE

    def to_dict(self) -> dict[str, Any]:
        """JSON-plain: name, split, seeds, each run's AP50 and interval, mean, sd, interval, the
        difference to the baseline (``diff``, ``diff_ci``, ``p_value``, ``p_holm``) and the verdict."""
        d = self.difference
        return {
            "configuration": self.name, "split": self.split, "n_seeds": self.n_seeds,
            "runs": [r.name for r in self.runs], "ap50_runs": [_num(r.ap50) for r in self.runs],
            "ap50_runs_ci": [_pair(r.interval) for r in self.runs],
            "mean": _num(self.mean), "sd": _num(self.sd), "ci": _pair(self.interval),
            "diff": _num(d.estimate) if d else None, "diff_ci": _pair(d.interval) if d else None,
            "p_value": _num(d.p_value) if d else None, "p_holm": _num(d.p_adjusted) if d else None,
            "verdict": self.verdict(), "note": self.note,
        }


def _num(x: Any) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _pair(x: Any) -> list[float | None] | None:
    return None if x is None else [_num(v) for v in x]


def run_files(run_dir: str | os.PathLike[str], split: str = "val") -> tuple[Path, Path] | None:
    """``(ground truth, predictions)`` of a run's split, or None when the run has not written them."""
    run = RunDir(run_dir)
    if split not in SPLITS:
        raise CellkitError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    gt = run.val_gt if split == "val" else run.holdout_gt
    pred = run.predictions(split=split)
    return (gt, pred) if gt.is_file() and pred.is_file() else None


def compare_configurations(
    groups: Mapping[str, Sequence[tuple[str, str | os.PathLike[str]]]],
    baseline: str | None = None,
    split: str = "val",
    bootstrap: int | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> list[ConfigurationResult]:
    """Score every run of every configuration on ``split`` and compare each configuration with the baseline.

    Args:
        groups: configuration -> its runs as ``(run name, run directory)``; runs without the split's
            files (not finished, or no hold-out) are left out; a configuration left without runs is
            left out too.
        baseline: the configuration to compare with (default: the first).
        split: ``"val"`` or ``"holdout"``.
        bootstrap, seed: draws of the images and their seed (default: the baseline run's
            ``eval.bootstrap`` and ``eval.bootstrap_seed``); each run's ``eval.max_dets`` and
            ``eval.backend`` come from the baseline's first run too, so every run is scored alike.
        progress: a bar over the runs.

    Returns:
        One :class:`ConfigurationResult` per configuration with runs, in the order of ``groups``.

    Raises:
        CellkitError: ``baseline`` is not one of the configurations with runs, or bootstrap is 0.
    """
    found = {name: [(r, Path(d), files) for r, d in runs if (files := run_files(d, split)) is not None]
             for name, runs in groups.items()}
    found = {name: runs for name, runs in found.items() if runs}
    if not found:
        return []
    names = list(found)
    base = baseline if baseline is not None else names[0]
    if base not in found:
        raise CellkitError(f"baseline '{base}' has no finished run with {split} predictions "
                           f"(configurations with runs: {', '.join(names)})")
    first = found[base][0]
    ev = _eval_config(first[1])
    n_boot = ev.bootstrap if bootstrap is None else bootstrap
    boot_seed = ev.bootstrap_seed if seed is None else seed
    if n_boot < 1:
        raise CellkitError("comparing configurations needs a bootstrap (eval.bootstrap > 0)")
    reference = load_ground_truth(first[2][0], None)
    total = sum(len(v) for v in found.values())
    pbar = bar(total=total, desc=f"scoring {split} predictions", enabled=progress, unit="run")
    scored: dict[str, list[tuple[RunResult, bool]]] = {}
    for name, runs in found.items():
        scored[name] = []
        for run_name, _, (gt_path, pred_path) in runs:
            gt = reference if gt_path == first[2][0] else load_ground_truth(gt_path, None)
            same = gt is reference or same_split(reference, gt) is None
            res = coco_evaluate(gt if not same else reference, str(pred_path), "segm", ev.max_dets,
                                ev.backend, None, bootstrap=n_boot, bootstrap_seed=boot_seed)  # type: ignore[arg-type]
            scored[name].append((RunResult(run_name, res), same))
            pbar.update(1)
    pbar.close()

    out: list[ConfigurationResult] = []
    for i, (name, runs) in enumerate(scored.items()):
        results = [r for r, _ in runs]
        comparable = all(same for _, same in runs)
        scores = np.array([r.ap50 for r in results], dtype=np.float64)
        per_run = np.stack([r.result.bootstrap.samples["ap50"] for r in results])  # type: ignore[union-attr]
        samples = replicate_draws(per_run, seed=[boot_seed, 1, i])
        sd = float(np.std(scores, ddof=1)) if len(scores) > 1 else None
        note = "" if comparable else f"evaluated on other {split} images than the baseline: not compared"
        out.append(ConfigurationResult(name, split, results, float(np.mean(scores)), sd,
                                       percentile_interval(samples, LEVEL), is_baseline=name == base, note=note,
                                       samples=samples))
    ref = next(c for c in out if c.is_baseline)
    compared = [c for c in out if not c.is_baseline and not c.note]
    for c in compared:
        c.difference = difference(ref.mean, c.mean, ref.samples, c.samples, LEVEL)
    for c, p in zip(compared, holm([c.difference.p_value for c in compared])):  # type: ignore[union-attr]
        c.difference.p_adjusted = float(p)  # type: ignore[union-attr]
    return out


def _eval_config(run_dir: Path) -> EvalConfig:
    """The run's ``eval`` section (defaults when its config.yaml cannot be read)."""
    try:
        return load_config(RunDir(run_dir).config).eval
    except CellkitError:
        return EvalConfig()

