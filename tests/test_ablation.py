"""Ablation grids: expansion and validation, real papermill runs on a Dask LocalCluster (parallel,
a worker and the runner killed with -9, retries that resume, no orphans, the ledger, TensorBoard
events), skipping, failures, locks, cluster specs, CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest
import yaml
from conftest import NARROW_HEADS
from tb_helpers import assert_tensorboard_equals_history

from cellkit.cli import main
from cellkit.errors import CellkitError, ConfigError
from cellkit.grid import (
    attention_of,
    collect_results,
    expand_grid,
    format_results_table,
    load_grid,
    run_action,
    run_grid,
    scheduler_label,
)
from cellkit.grid.cluster import THREAD_VARS, ClusterSpec, gpu_driver_loaded, open_cluster, parse_cluster
from cellkit.grid.spec import baseline_of
from cellkit.grid.task import RunBusy, RunLock
from cellkit.resources import GRIDS
from cellkit.runs import read_history

REPO = Path(__file__).resolve().parents[1]
REAL_NOTEBOOK = REPO / "notebooks" / "02_training.ipynb"

# the shipped tiny grid's settings, spelled out so the tests do not depend on that file's values
TINY = {
    "train.epochs": 1, "train.iters_per_epoch": 1, "train.batch_size": 1, "data.synth_train": 6,
    "data.synth_test": 1, "data.synth_max_size": 128, "data.augment.crop_size": 96,
    "model.rpn_pre_nms_top_n_test": 200, "model.rpn_post_nms_top_n_test": 100, "model.box_detections_per_img": 100,
    **NARROW_HEADS,
}

STANDIN_PARAMETERS = '''config = "demo"
overrides = {}
data = None
run_dir = "../runs/notebook-training"
resume = False
interactive = False
n_show = 2'''

STANDIN_BODY = '''import json, os, sys, time
from pathlib import Path
print("KERNEL_PREFIX", sys.prefix)
print("KERNEL_OMP", os.environ.get("OMP_NUM_THREADS"))
import cellkit
from cellkit.engine.train_loop import Hook
from cellkit.engine.defaults import train


class PauseOnFirstAttempt(Hook):
    """With CELLKIT_TEST_PAUSE=1: after epoch 1 of a run's first attempt, say so (with this
    kernel's pid) and wait to be killed."""
    priority = 95  # after the checkpoint, metrics and TensorBoard hooks: epoch 1 is on disk

    def after_epoch(self, metrics):
        if os.environ.get("CELLKIT_TEST_PAUSE") == "1" and os.environ.get("CELLKIT_GRID_ATTEMPT") == "1":
            if metrics["epoch"] == 1:
                Path(run_dir).parent.joinpath("paused.json").write_text(json.dumps({"kernel_pid": os.getpid()}))
                time.sleep(900)


summary = train(cellkit.load_config(config, {**overrides, **({"data.root": data} if data else {})}), run_dir,
                resume=resume, progress=False, hooks=[PauseOnFirstAttempt()])
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
    assert load_grid(grid).notebook.resolve() == REAL_NOTEBOOK.resolve()  # the default: the shipped notebook


def test_seeds_replicate_every_configuration_and_a_baseline_is_named(tmp_path: Path) -> None:
    spec = {"name": "s", "config": "demo", "grid": {"model.backbone": ["resnet18", "mobilenet_v3_large"]}, "seeds": 3,
            "baseline": "mobilenet_v3_large"}
    runs = expand_grid(spec, tmp_path)
    assert [(r.name, r.configuration, r.seed, r.cfg.train.seed) for r in runs] == [
        (f"{b}-seed={s}", b, s, s) for b in ("resnet18", "mobilenet_v3_large") for s in (0, 1, 2)]
    assert runs[0].run_dir == tmp_path / "resnet18-seed=0" / "run"
    assert baseline_of(load_grid(spec), runs) == "mobilenet_v3_large"
    # a list of seeds, or a train.seed axis, does the same; without seeds a run is its own configuration
    listed = expand_grid({**spec, "seeds": [7, 9]})
    axis = expand_grid({**{k: v for k, v in spec.items() if k != "seeds"},
                        "grid": {"model.backbone": ["resnet18", "mobilenet_v3_large"], "train.seed": [7, 9]}})
    assert [(r.name, r.seed) for r in listed] == [(r.name, r.seed) for r in axis] == [
        ("resnet18-seed=7", 7), ("resnet18-seed=9", 9), ("mobilenet_v3_large-seed=7", 7), ("mobilenet_v3_large-seed=9", 9)]
    plain = expand_grid({"config": "demo", "grid": {"model.backbone": ["resnet18", "mobilenet_v3_large"]}})
    assert [(r.configuration, r.seed) for r in plain] == [("resnet18", None), ("mobilenet_v3_large", None)]
    assert baseline_of(load_grid({"config": "demo", "grid": {"model.backbone": ["resnet18"]}}), plain) == "resnet18"


