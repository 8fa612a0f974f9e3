"""Ablation grids: expansion and validation, real papermill runs (parallel), skipping, failures, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from cellkit.ablation import (
    GRIDS, attention_of, collect_results, expand_grid, format_results_table, load_grid, run_action, run_grid,
    scheduler_label,
)
from cellkit.cli import main
from cellkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
REAL_NOTEBOOK = REPO / "notebooks" / "02_training.ipynb"

# the shipped tiny grid's settings, spelled out so the tests do not depend on that file's values
TINY = {
    "train.epochs": 1, "train.iters_per_epoch": 1, "train.batch_size": 1, "data.synth_train": 6,
    "data.synth_test": 1, "data.synth_max_size": 128, "data.augment.crop_size": 96,
    "model.rpn_pre_nms_top_n_test": 200, "model.rpn_post_nms_top_n_test": 100, "model.box_detections_per_img": 100,
}

STANDIN_PARAMETERS = '''config = "demo"
overrides = {}
data = None
run_dir = "../runs/notebook-training"
resume = False
interactive = False
n_show = 2'''

STANDIN_BODY = '''import os, sys
print("KERNEL_PREFIX", sys.prefix)
print("KERNEL_OMP", os.environ.get("OMP_NUM_THREADS"))
import cellkit
from cellkit.engine.trainer import train
summary = train(cellkit.load_config(config, {**overrides, **({"data.root": data} if data else {})}), run_dir,
                resume=resume, progress=False)
print("BEST", summary["best_val_ap50"])'''


def write_standin(folder: Path) -> Path:
    """A small notebook with 02_training's parameters cell that trains with cellkit's Trainer."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(STANDIN_PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(STANDIN_BODY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "standin.ipynb"
    nbformat.write(nb, path)
    return path


def stream_text(notebook: Path) -> str:
    nb = nbformat.read(notebook, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


# --------------------------------------------------------------------------------------------
# expansion and validation (no kernels)


def test_grid_product_names_overrides_and_run_dirs(tmp_path: Path) -> None:
    spec = {"name": "g", "config": "demo", "overrides": {"train.epochs": 2},
            "grid": {"model.backbone": ["resnet50_se", "resnet18"], "train.scheduler": ["plateau", "constant"]}}
    runs = expand_grid(spec, tmp_path)
    assert [r.name for r in runs] == ["resnet50_se-plateau", "resnet50_se-constant", "resnet18-plateau", "resnet18-constant"]
    r = runs[0]
    assert r.overrides == {"train.epochs": 2, "model.backbone": "resnet50_se", "train.scheduler": "plateau"}
    assert r.run_dir == tmp_path / "resnet50_se-plateau" / "run" and r.config == "demo"
    assert (r.cfg.model.backbone, r.cfg.train.scheduler, r.cfg.train.epochs) == ("resnet50_se", "plateau", 2)
    params = r.parameters()
    assert params["interactive"] is False and params["run_dir"] == str(r.run_dir) and params["data"] is None
    # numbers and lists keep their key in the name; extra overrides win over the grid's
    runs = expand_grid({"config": "demo", "grid": {"train.lr": [0.001, 1e-4], "model.anchor_sizes": [[8, 16, 32, 64, 128]]}},
                       extra_overrides={"train.epochs": "3"})
    assert [r.name for r in runs] == ["lr=0.001-anchor_sizes=8_16_32_64_128", "lr=0.0001-anchor_sizes=8_16_32_64_128"]
    assert runs[1].cfg.train.lr == 1e-4 and runs[1].cfg.train.epochs == 3 and runs[1].run_dir is None


def test_explicit_runs_crossed_with_a_grid_and_paths_relative_to_the_grid_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("_base_: " + str(REPO / "configs" / "demo.yaml") + "\nname: mine\n"
                                                "model: {backbone: mobilenet_v3_large}\n")
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "crossed",
        "runs": [{"name": "cbam", "config": "ablation/resnet50_cbam", "reported": 0.3617},
                 {"config": "sub/mine.yaml", "overrides": {"train": {"lr": 0.01}}}],
        "grid": {"train.seed": [0, 1]},
    }))
    runs = expand_grid(grid)
    assert [r.name for r in runs] == ["cbam-seed=0", "cbam-seed=1", "mine-seed=0", "mine-seed=1"]
    assert runs[0].config == "ablation/resnet50_cbam" and runs[0].reported == 0.3617
    assert runs[0].cfg.model.backbone == "resnet50_cbam" and runs[1].cfg.train.seed == 1
    assert runs[2].config == str((tmp_path / "sub" / "mine.yaml").resolve())  # absolute: the kernel runs elsewhere
    assert runs[2].cfg.model.backbone == "mobilenet_v3_large" and runs[3].overrides == {"train.lr": 0.01, "train.seed": 1}
    assert load_grid(grid).notebook == REAL_NOTEBOOK  # the default, relative to the repository


