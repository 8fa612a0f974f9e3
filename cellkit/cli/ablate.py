"""``cellkit ablate GRID.yaml --out DIR``: run an ablation grid through the training notebook."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..config import parse_set_args
from ..errors import ConfigError
from ..resources import GRIDS
from .common import add_data, add_no_progress, add_set, non_negative_int


def add_commands(sub: Any) -> None:
    """Add the ``ablate`` subcommand to the ``cellkit`` parser's subparsers."""
    p = sub.add_parser(
        "ablate", help="run a grid of trainings (notebooks/02_training.ipynb via papermill) and tabulate AP50",
        description="Run every cell of an ablation grid (a YAML file, or the name of one in configs/grids/: "
        f"{', '.join(sorted(g.stem for g in GRIDS.glob('*.yaml')))}) through the training notebook with papermill, "
        "each in its own kernel and folder OUT/<run>/. Finished runs are skipped on re-run, failed ones recorded "
        "and the grid goes on. Each run is a task on a Dask cluster (--cluster); a run whose worker dies is retried and resumes "
        "from its last checkpoint, and the command may be killed and started again on the same folder. The grid's "
        "'seeds: N' runs every configuration N times (train.seed 0..N-1) as replicates; each configuration is "
        "compared with the baseline ('baseline:', default the first) on the same images: mean AP50 over seeds with "
        "a 95 % interval over images and seeds, the difference with its paired interval, a Holm-corrected p-value "
        "and a verdict (better, worse, not distinguishable). Writes OUT/ledger.jsonl (every attempt), "
        "OUT/results.md, results.json, ap50.png, curves.png and forest.png (the differences to the baseline). "
        "Exit status 0 when every run succeeded, 1 when any failed, 2 for invalid input.",
    )
    p.add_argument("grid", metavar="GRID", help="grid YAML file, or a grid name from configs/grids/")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/grids/<grid name>)")
    p.add_argument("--cluster", metavar="SPEC", default=None,
                   help="where the runs execute (Dask distributed): local (default: one worker process per GPU, "
                   "1 without GPUs), local:N (N worker processes), tcp://HOST:PORT (a running `dask scheduler`), "
                   "slurm[:N] (dask-jobqueue, N jobs; pip install 'cellkit[slurm]')")
    p.add_argument("--jobs", "-j", type=non_negative_int, default=None, metavar="N",
                   help="shorthand for --cluster local:N (0: one worker per GPU)")
    p.add_argument("--retries", type=non_negative_int, default=2, metavar="N",
                   help="start a run again up to N times when its worker or kernel is killed; the retry resumes "
                   "from the run's last.pth (default 2)")
    p.add_argument("--gpus", metavar="IDS", help="comma-separated GPU ids to use (default: all visible)")
    add_data(p, help="dataset folder (hw3 layout) for every run; default: the grid's, else the built-in synthetic dataset")
    add_set(p)
    p.add_argument("--notebook", metavar="PATH", help="the notebook each run executes (default: the grid's, "
                   "else notebooks/02_training.ipynb)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their resolved settings; run nothing")
    add_no_progress(p)
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    from ..grid import (  # torch-free face: the grid (dask, torch) loads when the command runs
        expand_grid,
        format_plan,
        format_results_table,
        load_grid,
        parse_cluster,
        run_action,
        run_grid,
    )

    grid = load_grid(args.grid)
    if args.notebook:
        grid = dataclasses.replace(grid, notebook=Path(args.notebook).expanduser().resolve())
    out = Path(args.out) if args.out else Path("runs") / "grids" / grid.name
    overrides = parse_set_args(args.overrides)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None

    if args.jobs is not None and args.cluster is not None:
        raise ConfigError("give --cluster or --jobs, not both (--jobs N is --cluster local:N)")
    cluster = parse_cluster(args.cluster if args.jobs is None else (f"local:{args.jobs}" if args.jobs else "local"))
    if args.dry_run:
        runs = expand_grid(grid, out.resolve(), data=args.data, extra_overrides=overrides)
        print(format_plan(grid, runs, [run_action(r) for r in runs], out))
        print(f"cluster: {cluster}, retries {args.retries}")
        return 0

    rows = run_grid(grid, out, gpus=gpus, data=args.data, extra_overrides=overrides,
                    progress=not args.no_progress, cluster=cluster, retries=args.retries)
    print()
    print(format_results_table(rows, title=f"Grid {grid.name}"))
    forest = f", {out / 'forest.png'}" if (out / "forest.png").is_file() else ""
    print(f"\nresults: {out / 'results.md'} (and results.json); plots: {out / 'ap50.png'}, {out / 'curves.png'}{forest}")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} of {len(rows)} runs failed: {', '.join(r['name'] for r in failed)} "
              f"(see {out}/<run>/error.txt)")
        return 1
    return 0
