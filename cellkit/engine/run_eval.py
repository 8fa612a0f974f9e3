"""``cellkit evaluate --run RUN_DIR``: predict a run's validation split with its best checkpoint,
then evaluate.

This is the wiring between training (run directory layout of :mod:`cellkit.engine.trainer`),
prediction (:func:`cellkit.engine.predict.predict_images`) and evaluation
(:func:`cellkit.engine.evaluate.evaluate_predictions`). It is kept apart from the evaluation
itself, which needs neither torch nor a model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError
from .evaluate import EvalReport, evaluate_predictions


def evaluate_run(
    run_dir: str | os.PathLike[str],
    checkpoint: str = "best",
    max_dets: int | None = None,
    backend: str | None = None,
    iou_types: Sequence[str] = ("segm", "bbox"),
    score_threshold: float = 0.5,
    iou_threshold: float | None = None,
    cell_metrics: bool = True,
    device: str | None = None,
    save_predictions: bool = True,
    progress: bool = True,
) -> EvalReport:
    """Predict the validation split of a run with one of its checkpoints and evaluate it.

    Args:
        run_dir: a training run directory (``config.yaml``, ``checkpoints/best.pth``, ``val_gt.json``).
        checkpoint: ``"best"``, ``"last"`` or a path to a ``.pth`` file.
        max_dets, backend: default to the run config's ``eval.max_dets`` and ``eval.backend``.
        iou_types, score_threshold, cell_metrics: see :func:`~cellkit.engine.evaluate.evaluate_predictions`.
        iou_threshold: IoU of the cell-tool metrics (default: the run config's ``eval.iou_threshold``).
        device: ``cpu``, ``cuda`` ... (default: the run config's ``train.device``; ``auto`` picks CUDA
            when available).
        save_predictions: write the predictions to ``run_dir/val_predictions.json`` (the best
            checkpoint's, which the error-analysis notebook reads) or, for another checkpoint,
            ``run_dir/val_predictions_<checkpoint name>.json``.

    Raises:
        DataError: no such run, checkpoint or validation split.
    """
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise DataError(run, "run directory not found")
    ckpt = Path(checkpoint) if checkpoint not in ("best", "last") else run / "checkpoints" / f"{checkpoint}.pth"
    if not ckpt.is_file():
        raise DataError(ckpt, "checkpoint not found (train a run first, or pass --checkpoint)")
    import torch

    from ..data import CellDataset, build_coco, train_val_samples
    from ..data.coco import write_json
    from .checkpoint import model_from_checkpoint
    from .predict import predict_images
    from .validate import ImagesOnly

    model, cfg, _ = model_from_checkpoint(ckpt, "cpu")
    dev = device or cfg.train.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(dev)
    _, val = train_val_samples(cfg.data, cfg.model.num_classes, progress)
    if not val:
        raise DataError(run, "the run's config has no validation split (data.val_fraction is 0)")
    gt_path = run / "val_gt.json"
    gt: Any = str(gt_path) if gt_path.is_file() else build_coco(val, cfg.model.num_classes, progress)
    preds = predict_images(model, ImagesOnly(CellDataset(val, cache=False)), cfg.predict, progress=progress)
    if save_predictions:
        name = "val_predictions.json" if checkpoint == "best" else f"val_predictions_{Path(checkpoint).stem}.json"
        write_json(preds, run / name)
    return evaluate_predictions(
        gt, preds, iou_types=tuple(iou_types),  # type: ignore[arg-type]
        max_dets=max_dets or cfg.eval.max_dets, backend=backend or cfg.eval.backend,  # type: ignore[arg-type]
        num_classes=cfg.model.num_classes, cell_metrics=cell_metrics,
        iou_threshold=cfg.eval.iou_threshold if iou_threshold is None else iou_threshold, score_threshold=score_threshold,
    )
