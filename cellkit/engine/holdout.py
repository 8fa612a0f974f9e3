"""The hold-out split: scored once, at the epoch the validation split chose.

The validation split chooses the epoch (best.pth is the epoch with the best val AP50), so the
val AP50 of that epoch is the best of several tries on the same images: it flatters the run.
``data.holdout_fraction`` keeps a second split out of training and out of that choice; after
training, :class:`HoldoutHook` predicts it once with the chosen epoch's weights and scores it
with its 95 % interval. The run directory then holds ``holdout_gt.json`` and
``holdout_predictions.json``, and ``metrics.json`` ``holdout_ap50``, ``holdout_ap50_lo``,
``holdout_ap50_hi``, ``holdout_ap``, ``holdout_epoch`` and ``holdout_images``.

The chosen weights are those of ``checkpoints/best.pth`` when the run has a directory (what
:class:`~cellkit.engine.hooks.CheckpointHook` wrote, and what ``cellkit predict`` uses, also after
a resume); without a run directory the hook keeps a copy of the evaluation weights of each new
best validation epoch itself. A run without validation scores its last epoch.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from ..evaluation.coco import EvalReport, evaluate_predictions
from ..inference.split import predict_split
from ..models.checkpoint import load_checkpoint
from ..outputs import write_json
from ..runs import RunDir
from .hooks import improved
from .train_loop import Hook

__all__ = ["HoldoutHook"]


class HoldoutHook(Hook):
    """After training, predict the hold-out split (``data.holdout_fraction``) with the weights of the
    chosen epoch, score it once (segm AP50 with its 95 % interval, ``eval.bootstrap`` draws), write
    its ground truth and predictions and add ``holdout_*`` to the run's summary (see the module
    docstring).

    Args:
        metric, mode: what chose the epoch (as :class:`~cellkit.engine.hooks.CheckpointHook`).
    """

    priority = 72  # after the CheckpointHook (70) wrote best.pth, before the MetricsWriter (75) writes the summary
    main_process_only = True

    def __init__(self, metric: str = "val_ap50", mode: str = "max") -> None:
        self.metric, self.mode = metric, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._weights: dict[str, torch.Tensor] | None = None
        self.report: EvalReport | None = None
        """The hold-out evaluation, after training."""

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        value = metrics.get(self.metric)
        if not improved(value, self.best, self.mode):
            return
        self.best, self.best_epoch = float(value), int(metrics["epoch"])  # type: ignore[arg-type]
        if self.trainer.run_dir is None:  # no best.pth to read back: keep the weights of this epoch
            state = self.trainer.eval_model.state_dict()
            self._weights = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def after_train(self, summary: dict[str, Any]) -> None:
        t = self.trainer
        cfg = t.cfg
        model, epoch = self._chosen()
        sp = predict_split(model, cfg, "holdout", with_gt=True, device=t.device, progress=t.progress)
        entries = sp.entries()
        e = cfg.eval
        self.report = report = evaluate_predictions(
            sp.gt, entries, iou_types=("segm",), max_dets=e.max_dets, backend=e.backend,  # type: ignore[arg-type]
            num_classes=cfg.model.num_classes, cell_metrics=False, bootstrap=e.bootstrap,
            bootstrap_seed=e.bootstrap_seed)
        if t.run_dir is not None:
            run = RunDir(t.run_dir)
            write_json(sp.gt, run.holdout_gt)
            write_json(entries, run.predictions(split="holdout"))
        res = report.results["segm"]
        ci = res.interval("ap50")
        summary.update({
            "holdout_ap50": res.ap50,
            "holdout_ap50_lo": ci[0] if ci else None, "holdout_ap50_hi": ci[1] if ci else None,
            "holdout_ap": res.ap, "holdout_epoch": epoch, "holdout_images": res.n_images,
        })
        print(f"hold-out split ({res.n_images} images, scored once at epoch {epoch}): segm AP50 "
              f"{res.with_interval('ap50')}", flush=True)

    def _chosen(self) -> tuple[torch.nn.Module, int]:
        """The model with the chosen epoch's weights, and that epoch."""
        t = self.trainer
        best = RunDir(t.run_dir).checkpoint("best") if t.run_dir is not None else None
        if best is not None and best.is_file():
            ckpt = load_checkpoint(best, map_location="cpu")
            model = copy.deepcopy(t.eval_model)
            model.load_state_dict(ckpt["model"])
            return model, int(ckpt.get("epoch", self.best_epoch or t.epoch))
        if self._weights is not None:
            model = copy.deepcopy(t.eval_model)
            model.load_state_dict(self._weights)
            return model, int(self.best_epoch)  # type: ignore[arg-type]
        return t.eval_model, t.epoch  # no validation chose an epoch: the last one

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")
