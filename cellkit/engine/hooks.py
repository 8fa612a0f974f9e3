"""Trainer hooks: everything that varies around the training loop.

The :class:`~cellkit.engine.trainer.Trainer` runs the loop and the optimiser step; what happens
around them is a :class:`Hook`. A hook overrides any of::

    before_train()            once, after the data is ready (and after a resume)
    before_epoch(epoch)       epoch: 0-based index of the epoch about to run
    after_step(step)          after every optimiser step; step = {"epoch", "iteration", "lr", "loss"}
    after_epoch(metrics)      the epoch's metrics dict (losses, lr, timing); hooks may add to it
                              (validation adds val_ap50 ...): it is the line metrics.jsonl gets
    after_train(summary)      once, with the run's summary (what metrics.json gets)
    state_dict() / load_state_dict(state)   saved in checkpoints/last.pth and restored on resume

and sees the trainer as ``self.trainer``. Hooks run in increasing :attr:`Hook.priority` (ties in
the order given); a hook with ``main_process_only`` runs only on rank 0 under DDP. The default
hooks (:meth:`Trainer.default_hooks`), by priority:

==== =================== ==================================================================
  15 EMAHook             weights EMA after every step (``train.ema_decay``; validation and
                         best.pth then use the averaged weights; :mod:`cellkit.engine.ema`)
  20 ValidationHook      validation every ``train.eval_every`` epochs and at the last epoch
  30 LRScheduleHook      the learning-rate schedule (warm-up per step, the scheduler per epoch)
  40 EarlyStoppingHook   ``train.early_stop_decays`` / ``train.early_stop_patience``
  50 (user hooks)        the default priority
  65 TensorBoardHook     TensorBoard event files in the run directory (``train.tensorboard``;
                         :mod:`cellkit.engine.tensorboard`)
  70 CheckpointHook      last.pth every epoch; best.pth (+ val_predictions.json) on a new best
  75 MetricsWriter       metrics.jsonl every epoch, metrics.json at the end
  80 CurvePlotHook       plots/curves.png every epoch
  85 EpochLogger         the one-line epoch summary (and the early-stop reason)
  90 LiveCurves          live loss/AP50 curves in a notebook (only inside Jupyter; cellkit.viz.live)
==== =================== ==================================================================

A hook of your own is one small class; it may live anywhere (``train.hooks`` lists import paths
``module:Class`` for the command line)::

    class PrintLR(Hook):
        def after_epoch(self, metrics):
            print(metrics["epoch"], metrics["lr"])

    Trainer(cfg, "runs/x", hooks=[PrintLR()]).fit()
"""
from __future__ import annotations

import importlib
import json
import os
import time
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer

__all__ = [
    "CheckpointHook", "CurvePlotHook", "EarlyStoppingHook", "EpochLogger", "Hook", "LRScheduleHook", "MetricsWriter",
    "ValidationHook", "default_hooks", "hook_from_path",
]


class Hook:
    """Base class of trainer hooks: every method does nothing; override what you need."""

    priority: int = 50
    """Lower runs first (see the module docstring for the defaults' priorities)."""
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


