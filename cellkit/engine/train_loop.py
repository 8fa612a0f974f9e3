"""The training loop and the :class:`Hook` base: one loop for the CLI, notebooks and torchrun (DDP).

The :class:`Trainer` owns the loop and the optimiser step; everything else (validation, the
learning-rate schedule, early stopping, checkpoints, metrics files, plots, logging, notebook
curves) is a :class:`Hook` it is handed. This module knows no concrete hook: the default ones
(:mod:`cellkit.engine.hooks`) are assembled by :mod:`cellkit.engine.defaults`
(:class:`~cellkit.engine.defaults.DefaultTrainer`, :func:`~cellkit.engine.defaults.train`), as
Detectron2's ``defaults.py`` does. With the default hooks a run directory
(:mod:`cellkit.runs`) holds::

    config.yaml             the resolved config
    metrics.jsonl           one line per epoch (losses, lr, val AP50/AP, seconds, images/s, memory)
    metrics.json            the final summary (best val AP50 and its epoch, stop reason, ...)
    val_gt.json             COCO ground truth of the validation split
    val_predictions.json    the validation predictions of the best epoch (COCO results)
    holdout_gt.json, holdout_predictions.json   the hold-out split scored once at the best epoch
                            (``data.holdout_fraction`` > 0; :mod:`cellkit.engine.holdout`)
    checkpoints/last.pth    written every epoch (atomically), everything needed to resume
    checkpoints/best.pth    the epoch with the best val AP50: weights, config and history only
    plots/curves.png        loss and AP50 curves
    events.out.tfevents.*   TensorBoard (``train.tensorboard``; ``tensorboard --logdir RUN_DIR``)

While ``fit`` runs, the run directory is locked (``.lock``, :func:`cellkit.runs.claim_run_dir`); a
directory holding a previous run needs ``fit(resume=True)`` or ``fit(overwrite=True)``.
``fit(resume=True)`` continues from ``checkpoints/last.pth`` with the same schedule and the hooks'
saved state: the epochs already done are not repeated and ``metrics.jsonl`` is rebuilt from the
checkpoint's history, so no epoch appears twice even if the process died between two writes.
"""
from __future__ import annotations

import os
import random
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .. import __version__
from ..analysis.scale import resolve_cell_statistics
from ..config import Config
from ..data import CellDataset, build_copy_paste, build_train_transforms, collate, num_classes_of, train_val_samples
from ..data.coco import build_coco, coco_from_dataset
from ..data.intensity import Intensity
from ..data.sampling import RepeatFactorSampler, repeat_factors
from ..errors import ConfigError, DataError, TrainingError
from ..models import build_model
from ..models.checkpoint import load_checkpoint, load_model_weights, rng_state, set_rng_state, stored_config
from ..models.devices import resolve_device
from ..outputs import write_atomic, write_json
from ..progress import bar
from ..runs import RunDir, check_resume_config, claim_run_dir
from . import distributed as dist_utils
from .schedule import build_optimizer, load_optimizer_state


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: full precision). Always off on CPU."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    return torch.float16


