"""Every benchmark in benchmarks/ runs: a tiny-argument smoke run of each, so that a figure in
docs/benchmarks.md always has a command that still works. The checks read the figures each one
prints, not only its exit status."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


def run_benchmark(name: str, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "CELLKIT_PROGRESS": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    r = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=REPO)
    assert r.returncode == 0, f"{name} {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_every_benchmark_has_a_smoke_run() -> None:
    """A new script in benchmarks/ must get a smoke run here."""
    tested = {"data_memory.py", "demo_flops.py", "eval_speed.py", "mask_roundtrip.py", "paste_memory.py",
              "train_throughput.py"}
    assert {p.name for p in BENCHMARKS.glob("*.py")} <= tested


@pytest.mark.slow
def test_eval_speed_smoke() -> None:
    """It crashed at HEAD once (NameError: enc); each variant must report a real AP50."""
    out = run_benchmark("eval_speed.py", "--images", "2", "--dets", "40", "--variants", "pycocotools,cellkit")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("pycocotools ", "cellkit "))}
    assert set(rows) == {"pycocotools", "cellkit"}, out
    assert "failed" not in out, out
    ap_plain, ap_cellkit = float(rows["pycocotools"][2]), float(rows["cellkit"][2])
    assert 0.0 < ap_plain <= 1.0
    assert ap_cellkit == pytest.approx(ap_plain, abs=1e-4)  # the same evaluation, two ways


@pytest.mark.slow
def test_demo_flops_smoke() -> None:
    small = ["train.batch_size=1", "data.augment.crop_size=128", "data.synth_train=4", "data.synth_test=1",
             "data.synth_max_size=160", "data.val_fraction=0.25"]
    out = run_benchmark("demo_flops.py", "--batches", "1", "--no-time", "--json", *[f"--set={kv}" for kv in small])
    r = last_json(out)
    assert r["recipe"] == "demo" and r["steps"] == 240  # 12 epochs x 20 steps
    assert r["gflop_per_step"] > 1
    assert r["tflop_training"] == pytest.approx(r["gflop_per_step"] * r["steps"] / 1e3)
    parts = r["gflop_by_module"]
    assert {"backbone body", "RPN head", "mask head convs"} <= set(parts)
    assert sum(parts.values()) <= r["gflop_per_step"] * 1.001  # parts of the whole, counted once
    assert r["matmul_gflops"] > 0


def test_mask_roundtrip_smoke() -> None:
    out = run_benchmark("mask_roundtrip.py", "--quick")
    rows = {cells[2]: float(cells[3]) for cells in (line.split("|") for line in out.splitlines())
            if len(cells) > 3 and cells[1].strip() == "28" for cells in [[c.strip() for c in cells]]}
    assert rows["exact"] >= 0.98 > rows["torchvision"], out


@pytest.mark.slow
def test_paste_memory_smoke() -> None:
    out = run_benchmark("paste_memory.py", "--n", "20", "--n-full", "5", "--size", "200", "--no-predict")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert len(rows) == 5, out
    assert "extrapolated" in out


@pytest.mark.slow
def test_train_throughput_smoke() -> None:
    out = run_benchmark("train_throughput.py", "--iters", "1", "--batch", "1", "--size", "96", "--repeats", "1",
                        "--images", "4")
    r = json.loads(out)
    assert r["bare_images_per_s"] > 0 and r["trainer_images_per_s"] > 0 and r["ratio"] > 0


@pytest.mark.slow
def test_data_memory_smoke() -> None:
    out = run_benchmark("data_memory.py", "--height", "300", "--width", "240", "--crop", "128", "--crops", "2")
    assert "image 300 x 240" in out and "128 px training crop" in out, out