@pytest.mark.parametrize("spec, message", [
    ({"config": "demo", "overides": {"train.lr": 1}, "grid": {"train.seed": [0]}}, "unknown grid key 'overides'; did you mean 'overrides'"),
    ({"runs": [{"nmae": "a", "config": "demo"}]}, r"runs\[0\]: unknown grid key 'nmae'; did you mean 'name'"),
    ({"config": "demo", "grid": {"train.sheduler": ["cosine"]}}, "unknown config key 'train.sheduler'; did you mean 'train.scheduler'"),
    ({"config": "demo", "grid": {"train.lr": 0.001}}, "grid key 'train.lr' needs a non-empty list"),
    ({"config": "demmo", "grid": {"train.seed": [0]}}, "did you mean recipe 'demo'"),
    ({"config": "demo"}, "nothing to run"),
    ({"runs": [{"name": "a", "config": "demo"}, {"name": "a", "config": "demo"}]}, "runs share a name"),
])
def test_invalid_grids_fail_with_a_suggestion(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        expand_grid(spec)


def test_an_invalid_config_value_fails_before_anything_runs(tmp_path: Path) -> None:
    spec = {"name": "typo", "config": "demo", "overrides": TINY,
            "runs": [{"name": "fine"}, {"name": "typo", "overrides": {"train.scheduler": "cosin"}}]}
    out = tmp_path / "out"
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"run 'typo': train.scheduler: 'cosin' is not one of.*did you mean 'cosine'"):
        run_grid(spec, out, progress=False)
    assert not out.exists() and time.time() - t0 < 5  # nothing started, not even the fine run


def test_shipped_grids_reproduce_the_reports() -> None:
    r000 = expand_grid(GRIDS / "report000.yaml")
    by_name = {r.name: r for r in r000}
    assert set(by_name) == {"resnet50", "resnet50_se", "resnet50_cbam", "resnet50_v2", "resnet50_v2_se", "resnet50_v2_cbam",
                            "resnext50_32x4d_cbam", "efficientnet_b0", "resnet101"}
    for name, r in by_name.items():
        assert r.config == f"ablation/{name}" and r.cfg.model.backbone == name and r.cfg.model.weights == "imagenet"
    assert by_name["resnet50_cbam"].reported == 0.3617 and by_name["resnet101"].reported is None
    assert scheduler_label(by_name["resnet50_cbam"].cfg.train.__dict__) == "plateau + early stop"
    assert scheduler_label(by_name["efficientnet_b0"].cfg.train.__dict__) == "constant"
    r004 = expand_grid("report004_scheduler")  # by name, from configs/grids/
    assert [(r.name, r.cfg.train.scheduler, r.cfg.model.weights, r.reported) for r in r004] == [
        ("multistep", "multistep", "coco", 0.487), ("no_scheduler", "constant", "coco", 0.5078)]
    tiny = expand_grid("tiny")
    assert len(tiny) == 2 and all(r.cfg.train.epochs == 1 and r.cfg.train.device == "auto" for r in tiny)
    assert len({r.cfg.model.backbone for r in tiny}) == 2


def test_table_labels() -> None:
    assert [attention_of(b) for b in ("resnet50", "resnet50_se", "resnet50_v2_cbam", "resnext50_32x4d_se", None)] == [
        "none", "SE", "CBAM", "SE", "?"]
    assert scheduler_label({"scheduler": "plateau", "early_stop_decays": 3}) == "plateau + early stop"
    assert scheduler_label({"scheduler": "cosine", "early_stop_patience": None}) == "cosine"


