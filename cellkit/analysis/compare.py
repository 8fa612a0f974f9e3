"""Two training runs (e.g. two cells of an ablation grid) compared cell by cell on their validation split.

::

    from cellkit.analysis.compare import compare_runs

    cmp = compare_runs("runs/grids/g/resnet18/run", "runs/grids/g/mobilenet_v3_large/run")
    print(cmp.format())            # AP50 of each with its interval, the difference with its paired
                                   # interval and a verdict, the part the differing cells explain, counts
    cmp.verdict()                  # "resnet18 better", "mobilenet_v3_large better" or "not distinguishable"
    cmp.by_image(); cmp.table()    # per image, per image and class
    plot_run_comparison(cmp)       # cellkit.viz.compare_plots: the static figure
    comparison_browser(val, cmp)   # cellkit.viz.browser: cells coloured found-by-A / B / both / neither

Each run's best-epoch validation predictions (``val_predictions.json``) are compared against its
``val_gt.json``; the two ground truths must be the same split (runs evaluated on other images are
refused). ``split="holdout"`` compares the hold-out predictions instead (``data.holdout_fraction``:
scored once, not used to choose the epoch). The computation is
:func:`cellkit.evaluation.compare.compare_predictions` (no torch); the verdict comes from a
paired bootstrap over the same images (:mod:`cellkit.evaluation.significance`).
"""
from __future__ import annotations

import os
from typing import Sequence

from ..errors import DataError
from ..evaluation.compare import RunComparison, check_same_split, compare_predictions
from ..evaluation.inputs import load_ground_truth
from ..runs import RunDir, open_run

__all__ = ["compare_runs"]


def compare_runs(
    run_a: str | os.PathLike[str],
    run_b: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    iou: float = 0.5,
    bootstrap: int | None = None,
    bootstrap_seed: int | None = None,
    split: str = "val",
) -> RunComparison:
    """Compare the validation predictions of two finished runs: AP50 of each, the difference with a
    paired bootstrap 95 % interval and a verdict, and cell by cell.

    Args:
        run_a, run_b: run directories (``config.yaml``, ``val_gt.json``, ``val_predictions.json``),
            or a grid cell's folder ``OUT/<name>`` holding ``run/``.
        names: what to call them (default: the grid cell's name, else the run folder's name).
        iou: the IoU at which a prediction finds a cell.
        bootstrap, bootstrap_seed: draws of the images (default: run A's ``eval.bootstrap`` and
            ``eval.bootstrap_seed``; 0: no interval and no verdict).
        split: ``"val"`` (the best epoch's validation predictions) or ``"holdout"``.

    Raises:
        DataError: a folder that is not a finished run (or has no hold-out split), or runs
            evaluated on different images.
    """
    runs = [open_run(run_a), open_run(run_b)]
    dirs = [r.run_dir for r in runs]
    cfg = runs[0].config
    n = cfg.model.num_classes
    if split == "holdout":
        gt_paths = [RunDir(d).holdout_gt for d in dirs]
        pred_paths = [RunDir(d).predictions(split="holdout") for d in dirs]
        for path in gt_paths + pred_paths:
            if not path.is_file():
                raise DataError(path, "not found: this run has no hold-out split (train with data.holdout_fraction > 0)")
    elif split == "val":
        gt_paths, pred_paths = [r.gt for r in runs], [r.predictions for r in runs]
    else:
        raise DataError(split, "split must be 'val' or 'holdout'")
    gts = [load_ground_truth(p, n) for p in gt_paths]
    check_same_split(gts[0], gts[1], str(gt_paths[0]), str(gt_paths[1]))
    if names is None:
        names = [d.parent.name if d.name == "run" else d.name for d in dirs]
        if names[0] == names[1]:
            names = [f"{names[0]} (A)", f"{names[1]} (B)"]
    return compare_predictions(gts[0], pred_paths[0], pred_paths[1], names, n, cfg.eval.max_dets, cfg.eval.backend, iou,
                               bootstrap=cfg.eval.bootstrap if bootstrap is None else bootstrap,
                               bootstrap_seed=cfg.eval.bootstrap_seed if bootstrap_seed is None else bootstrap_seed)

