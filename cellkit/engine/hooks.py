"""The concrete trainer hooks: validation, the schedule, early stopping, checkpoints, metrics files,
the curve plot and the epoch line.

Each is a :class:`~cellkit.engine.train_loop.Hook`; :mod:`cellkit.engine.defaults` assembles the
default set (the table of priorities is there). Hooks hand results to each other through the
trainer's :attr:`~cellkit.engine.train_loop.Trainer.storage`, never by looking each other up: the
validation hook stores its :class:`Validation` under :data:`VALIDATION`, which the checkpoint and
TensorBoard hooks read. The validation hook is handed what it runs (a callable), as Detectron2's
``EvalHook`` is.

A hook of your own is one small class; it may live anywhere (``train.hooks`` lists import paths
``module:Class`` for the command line)::

    class PrintLR(Hook):
        def after_epoch(self, metrics):
            print(metrics["epoch"], metrics["lr"])

    DefaultTrainer(cfg, "runs/x", hooks=[PrintLR()]).fit()
"""
from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError
from ..evaluation.coco import EvalReport
from ..models.checkpoint import save_checkpoint
from ..outputs import write_atomic, write_json
from ..runs import RunDir
from ..viz.curves import save_history_plot
from .schedule import EarlyStopper, Schedule
from .train_loop import Hook, Trainer

__all__ = [
    "CheckpointHook", "CurvePlotHook", "EarlyStoppingHook", "EpochLogger", "LRScheduleHook", "MetricsWriter",
    "VALIDATION", "Validation", "ValidationHook", "hook_from_path", "improved",
]

VALIDATION = "validation"
"""The :attr:`Trainer.storage <cellkit.engine.train_loop.Trainer.storage>` key of the epoch's :class:`Validation`."""


def hook_from_path(path: str) -> Hook:
    """Instantiate a hook from ``"package.module:ClassName"`` (``train.hooks`` entries).

    Raises:
        ConfigError: not importable, no such class, or not a :class:`~cellkit.engine.train_loop.Hook`.
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
    # checked before calling it: 'os:system' names a function, which must not run
    if not (isinstance(cls, type) and issubclass(cls, Hook)):
        kind = "a class" if isinstance(cls, type) else type(cls).__name__
        raise ConfigError(f"train.hooks: {path} is {kind}, not a subclass of cellkit.engine.train_loop.Hook")
    try:
        return cls()
    except TypeError as e:
        raise ConfigError(f"train.hooks: {path} cannot be made without arguments ({e})") from None


# --------------------------------------------------------------------------------------------
# schedule and stopping


class LRScheduleHook(Hook):
    """The learning-rate schedule of ``cfg.train`` (:class:`~cellkit.engine.schedule.Schedule`):
    iteration warm-up after each optimiser step, the epoch schedulers after each epoch (the
    plateau scheduler on the epoch's ``val_ap50``; ``plateau_decay: true`` marks its decays)."""

    priority = 30

    def __init__(self) -> None:
        self.schedule: Schedule | None = None

    def before_train(self) -> None:
        self._ensure()

    def _ensure(self) -> Schedule:
        if self.schedule is None:
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
        self.stopper: EarlyStopper | None = None

    def _ensure(self) -> EarlyStopper:
        if self.stopper is None:
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


@dataclass
class Validation:
    """What one validation produced.

    Attributes:
        metrics: what goes into the epoch's metrics (``val_ap50``, ``val_ap``, ``val_ap75`` ...).
        predictions: the COCO results that were scored (all ranks' on rank 0; None elsewhere).
        report: the full evaluation report, when there is one.
    """

    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] | None = None
    report: EvalReport | None = None


class ValidationHook(Hook):
    """Run a validation every ``train.eval_every`` epochs (or ``every``) and after the last one, add
    its metrics and ``val_seconds`` to the epoch's metrics and put the :class:`Validation` into
    the trainer's storage (:data:`VALIDATION`) for the hooks that follow.

    Args:
        evaluate: what a validation is: called with the trainer, returns a :class:`Validation`
            (the defaults hand it :class:`cellkit.engine.validation.COCOValidation`).
        every: validate every this many epochs (None: ``train.eval_every``; 0: never).
    """

    priority = 20

    def __init__(self, evaluate: Callable[[Trainer], Validation], every: int | None = None) -> None:
        self.evaluate = evaluate
        self.every = every

    def due(self, epoch: int) -> bool:
        """Whether validation runs after ``epoch`` (1-based)."""
        t = self.trainer
        every = t.cfg.train.eval_every if self.every is None else self.every
        if not t.has_validation or every <= 0:
            return False
        return epoch % every == 0 or epoch == t.cfg.train.epochs

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        if not self.due(metrics["epoch"]):
            return
        t0 = time.perf_counter()
        result = self.evaluate(self.trainer)
        metrics.update(result.metrics)
        metrics["val_seconds"] = time.perf_counter() - t0
        self.trainer.storage[VALIDATION] = result


# --------------------------------------------------------------------------------------------
# files


