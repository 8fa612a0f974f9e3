"""Exponential moving average of the weights as a trainer hook (``train.ema_decay``).

:class:`EMAHook` keeps timm's ``ModelEmaV3`` copy of the model and updates it after every
optimiser step (``after_step``): ``ema = decay * ema + (1 - decay) * weights``. With
``train.ema_warmup`` the decay of step ``t`` (1-based, the trainer's global iteration) is
``min(ema_decay, 1 - (1 + t - 1) ** -ema_warmup_power)`` (timm's warm-up; step 1 copies the
weights), so the random initial weights fade quickly in a short run.

Buffers (BatchNorm running statistics, ``num_batches_tracked``) are copied from the training
model at every update with ``train.ema_buffers: copy`` (the default; timm's ``exclude_buffers``);
``average`` averages floating-point buffers like weights. Copying is the default because an
earlier, lost attempt at this hook measured averaged running statistics at about 0.15 AP50 below
copied ones on the CPU demo (not re-measured since; the running statistics of the averaged
weights are not the average of the running statistics).

The hook sets :attr:`Trainer.eval_model <cellkit.engine.train_loop.Trainer.eval_model>` to the
averaged model, so validation (``ValidationHook``) scores it and ``checkpoints/best.pth``
(``Trainer.inference_state``) holds its weights; ``checkpoints/last.pth`` holds both the
training weights (``model``) and the averaged ones (this hook's state), and a resumed run
continues the average exactly where it stopped.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.utils import ModelEmaV3

from .train_loop import Hook


class EMAHook(Hook):
    """Weights EMA (see the module docstring).

    Args:
        decay: the EMA decay (``train.ema_decay``), in [0, 1).
        warmup: warm the decay up (``train.ema_warmup``).
        warmup_power: exponent of the warm-up (``train.ema_warmup_power``).
        buffers: ``copy`` or ``average`` (``train.ema_buffers``).
    """

    priority = 15  # before validation (20): the averaged weights are current when it runs

    def __init__(self, decay: float, warmup: bool = True, warmup_power: float = 0.75, buffers: str = "copy") -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if buffers not in ("copy", "average"):
            raise ValueError(f"EMA buffers must be copy or average, got {buffers!r}")
        self.decay, self.warmup, self.warmup_power, self.buffers = decay, warmup, warmup_power, buffers
        self.ema: Any = None
        """timm ``ModelEmaV3``; ``self.ema.module`` is the averaged model."""
        self.updates = 0
        """Optimiser steps averaged in so far."""

    @classmethod
    def from_config(cls, tc: Any) -> "EMAHook":
        """The hook of ``cfg.train`` (``ema_decay`` must be set)."""
        return cls(tc.ema_decay, tc.ema_warmup, tc.ema_warmup_power, tc.ema_buffers)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (built from the trainer's model on first use)."""
        return self._ensure().module

    def _ensure(self) -> Any:
        if self.ema is None:
            model = self.trainer.model
            self.ema = ModelEmaV3(
                model, decay=self.decay, use_warmup=self.warmup, warmup_power=self.warmup_power,
                exclude_buffers=self.buffers == "copy",
            )
            self.ema.module.requires_grad_(False)
            self.trainer.eval_model = self.ema.module
        return self.ema

    def before_train(self) -> None:
        self._ensure()

    def after_step(self, step: dict[str, Any]) -> None:
        ema = self._ensure()
        ema.update(self.trainer.model, step=step["iteration"])
        self.updates += 1

    def current_decay(self, iteration: int) -> float:
        """The decay the update after optimiser step ``iteration`` (1-based) uses."""
        return float(self._ensure().get_decay(iteration))

    def state_dict(self) -> dict[str, Any]:
        return {"module": self._ensure().module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ensure().module.load_state_dict(state["module"])
        self.updates = int(state.get("updates", 0))
