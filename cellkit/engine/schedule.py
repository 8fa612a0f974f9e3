"""Learning-rate schedules of the original reports, built from torch's schedulers, and the
early-stopping rule (both driven by the Trainer's hooks, :mod:`cellkit.engine.hooks`).

========== =====================================================================================
scheduler  what happens after the warm-up
========== =====================================================================================
constant   the base lr throughout (report 004 found no scheduler best)
multistep  ``MultiStepLR`` decaying by ``gamma`` at ``milestones`` (fractions of ``epochs``)
cosine     ``CosineAnnealingLR`` from the base lr to ``min_lr`` over the remaining epochs
plateau    ``ReduceLROnPlateau`` on validation AP50 (mode max, ``plateau_factor``,
           ``plateau_patience``); its decays hold (nothing else writes the lr after the warm-up,
           unlike the original code, whose LambdaLR overwrote them every epoch)
========== =====================================================================================

Warm-up: ``warmup_epochs`` epochs at ``warmup_factor * lr`` (report 000: 3 epochs at 10 %), or
``warmup_iters`` optimiser steps rising linearly from ``warmup_factor * lr`` (torchvision's
references). Epoch ``e`` (0-based) trains at the lr the schedule gives after ``e`` epoch steps.

Early stopping (needs validation every epoch): ``early_stop_decays`` stops at the epoch in which
the K-th learning-rate decay since the last new best AP50 happens; ``early_stop_patience`` stops
after that many epochs without a new best.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

from ..config import TrainConfig


class Schedule:
    """Owns every learning-rate scheduler of a run.

    Call :meth:`step_iter` after each optimiser step and :meth:`step_epoch` after each epoch
    (with the validation metric when there was a validation); ``step_epoch`` returns True when
    ReduceLROnPlateau decayed the learning rate.
    """

    def __init__(self, optimizer: Optimizer, cfg: TrainConfig) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        w = cfg.warmup_epochs
        self.iter_scheduler: lrs.LRScheduler | None = None
        if cfg.warmup_iters > 0:
            self.iter_scheduler = lrs.LinearLR(optimizer, start_factor=cfg.warmup_factor, total_iters=cfg.warmup_iters)
        main: lrs.LRScheduler | None = None
        if cfg.scheduler == "multistep":
            marks = sorted({max(1, round(f * cfg.epochs)) - w for f in cfg.milestones})
            main = lrs.MultiStepLR(optimizer, milestones=[m for m in marks if m > 0], gamma=cfg.gamma)
        elif cfg.scheduler == "cosine":
            main = lrs.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs - w), eta_min=cfg.min_lr)
        warmup = lrs.ConstantLR(optimizer, factor=cfg.warmup_factor, total_iters=w) if w > 0 else None
        if warmup is not None and main is not None:
            self.epoch_scheduler: lrs.LRScheduler | None = lrs.SequentialLR(optimizer, [warmup, main], milestones=[w])
        else:
            self.epoch_scheduler = warmup or main
        self.plateau: lrs.ReduceLROnPlateau | None = None
        if cfg.scheduler == "plateau":
            self.plateau = lrs.ReduceLROnPlateau(
                optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
            )
        self.warmup_epochs = w
        self.epochs_done = 0
        self.decays = 0

    @property
    def lr(self) -> float:
        """Learning rate of the first parameter group now."""
        return float(self.optimizer.param_groups[0]["lr"])

    def step_iter(self) -> None:
        """After every optimiser step (iteration warm-up)."""
        if self.iter_scheduler is not None and self.iter_scheduler.last_epoch < self.cfg.warmup_iters:
            self.iter_scheduler.step()

    def step_epoch(self, metric: float | None = None) -> bool:
        """After every epoch, with the validation AP50 when there was a validation.

        Returns:
            True when ReduceLROnPlateau decayed the learning rate (counted in :attr:`decays`).
        """
        before = self.lr
        if self.epoch_scheduler is not None and (self.plateau is None or self.epochs_done < self.warmup_epochs):
            self.epoch_scheduler.step()
        self.epochs_done += 1
        if metric is None or self.plateau is None or self.epochs_done <= self.warmup_epochs:
            return False
        self.plateau.step(metric)
        decayed = self.lr < before * (1 - 1e-9)
        self.decays += int(decayed)
        return decayed

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epochs_done": self.epochs_done, "decays": self.decays}
        for name in ("iter_scheduler", "epoch_scheduler", "plateau"):
            sched = getattr(self, name)
            out[name] = sched.state_dict() if sched is not None else None
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("iter_scheduler", "epoch_scheduler", "plateau"):
            sched = getattr(self, name)
            if sched is not None and state.get(name) is not None:
                sched.load_state_dict(state[name])
        self.epochs_done, self.decays = int(state["epochs_done"]), int(state["decays"])


class EarlyStopper:
    """The early-stopping rule of ``train.early_stop_decays`` / ``train.early_stop_patience``.

    Call :meth:`update` after each validated epoch with its metric and whether the learning rate
    was decayed by the plateau scheduler; it returns the reason to stop, or None.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.max_decays = cfg.early_stop_decays
        self.patience = cfg.early_stop_patience
        self.best: float | None = None
        self.epochs_since_best = 0
        self.decays_since_best = 0
        self.stop_reason: str | None = None

    def update(self, metric: float, decayed: bool = False) -> str | None:
        """Record one validated epoch; the reason to stop when a rule fires, else None."""
        if self.best is None or metric > self.best:
            self.best, self.epochs_since_best, self.decays_since_best = metric, 0, 0
        else:
            self.epochs_since_best += 1
            self.decays_since_best += int(decayed)
        k, p = self.max_decays, self.patience
        if k is not None and self.decays_since_best >= k:
            self.stop_reason = f"{self.decays_since_best} learning-rate decays without a new best val AP50"
        elif p is not None and self.epochs_since_best >= p:
            self.stop_reason = f"{self.epochs_since_best} epochs without a new best val AP50"
        return self.stop_reason

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("best", "epochs_since_best", "decays_since_best", "stop_reason")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


