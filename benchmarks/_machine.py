"""What the benchmarks share: the matmul figure that lets a time measured here be scaled to another
machine, this process's memory (Linux ``/proc``), and a random-weight checkpoint of a recipe."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cellkit.config import load_config
from cellkit.models.checkpoint import save_checkpoint
from cellkit.models.maskrcnn import build_model

MB = 2.0**20


def matmul_gflops(threads: int | None = None, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 GFLOP/s of an ``n x n`` matmul on the CPU (on ``threads`` threads
    when given, else torch's current setting): seconds elsewhere ~ seconds here x this / theirs."""
    if threads is not None:
        torch.set_num_threads(threads)
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b  # warm-up: the first call allocates and picks its kernel
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def add_matmul_size(ap: argparse.ArgumentParser) -> None:
    """``--matmul-size N``: the side of the matmul behind the machine's figure (default 2048, the
    one docs/ quote; a smoke run takes a smaller one, whose figure reads differently)."""
    ap.add_argument("--matmul-size", type=int, default=2048, metavar="N",
                    help="side of the fp32 matmul that measures this machine (default 2048; smaller for a smoke run)")


def _status_bytes(key: str) -> float:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024.0 for line in f if line.startswith(key + ":")), float("nan"))


def rss_mb() -> float:
    """This process's resident memory now, in MiB (``VmRSS``)."""
    return _status_bytes("VmRSS") / MB


def peak_mb() -> float:
    """This process's high-water resident memory, in MiB (``VmHWM``; not ``ru_maxrss``, which a
    child inherits across exec)."""
    return _status_bytes("VmHWM") / MB


def random_checkpoint(config: str, set_items: list[str], path: Path) -> str:
    """A random-weight checkpoint of a recipe (the network and its cost, no training)."""
    overrides = dict(item.split("=", 1) for item in set_items if item.startswith("model."))
    cfg = load_config(config, {"model.num_classes": 4, "model.weights": "none", **overrides})
    if cfg.model.scale == "auto":
        cfg = cfg.replace({"model.scale": 1.0})
    torch.manual_seed(0)
    save_checkpoint({"model": build_model(cfg).state_dict(), "config": cfg.to_dict()}, path)
    return str(path)