@pytest.mark.parametrize("spec, message", [
    ({"config": "demo", "overides": {"train.lr": 1}, "grid": {"train.seed": [0]}}, "unknown grid key 'overides'; did you mean 'overrides'"),
    ({"runs": [{"nmae": "a", "config": "demo"}]}, r"runs\[0\]: unknown grid key 'nmae'; did you mean 'name'"),
    ({"config": "demo", "grid": {"train.sheduler": ["cosine"]}}, "unknown config key 'train.sheduler'; did you mean 'train.scheduler'"),
    ({"config": "demo", "grid": {"train.lr": 0.001}}, "grid key 'train.lr' needs a non-empty list"),
    ({"config": "demmo", "grid": {"train.seed": [0]}}, "did you mean recipe 'demo'"),
    ({"config": "demo"}, "nothing to run"),
    ({"runs": [{"name": "a", "config": "demo"}, {"name": "a", "config": "demo"}]}, "runs share a name"),
    ({"config": "demo", "grid": {"train.seed": [0, 1]}, "seeds": 2}, "give 'seeds' or a grid axis train.seed, not both"),
    ({"config": "demo", "grid": {"train.lr": [0.1]}, "seeds": 0}, "seeds must be at least 1"),
    ({"config": "demo", "grid": {"train.lr": [0.1]}, "seeds": [1, 1]}, "seeds repeat a value"),
    ({"config": "demo", "grid": {"train.lr": [0.1]}, "seeds": "three"}, "seeds is a number of runs per configuration"),
    ({"config": "demo", "grid": {"model.backbone": ["resnet18"]}, "baseline": "resnet19"},
     "baseline 'resnet19' is not a configuration of the grid; did you mean 'resnet18'"),
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


def test_every_shipped_grid_expands_and_the_help_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    """The help's list of grid names comes from the package (it once named 3 of 7), and every grid
    there is valid; the two that docs/benchmarks.md rests on replicate each configuration 3 times."""
    names = sorted(p.stem for p in GRIDS.glob("*.yaml"))
    for name in names:
        assert expand_grid(name), name
    heads = expand_grid("heads")
    assert len(heads) == 12 and {r.cfg.train.seed for r in heads} == {0, 1, 2}
    assert baseline_of(load_grid("heads"), heads) == "baseline"
    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    assert ", ".join(names) in " ".join(capsys.readouterr().out.split())


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
# real runs through papermill on a Dask LocalCluster: a worker and then the runner killed with -9

RUNS = ["resnet18", "mobilenet_v3_large"]


def ledger(out: Path) -> list[dict]:
    path = out / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def events(out: Path, event: str, run: str | None = None) -> list[dict]:
    return [e for e in ledger(out) if e["event"] == event and (run is None or e["run"] == run)]


def wait_for(pred, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    t0 = time.time()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the runner ended early while waiting for {what}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def holds_torch(pid: int) -> bool:
    """Whether process ``pid`` has loaded torch (its shared library is mapped)."""
    return any("libtorch" in Path(m.path).name for m in psutil.Process(pid).memory_maps())


@pytest.fixture(scope="module")
def killed_grid(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny grid (2 runs of 2 epochs) on a LocalCluster of 2 worker processes on 127.0.0.1,
    started with `cellkit ablate --cluster local:2`. Both runs pause after epoch 1 of their first
    attempt; then the worker of resnet18 is killed with -9 (its retry resumes and finishes), then
    the runner itself is killed with -9 while mobilenet_v3_large is still in its first attempt, and
    the grid is run again."""
    tmp = tmp_path_factory.mktemp("ablate")
    notebook = write_standin(tmp)
    grid = tmp / "tiny.yaml"
    grid.write_text(yaml.safe_dump({"name": "tiny", "notebook": str(notebook), "config": "demo",
                                    "overrides": {**TINY, "train.epochs": 2}, "grid": {"model.backbone": RUNS}}))
    out = tmp / "out"
    facts: dict = {"grid": grid, "out": out, "notebook": notebook}
    # the grid splits the cores between its workers unless OMP_NUM_THREADS is set (make test sets it)
    env = {**{k: v for k, v in os.environ.items() if k not in THREAD_VARS}, "CELLKIT_TEST_PAUSE": "1"}
    log = open(tmp / "runner.log", "w")
    t0 = time.time()
    runner = subprocess.Popen([sys.executable, "-m", "cellkit", "ablate", str(grid), "--out", str(out),
                               "--cluster", "local:2", "--retries", "2"], stdout=log, stderr=subprocess.STDOUT, env=env)
    tree: list[int] = []
    try:
        # 1. both runs in their first attempt, paused after epoch 1
        wait_for(lambda: all((out / r / "paused.json").is_file() for r in RUNS), 900, runner, "both runs to pause")
        first = {e["run"]: e for e in events(out, "started")}
        facts["first"] = first
        victim = first["resnet18"]
        kernel = json.loads((out / "resnet18" / "paused.json").read_text())["kernel_pid"]
        facts["victim"] = {"worker": victim["pid"], "papermill": victim["child_pid"], "kernel": kernel}
        # the kernel, its papermill process and the worker are one chain, each tagged with the cell
        assert psutil.Process(kernel).ppid() == victim["child_pid"]
        assert psutil.Process(victim["child_pid"]).ppid() == victim["pid"]
        assert psutil.Process(kernel).environ()["CELLKIT_GRID_RUN"] == str(out / ".locks" / "resnet18.lock")
        facts["holds_torch"] = {role: holds_torch(pid) for role, pid in
                                (("worker", victim["pid"]), ("papermill", victim["child_pid"]), ("kernel", kernel),
                                 ("runner", runner.pid))}
        os.kill(victim["pid"], signal.SIGKILL)
        t_kill = time.time()
        wait_for(lambda: not alive([victim["child_pid"], kernel]), 30, runner, "the killed worker's processes to end")
        facts["victim_gone_after"] = time.time() - t_kill
        # 2. the retry resumes after epoch 1 and finishes; the other run is still in its first attempt
        wait_for(lambda: events(out, "finished", "resnet18"), 900, runner, "the retry to finish")
        assert not events(out, "finished", "mobilenet_v3_large")
        # 3. the runner killed with -9: every process it started ends (workers, papermill, kernels)
        tree = [p.pid for p in psutil.Process(runner.pid).children(recursive=True)]
        facts["tree"] = tree
        facts["mobilenet_kernel"] = json.loads((out / "mobilenet_v3_large" / "paused.json").read_text())["kernel_pid"]
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        t_kill = time.time()
        wait_for(lambda: not alive(tree), 60, None, "the runner's processes to end")
        facts["tree_gone_after"] = time.time() - t_kill
    finally:
        if runner.poll() is None:
            runner.kill()
        for pid in alive(tree):
            os.kill(pid, signal.SIGKILL)
        log.close()
    facts["log"] = (tmp / "runner.log").read_text()
    facts["first_seconds"] = time.time() - t0
    # 4. the grid again, in this process: resnet18 is skipped, mobilenet_v3_large resumes
    with pytest.MonkeyPatch.context() as mp:
        for var in THREAD_VARS:
            mp.delenv(var, raising=False)
        facts["rows"] = run_grid(grid, out, cluster="local:2", progress=False)
    return facts


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_resumes(killed_grid: dict) -> None:
    out, v = killed_grid["out"], killed_grid["victim"]
    assert killed_grid["victim_gone_after"] < 10  # its papermill process and kernel did not keep training
    started = events(out, "started", "resnet18")
    assert [(e["attempt"], e["action"], e["epochs_done"]) for e in started] == [(1, "run", 0), (2, "resume", 1)]
    assert started[1]["pid"] != v["worker"] and started[1]["t"] > started[0]["t"]
    assert [e["attempt"] for e in events(out, "finished", "resnet18")] == [2]
    log = (out / "resnet18" / "log.txt").read_text()
    assert "attempt 2: resuming resnet18" in log and "after epoch 1" in log  # the Trainer resumed from last.pth
    assert "resnet18: resuming after epoch 1 (attempt 2)" in killed_grid["log"]  # the runner said so
    # only the kernel trains: the Dask worker and the papermill worker never load torch, nor does
    # the runner where no GPU driver is loaded (it asks torch to count the GPUs only where one is)
    assert killed_grid["holds_torch"] == {"worker": False, "papermill": False, "kernel": True,
                                          "runner": gpu_driver_loaded()}


@pytest.mark.slow
def test_a_killed_runner_leaves_nothing_running_and_the_rerun_finishes(killed_grid: dict) -> None:
    out, rows = killed_grid["out"], killed_grid["rows"]
    assert killed_grid["tree_gone_after"] < 30
    assert killed_grid["mobilenet_kernel"] in killed_grid["tree"]  # the kernels were in the tree that ended
    assert [(r["name"], r["action"], r["status"], r["attempts"]) for r in rows] == [
        ("resnet18", "skip", "ok", 2), ("mobilenet_v3_large", "resume", "ok", 2)]
    started = events(out, "started", "mobilenet_v3_large")
    assert [(e["attempt"], e["action"], e["epochs_done"]) for e in started] == [(1, "run", 0), (2, "resume", 1)]
    assert not events(out, "started", "resnet18")[2:]  # the finished run was not started again
    for name in RUNS:
        # each epoch once, in metrics.jsonl and in the TensorBoard events (the interrupted attempt's purged)
        lines = read_history(out / name / "run")
        assert [m["epoch"] for m in lines] == [1, 2]
        assert_tensorboard_equals_history(out / name / "run", lines)
        assert json.loads((out / name / "status.json").read_text())["status"] == "ok"
    md = (out / "results.md").read_text()
    runs_md = md.split("Runs (")[1]  # the runs table, after the configurations compared with the baseline
    table = [line.split("|")[1].strip() for line in runs_md.splitlines() if line.startswith("| ") and "| Run |" not in line]
    assert table == RUNS and "Attempts" in md  # each run once
    # the lock files say who held them last; nothing holds them now
    for name in RUNS + ["runner"]:
        RunLock(out / ".locks" / f"{name}.lock").acquire(timeout=0).release()


@pytest.mark.slow
def test_runs_ran_in_parallel_kernels_and_the_table_reads_their_files(killed_grid: dict) -> None:
    out, rows = killed_grid["out"], killed_grid["rows"]
    first = killed_grid["first"]
    assert {e["worker"] for e in first.values()} and len({e["pid"] for e in first.values()}) == 2  # 2 workers at once
    for r in rows:
        executed = out / r["name"] / "standin.ipynb"
        text = stream_text(executed)
        assert f"KERNEL_PREFIX {sys.prefix}\n" in text  # the kernel runs this venv's interpreter
        # the cores are split between the workers
        workers = 2 if r["name"] == "resnet18" else 1  # the re-run started one worker for its one run
        assert f"KERNEL_OMP {max(1, len(os.sched_getaffinity(0)) // workers)}" in text
        metrics = json.loads((out / r["name"] / "run" / "metrics.json").read_text())
        assert r["backbone"] == metrics["backbone"] == r["name"]
        assert r["best_val_ap50"] == metrics["best_val_ap50"] and f"BEST {metrics['best_val_ap50']}" in text
        assert r["epochs_run"] == 2 and r["attention"] == "none" and r["scheduler"] == "cosine"
        assert not (out / r["name"] / "error.txt").exists()
    assert json.loads((out / "results.json").read_text()) == collect_results(out)
    md = (out / "results.md").read_text()
    assert "| Run | Backbone | Attention | Scheduler |" in md and "| mobilenet_v3_large | mobilenet_v3_large | none | cosine | 2 |" in md
    for png in ("ap50.png", "curves.png"):
        assert (out / png).stat().st_size > 5000


@pytest.mark.slow
def test_rerun_skips_finished_runs(killed_grid: dict) -> None:
    out = killed_grid["out"]
    executed = [out / name / "standin.ipynb" for name in RUNS]
    mtimes = [p.stat().st_mtime_ns for p in executed]
    t0 = time.time()
    rows = run_grid(killed_grid["grid"], out, jobs=2, progress=False)
    assert [r["action"] for r in rows] == ["skip", "skip"] and all(r["status"] == "ok" for r in rows)
    assert [p.stat().st_mtime_ns for p in executed] == mtimes
    assert time.time() - t0 < 10.0  # no cluster is started when nothing is left to run
    # the command line on the same folder: nothing runs, the table is printed, exit status 0
    r = subprocess.run([sys.executable, "-m", "cellkit", "ablate", str(killed_grid["grid"]), "--out", str(out),
                        "--jobs", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resnet18: finished before, skipped" in r.stdout and "| resnet18 | resnet18 | none | cosine | 2 |" in r.stdout
    assert [p.stat().st_mtime_ns for p in executed] == mtimes
    # a changed setting is a different run: it does not count as finished
    [first, _] = expand_grid(killed_grid["grid"], out, extra_overrides={"train.lr": 0.01})
    assert run_action(first) == "replace"


@pytest.mark.slow
def test_a_second_live_runner_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from cellkit.grid.task import RunLock; "
        f"RunLock({str(out / '.locks' / 'runner.lock')!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        spec = {"name": "g", "config": "demo", "overrides": TINY, "runs": [{"name": "a"}]}
        with pytest.raises(CellkitError, match=f"this grid is being run by pid {holder.pid}"):
            run_grid(spec, out, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "a").exists()


@pytest.mark.slow
def test_the_lock_outlives_a_killed_holder_while_its_child_runs(tmp_path: Path) -> None:
    # a task's papermill subprocess inherits the lock: killing the task's process (-9) does not
    # free the run for a second attempt while the first one's training process still runs
    path = tmp_path / "cell.lock"
    code = (
        "import subprocess, sys, time; from cellkit.grid.task import RunLock\n"
        f"lock = RunLock({str(path)!r}).acquire()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], pass_fds=(lock.fd,))\n"
        "print(child.pid, flush=True); time.sleep(60)\n"
    )
    task = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(task.stdout.readline())
    try:
        with pytest.raises(RunBusy, match=f"held by pid {task.pid}"):
            RunLock(path).acquire(timeout=0.3)
        task.kill()
        task.wait()
        with pytest.raises(RunBusy):  # the child still holds it
            RunLock(path).acquire(timeout=0.3)
    finally:
        os.kill(child, signal.SIGKILL)
    lock = RunLock(path).acquire(timeout=10)  # free once the last holder is gone
    assert lock.holder()["pid"] == os.getpid()
    lock.release()


@pytest.mark.slow
def test_papermill_worker_dies_with_its_parent(tmp_path: Path) -> None:
    # die_with_parent (PR_SET_PDEATHSIG): a process that called it is killed when its parent dies
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; from cellkit.grid.processes import die_with_parent; "
        "die_with_parent(); print(1, flush=True); time.sleep(60)'], stdout=subprocess.PIPE, text=True)\n"
        "child.stdout.readline(); print(child.pid, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive([child])
    parent.kill()
    parent.wait()
    t0 = time.time()
    while alive([child]) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert not alive([child])


def test_cluster_specs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_cluster(None) == parse_cluster("local") == ClusterSpec("local")
    assert parse_cluster("local:3") == ClusterSpec("local", 3)
    assert parse_cluster("tcp://10.0.0.5:8786") == ClusterSpec("address", address="tcp://10.0.0.5:8786")
    assert parse_cluster("slurm:4") == ClusterSpec("slurm", 4)
    for bad in ("locl", "local:0", "tcp://host", "8786"):
        with pytest.raises(ConfigError, match="expected local, local:N, tcp://HOST:PORT|at least 1"):
            parse_cluster(bad)
    assert main(["ablate", "tiny", "--dry-run", "--out", str(tmp_path / "o"), "--jobs", "3"]) == 0
    assert "cluster: local:3, retries 2" in capsys.readouterr().out
    assert main(["ablate", "tiny", "--dry-run", "--cluster", "tcp:/x"]) == 2
    assert "expected local, local:N, tcp://HOST:PORT" in capsys.readouterr().err
    assert main(["ablate", "tiny", "--dry-run", "--cluster", "local:2", "--jobs", "2"]) == 2
    assert "give --cluster or --jobs, not both" in capsys.readouterr().err
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:  # the optional extra is missing: one line saying how to get it
        assert main(["ablate", "tiny", "--out", str(tmp_path / "s"), "--cluster", "slurm"]) == 2
        assert "pip install 'cellkit[slurm]'" in capsys.readouterr().err
    # a scheduler that is not there: a clear error, not a hang
    t0 = time.time()
    assert main(["ablate", "tiny", "--out", str(tmp_path / "t"), "--cluster", "tcp://127.0.0.1:9"]) == 2
    assert "no dask scheduler answers there" in capsys.readouterr().err and time.time() - t0 < 60


@pytest.mark.slow
def test_a_running_scheduler_with_gpu_workers(tmp_path: Path) -> None:
    # the README's several-machines setup on one machine: `dask scheduler`, a `dask worker` with
    # --resources GPU=1; --cluster tcp://HOST:PORT connects, sees the GPU resource, and runs tasks
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    procs = [subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen([str(bindir / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                       "--resources", "GPU=1", "--no-dashboard"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        t0 = time.time()
        while True:
            try:
                with open_cluster(address) as cl:
                    if cl.threads:
                        break
            except ConfigError:
                pass
            assert time.time() - t0 < 120, "the scheduler and worker did not come up"
            time.sleep(1)
        with open_cluster(address) as cl:
            assert cl.gpu_resources and len(cl.threads) == 1 and cl.spec == ClusterSpec("address", address=address)
            fut = cl.client.submit(os.getpid, resources={"GPU": 1}, pure=False)
            assert fut.result(timeout=60) != os.getpid()
        assert all(p.poll() is None for p in procs)  # connecting did not close someone else's cluster
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_the_gpu_count_asks_torch_only_where_a_driver_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Linux no driver means no GPU, answered without importing torch (the killed-grid test
    reads the runner's process maps); a driver's folder means torch is asked."""
    from cellkit.grid import cluster

    if not sys.platform.startswith("linux"):
        pytest.skip("the driver's files are Linux's")
    monkeypatch.setattr(cluster, "GPU_DRIVER_PATHS", (str(REPO / "no-such-driver"),))
    assert not cluster.gpu_driver_loaded() and cluster.visible_gpus() == []
    monkeypatch.setattr(cluster, "GPU_DRIVER_PATHS", (str(REPO / "no-such-driver"), str(REPO)))
    assert cluster.gpu_driver_loaded()


@pytest.mark.slow
def test_local_cluster_gives_each_worker_one_gpu(tmp_path: Path) -> None:
    # with GPUs (here: ids given, no CUDA needed) each worker gets its own CUDA_VISIBLE_DEVICES and
    # the resource GPU=1, and tasks ask for it
    with open_cluster("local:3", gpus=["4", "7"]) as cl:
        seen = cl.client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["4", "4", "7"] and cl.gpu_resources
        info = cl.client.scheduler_info()["workers"]
        assert all(w["resources"] == {"GPU": 1} for w in info.values())
        assert set(cl.threads) == set(info) and all(n >= 1 for n in cl.threads.values())


@pytest.mark.slow
def test_a_local_cluster_leaves_the_runs_their_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting a LocalCluster sets OMP_NUM_THREADS=1 in the runner's own process (dask's nanny
    pre-spawn environment); that was read back as the user's choice, so every run of a local grid
    trained on one thread (the heads grid ran at half speed on 2 cores)."""
    from cellkit.grid.cluster import cpu_count

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    with open_cluster("local:1") as cl:
        assert os.environ.get("OMP_NUM_THREADS") is None
        [address] = cl.threads
        assert cl.threads_for(address) == cl.threads[address] == cpu_count()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's own setting still wins
    with open_cluster("local:1") as cl:
        assert os.environ["OMP_NUM_THREADS"] == "1" and cl.threads_for(next(iter(cl.threads))) == 1


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
