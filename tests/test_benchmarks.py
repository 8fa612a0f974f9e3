"""Every benchmark in benchmarks/ runs: a tiny-argument smoke run of each, so that a figure in
docs/benchmarks.md always has a command that still works. The checks read the figures each one
prints, not only its exit status."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LONGEST_FIRST, TORCH_THREADS

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
    """A new script in benchmarks/ must get a smoke run here (mask_roundtrip.py has its own in
    tests/test_mask_geometry.py, beside the geometry it measures)."""
    tested = {"data_memory.py", "demo_flops.py", "eval_speed.py", "mask_roundtrip.py", "paste_memory.py",
              "train_throughput.py", "segment_speed.py", "predict_speed.py", "slower_cpu.py"}
    assert {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")} <= tested  # _machine.py: shared helpers


def test_the_longest_files_first_are_files_of_the_suite() -> None:
    """conftest's LONGEST_FIRST goes by file name: a renamed file would lose its place silently."""
    assert [name for name in LONGEST_FIRST if not (REPO / "tests" / name).is_file()] == []


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
def test_eval_speed_bootstrap_smoke() -> None:
    """The intervals' cost (--bootstrap N), reported apart: each backend's evaluation, with the
    intervals, and the draws alone, with the same AP50 and an interval around it."""
    out = run_benchmark("eval_speed.py", "--images", "3", "--dets", "40", "--variants", "", "--bootstrap", "50")
    line = next(row for row in out.splitlines() if row.startswith("pycocotools "))
    evaluation, with_intervals, draws, _, ap50 = (float(x) for x in line.split()[1:6])
    lo, hi = (float(x) for x in line.split("[")[1].rstrip("]").split(","))
    assert 0 <= draws <= with_intervals + 0.01 and evaluation > 0, out
    assert 0.0 < ap50 <= 1.0 and lo <= ap50 <= hi, out


@pytest.mark.slow
def test_demo_flops_smoke() -> None:
    small = ["train.batch_size=1", "data.augment.crop_size=128", "data.synth_train=4", "data.synth_test=1",
             "data.synth_max_size=160", "data.val_fraction=0.25"]
    out = run_benchmark("demo_flops.py", "--batches", "1", "--no-time", "--json", "--matmul-size", "512",
                        *[f"--set={kv}" for kv in small])
    r = last_json(out)
    assert r["recipe"] == "demo" and r["steps"] == 240  # 12 epochs x 20 steps
    assert r["gflop_per_step"] > 1
    assert r["tflop_training"] == pytest.approx(r["gflop_per_step"] * r["steps"] / 1e3)
    parts = r["gflop_by_module"]
    assert {"backbone body", "RPN head", "mask head convs"} <= set(parts)
    assert sum(parts.values()) <= r["gflop_per_step"] * 1.001  # parts of the whole, counted once
    assert r["matmul_gflops"] > 0 and "512 x 512 fp32 matmul" in out


@pytest.mark.slow
def test_paste_memory_smoke() -> None:
    """Each variant once (lean is measured once when --n-full equals --n: one process less)."""
    out = run_benchmark("paste_memory.py", "--n", "20", "--n-full", "20", "--size", "200", "--no-predict",
                        "--threads", str(TORCH_THREADS))
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert rows == ["torchvision", "lean", "torchvision-chunked", "lean-exact"], out
    assert "extrapolated" in out


@pytest.mark.slow
def test_train_throughput_smoke() -> None:
    out = run_benchmark("train_throughput.py", "--iters", "1", "--batch", "1", "--size", "96", "--repeats", "1",
                        "--images", "4")
    r = json.loads(out)
    assert r["bare_images_per_s"] > 0 and r["trainer_images_per_s"] > 0 and r["ratio"] > 0
    assert set(r["optimizer_step_ms"]) == {"per_tensor", "fused"} and min(r["optimizer_step_ms"].values()) > 0


@pytest.mark.slow
def test_data_memory_smoke() -> None:
    out = run_benchmark("data_memory.py", "--height", "300", "--width", "240", "--crop", "128", "--crops", "2")
    assert "image 300 x 240" in out and "128 px training crop" in out, out