FUSED_DEVICES = ("cpu", "cuda")
"""Devices whose parameters get torch's fused optimiser step (one kernel over all tensors): the
demo model's AdamW step takes 5.5 ms fused against 27.5 ms per tensor on 2 CPU threads
(docs/benchmarks.md, "Training throughput"): under 2 % of the demo's 1.2 s step, more of a small
model's step of a few hundred ms."""


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> Optimizer:
    """AdamW or SGD (with momentum and weight decay) over the trainable parameters, with the
    fused step where every parameter is a floating tensor on a device of :data:`FUSED_DEVICES`
    (the per-tensor loop elsewhere; the two agree to float32 rounding)."""
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=fused or None)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def load_optimizer_state(optimizer: Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)`` that keeps this optimiser's own step kind: torch takes
    ``fused`` and ``foreach`` from the saved groups, so a checkpoint of the per-tensor step would
    turn the fused one off (and one saved fused would turn it on where it is not supported)."""
    kinds = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kind in zip(optimizer.param_groups, kinds):
        group.update(kind)


def lr_trajectory(cfg: TrainConfig, metrics: list[float | None] | None = None, iters_per_epoch: int = 1) -> list[float]:
    """The lr each epoch starts with under ``cfg`` for a given sequence of validation metrics,
    early stopping included, computed on a dummy parameter (what an unbroken run does; used by
    tests and plots)."""
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = Schedule(opt, cfg)
    stopper = EarlyStopper(cfg)
    out = []
    for e in range(cfg.epochs):
        out.append(sched.lr)
        for _ in range(iters_per_epoch):
            opt.step()  # no gradients: changes nothing, keeps torch's call-order check quiet
            sched.step_iter()
        metric = metrics[e] if metrics is not None else None
        decayed = sched.step_epoch(metric)
        if metric is not None and stopper.update(metric, decayed):
            break
    return out