def test_run_action_reads_the_run_folder(tmp_path: Path) -> None:
    [r] = expand_grid({"runs": [{"name": "a", "config": "demo"}]}, tmp_path, validate=False)
    assert run_action(r) == "run"
    r.run_dir.mkdir(parents=True)
    (r.folder / "status.json").write_text(json.dumps({"status": "ok", "settings": r.settings()}))
    assert run_action(r) == "run"  # ok, but no metrics.json: not finished
    (r.run_dir / "metrics.json").write_text(json.dumps({"epochs_run": 1, "best_val_ap50": 0.5}))
    assert run_action(r) == "skip"
    (r.folder / "status.json").write_text(json.dumps({"status": "failed", "settings": r.settings()}))
    (r.run_dir / "checkpoints").mkdir()
    (r.run_dir / "checkpoints" / "last.pth").write_bytes(b"x")
    assert run_action(r) == "resume"
    other = {**r.settings(), "overrides": {"train.lr": 1}}
    (r.folder / "status.json").write_text(json.dumps({"status": "ok", "settings": other}))
    assert run_action(r) == "replace"


def test_cli_dry_run_and_invalid_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ablate", "report000", "--dry-run", "--out", str(tmp_path / "o"), "--set", "train.epochs=5"]) == 0
    out = capsys.readouterr().out
    assert "grid report000: 9 runs" in out and "resnet50_cbam  " in out and "attention CBAM" in out
    assert "plateau + early stop" in out and "5 epochs" in out and "every run: train.epochs=5" in out
    assert not (tmp_path / "o").exists()
    assert main(["ablate", "report000", "--dry-run", "--set", "train.epoch=5"]) == 2
    assert "did you mean 'train.epochs'" in capsys.readouterr().err
    assert main(["ablate", "tiyn", "--dry-run"]) == 2
    assert "did you mean grid 'tiny'" in capsys.readouterr().err
    assert main(["ablate", "tiny", "--out", str(tmp_path / "o"), "--notebook", str(tmp_path / "none.ipynb")]) == 2
    assert "notebook not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# real runs through papermill


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The shipped tiny grid (2 runs) through a stand-in notebook, 2 jobs in parallel."""
    tmp = tmp_path_factory.mktemp("ablate")
    notebook = write_standin(tmp)
    grid = tmp / "tiny.yaml"
    grid.write_text(yaml.safe_dump({"name": "tiny", "notebook": str(notebook), "config": "demo", "overrides": TINY,
                                    "grid": {"model.backbone": ["resnet18", "mobilenet_v3_large"]}}))
    out = tmp / "out"
    t0 = time.time()
    rows = run_grid(grid, out, jobs=2, progress=False)
    return {"grid": grid, "out": out, "rows": rows, "notebook": notebook, "seconds": time.time() - t0}


@pytest.mark.slow
def test_tiny_grid_runs_in_parallel_kernels(tiny_grid: dict) -> None:
    out, rows = tiny_grid["out"], tiny_grid["rows"]
    assert [r["name"] for r in rows] == ["resnet18", "mobilenet_v3_large"]
    assert all(r["status"] == "ok" and r["action"] == "run" for r in rows), rows
    statuses = [json.loads((out / r["name"] / "status.json").read_text()) for r in rows]
    # both ran at once: each started before the other finished
    assert statuses[0]["started_unix"] < statuses[1]["finished_unix"] and statuses[1]["started_unix"] < statuses[0]["finished_unix"]
    for r in rows:
        executed = out / r["name"] / "standin.ipynb"
        text = stream_text(executed)
        assert f"KERNEL_PREFIX {sys.prefix}\n" in text  # the kernel runs this venv's interpreter
        if "OMP_NUM_THREADS" not in os.environ:  # the cores are split between the 2 jobs
            assert f"KERNEL_OMP {max(1, len(os.sched_getaffinity(0)) // 2)}" in text
        # the table is read back from each run's own files
        metrics = json.loads((out / r["name"] / "run" / "metrics.json").read_text())
        assert r["backbone"] == metrics["backbone"] == r["name"]
        assert r["best_val_ap50"] == metrics["best_val_ap50"] and f"BEST {metrics['best_val_ap50']}" in text
        assert r["epochs_run"] == 1 and r["best_epoch"] == 1 and r["attention"] == "none" and r["scheduler"] == "cosine"
        assert (out / r["name"] / "run" / "metrics.jsonl").is_file() and not (out / r["name"] / "error.txt").exists()
    assert json.loads((out / "results.json").read_text()) == collect_results(out)
    md = (out / "results.md").read_text()
    assert "| Run | Backbone | Attention | Scheduler |" in md and "| mobilenet_v3_large | mobilenet_v3_large | none | cosine | 1 |" in md
    for png in ("ap50.png", "curves.png"):
        assert (out / png).stat().st_size > 5000


@pytest.mark.slow
def test_rerun_skips_finished_runs(tiny_grid: dict) -> None:
    out = tiny_grid["out"]
    executed = [out / name / "standin.ipynb" for name in ("resnet18", "mobilenet_v3_large")]
    mtimes = [p.stat().st_mtime_ns for p in executed]
    t0 = time.time()
    rows = run_grid(tiny_grid["grid"], out, jobs=2, progress=False)
    assert [r["action"] for r in rows] == ["skip", "skip"] and all(r["status"] == "ok" for r in rows)
    assert [p.stat().st_mtime_ns for p in executed] == mtimes
    assert time.time() - t0 < min(10.0, tiny_grid["seconds"])
    # the command line on the same folder: nothing runs, the table is printed, exit status 0
    r = subprocess.run([sys.executable, "-m", "cellkit", "ablate", str(tiny_grid["grid"]), "--out", str(out), "--jobs", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resnet18: finished before, skipped" in r.stdout and "| resnet18 | resnet18 | none | cosine | 1 |" in r.stdout
    assert [p.stat().st_mtime_ns for p in executed] == mtimes
    # a changed setting is a different run: it does not count as finished
    [first, _] = expand_grid(tiny_grid["grid"], out, extra_overrides={"train.lr": 0.01})
    assert run_action(first) == "replace"


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_grid_goes_on(tmp_path: Path) -> None:
    notebook = write_standin(tmp_path)
    (tmp_path / "empty").mkdir()
    grid = tmp_path / "fail.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "fail", "config": "demo", "overrides": TINY,
        "runs": [{"name": "good"}, {"name": "bad", "overrides": {"data.root": str(tmp_path / "empty")}}],
    }))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "cellkit", "ablate", str(grid), "--out", str(out), "--jobs", "2",
                        "--notebook", str(notebook)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 of 2 runs failed: bad" in r.stdout
    rows = {row["name"]: row for row in collect_results(out)}
    assert rows["good"]["status"] == "ok" and rows["good"]["best_val_ap50"] is not None
    bad = rows["bad"]
    assert bad["status"] == "failed" and bad["best_val_ap50"] is None
    assert bad["error"].startswith("DataError:") and "no image folders found" in bad["error"]
    status = json.loads((out / "bad" / "status.json").read_text())
    assert status["ename"] == "DataError" and status["cell_index"] == 2  # the training cell (after the injected one)
    error_txt = (out / "bad" / "error.txt").read_text()
    assert "no image folders found" in error_txt and "scan_train" in error_txt  # the kernel's traceback
    assert (out / "bad" / "standin.ipynb").is_file()  # the executed notebook, error and all
    assert "Failed runs:\n- bad: DataError" in (out / "results.md").read_text()
    assert "bad: DataError" in format_results_table(list(rows.values()))


@pytest.mark.slow
@pytest.mark.skipif(not REAL_NOTEBOOK.is_file(), reason="notebooks/02_training.ipynb not written yet")
def test_the_real_training_notebook(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = run_grid({"name": "real", "config": "demo", "overrides": TINY, "runs": [{"name": "real"}]}, out, progress=False)
    assert rows[0]["status"] == "ok", (out / "real" / "error.txt").read_text() if (out / "real" / "error.txt").exists() else rows
    assert rows[0]["backbone"] == "resnet18" and rows[0]["epochs_run"] == 1
    assert (out / "real" / "02_training.ipynb").is_file() and (out / "real" / "run" / "metrics.json").is_file()
    assert "AP50" in stream_text(out / "real" / "02_training.ipynb")  # the notebook's evaluation ran
