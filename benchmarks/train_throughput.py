"""Trainer throughput against a bare training loop over the same model and batches, and a GPU sweep.

Default (CPU): the bare loop is ``model(images, targets) -> sum(losses).backward() ->
optimizer.step()``, with the Trainer's optimiser (:func:`cellkit.engine.schedule.build_optimizer`:
the fused step on CPU and CUDA); the Trainer adds loss bookkeeping, the non-finite check, the
progress bar and the schedule. Both see the same precomputed batches (synthetic crops) in the same
order, interleaved, best of ``--repeats``. Target on CPU: the Trainer keeps >= 95 % of the bare
loop's images/s. The AdamW step alone over the model's trainable parameters is timed apart, torch's
per-tensor loop against the fused step (``optimizer_step_ms``, best of ``--repeats`` x 5 steps).

    python benchmarks/train_throughput.py [--backbone resnet18] [--iters 12] [--batch 4] [--size 256]

``--gpu-sweep`` (CUDA): the Trainer alone over sizes x batches x AMP modes x channels_last with
maskrcnn_resnet50_fpn_v2's design (``--backbone resnet50_v2``), recording images/s and peak GPU
memory (``torch.cuda.max_memory_allocated``) as JSON lines:

    python benchmarks/train_throughput.py --gpu-sweep --backbone resnet50_v2 --sizes 512 800 --batches 2 4 8
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

import cellkit
from cellkit.config import TrainConfig
from cellkit.data import collate
from cellkit.engine.schedule import build_optimizer
from cellkit.engine.train_loop import Trainer, peak_memory_mb


class Frozen(Dataset):
    """A fixed list of (image, target) samples: every loop trains on exactly the same data."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def bare_loop(model: torch.nn.Module, loader: DataLoader, train_cfg: TrainConfig) -> float:
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], train_cfg)
    model.train()
    n = 0
    t0 = time.perf_counter()
    for images, targets in loader:
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(images)
    return n / (time.perf_counter() - t0)


def optimizer_step_ms(model: torch.nn.Module, train_cfg: TrainConfig, repeats: int) -> dict[str, float]:
    """Milliseconds of one AdamW step over ``model``'s trainable parameters with random gradients,
    best of ``repeats`` x 5 steps: torch's per-tensor loop against the fused step. The parameters
    move; the caller restores them."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    out = {}
    for name, fused in (("per_tensor", None), ("fused", True)):
        opt = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=fused)
        opt.step()  # warm-up: the first step allocates the moments
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(5):
                opt.step()
            best = min(best, (time.perf_counter() - t0) / 5)
        out[name] = 1e3 * best
    for p in params:
        p.grad = None
    return out


def make_trainer(args: argparse.Namespace, size: int, batch: int, **extra: object) -> tuple[Trainer, DataLoader]:
    overrides = {
        "model.backbone": args.backbone, "train.batch_size": batch, "train.eval_every": 0,
        "train.iters_per_epoch": args.iters, "train.epochs": 1, "data.augment.crop_size": size,
        "data.augment.scale_range": None, "data.synth_max_size": max(512, size), "data.synth_train": args.images,
        **extra,
    }
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's messages; stdout carries the JSON
        trainer = Trainer(cellkit.load_config("demo", overrides), None, progress=False)
    trainer.train_set.preload(False)
    torch.manual_seed(0)
    items = [trainer.train_set[i % len(trainer.train_set)] for i in range(args.iters * batch)]
    loader = DataLoader(Frozen(items), batch_size=batch, shuffle=False, collate_fn=collate)
    trainer._loader = loader
    return trainer, loader


def compare_with_bare_loop(args: argparse.Namespace) -> dict:
    trainer, loader = make_trainer(args, args.size, args.batch)
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    step_ms = optimizer_step_ms(trainer.model, trainer.cfg.train, args.repeats)
    trainer.model.load_state_dict(state)
    warm = DataLoader(Frozen(list(loader.dataset)[: 2 * args.batch]), batch_size=args.batch, collate_fn=collate)
    bare_loop(trainer.model, warm, dataclasses.replace(trainer.cfg.train, lr=1e-4))
    results: dict[str, list[float]] = {"bare": [], "trainer": []}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        trainer.model.load_state_dict(state)
        results["bare"].append(bare_loop(trainer.model, loader, trainer.cfg.train))
        trainer.model.load_state_dict(state)
        results["trainer"].append(trainer.train_one_epoch(0)["images_per_s"])
    best = {k: max(v) for k, v in results.items()}
    mem, kind = peak_memory_mb(trainer.device)
    return {
        "backbone": args.backbone, "batch": args.batch, "size": args.size, "iters": args.iters,
        "threads": torch.get_num_threads(), "device": str(trainer.device),
        "bare_images_per_s": best["bare"], "trainer_images_per_s": best["trainer"],
        "ratio": best["trainer"] / best["bare"], "runs": results, f"peak_mem_mb_{kind}": mem,
        "optimizer_step_ms": step_ms,
    }


def gpu_sweep(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu-sweep needs CUDA")
    for size, batch, amp, cl in itertools.product(args.sizes, args.batches, args.amps, (False, True)):
        trainer, _ = make_trainer(args, size, batch, **{"train.amp": amp, "train.channels_last": cl,
                                                        "model.scale": 1.0, "model.max_size": 2048})
        trainer.train_one_epoch(0)  # warm-up (cudnn autotuning, allocator)
        m = trainer.train_one_epoch(0)
        print(json.dumps({"backbone": args.backbone, "size": size, "batch": batch, "amp": amp, "channels_last": cl,
                          "images_per_s": round(m["images_per_s"], 2), "peak_gpu_mb": round(m["peak_mem_mb"]),
                          "gpu": torch.cuda.get_device_name()}), flush=True)
        del trainer
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=40, help="synthetic training images (default 40, the demo's)")
    ap.add_argument("--gpu-sweep", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 800])
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--amps", nargs="+", default=["off", "fp16", "bf16"])
    args = ap.parse_args()
    if args.gpu_sweep:
        gpu_sweep(args)
    else:
        print(json.dumps(compare_with_bare_loop(args), indent=1))


if __name__ == "__main__":
    main()