def _any_cell(dataset: CellDataset) -> bool:
    """Whether any label map of ``dataset`` holds a cell (decodes until the first one that does)."""
    return any(dataset.load(i)[1].num_instances for i in range(len(dataset)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MB, what was measured): GPU max allocated since the last reset, or process peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss"


class Hook:
    """Base class of trainer hooks: every method does nothing; override what you need.

    A hook overrides any of::

        before_train()            once, after the data is ready (and after a resume)
        before_epoch(epoch)       epoch: 0-based index of the epoch about to run
        after_step(step)          after every optimiser step; step = {"epoch", "iteration", "lr", "loss"}
        after_epoch(metrics)      the epoch's metrics dict (losses, lr, timing); hooks may add to it
                                  (validation adds val_ap50 ...): it is the line metrics.jsonl gets
        after_train(summary)      once, with the run's summary (what metrics.json gets)
        state_dict() / load_state_dict(state)   saved in checkpoints/last.pth and restored on resume

    and sees the trainer as ``self.trainer``. Hooks run in increasing :attr:`priority` (ties in
    the order given); a hook with :attr:`main_process_only` runs only on rank 0 under DDP. Hooks
    do not look for each other: what one produces for the others in an epoch goes into
    :attr:`Trainer.storage` (validation puts its result there, checkpoints and TensorBoard read it).
    """

    priority: int = 50
    """Lower runs first (see :mod:`cellkit.engine.defaults` for the default hooks' priorities)."""
    main_process_only: bool = False
    """Run only on rank 0 under DDP (hooks that write files or print)."""
    trainer: "Trainer"

    def before_train(self) -> None:
        """Once, before the first epoch of this process (after a resume has restored the state)."""

    def before_epoch(self, epoch: int) -> None:
        """Before epoch ``epoch`` (0-based)."""

    def after_step(self, step: dict[str, Any]) -> None:
        """After every optimiser step: ``{"epoch": int (0-based), "iteration": int (global, 1-based),
        "lr": float, "loss": float}``."""

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        """After every epoch, with its metrics (add keys to record them in metrics.jsonl)."""

    def after_train(self, summary: dict[str, Any]) -> None:
        """Once, after the last epoch (or early stop), with the run's summary."""

    def state_dict(self) -> dict[str, Any]:
        """What this hook needs to resume (plain containers, numbers, strings and tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    @property
    def name(self) -> str:
        return type(self).__name__


class Trainer:
    """Train Mask R-CNN on a :class:`~cellkit.config.Config`.

    Args:
        cfg: the configuration (``data``, ``model``, ``train``, ``eval``, ``predict``). A
            ``model.scale: auto`` and ``model.max_cell_diameter`` are measured on the training
            set here (:func:`cellkit.analysis.scale.resolve_cell_statistics`); ``self.cfg``, the
            run's ``config.yaml`` and the checkpoints hold the resulting numbers.
        run_dir: where results go (None: nothing is written; handy in notebooks and tests).
        hooks: the hooks (none by default: a bare loop; :class:`~cellkit.engine.defaults.DefaultTrainer`
            adds validation, checkpoints, metrics ...). Hooks run in order of their ``priority``.
        train_set: a torch Dataset of ``(image (3, H, W) float32 in [0, 1], target)`` pairs, the
            target as torchvision's Mask R-CNN takes it (``boxes``, ``labels``, ``masks``,
            ``image_id``); default: the training split of ``cfg.data`` with its augmentation.
        val_set: the same for validation (default: the validation split of ``cfg.data``); its
            ground truth is built from its targets.
        model: a prebuilt model (default: ``cellkit.build_model(cfg)``).
        progress: show tqdm bars (they stay quiet when stderr is not a terminal).
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | os.PathLike[str] | None = None,
        hooks: Sequence[Hook] | None = None,
        train_set: Dataset | None = None,
        val_set: Dataset | None = None,
        model: torch.nn.Module | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg.validate()  # a config changed by hand is range-checked too
        tc = cfg.train
        device_type = "cuda" if (tc.device.startswith("cuda") or (tc.device == "auto" and torch.cuda.is_available())) else "cpu"
        self.dist = dist_utils.init_distributed(device_type)
        self.device = resolve_device(tc.device, self.dist.local_rank)
        self.run_dir = Path(run_dir) if run_dir is not None and self.dist.is_main else None
        self.progress = progress and self.dist.is_main
        seed_everything(tc.seed + self.dist.rank)

        if train_set is None or val_set is None:
            train_samples, val_samples = train_val_samples(cfg.data, cfg.model.num_classes, progress=self.progress)
            if cfg.model.num_classes is None:  # from the data: its highest classK.tif
                cfg = self.cfg = cfg.replace({"model.num_classes": num_classes_of(train_samples + val_samples)})
            if train_set is None:
                train_set = CellDataset(train_samples, build_train_transforms(cfg.data.augment), cache=cfg.data.cache,
                                        copy_paste=build_copy_paste(cfg.data.augment, cfg.model.num_classes),
                                        intensity=Intensity.from_config(cfg.data))
            if val_set is None:
                val_set = CellDataset(val_samples, None, cache=cfg.data.cache, intensity=Intensity.from_config(cfg.data))
        self.train_set: Dataset = train_set
        self.val_set: Dataset = val_set
        if cfg.model.num_classes is None:
            cfg = self.cfg = cfg.replace({"model.num_classes": self._classes_of_datasets()})
        # model.scale: auto -> a number; model.max_cell_diameter (tiles' overlap) measured when not set
        cfg = self.cfg = resolve_cell_statistics(cfg, train_set, log=self._log)

        if model is None:
            model = build_model(cfg)
        self.model = model.to(self.device)
        if tc.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, tc)
        self.amp_dtype = amp_dtype(tc.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ddp_model: torch.nn.Module = self.model
        if self.dist.enabled:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.eval_model: torch.nn.Module = self.model
        """The weights validation and best.pth use (a hook may swap in averaged weights, e.g. EMA)."""
        self.epoch = 0
        """Epochs completed."""
        self.iteration = 0
        """Optimiser steps taken over the whole run."""
        self.history: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self.nonfinite_in_a_row = 0
        self._val_gt: dict[str, Any] | None = None
        self._val_without_cells = False
        self._loader: DataLoader | None = None
        self.storage: dict[str, Any] = {}
        """What hooks hand each other during the current epoch (emptied before each epoch), e.g.
        ``"validation"``: the :class:`~cellkit.engine.hooks.Validation` of the epoch."""
        self.hooks: list[Hook] = []
        self.register_hooks(hooks or ())

    # ---------------------------------------------------------------------------------------
    # hooks

    def _classes_of_datasets(self) -> int:
        datasets = [d for d in (self.train_set, self.val_set) if isinstance(d, CellDataset)]
        if not datasets:
            raise ConfigError("model.num_classes: not set, and the datasets passed in do not say how many classes "
                              "there are (only CellDatasets do); set model.num_classes")
        return num_classes_of([s for d in datasets for s in d.samples])

    def register_hooks(self, hooks: Iterable[Hook]) -> None:
        """Add hooks; all hooks are kept sorted by ``priority`` (stable: ties keep their order)."""
        for h in hooks:
            if not isinstance(h, Hook):
                raise ConfigError(f"{h!r} is not a cellkit.engine.train_loop.Hook")
            h.trainer = self
            self.hooks.append(h)
        self.hooks.sort(key=lambda h: h.priority)

    def _call(self, method: str, *args: Any) -> None:
        for h in self.hooks:
            if h.main_process_only and not self.dist.is_main:
                continue
            getattr(h, method)(*args)

    def request_stop(self, reason: str) -> None:
        """Stop after the current epoch (a hook's early-stopping rule calls this)."""
        self.stop_reason = reason

    # ---------------------------------------------------------------------------------------
    # data

    @property
    def has_validation(self) -> bool:
        """A validation split with at least one image (and, once checked, one cell: AP is undefined without)."""
        return len(self.val_set) > 0 and not self._val_without_cells  # type: ignore[arg-type]

    def _check_cells(self) -> None:
        """Refuse a training split whose label maps hold no cell (it would train on background alone
        and report AP50 NaN); a validation split without cells is not validated, with a warning."""
        train = self.train_set
        if isinstance(train, CellDataset) and len(train) and not _any_cell(train):
            raise DataError(train.samples[0].image_path.parent.parent,
                            f"the label maps (classK.tif) of the {len(train)} training images hold no cell, only "
                            "background: there is nothing to learn from")
        val = self.val_set
        if isinstance(val, CellDataset) and len(val) and not _any_cell(val):
            self._val_without_cells = True
            self._log(f"warning: the label maps of the {len(val)} validation images hold no cell, so AP is undefined "
                      "there: this run is not validated (best.pth is its first epoch); set data.split_seed or "
                      "data.val_fraction for a split with cells")

    def _sampler(self) -> torch.utils.data.Sampler[int]:
        tc = self.cfg.train
        if tc.sampler == "repeat_factor":
            if not hasattr(self.train_set, "class_presence"):
                raise ConfigError("train.sampler: repeat_factor needs a dataset with class_presence() (a CellDataset)")
            presence = self.train_set.class_presence(self.cfg.model.num_classes)  # type: ignore[attr-defined]
            return RepeatFactorSampler(repeat_factors(presence, tc.repeat_threshold), tc.seed,
                                       self.dist.world_size, self.dist.rank)
        # a new shuffle per epoch from (seed, epoch): a resumed run sees the same order
        return DistributedSampler(self.train_set, self.dist.world_size, self.dist.rank, shuffle=True, seed=tc.seed)

    def train_loader(self) -> DataLoader:
        if self._loader is None:
            workers = self.cfg.data.num_workers
            self._loader = DataLoader(
                self.train_set, batch_size=self.cfg.train.batch_size, sampler=self._sampler(), collate_fn=collate,
                num_workers=workers, persistent_workers=workers > 0, pin_memory=self.device.type == "cuda",
            )
        return self._loader

    @property
    def val_gt(self) -> dict[str, Any]:
        """COCO ground truth of the validation set (built once: from the decoded label maps of a
        :class:`~cellkit.data.CellDataset`, from the targets of any other dataset)."""
        if self._val_gt is None:
            ds = self.val_set
            if isinstance(ds, CellDataset):
                loaded = (ds.load(i) for i in range(len(ds)))
                self._val_gt = build_coco(ds.samples, self.cfg.model.num_classes, False, loaded)
            else:
                self._val_gt = coco_from_dataset(ds, self.cfg.model.num_classes)
        return self._val_gt

    @property
    def lr(self) -> float:
        """Learning rate of the first parameter group now."""
        return float(self.optimizer.param_groups[0]["lr"])

    # ---------------------------------------------------------------------------------------
    # the loop

    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Train for ``train.epochs`` epochs (or until a hook stops it) and return the summary.

        The run directory is locked while training (:func:`cellkit.runs.claim_run_dir`):
        a second process gets a clear error. A directory that holds a previous run needs
        ``resume=True`` (continue it) or ``overwrite=True`` (delete its outputs and start again).
        """
        with claim_run_dir(self.run_dir, resume=resume, overwrite=overwrite, log=self._log):
            return self._fit(resume)

    def _fit(self, resume: bool) -> dict[str, Any]:
        if resume:
            self._resume()
        t_start = time.time()
        n_cached = sum(ds.preload(self.progress) for ds in (self.train_set, self.val_set) if isinstance(ds, CellDataset))
        self._check_cells()
        if self.run_dir is not None:
            write_atomic(RunDir(self.run_dir).config, self.cfg.to_yaml())
        if self.run_dir is not None and self.has_validation:
            write_json(self.val_gt, RunDir(self.run_dir).val_gt)
        self._log(f"{len(self.train_set)} training / {len(self.val_set)} validation images "  # type: ignore[arg-type]
                  f"({n_cached / 2**20:.0f} MB decoded in memory); device {self.device}"
                  + (f", {self.dist.world_size} processes" if self.dist.enabled else ""))
        self._call("before_train")
        try:
            while self.epoch < self.cfg.train.epochs and self.stop_reason is None:
                self.storage.clear()
                self._call("before_epoch", self.epoch)
                metrics = self.train_one_epoch(self.epoch)
                self.epoch += 1
                self.history.append(metrics)
                self._call("after_epoch", metrics)
        finally:
            dist_utils.barrier()
        summary = self.summary(time.time() - t_start)
        self._call("after_train", summary)
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
        lr = self.lr
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
            loss_value = float(loss.detach())
            if (i + 1) % tc.accumulate == 0 or i + 1 == n_batches:
                self._optimizer_step()
                counts["steps"] += 1
                self._call("after_step", {"epoch": epoch, "iteration": self.iteration, "lr": self.lr, "loss": loss_value})
            for k, v in losses.items():
                sums[k] += float(v.detach())
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
        # train.channels_last needs nothing here: the images are (3, H, W), which have no
        # channels_last layout, and the model batches them into a new tensor anyway; the weights'
        # layout (set in __init__) makes the convolutions run and answer in channels_last
        images = [im.to(self.device, non_blocking=True) for im in images]
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
        self.iteration += 1

    def _skip_nonfinite(self, losses: dict[str, torch.Tensor], epoch: int, batch: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        bad = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v)}
        limit = self.cfg.train.max_nonfinite
        if self.nonfinite_in_a_row >= limit:
            raise TrainingError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row (epoch {epoch + 1}, batch {batch + 1}: {bad}); "
                f"stopping. Lower train.lr, set train.grad_clip, or check the data. "
                f"Last good checkpoint: {RunDir(self.run_dir).checkpoint('last') if self.run_dir else 'none'}"
            )

    # ---------------------------------------------------------------------------------------
    # state

    def summary(self, seconds: float) -> dict[str, Any]:
        """The run's final numbers (the default hooks write them to ``metrics.json``)."""
        best = max((h for h in self.history if h.get("val_ap50") is not None), key=lambda h: h["val_ap50"], default=None)
        return {
            "name": self.cfg.name,
            "epochs_run": self.epoch,
            "best_val_ap50": best["val_ap50"] if best else None,
            "best_val_ap50_lo": best.get("val_ap50_lo") if best else None,
            "best_val_ap50_hi": best.get("val_ap50_hi") if best else None,
            "best_val_ap": best["val_ap"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "final": self.history[-1] if self.history else None,
            "stop_reason": self.stop_reason,
            "seconds": seconds,
            "backbone": self.cfg.model.backbone,
            "run_dir": str(self.run_dir) if self.run_dir else None,
        }

    def _hook_keys(self) -> list[str]:
        seen: dict[str, int] = {}
        keys = []
        for h in self.hooks:
            n = seen.get(h.name, 0)
            seen[h.name] = n + 1
            keys.append(h.name if n == 0 else f"{h.name}#{n}")
        return keys

    def state_dict(self) -> dict[str, Any]:
        """The resume checkpoint (``checkpoints/last.pth``; see :mod:`cellkit.models.checkpoint`)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "config": self.cfg.to_dict(),
            "history": self.history,
            "stop_reason": self.stop_reason,
            "hooks": {k: h.state_dict() for k, h in zip(self._hook_keys(), self.hooks)},
            "rng": rng_state(),
            "cellkit_version": __version__,
        }

    def inference_state(self) -> dict[str, Any]:
        """The light checkpoint of :attr:`eval_model` (``checkpoints/best.pth``): weights, config, history."""
        return {"model": self.eval_model.state_dict(), "epoch": self.epoch, "config": self.cfg.to_dict(),
                "history": self.history, "cellkit_version": __version__}

    def _resume(self) -> None:
        if self.run_dir is None and not self.dist.enabled:
            raise ConfigError("resume needs a run directory")
        path = RunDir(self.run_dir or Path(".")).checkpoint("last")
        path = dist_utils.broadcast(str(path) if self.dist.is_main else None)
        if not Path(path).is_file():
            self._log(f"nothing to resume at {path}; starting from scratch")
            return
        ckpt = load_checkpoint(path, map_location="cpu")  # load_state_dict moves each tensor where it belongs
        check_resume_config(stored_config(ckpt, path), self.cfg)  # e.g. adamw state into sgd
        # hooks first: a scheduler hook builds its schedulers (which set the lr) before the
        # optimiser's saved state (and lr) is put back
        states = ckpt.get("hooks") or {}
        for key, h in zip(self._hook_keys(), self.hooks):
            if key in states:
                h.load_state_dict(states[key])
        load_model_weights(self.model, ckpt["model"], path, stored_config(ckpt, path), self.cfg)
        try:
            load_optimizer_state(self.optimizer, ckpt["optimizer"])
        except (ValueError, KeyError) as e:  # other trainable parameters than the run had
            raise DataError(path, f"the optimizer state does not fit this config's trainable parameters ({e})") from None
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.iteration = int(ckpt.get("iteration", 0))
        self.history = list(ckpt["history"])
        self.stop_reason = ckpt.get("stop_reason")
        set_rng_state(ckpt["rng"])  # rank 0's streams; the other ranks draw their own
        if self.dist.rank:
            seed_everything(self.cfg.train.seed + self.dist.rank + 7919 * self.epoch)
        self._log(f"resumed from {path} after epoch {self.epoch}")

    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, flush=True)

