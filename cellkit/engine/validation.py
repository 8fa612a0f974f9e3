"""What the default validation hook runs: predict the validation split with the trainer's
evaluation weights and score it (COCO segm AP50 with its 95 % interval over images, AP, AP75).

The interval (``val_ap50_lo``, ``val_ap50_hi``; ``eval.bootstrap`` draws) is computed at every
validation: it re-accumulates COCOeval's matching and matches nothing again, so it costs
milliseconds to a few tenths of a second, against seconds to minutes for predicting the split.

Under DDP each rank predicts its own shard of the validation images and a
:class:`~cellkit.evaluation.COCOEvaluator` gathers them on rank 0 (every rank gets the numbers).
"""
from __future__ import annotations

from ..evaluation import COCOEvaluator
from ..inference.split import predict_split
from .hooks import Validation
from .train_loop import Trainer


class COCOValidation:
    """Callable for :class:`~cellkit.engine.hooks.ValidationHook`: ``COCOValidation()(trainer)``
    predicts ``trainer.val_set`` with ``trainer.eval_model`` and ``cfg.predict``, evaluates it
    against ``trainer.val_gt`` with ``cfg.eval`` and returns ``val_ap50``, ``val_ap`` and
    ``val_ap75`` (and ``val_ap50_lo``, ``val_ap50_hi``: its 95 % interval over the validation
    images, with ``eval.bootstrap`` > 0) with the predictions and the report."""

    def __init__(self) -> None:
        self._evaluator: COCOEvaluator | None = None

    def __call__(self, t: Trainer) -> Validation:
        cfg = t.cfg
        if self._evaluator is None:  # the ground truth is indexed once per run
            self._evaluator = COCOEvaluator(t.val_gt, ("segm",), cfg.eval.max_dets, cfg.eval.backend,
                                            cfg.model.num_classes, bootstrap=cfg.eval.bootstrap,
                                            bootstrap_seed=cfg.eval.bootstrap_seed)
        ev = self._evaluator
        ev.reset()
        try:
            shard = predict_split(t.eval_model, cfg, dataset=t.val_set, shard=(t.dist.rank, t.dist.world_size),
                                  device=t.device, progress=t.progress)
            ev.process(shard.entries())
        except Exception as e:  # the other ranks wait in the gather: tell them, then fail together
            if not t.dist.enabled:
                raise
            ev.fail(f"{type(e).__name__}: {e}")
        report = ev.evaluate()
        res = report.results["segm"]
        metrics = {"val_ap50": res.ap50, "val_ap": res.ap, "val_ap75": res.ap75}
        ci = res.interval("ap50")
        if ci is not None:
            metrics["val_ap50_lo"], metrics["val_ap50_hi"] = ci
        return Validation(metrics, ev.predictions, report)
