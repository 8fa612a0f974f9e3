"""The assembly of a plain training run: the default hooks, :class:`DefaultTrainer` and :func:`train`.

Only this module knows the default hooks (as Detectron2's ``engine/defaults.py``); the loop
(:mod:`cellkit.engine.train_loop`) runs whatever hooks it is handed. By priority:

==== =================== ==================================================================
  15 EMAHook             weights EMA after every step (``train.ema_decay``; validation and
                         best.pth then use the averaged weights; :mod:`cellkit.engine.ema`)
  20 ValidationHook      validation every ``train.eval_every`` epochs and at the last epoch,
                         running :class:`~cellkit.engine.validation.COCOValidation`
  30 LRScheduleHook      the learning-rate schedule (warm-up per step, the scheduler per epoch)
  40 EarlyStoppingHook   ``train.early_stop_decays`` / ``train.early_stop_patience``
  50 (user hooks)        the default priority; ``train.hooks`` adds them by import path
  65 TensorBoardHook     TensorBoard event files in the run directory (``train.tensorboard``;
                         :mod:`cellkit.engine.tensorboard`)
  70 CheckpointHook      last.pth every ``train.checkpoint_every`` epochs and at the end; best.pth
                         (+ val_predictions.json) on a new best
  72 HoldoutHook         after training, the hold-out split (``data.holdout_fraction`` > 0) scored
                         once with best.pth's weights (:mod:`cellkit.engine.holdout`)
  75 MetricsWriter       metrics.jsonl every epoch, metrics.json at the end
  80 CurvePlotHook       plots/curves.png after an epoch (at most a tenth of the time) and at the end
  85 EpochLogger         the one-line epoch summary (and the early-stop reason)
  90 LiveCurves          live loss/AP50 curves in a notebook (only inside Jupyter; :mod:`cellkit.engine.live`)
==== =================== ==================================================================
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from ..config import Config
from ..progress import in_notebook
from . import distributed as dist_utils
from .ema import EMAHook
from .holdout import HoldoutHook
from .hooks import (
    CheckpointHook,
    CurvePlotHook,
    EarlyStoppingHook,
    EpochLogger,
    LRScheduleHook,
    MetricsWriter,
    ValidationHook,
    hook_from_path,
)
from .live import LiveCurves
from .tensorboard import TensorBoardHook
from .train_loop import Hook, Trainer
from .validation import COCOValidation


def default_hooks(cfg: Config) -> list[Hook]:
    """The hooks of a plain run of ``cfg`` (see the module docstring), then ``cfg.train.hooks``."""
    hooks: list[Hook] = [ValidationHook(COCOValidation()), LRScheduleHook(), EarlyStoppingHook(), CheckpointHook(),
                         MetricsWriter(), CurvePlotHook(), EpochLogger()]
    if cfg.train.ema_decay is not None:
        hooks.append(EMAHook.from_config(cfg.train))
    if cfg.train.tensorboard:
        hooks.append(TensorBoardHook())
    if cfg.data.holdout_fraction > 0:
        hooks.append(HoldoutHook())
    if in_notebook():
        hooks.append(LiveCurves())
    hooks.extend(hook_from_path(p) for p in cfg.train.hooks)
    return hooks


class DefaultTrainer(Trainer):
    """A :class:`~cellkit.engine.train_loop.Trainer` with the default hooks of its config, then ``hooks``.

    Arguments as :class:`~cellkit.engine.train_loop.Trainer`; ``hooks`` are added to the defaults.
    """

    def __init__(self, cfg: Config, run_dir: str | os.PathLike[str] | None = None, hooks: Sequence[Hook] = (),
                 **kwargs: Any) -> None:
        super().__init__(cfg, run_dir, hooks=[*default_hooks(cfg), *hooks], **kwargs)


def train(cfg: Config, run_dir: str | os.PathLike[str] | None, resume: bool = False, progress: bool = True,
          hooks: Sequence[Hook] = (), overwrite: bool = False) -> dict[str, Any]:
    """Build a :class:`DefaultTrainer`, fit, clean up the process group; returns the summary.

    ``resume`` / ``overwrite``: see :meth:`Trainer.fit <cellkit.engine.train_loop.Trainer.fit>`
    (a folder with a previous run needs one).
    """
    try:
        return DefaultTrainer(cfg, run_dir, hooks=list(hooks), progress=progress).fit(resume=resume,
                                                                                       overwrite=overwrite)
    finally:
        dist_utils.cleanup()
