"""The Trainer: one training loop for the CLI, notebooks and torchrun (DDP).

A run directory holds::

    config.yaml             the resolved config
    metrics.jsonl           one line per epoch (losses, lr, val AP50/AP, seconds, images/s, memory)
    metrics.json            the final summary (best val AP50 and its epoch, stop reason, ...)
    val_gt.json             COCO ground truth of the validation split
    val_predictions.json    the validation predictions of the best epoch (COCO results)
    checkpoints/last.pth    written every epoch (atomically), everything needed to resume
    checkpoints/best.pth    the epoch with the best val AP50: weights, config and history only
    plots/curves.png        loss and AP50 curves

``fit(resume=True)`` continues from ``checkpoints/last.pth`` with the same schedule: the epochs
already done are not repeated and ``metrics.jsonl`` is rebuilt from the checkpoint's history, so no
epoch appears twice even if the process died between the two writes.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .. import __version__
from ..config import Config
from ..data import CellDataset, build_coco, build_train_transforms, collate, train_val_samples
from ..data.coco import write_json
from ..data.sampling import RepeatFactorSampler, repeat_factors
from ..errors import ConfigError, TrainingError
from ..progress import bar
from . import distributed as dist_utils
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .devices import resolve_device
from .schedule import Schedule, build_optimizer

Callback = Callable[["Trainer", dict[str, Any]], None]


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: full precision). Always off on CPU."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    return torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MB, what was measured): GPU max allocated since the last reset, or process peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss"


class Trainer:
    """Train Mask R-CNN on a :class:`~cellkit.config.Config`.

    Args:
        cfg: the configuration (``data``, ``model``, ``train``, ``eval``, ``predict``).
        run_dir: where results go (None: nothing is written; handy in notebooks and tests).
        model: a prebuilt model (default: ``cellkit.build_model(cfg)``).
        callbacks: called as ``callback(trainer, epoch_metrics)`` after every epoch on rank 0
            (live plots in notebooks).
        progress: show tqdm bars (they stay quiet when stderr is not a terminal).
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | os.PathLike[str] | None = None,
        model: torch.nn.Module | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        tc = cfg.train
        device_type = "cuda" if (tc.device.startswith("cuda") or (tc.device == "auto" and torch.cuda.is_available())) else "cpu"
        self.dist = dist_utils.init_distributed(device_type)
        self.device = resolve_device(tc.device, self.dist.local_rank)
        self.run_dir = Path(run_dir) if run_dir is not None and self.dist.is_main else None
        self.callbacks = list(callbacks)
        self.progress = progress and self.dist.is_main
        seed_everything(tc.seed + self.dist.rank)

        train_samples, val_samples = train_val_samples(cfg.data, cfg.model.num_classes, progress=self.progress)
        self.train_ds = CellDataset(train_samples, build_train_transforms(cfg.data.augment), cache=cfg.data.cache)
        self.val_ds = CellDataset(val_samples, None, cache=cfg.data.cache)

        if model is None:
            from ..models import build_model

            model = build_model(cfg)
        self.model = model.to(self.device)
        if tc.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, tc)
        self.schedule = Schedule(self.optimizer, tc)
        self.amp_dtype = amp_dtype(tc.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ddp_model: torch.nn.Module = self.model
        if self.dist.enabled:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best_ap50: float | None = None
        self.nonfinite_in_a_row = 0
        self._val_gt: dict[str, Any] | None = None
        self._val_predictions: list[dict[str, Any]] | None = None
        self._loader: DataLoader | None = None

    # ---------------------------------------------------------------------------------------
    # data

    def _sampler(self) -> torch.utils.data.Sampler[int]:
        tc = self.cfg.train
        if tc.sampler == "repeat_factor":
            factors = repeat_factors(self.train_ds.class_presence(self.cfg.model.num_classes), tc.repeat_threshold)
            return RepeatFactorSampler(factors, tc.seed, self.dist.world_size, self.dist.rank)
        # a new shuffle per epoch from (seed, epoch): a resumed run sees the same order
        return DistributedSampler(self.train_ds, self.dist.world_size, self.dist.rank, shuffle=True, seed=tc.seed)

    def train_loader(self) -> DataLoader:
        if self._loader is None:
            workers = self.cfg.data.num_workers
            self._loader = DataLoader(
                self.train_ds, batch_size=self.cfg.train.batch_size, sampler=self._sampler(), collate_fn=collate,
                num_workers=workers, persistent_workers=workers > 0, pin_memory=self.device.type == "cuda",
            )
        return self._loader

    @property
    def val_gt(self) -> dict[str, Any]:
        """COCO ground truth of the validation split (built once from the dataset cache)."""
        if self._val_gt is None:
            loaded = (self.val_ds.load(i) for i in range(len(self.val_ds)))
            self._val_gt = build_coco(self.val_ds.samples, self.cfg.model.num_classes, False, loaded)
        return self._val_gt

    # ---------------------------------------------------------------------------------------
    # the loop

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train for ``train.epochs`` epochs (or until early stopping) and return the summary."""
        tc = self.cfg.train
        if resume:
            self._resume()
        t_start = time.time()
        if self.run_dir is not None:
            self.cfg.save(self.run_dir / "config.yaml")
            for stale in (self.run_dir / "checkpoints").glob(".*.tmp*"):  # left by a process killed mid-write
                stale.unlink()
        n_cached = self.train_ds.preload(self.progress) + self.val_ds.preload(self.progress)
        if self.run_dir is not None and len(self.val_ds):
            write_json(self.val_gt, self.run_dir / "val_gt.json")
        self._log(f"{len(self.train_ds)} training / {len(self.val_ds)} validation images "
                  f"({n_cached / 2**20:.0f} MB decoded in memory); device {self.device}"
                  + (f", {self.dist.world_size} processes" if self.dist.enabled else ""))
        stop_reason = self.schedule.stop_reason
        try:
            while self.epoch < tc.epochs and stop_reason is None:
                metrics = self.train_one_epoch(self.epoch)
                metrics.update(self._validate_if_due(self.epoch))
                if self.schedule.step_epoch(metrics.get("val_ap50")):
                    stop_reason = self.schedule.stop_reason
                    metrics["stopped"] = stop_reason
                self.epoch += 1
                self.history.append(metrics)
                self._end_of_epoch(metrics)
        finally:
            dist_utils.barrier()
        summary = self.summary(stop_reason, time.time() - t_start)
        if self.run_dir is not None:
            write_json(summary, self.run_dir / "metrics.json")
        if stop_reason:
            self._log(f"early stop: {stop_reason}")
        return summary

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training data (or ``train.iters_per_epoch`` optimiser steps)."""
        tc = self.cfg.train
        loader = self.train_loader()
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        self.ddp_model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        n_batches = len(loader) if tc.iters_per_epoch is None else min(len(loader), tc.iters_per_epoch * tc.accumulate)
        sums: dict[str, float] = defaultdict(float)
        counts = {"images": 0, "batches": 0, "steps": 0, "nonfinite": 0}
        lr = self.schedule.lr
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        pbar = bar(total=n_batches, desc=f"epoch {epoch + 1}/{tc.epochs}", enabled=self.progress)
        for i, (images, targets) in enumerate(loader):
            if i >= n_batches:
                break
            losses = self._forward(images, targets)
            loss = sum(losses.values())
            if not dist_utils.all_true(bool(torch.isfinite(loss)), self.device):
                self._skip_nonfinite(losses, epoch, i)
                counts["nonfinite"] += 1
                pbar.update(1)
                continue
            self.nonfinite_in_a_row = 0
            self.scaler.scale(loss / tc.accumulate).backward()
            if (i + 1) % tc.accumulate == 0 or i + 1 == n_batches:
                self._optimizer_step()
                counts["steps"] += 1
            for k, v in losses.items():
                sums[k] += float(v.detach())
            loss_value = float(loss.detach())
            sums["loss"] += loss_value
            counts["images"] += len(images)
            counts["batches"] += 1
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        pbar.close()
        seconds = time.perf_counter() - t0
        totals = dist_utils.all_reduce_sums({**sums, **{f"n_{k}": float(v) for k, v in counts.items()}}, self.device)
        n_batches_done = max(1.0, totals["n_batches"])
        mem, mem_kind = peak_memory_mb(self.device)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
        metrics.update({k: totals[k] / n_batches_done for k in sums})
        metrics.update({
            "images": int(totals["n_images"]), "steps": int(totals["n_steps"]) // self.dist.world_size,
            "nonfinite_steps": int(totals["n_nonfinite"]), "train_seconds": seconds,
            "images_per_s": totals["n_images"] / seconds if seconds > 0 else 0.0,
            "peak_mem_mb": mem, "mem_kind": mem_kind,
        })
        return metrics

    def _forward(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [im.to(self.device, non_blocking=True) for im in images]
        if self.cfg.train.channels_last:
            images = [im.contiguous(memory_format=torch.channels_last) for im in images]
        targets = [{k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            return self.ddp_model(images, targets)

    def _optimizer_step(self) -> None:
        tc = self.cfg.train
        if tc.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step_iter()

    def _skip_nonfinite(self, losses: dict[str, torch.Tensor], epoch: int, batch: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v)}
        limit = self.cfg.train.max_nonfinite
        if self.nonfinite_in_a_row >= limit:
            raise TrainingError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row (epoch {epoch + 1}, batch {batch + 1}: {bad}); "
                f"stopping. Lower train.lr, set train.grad_clip, or check the data. "
                f"Last good checkpoint: {self.run_dir / 'checkpoints/last.pth' if self.run_dir else 'none'}"
            )

    # ---------------------------------------------------------------------------------------
    # validation, bookkeeping

    def _validate_if_due(self, epoch: int) -> dict[str, Any]:
        every = self.cfg.train.eval_every
        last = epoch + 1 == self.cfg.train.epochs
        if not len(self.val_ds) or every <= 0 or ((epoch + 1) % every and not last):
            return {}
        result: dict[str, Any] = {}
        error: Exception | None = None
        if self.dist.is_main:
            try:
                result = self.validate()
            except Exception as e:  # every rank waits in broadcast: tell them, then fail together
                error, result = e, {"error": f"{type(e).__name__}: {e}"}
        result = dist_utils.broadcast(result)
        if error is not None:
            raise error
        if "error" in result:
            raise TrainingError(f"validation failed on rank 0: {result['error']}")
        return result

    def validate(self) -> dict[str, Any]:
        """Predict the validation split with the current model; COCO segm AP50/AP and timing."""
        from .validate import evaluate_model

        t0 = time.perf_counter()
        res, self._val_predictions = evaluate_model(
            self.model, self.val_ds, self.val_gt, self.cfg, self.device, progress=self.progress
        )
        return {"val_ap50": res.ap50, "val_ap": res.ap, "val_ap75": res.ap75, "val_seconds": time.perf_counter() - t0}

    def _end_of_epoch(self, m: dict[str, Any]) -> None:
        improved = m.get("val_ap50") is not None and (self.best_ap50 is None or m["val_ap50"] > self.best_ap50)
        if improved:
            self.best_ap50 = m["val_ap50"]
        if self.run_dir is not None:
            state = self.state_dict()
            save_checkpoint(state, self.run_dir / "checkpoints" / "last.pth")
            if improved or (self.best_ap50 is None and not (self.run_dir / "checkpoints" / "best.pth").exists()):
                weights_only = {k: state[k] for k in ("model", "epoch", "config", "history", "best", "cellkit_version")}
                save_checkpoint(weights_only, self.run_dir / "checkpoints" / "best.pth")
                if improved and self._val_predictions is not None:
                    write_json(self._val_predictions, self.run_dir / "val_predictions.json")
            self._write_metrics()
            from ..viz.curves import save_history_plot

            save_history_plot(self.history, self.run_dir / "plots" / "curves.png", self.cfg.name)
        self._log(self.epoch_line(m))
        if self.dist.is_main:
            for cb in self.callbacks:
                cb(self, m)

    def epoch_line(self, m: dict[str, Any]) -> str:
        """The one-line epoch summary."""
        parts = [f"epoch {m['epoch']}/{self.cfg.train.epochs}", f"loss {m.get('loss', float('nan')):.4f}",
                 f"lr {m['lr']:.2e}"]
        if m.get("val_ap50") is not None:
            parts.append(f"val AP50 {m['val_ap50']:.4f} AP {m['val_ap']:.4f}")
        parts += [f"{m['train_seconds']:.0f}s", f"{m['images_per_s']:.2f} img/s", f"mem {m['peak_mem_mb']:.0f} MB"]
        if m.get("nonfinite_steps"):
            parts.append(f"{m['nonfinite_steps']} non-finite steps skipped")
        return " | ".join(parts)

    def _write_metrics(self) -> None:
        assert self.run_dir is not None
        path = self.run_dir / "metrics.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        os.replace(tmp, path)

    def summary(self, stop_reason: str | None, seconds: float) -> dict[str, Any]:
        """The run's final numbers (also written to ``metrics.json``)."""
        best = max((h for h in self.history if h.get("val_ap50") is not None), key=lambda h: h["val_ap50"], default=None)
        return {
            "name": self.cfg.name,
            "epochs_run": self.epoch,
            "best_val_ap50": best["val_ap50"] if best else None,
            "best_val_ap": best["val_ap"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "final": self.history[-1] if self.history else None,
            "stop_reason": stop_reason,
            "seconds": seconds,
            "backbone": self.cfg.model.backbone,
            "run_dir": str(self.run_dir) if self.run_dir else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint dict (see :mod:`cellkit.engine.checkpoint`)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "config": self.cfg.to_dict(),
            "history": self.history,
            "best": self.best_ap50,
            "rng": rng_state(),
            "cellkit_version": __version__,
        }

    def _resume(self) -> None:
        path = (self.run_dir or Path(".")) / "checkpoints" / "last.pth"
        if self.run_dir is None and not self.dist.enabled:
            raise ConfigError("resume needs a run directory")
        path = dist_utils.broadcast(str(path) if self.dist.is_main else None)
        if not Path(path).is_file():
            self._log(f"nothing to resume at {path}; starting from scratch")
            return
        ckpt = load_checkpoint(path, map_location="cpu")  # load_state_dict moves each tensor where it belongs
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.history = list(ckpt["history"])
        self.best_ap50 = ckpt.get("best")
        set_rng_state(ckpt["rng"])  # rank 0's streams; the other ranks draw their own
        if self.dist.rank:
            seed_everything(self.cfg.train.seed + self.dist.rank + 7919 * self.epoch)
        if self.run_dir is not None:
            self._write_metrics()
        self._log(f"resumed from {path} after epoch {self.epoch}")

    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, flush=True)


def train(cfg: Config, run_dir: str | os.PathLike[str] | None, resume: bool = False, progress: bool = True,
          callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Build a :class:`Trainer`, fit, clean up the process group; returns the summary."""
    try:
        return Trainer(cfg, run_dir, callbacks=list(callbacks), progress=progress).fit(resume=resume)
    finally:
        dist_utils.cleanup()
