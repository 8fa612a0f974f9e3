"""Trainer throughput against a bare training loop over the same model and batches.

The bare loop is ``model(images, targets) -> sum(losses).backward() -> optimizer.step()``; the
Trainer adds loss bookkeeping, the non-finite check, the progress bar and the schedule. Both see
the same precomputed batches (synthetic 256 px crops) in the same order. Target on CPU: the
Trainer keeps >= 95 % of the bare loop's images/s.

    python benchmarks/train_throughput.py [--backbone resnet18] [--iters 12] [--batch 2] [--size 256]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader, Dataset

import cellkit
from cellkit.data import collate
from cellkit.engine.trainer import Trainer, peak_memory_mb


class Frozen(Dataset):
    """A fixed list of (image, target) samples: both loops train on exactly the same data."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def bare_loop(model: torch.nn.Module, loader: DataLoader, lr: float) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = cellkit.load_config("configs/demo.yaml", {
        "model.backbone": args.backbone, "train.batch_size": args.batch, "train.eval_every": 0,
        "train.iters_per_epoch": args.iters, "train.epochs": 1, "data.augment.crop_size": args.size,
    })
    trainer = Trainer(cfg, None, progress=False)
    trainer.train_ds.preload(False)
    items = [trainer.train_ds[i % len(trainer.train_ds)] for i in range(args.iters * args.batch)]
    loader = DataLoader(Frozen(items), batch_size=args.batch, shuffle=False, collate_fn=collate)
    trainer._loader = loader
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    bare_loop(trainer.model, DataLoader(Frozen(items[: 2 * args.batch]), batch_size=args.batch, collate_fn=collate), 1e-4)
    results = {"bare": [], "trainer": []}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        trainer.model.load_state_dict(state)
        results["bare"].append(bare_loop(trainer.model, loader, cfg.train.lr))
        trainer.model.load_state_dict(state)
        results["trainer"].append(trainer.train_one_epoch(0)["images_per_s"])
    best = {k: max(v) for k, v in results.items()}
    mem, kind = peak_memory_mb(trainer.device)
    out = {
        "backbone": args.backbone, "batch": args.batch, "size": args.size, "iters": args.iters,
        "threads": torch.get_num_threads(), "device": str(trainer.device),
        "bare_images_per_s": best["bare"], "trainer_images_per_s": best["trainer"],
        "ratio": best["trainer"] / best["bare"], "runs": results, f"peak_mem_mb_{kind}": mem,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
