"""Two training runs (e.g. two cells of an ablation grid) compared cell by cell on their validation split.

::

    from cellkit.analysis.compare import compare_runs

    cmp = compare_runs("runs/grids/g/resnet18/run", "runs/grids/g/mobilenet_v3_large/run")
    print(cmp.format())            # AP50 of each, the difference the differing cells explain, counts
    cmp.by_image(); cmp.table()    # per image, per image and class
    plot_run_comparison(cmp)       # cellkit.viz.compare_plots: the static figure
    comparison_browser(val, cmp)   # cellkit.viz.browser: cells coloured found-by-A / B / both / neither

Each run's best-epoch validation predictions (``val_predictions.json``) are compared against its
``val_gt.json``; the two ground truths must be the same split. The computation is
:func:`cellkit.evaluation.compare.compare_predictions` (no torch).
"""
from __future__ import annotations

import os
from typing import Sequence

from ..evaluation.compare import RunComparison, check_same_split, compare_predictions
from ..evaluation.inputs import load_ground_truth
from ..runs import open_run

__all__ = ["compare_runs"]


def compare_runs(
    run_a: str | os.PathLike[str],
    run_b: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    iou: float = 0.5,
) -> RunComparison:
    """Compare the validation predictions of two finished runs cell by cell.

    Args:
        run_a, run_b: run directories (``config.yaml``, ``val_gt.json``, ``val_predictions.json``),
            or a grid cell's folder ``OUT/<name>`` holding ``run/``.
        names: what to call them (default: the grid cell's name, else the run folder's name).
        iou: the IoU at which a prediction finds a cell.

    Raises:
        DataError: a folder that is not a finished run, or runs validated on different splits.
    """
    runs = [open_run(run_a), open_run(run_b)]
    dirs = [r.run_dir for r in runs]
    cfg = runs[0].config
    n = cfg.model.num_classes
    gts = [load_ground_truth(r.gt, n) for r in runs]
    check_same_split(gts[0], gts[1], str(runs[0].gt), str(runs[1].gt))
    if names is None:
        names = [d.parent.name if d.name == "run" else d.name for d in dirs]
        if names[0] == names[1]:
            names = [f"{names[0]} (A)", f"{names[1]} (B)"]
    return compare_predictions(gts[0], runs[0].predictions, runs[1].predictions, names, n, cfg.eval.max_dets,
                               cfg.eval.backend, iou)