def improved(value: float | None, best: float | None, mode: str = "max") -> bool:
    """Whether ``value`` is a new best over ``best`` (None: none yet) in ``mode`` max or min; None
    and NaN never are. The rule that chooses a run's epoch (best.pth, the hold-out's weights)."""
    if value is None or value != value:  # None or NaN
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class CheckpointHook(Hook):
    """``checkpoints/last.pth`` every ``train.checkpoint_every`` epochs (or ``every``), after the
    last epoch and when a hook stops the run (everything needed to resume, hooks' state included);
    ``checkpoints/best.pth`` (weights, config, history) and ``val_predictions.json`` whenever
    ``metric`` reaches a new best (``mode`` max or min).

    Both are written atomically; a run without validation keeps its first epoch as best.pth.
    """

    priority = 70
    main_process_only = True

    def __init__(self, metric: str = "val_ap50", mode: str = "max", every: int | None = None) -> None:
        if mode not in ("max", "min"):
            raise ConfigError(f"checkpoint mode must be 'max' or 'min', got {mode!r}")
        if every is not None and every < 1:
            raise ConfigError(f"checkpoint every must be at least 1 epoch, got {every}")
        self.metric, self.mode, self.every = metric, mode, every
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.saved_epoch = 0  # the epoch last.pth holds (set in before_train)

    def improved(self, value: float | None) -> bool:
        return improved(value, self.best, self.mode)

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        t = self.trainer
        if t.run_dir is None:
            return
        run = RunDir(t.run_dir)
        value = metrics.get(self.metric)
        improved = self.improved(value)
        if improved:
            self.best, self.best_epoch = float(value), int(metrics["epoch"])  # type: ignore[arg-type]
        state = t.state_dict()  # after updating self.best: last.pth resumes with it
        if improved or (self.best is None and not run.checkpoint("best").exists()):
            save_checkpoint(t.inference_state(), run.checkpoint("best"))
            validation = t.storage.get(VALIDATION)
            if improved and validation is not None and validation.predictions is not None:
                write_json(validation.predictions, run.predictions())
        # last: a run killed before it resumes from the last one written and does the epochs since
        # again, so best.pth and val_predictions.json are written again together
        every = t.cfg.train.checkpoint_every if self.every is None else self.every
        epoch = int(metrics["epoch"])
        if epoch % every == 0 or epoch >= t.cfg.train.epochs or t.stop_reason is not None:
            save_checkpoint(state, run.checkpoint("last"))
            self.saved_epoch = epoch

    def before_train(self) -> None:
        self.saved_epoch = self.trainer.epoch  # 0, or the epoch a resumed run's last.pth holds

    def after_train(self, summary: dict[str, Any]) -> None:
        # a hook after this one may have stopped the run between two checkpoints
        t = self.trainer
        if t.run_dir is not None and self.saved_epoch != t.epoch:
            save_checkpoint(t.state_dict(), RunDir(t.run_dir).checkpoint("last"))
            self.saved_epoch = t.epoch

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
        path = RunDir(self.trainer.run_dir).metrics_log  # type: ignore[arg-type]
        write_atomic(path, "".join(json.dumps(h) + "\n" for h in self.trainer.history))

    def after_train(self, summary: dict[str, Any]) -> None:
        if self.trainer.run_dir is not None:
            write_json(summary, RunDir(self.trainer.run_dir).summary_file)


class CurvePlotHook(Hook):
    """``plots/curves.png``: losses, val AP50/AP and the learning rate, redrawn after an epoch and
    always after the last one.

    Drawing takes about half a second (matplotlib's layout of the log-scale ticks), longer than a
    whole epoch of a small run: an epoch's redraw is skipped while the last drawing took more than
    ``budget`` of the time since it, so the plot never costs more than that share of the training.
    With epochs of a minute or more every epoch is drawn.
    """

    priority = 80
    main_process_only = True

    def __init__(self, budget: float = 0.1) -> None:
        self.budget = budget
        self._cost = 0.0  # seconds the last drawing took
        self._since = 0.0  # perf_counter() when it ended
        self._drawn = -1  # len(history) it showed

    def before_train(self) -> None:
        self._cost, self._since, self._drawn = 0.0, time.perf_counter(), -1

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        if self._cost <= self.budget * (time.perf_counter() - self._since):
            self._draw()

    def after_train(self, summary: dict[str, Any]) -> None:
        if self._drawn != len(self.trainer.history):
            self._draw()

    def _draw(self) -> None:
        t = self.trainer
        if t.run_dir is None:
            return
        start = time.perf_counter()
        save_history_plot(t.history, RunDir(t.run_dir).curves, t.cfg.name)
        self._since = time.perf_counter()
        self._cost, self._drawn = self._since - start, len(t.history)


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
        """``epoch 3/12 | loss 0.8123 | lr 1.00e-03 | val AP50 0.5012 [0.44, 0.57] AP 0.2301 | 41s | 1.95 img/s |
        mem 2100 MB`` (the interval: 95 % over the validation images)."""
        parts = [f"epoch {m['epoch']}/{self.trainer.cfg.train.epochs}", f"loss {m.get('loss', float('nan')):.4f}",
                 f"lr {m['lr']:.2e}"]
        if m.get("val_ap50") is not None:
            ci = f" [{m['val_ap50_lo']:.2f}, {m['val_ap50_hi']:.2f}]" if m.get("val_ap50_lo") is not None else ""
            parts.append(f"val AP50 {m['val_ap50']:.4f}{ci} AP {m['val_ap']:.4f}")
        parts += [f"{m['train_seconds']:.0f}s", f"{m['images_per_s']:.2f} img/s", f"mem {m['peak_mem_mb']:.0f} MB"]
        if m.get("nonfinite_steps"):
            parts.append(f"{m['nonfinite_steps']} non-finite steps skipped")
        return " | ".join(parts)