def hook_from_path(path: str) -> Hook:
    """Instantiate a hook from ``"package.module:ClassName"`` (``train.hooks`` entries).

    Raises:
        ConfigError: not importable, no such class, or not a :class:`Hook`.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"train.hooks: {path!r} is not 'module:Class' (e.g. 'myhooks:PrintLR')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"train.hooks: cannot import {module_name!r} ({e})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"train.hooks: module {module_name!r} has no {attr!r}")
    hook = cls()
    if not isinstance(hook, Hook):
        raise ConfigError(f"train.hooks: {path} is not a cellkit.engine.hooks.Hook")
    return hook


# --------------------------------------------------------------------------------------------
# schedule and stopping


class LRScheduleHook(Hook):
    """The learning-rate schedule of ``cfg.train`` (:class:`~cellkit.engine.schedule.Schedule`):
    iteration warm-up after each optimiser step, the epoch schedulers after each epoch (the
    plateau scheduler on the epoch's ``val_ap50``; ``plateau_decay: true`` marks its decays)."""

    priority = 30

    def __init__(self) -> None:
        self.schedule: Any = None

    def before_train(self) -> None:
        self._ensure()

    def _ensure(self) -> Any:
        if self.schedule is None:
            from .schedule import Schedule

            self.schedule = Schedule(self.trainer.optimizer, self.trainer.cfg.train)
        return self.schedule

    def after_step(self, step: dict[str, Any]) -> None:
        self._ensure().step_iter()

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        if self._ensure().step_epoch(metrics.get("val_ap50")):
            metrics["plateau_decay"] = True

    def state_dict(self) -> dict[str, Any]:
        return self._ensure().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ensure().load_state_dict(state)


class EarlyStoppingHook(Hook):
    """Stop after ``train.early_stop_decays`` plateau decays, or ``train.early_stop_patience``
    validated epochs, without a new best val AP50 (needs validation)."""

    priority = 40

    def __init__(self) -> None:
        self.stopper: Any = None

    def _ensure(self) -> Any:
        if self.stopper is None:
            from .schedule import EarlyStopper

            self.stopper = EarlyStopper(self.trainer.cfg.train)
        return self.stopper

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        if metrics.get("val_ap50") is None:
            return
        reason = self._ensure().update(metrics["val_ap50"], bool(metrics.get("plateau_decay")))
        if reason:
            metrics["stopped"] = reason
            self.trainer.request_stop(reason)

    def state_dict(self) -> dict[str, Any]:
        return self._ensure().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ensure().load_state_dict(state)


# --------------------------------------------------------------------------------------------
# validation


class ValidationHook(Hook):
    """Predict the validation split and score it (COCO segm AP50, AP, AP75) every ``every``
    epochs and after the last one; adds ``val_ap50``, ``val_ap``, ``val_ap75``, ``val_seconds``
    to the epoch's metrics.

    Under DDP each rank predicts its own shard of the validation images and a
    :class:`~cellkit.evaluation.COCOEvaluator` gathers them on rank 0 (every rank gets the
    numbers). The predictions stay in :attr:`predictions` (rank 0) for the checkpoint hook.
    """

    priority = 20

    def __init__(self, every: int | None = None) -> None:
        self.every = every
        self.predictions: list[dict[str, Any]] | None = None
        """The COCO results of the latest validation (all ranks' on rank 0), None before one."""
        self.report: Any = None
        """The :class:`~cellkit.evaluation.EvalReport` of the latest validation."""
        self._evaluator: Any = None

    def due(self, epoch: int) -> bool:
        """Whether validation runs after ``epoch`` (1-based)."""
        t = self.trainer
        every = t.cfg.train.eval_every if self.every is None else self.every
        if not t.has_validation or every <= 0:
            return False
        return epoch % every == 0 or epoch == t.cfg.train.epochs

    def before_epoch(self, epoch: int) -> None:
        self.predictions = None

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        if not self.due(metrics["epoch"]):
            return
        from ..evaluation import COCOEvaluator
        from .split import predict_split

        t = self.trainer
        cfg = t.cfg
        if self._evaluator is None:
            self._evaluator = COCOEvaluator(t.val_gt, ("segm",), cfg.eval.max_dets, cfg.eval.backend,
                                            cfg.model.num_classes)
        ev = self._evaluator
        ev.reset()
        t0 = time.perf_counter()
        try:
            shard = predict_split(t.eval_model, cfg, dataset=t.val_set, shard=(t.dist.rank, t.dist.world_size),
                                  device=t.device, progress=t.progress)
            ev.process(shard.entries())
        except Exception as e:  # the other ranks wait in the gather: tell them, then fail together
            if not t.dist.enabled:
                raise
            ev.fail(f"{type(e).__name__}: {e}")
        self.report = ev.evaluate()
        res = self.report.results["segm"]
        self.predictions = ev.predictions
        metrics.update({"val_ap50": res.ap50, "val_ap": res.ap, "val_ap75": res.ap75,
                        "val_seconds": time.perf_counter() - t0})


# --------------------------------------------------------------------------------------------
# files


class CheckpointHook(Hook):
    """``checkpoints/last.pth`` every epoch (everything needed to resume, hooks' state included);
    ``checkpoints/best.pth`` (weights, config, history) and ``val_predictions.json`` whenever
    ``metric`` reaches a new best (``mode`` max or min).

    Both are written atomically; a run without validation keeps its first epoch as best.pth.
    """

    priority = 70
    main_process_only = True

    def __init__(self, metric: str = "val_ap50", mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ConfigError(f"checkpoint mode must be 'max' or 'min', got {mode!r}")
        self.metric, self.mode = metric, mode
        self.best: float | None = None
        self.best_epoch: int | None = None

    def improved(self, value: float | None) -> bool:
        if value is None or value != value:  # None or NaN
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        from ..data.coco import write_json
        from .checkpoint import save_checkpoint

        t = self.trainer
        if t.run_dir is None:
            return
        folder = t.run_dir / "checkpoints"
        value = metrics.get(self.metric)
        improved = self.improved(value)
        if improved:
            self.best, self.best_epoch = float(value), int(metrics["epoch"])  # type: ignore[arg-type]
        state = t.state_dict()  # after updating self.best: last.pth resumes with it
        save_checkpoint(state, folder / "last.pth")
        if improved or (self.best is None and not (folder / "best.pth").exists()):
            save_checkpoint(t.inference_state(), folder / "best.pth")
            val = next((h for h in t.hooks if isinstance(h, ValidationHook)), None)
            if improved and val is not None and val.predictions is not None:
                write_json(val.predictions, t.run_dir / "val_predictions.json")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")


class MetricsWriter(Hook):
    """``metrics.jsonl`` (one line per epoch, rewritten atomically from the history every epoch,
    so a resumed run never repeats an epoch) and ``metrics.json`` (the summary) at the end."""

    priority = 75
    main_process_only = True

    def before_train(self) -> None:
        if self.trainer.run_dir is not None and self.trainer.history:
            self._write_history()

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        if self.trainer.run_dir is not None:
            self._write_history()

    def _write_history(self) -> None:
        path = self.trainer.run_dir / "metrics.jsonl"  # type: ignore[operator]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(h) + "\n" for h in self.trainer.history))
        os.replace(tmp, path)

    def after_train(self, summary: dict[str, Any]) -> None:
        from ..data.coco import write_json

        if self.trainer.run_dir is not None:
            write_json(summary, self.trainer.run_dir / "metrics.json")


class CurvePlotHook(Hook):
    """``plots/curves.png``: losses, val AP50/AP and the learning rate, redrawn every epoch."""

    priority = 80
    main_process_only = True

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        t = self.trainer
        if t.run_dir is not None:
            from ..viz.curves import save_history_plot

            save_history_plot(t.history, t.run_dir / "plots" / "curves.png", t.cfg.name)


class EpochLogger(Hook):
    """Prints the one-line summary of every epoch and, at the end, why training stopped early."""

    priority = 85
    main_process_only = True

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        print(self.line(metrics), flush=True)

    def after_train(self, summary: dict[str, Any]) -> None:
        if summary.get("stop_reason"):
            print(f"early stop: {summary['stop_reason']}", flush=True)

    def line(self, m: dict[str, Any]) -> str:
        """``epoch 3/12 | loss 0.8123 | lr 1.00e-03 | val AP50 0.5012 AP 0.2301 | 41s | 1.95 img/s | mem 2100 MB``."""
        parts = [f"epoch {m['epoch']}/{self.trainer.cfg.train.epochs}", f"loss {m.get('loss', float('nan')):.4f}",
                 f"lr {m['lr']:.2e}"]
        if m.get("val_ap50") is not None:
            parts.append(f"val AP50 {m['val_ap50']:.4f} AP {m['val_ap']:.4f}")
        parts += [f"{m['train_seconds']:.0f}s", f"{m['images_per_s']:.2f} img/s", f"mem {m['peak_mem_mb']:.0f} MB"]
        if m.get("nonfinite_steps"):
            parts.append(f"{m['nonfinite_steps']} non-finite steps skipped")
        return " | ".join(parts)


def default_hooks(cfg: Any) -> list[Hook]:
    """The hooks of a plain run of ``cfg`` (see the module docstring), then ``cfg.train.hooks``."""
    from ..progress import in_notebook

    hooks: list[Hook] = [ValidationHook(), LRScheduleHook(), EarlyStoppingHook(), CheckpointHook(),
                         MetricsWriter(), CurvePlotHook(), EpochLogger()]
    if cfg.train.ema_decay is not None:
        from .ema import EMAHook

        hooks.append(EMAHook.from_config(cfg.train))
    if cfg.train.tensorboard:
        from .tensorboard import TensorBoardHook

        hooks.append(TensorBoardHook())
    if in_notebook():
        from ..viz.live import LiveCurves

        hooks.append(LiveCurves())
    hooks.extend(hook_from_path(p) for p in cfg.train.hooks)
    return hooks
