"""Seeds as replicates in a grid's results: configurations with their mean over seeds, intervals over
images and seeds, paired differences to the baseline with Holm-corrected verdicts, the tables and
the forest plot. The run folders hold real COCO files (perturbed ground truth as predictions)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from perturb import perturb_predictions

from cellkit.analysis.replicates import compare_configurations
from cellkit.config import load_config
from cellkit.errors import CellkitError
from cellkit.evaluation.coco import coco_evaluate
from cellkit.grid import collect_results, configurations, format_results_table, save_plots
from cellkit.viz.ablation_plots import plot_forest


def half(preds: list, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [p for p in preds if rng.random() < 0.5]


# configuration -> the predictions of each of its seeds
def make_runs(gt: dict) -> dict[str, list[list]]:
    return {
        "base": [perturb_predictions(gt, seed=s, fp_per_image=5) for s in (0, 1, 2)],
        "same": [perturb_predictions(gt, seed=s, fp_per_image=5) for s in (10, 11, 12)],
        "half": [half(perturb_predictions(gt, seed=s, fp_per_image=5), s) for s in (20, 21, 22)],
        "single": [perturb_predictions(gt, seed=30, fp_per_image=5)],
    }


def write_grid(out: Path, gt: dict, runs: dict[str, list[list]], baseline: str | None = None,
               holdout: dict[str, list[list]] | None = None) -> Path:
    """A finished grid folder as the runner leaves it: grid.json, and per run status.json and its run files."""
    entries = []
    for conf, seeds in runs.items():
        for s, preds in enumerate(seeds):
            name = f"{conf}-seed={s}" if len(seeds) > 1 else conf
            run = out / name / "run"
            run.mkdir(parents=True)
            load_config("demo", {"train.seed": s}).save(run / "config.yaml")
            (run / "val_gt.json").write_text(json.dumps(gt))
            (run / "val_predictions.json").write_text(json.dumps(preds))
            ap50 = coco_evaluate(gt, preds).ap50
            summary = {"epochs_run": 2, "best_val_ap50": ap50, "best_val_ap": 0.1, "best_epoch": 2, "seconds": 5.0,
                       "backbone": "resnet18"}
            if holdout is not None:
                (run / "holdout_gt.json").write_text(json.dumps(gt))
                (run / "holdout_predictions.json").write_text(json.dumps(holdout[conf][s]))
                summary["holdout_ap50"] = coco_evaluate(gt, holdout[conf][s]).ap50
            (run / "metrics.json").write_text(json.dumps(summary))
            (out / name / "status.json").write_text(json.dumps({"status": "ok"}))
            entries.append({"name": name, "configuration": conf, "seed": s if len(seeds) > 1 else None,
                            "reported": None, "config": "demo", "overrides": {}, "data": None})
    (out / "grid.json").write_text(json.dumps({"name": "g", "baseline": baseline, "runs": entries}))
    return out


@pytest.fixture(scope="module")
def grid(synth_gt: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], dict]:
    runs = make_runs(synth_gt)
    out = write_grid(tmp_path_factory.mktemp("grid") / "out", synth_gt, runs)
    return out, collect_results(out), runs


def test_configurations_group_the_seeds_and_compare_with_the_baseline(grid: tuple, synth_gt: dict) -> None:
    out, rows, runs = grid
    confs = {c["configuration"]: c for c in configurations(rows)}
    assert list(confs) == ["base", "same", "half", "single"]
    for name, seeds in runs.items():
        ap50 = [coco_evaluate(synth_gt, p).ap50 for p in seeds]
        c = confs[name]
        assert c["n_seeds"] == len(seeds) and c["mean"] == pytest.approx(np.mean(ap50), abs=1e-12)
        assert c["sd"] == (pytest.approx(np.std(ap50, ddof=1), abs=1e-12) if len(seeds) > 1 else None)
        assert c["ci"][0] < c["mean"] < c["ci"][1]
        assert c["ap50_runs"] == pytest.approx(ap50, abs=1e-12)
        assert c["baseline"] == "base" and c["verdict_split"] == "val"
    assert confs["base"]["verdict"] == "baseline" and confs["base"]["diff"] is None
    assert confs["half"]["verdict"] == "worse" and confs["half"]["diff_ci"][1] < 0
    assert confs["same"]["verdict"] == "not distinguishable" and confs["same"]["diff_ci"][0] < 0 < confs["same"]["diff_ci"][1]
    assert confs["half"]["diff"] == pytest.approx(confs["half"]["mean"] - confs["base"]["mean"], abs=1e-12)
    # Holm over the three comparisons: each adjusted p-value at least the raw one, at most 3 times it
    for name in ("same", "half", "single"):
        p, adj = confs[name]["p_value"], confs[name]["p_holm"]
        assert p <= adj <= min(1.0, 3 * p) + 1e-12
    assert sorted(c["p_holm"] for c in confs.values() if c["p_holm"] is not None)[0] == pytest.approx(
        3 * min(c["p_value"] for c in confs.values() if c["p_value"] is not None))
    # each run's own interval over images is in its row; results.json is the rows
    for r in rows:
        lo, hi = r["val_ap50_ci"]
        assert lo <= r["best_val_ap50"] <= hi and r["comparison"]["baseline"] == "base"
    assert json.loads((out / "results.json").read_text()) == rows


def test_the_seed_variation_is_in_the_interval(grid: tuple) -> None:
    out, rows, _ = grid
    confs = {c["configuration"]: c for c in configurations(rows)}
    run_widths = [r["val_ap50_ci"][1] - r["val_ap50_ci"][0] for r in rows if r["configuration"] == "base"]
    base = confs["base"]
    # averaging 3 seeds narrows the image part, the seed part widens it again: not narrower than
    # one run's interval divided by sqrt(3)
    assert base["ci"][1] - base["ci"][0] > min(run_widths) / np.sqrt(3)


def test_the_tables_highlight_only_what_is_distinguishable(grid: tuple) -> None:
    out, rows, _ = grid
    md = (out / "results.md").read_text()
    assert md == format_results_table(rows, title="Grid g") + "\n"
    conf_lines = [line for line in md.splitlines() if line.startswith("| ") and "| Configuration |" not in line][:4]
    assert [line.split("|")[1].strip() for line in conf_lines] == ["base", "same", "half", "single"]
    assert md.count("**") == 2 and "**worse**" in md  # the one distinguishable verdict, nothing for a maximum
    assert "| val AP50 (chose the epoch) |" in md and "Holm" in md and "chose each run's epoch" in md
    assert "| half | 3 |" in md and "| single | 1 |" in md
    half_line = next(line for line in conf_lines if line.startswith("| half |"))
    c = next(c for c in configurations(rows) if c["configuration"] == "half")
    assert f"{c['diff']:+.4f} [{c['diff_ci'][0]:+.2f}, {c['diff_ci'][1]:+.2f}]" in half_line
    paths = save_plots(out, rows)
    assert (out / "forest.png") in paths and (out / "forest.png").stat().st_size > 5000


def test_the_forest_plot_keeps_its_words_inside_the_figure(grid: tuple) -> None:
    """Its title and axis label once ran past the figure's right edge (the heads grid's forest.png)."""
    _, rows, _ = grid
    confs = configurations(rows)
    for c in confs:
        c["baseline"] = "torchvision_geometry_and_a_long_name"
    fig = plot_forest(confs)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    for text in (ax.title, ax.xaxis.label):
        box = text.get_window_extent(renderer)
        assert box.x0 >= fig.bbox.x0 and box.x1 <= fig.bbox.x1, text.get_text()
    assert "'torchvision_geometry_and_a_long_name'" in ax.title.get_text()
    plt.close(fig)


def test_a_named_baseline_and_the_hold_out_split(synth_gt: dict, tmp_path: Path) -> None:
    runs = make_runs(synth_gt)
    del runs["single"]
    # the hold-out predictions: "same" clearly better there
    holdout = {"base": [half(p, 5) for p in runs["base"]], "same": runs["same"], "half": runs["half"]}
    out = write_grid(tmp_path / "out", synth_gt, runs, baseline="half", holdout=holdout)
    rows = collect_results(out)
    confs = {c["configuration"]: c for c in configurations(rows)}
    assert confs["half"]["verdict"] == "baseline" and confs["base"]["verdict_split"] == "holdout"
    assert confs["same"]["verdict"] == "better"  # on the hold-out split
    assert confs["base"]["holdout"]["mean"] == pytest.approx(np.mean([coco_evaluate(synth_gt, p).ap50
                                                                      for p in holdout["base"]]))
    assert confs["base"]["val"]["mean"] != confs["base"]["holdout"]["mean"]
    md = (out / "results.md").read_text()
    assert "| hold-out AP50 (scored once) |" in md and "on the hold-out split (scored once" in md
    assert all(r["holdout_ap50_ci"] is not None for r in rows)


def test_runs_on_other_images_are_not_compared(synth_gt: dict, real_gt: dict, tmp_path: Path) -> None:
    runs = {"base": [perturb_predictions(synth_gt, seed=0)], "other": [[]]}
    out = write_grid(tmp_path / "out", synth_gt, runs)
    other = out / "other" / "run"
    (other / "val_gt.json").write_text(json.dumps(real_gt))
    rows = collect_results(out)
    confs = {c["configuration"]: c for c in configurations(rows)}
    assert confs["other"]["verdict"] == "not compared" and "other val images" in confs["other"]["note"]
    with pytest.raises(CellkitError, match="baseline 'nope'"):
        compare_configurations({"base": [("base", out / "base" / "run")]}, baseline="nope")
