"""Every notebook runs headless under papermill on the synthetic dataset with tiny parameters, and
the numbers each one records are read back and checked against the library."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import imagecodecs
import nbformat
import numpy as np
import pandas as pd
import papermill as pm
import pytest
import roifile
import tifffile
from conftest import NARROW_HEADS

from cellkit.data import load_sample, resolve_root, scan_train
from cellkit.data.synth import synth_image
from cellkit.evaluation import ErrorAnalysis
from cellkit.evaluation.coco import coco_evaluate
from cellkit.workbench import notebook_config

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_data_inspection", "02_training", "03_ablation", "04_error_analysis"]
TINY = {"data.synth_train": 6, "data.synth_test": 1, "data.synth_max_size": 128, "data.augment.crop_size": 96,
        "train.epochs": 1, "train.iters_per_epoch": 1, "train.batch_size": 2, "model.rpn_pre_nms_top_n_test": 200,
        "model.rpn_post_nms_top_n_test": 100, "model.box_detections_per_img": 100}


def execute(name: str, out: Path, **parameters: Any) -> nbformat.NotebookNode:
    path = out / f"{name}.ipynb"
    pm.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(path), parameters=parameters, cwd=str(NOTEBOOKS),
                        progress_bar=False, kernel_name="python3")
    nb = nbformat.read(path, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    return nb


def images_in(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs_and_one_parameters_cell(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "interactive = True" in tagged[0].source


@pytest.mark.slow
@pytest.mark.parametrize("interactive", [False, True])
def test_data_inspection(tmp_path: Path, interactive: bool) -> None:
    overrides = {"data.synth_train": 6, "data.synth_max_size": 160}
    nb = execute("01_data_inspection", tmp_path, overrides=overrides, interactive=interactive,
                 results_json=str(tmp_path / "stats.json"))
    stats = json.loads((tmp_path / "stats.json").read_text())
    samples = scan_train(resolve_root(notebook_config("demo", overrides).data, progress=False))
    counts = np.sum([load_sample(s)[1].class_counts(4) for s in samples], axis=0)
    assert stats["images"] == len(samples) == 6
    assert stats["instances"] == counts.sum()
    assert [stats["classes"][f"class{k}"]["instances"] for k in range(1, 5)] == counts.tolist()
    assert images_in(nb) >= (2 if interactive else 3)  # distributions, examples (+ static browser views)
    widgets = [o for c in nb.cells for o in c.get("outputs", [])
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert bool(widgets) == interactive


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nb02")
    nb = execute("02_training", out, overrides=TINY, run_dir=str(out / "run"), interactive=False)
    assert images_in(nb) >= 2  # the live curves and a prediction beside its ground truth
    return out / "run"


@pytest.mark.slow
def test_training_records_its_run(trained_run: Path) -> None:
    summary = json.loads((trained_run / "metrics.json").read_text())
    lines = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert summary["epochs_run"] == len(lines) == 1
    rescored = coco_evaluate(trained_run / "val_gt.json", trained_run / "val_predictions.json", max_dets=100)
    assert summary["best_val_ap50"] == pytest.approx(rescored.ap50, abs=1e-9)
    assert (trained_run / "checkpoints" / "best.pth").is_file()


@pytest.mark.slow
def test_error_analysis(trained_run: Path, tmp_path: Path) -> None:
    execute("04_error_analysis", tmp_path, run_dir=str(trained_run), interactive=True, n_worst=2,
            results_json=str(tmp_path / "errors.json"))
    numbers = json.loads((tmp_path / "errors.json").read_text())
    rescored = coco_evaluate(trained_run / "val_gt.json", trained_run / "val_predictions.json", max_dets=100)
    assert numbers["ap50"] == pytest.approx(rescored.ap50, abs=1e-9)
    assert all(v >= -1e-12 for v in numbers["ap50_gain"].values())
    preds = json.loads((trained_run / "val_predictions.json").read_text())
    counted = sum(v for k, v in numbers["counts"].items() if k not in ("miss",))
    assert counted == len(preds)
    assert 1 <= len(numbers["worst"]) <= 2


@pytest.mark.slow
def test_ablation_grid(tmp_path: Path) -> None:
    # narrow heads for the grid's runs; not for trained_run: the error analysis's oracles need the few
    # cells the demo's heads find after one step, and the narrow ones find none
    grid = {"name": "nb", "config": "demo", "overrides": {**TINY, **NARROW_HEADS},
            "grid": {"train.scheduler": ["constant", "cosine"]}}
    nb = execute("03_ablation", tmp_path, grid=grid, out_dir=str(tmp_path / "grid"), cluster="local:2", interactive=False,
                 results_json=str(tmp_path / "rows.json"), comparison_json=str(tmp_path / "comparison.json"))
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert sorted(r["name"] for r in rows) == ["constant", "cosine"]
    for r in rows:
        summary = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        assert r["status"] == "ok" and r["best_val_ap50"] == pytest.approx(summary["best_val_ap50"])
        assert r["scheduler"] == r["name"] and r["attempts"] == 1
        assert list(Path(r["run_dir"]).glob("events.out.tfevents.*"))  # TensorBoard for every run
        # each run went through the shipped training notebook, executed copy kept beside its run
        assert r["backbone"] == "resnet18" and r["epochs_run"] == 1
        executed = nbformat.read(Path(r["run_dir"]).parent / "02_training.ipynb", as_version=4)
        text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert "AP50" in text  # the training notebook's own evaluation ran
    ledger = [json.loads(x) for x in (tmp_path / "grid" / "ledger.jsonl").read_text().splitlines()]
    assert sorted(e["run"] for e in ledger if e["event"] == "finished") == ["constant", "cosine"]
    # the comparison of the first two runs: each run's AP50 is its own, every validation cell is
    # counted once, and the cells each run finds are the true positives of its own matching
    cmp = json.loads((tmp_path / "comparison.json").read_text())
    a, b = rows[0], rows[1]
    assert cmp["names"] == [a["name"], b["name"]]
    assert cmp["ap50_a"] == pytest.approx(a["best_val_ap50"], abs=1e-9)
    assert cmp["ap50_b"] == pytest.approx(b["best_val_ap50"], abs=1e-9)
    gt = json.loads((Path(a["run_dir"]) / "val_gt.json").read_text())
    assert sum(cmp["counts"].values()) == len(gt["annotations"]) == sum(r["n_gt"] for r in cmp["table"])
    for run, found in ((a, ("both", "a_only")), (b, ("both", "b_only"))):
        ea = ErrorAnalysis(Path(run["run_dir"]) / "val_gt.json", Path(run["run_dir"]) / "val_predictions.json",
                           max_dets=100)
        assert ea.matching.counts()["tp"] == sum(cmp["counts"][k] for k in found)
    assert cmp["explained"] + cmp["rest"] == pytest.approx(cmp["ap50_diff"], abs=1e-12)
    # the paired verdict, and the configurations compared with the baseline (the first)
    assert cmp["verdict"] in ("constant better", "cosine better", "not distinguishable")
    assert cmp["ap50_diff_ci"][0] <= cmp["ap50_diff_ci"][1] and cmp["n_images"] == len(gt["images"])
    assert [r["comparison"]["val"]["verdict"] for r in rows][0] == "baseline"
    assert images_in(nb) == 5  # forest plot, bar chart, curves, the comparison figure, a compared image


@pytest.mark.slow
def test_segment_notebook(trained_run: Path, tmp_path: Path) -> None:
    """05_segment on two own images (an RGB TIFF and a 16-bit grey PNG): its numbers are the files'."""
    nb = nbformat.read(NOTEBOOKS / "05_segment.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert len([c for c in code if "parameters" in c.metadata.get("tags", [])]) == 1
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(4)
    tifffile.imwrite(imgs / "a.tif", synth_image(rng, 120, 140)[0])
    (imgs / "b.png").write_bytes(imagecodecs.png_encode(synth_image(rng, 100, 90)[0][..., 0].astype(np.uint16) * 257))
    out = tmp_path / "own"
    nb = execute("05_segment", tmp_path, checkpoint=str(trained_run / "checkpoints" / "best.pth"), images=str(imgs),
                 out_dir=str(out), score_thresh=0.0, interactive=False, results_json=str(tmp_path / "seg.json"))
    numbers = json.loads((tmp_path / "seg.json").read_text())
    tables = [pd.read_csv(out / n / "cells.csv") for n in ("a", "b")]
    assert numbers["images"] == 2 and numbers["skipped"] == 0
    assert numbers["cells"] == sum(len(t) for t in tables) > 0
    for row in numbers["per_image"]:
        assert row["rois"] == row["geojson_features"] == row["cells"] == len(roifile.roiread(out / row["image"] / "rois.zip"))
    assert len(scan_train(out)) == 2  # the training layout
    assert images_in(nb) >= 3  # overlays, the diameter histogram, the in-memory overlay
