"""Ablation grids: many runs of the training notebook through papermill, one table at the end.

The modules, each one concern:

- :mod:`~cellkit.grid.spec`: the grid file and its runs (:func:`load_grid`, :func:`expand_grid`)
- :mod:`~cellkit.grid.status`: the grid folder's files, a run's ``status.json``, :func:`run_action`
- :mod:`~cellkit.grid.ledger`: ``ledger.jsonl``, every event
- :mod:`~cellkit.grid.processes`: a run's processes (tagged, dying with their parent)
- :mod:`~cellkit.grid.task`: one run as a Dask task (lock, papermill subprocess)
- :mod:`~cellkit.grid.worker`: the papermill worker process
- :mod:`~cellkit.grid.cluster`: where the tasks run (local, a scheduler, SLURM)
- :mod:`~cellkit.grid.runner`: :func:`run_grid`
- :mod:`~cellkit.grid.results`: the results table and its plots
"""
from __future__ import annotations

from .cluster import ClusterSpec, open_cluster, parse_cluster
from .results import collect_results, configurations, format_results_table, save_plots
from .runner import run_grid
from .spec import GridSpec, RunSpec, attention_of, expand_grid, format_plan, load_grid, scheduler_label
from .status import run_action

__all__ = [
    "ClusterSpec", "GridSpec", "RunSpec", "attention_of", "collect_results", "configurations", "expand_grid",
    "format_plan",
    "format_results_table", "load_grid", "open_cluster", "parse_cluster", "run_action", "run_grid", "save_plots",
    "scheduler_label",
]