@pytest.mark.slow
def test_segment_speed_smoke() -> None:
    out = run_benchmark("segment_speed.py", "--sizes", "200,400", "--threads", str(TORCH_THREADS),
                        "--matmul-size", "512",
                        "--set", "predict.tile_size=256", "--set", "predict.tile_above=300",
                        "--set", "model.box_detections_per_img=20",
                        "--set", "model.rpn_post_nms_top_n_test=50", "--set", "model.rpn_pre_nms_top_n_test=100")
    result = last_json(out)
    small, large = result["rows"]
    assert (small["size"], small["tiles"]) == (200, 1) and (large["size"], large["tiles"]) == (400, 9)
    assert all(r["cells"] > 0 and r["s_per_mp"] > 0 and r["total_s"] >= r["predict_s"] for r in result["rows"])
    assert result["matmul_gflops"] > 0 and "| 400 x 400 | 0.2 | 9 |" in out


@pytest.mark.slow
def test_predict_speed_smoke() -> None:
    """The whole path against the bare forward on a tiny image with a random-weight model: tiles,
    seconds, FLOPs per megapixel, peak memory, and the matmul figure, as the table shows them."""
    out = run_benchmark("predict_speed.py", "--sizes", "200", "--repeats", "1", "--score", "0.0",
                        "--threads", str(TORCH_THREADS), "--matmul-size", "512",
                        "--set", "model.max_size=128", "--set", "model.max_cell_diameter=40",
                        "--set", "model.box_detections_per_img=20", "--set", "model.rpn_post_nms_top_n_test=50",
                        "--set", "model.rpn_pre_nms_top_n_test=100")
    result = last_json(out)
    (row,) = result["rows"]
    whole, bare = row["whole"], row["bare"]
    assert (row["size"], bare["tiles"]) == (200, 4)  # 128 px tiles without overlap: 2 x 2
    assert whole["tiles"] == 9 and max(whole["tile_px"]) <= 128  # overlapping by 40 px, on the 32 px stride: 3 x 3
    assert whole["cells"] > 0 and whole["seconds"] > 0 and bare["seconds"] > 0 and row["ratio"] > 0
    assert row["gflop_whole"] > row["gflop_bare"] * 0.9 > 0 and whole["peak_mb"] > 0
    assert all(g > 0 for g in result["matmul_gflops"]) and "| 200 x 200 | 9 of 128x128 px (4) |" in out


def _cgroup_cpu_writable() -> bool:
    return os.geteuid() == 0 and (os.access("/sys/fs/cgroup/cpu", os.W_OK) or os.access("/sys/fs/cgroup", os.W_OK))


@pytest.mark.slow
@pytest.mark.skipif(not _cgroup_cpu_writable(), reason="a CPU quota needs root and a writable cgroup hierarchy")
def test_slower_cpu_smoke() -> None:
    """The quota slows the matmul to the target (30 GFLOP/s: every machine of ours reads 67 or more
    free, and more than 60 with a second pytest worker beside it), the command runs inside the
    cgroup, and its exit status comes back."""
    name = f"cellkit-smoke-{os.getpid()}"
    probe = "import sys; print(open('/proc/self/cgroup').read()); sys.exit(3)"
    r = subprocess.run([sys.executable, str(BENCHMARKS / "slower_cpu.py"), "--gflops", "30", "--matmul-size", "1024",
                        "--readings", "2", "--cgroup", name, "--", sys.executable, "-c", probe],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    if r.returncode != 3 and re.match(r"slower_cpu: (cannot create cgroup|no cgroup cpu controller)", r.stderr):
        pytest.skip(r.stderr.strip().splitlines()[-1])  # a container whose cgroups are not its own to change
    assert r.returncode == 3, r.stdout + r.stderr
    free, inside = (float(x) for x in re.search(r"matmul (\d+) GFLOP/s free, (\d+) inside", r.stdout).groups())
    assert 18 <= inside <= 42 and inside < free / 1.4, r.stdout  # near 30 (a 1024 px matmul under a quota varies by 10-30 %)
    assert re.search(rf"^\d+:[a-z,]*:/{name}$", r.stdout, re.M), r.stdout  # the command's own /proc/self/cgroup
    after = float(re.search(r"inside the quota after it: (\d+)", r.stdout).group(1))
    assert after < free / 1.4, r.stdout  # still throttled after the command
    assert not Path(f"/sys/fs/cgroup/cpu/{name}").exists() and not Path(f"/sys/fs/cgroup/{name}").exists()
