"""Predict a split of the dataset with its ground truth: the one path from a model (or a run's
checkpoint) to scored predictions, used by validation during training, ``cellkit evaluate --run``
and ``cellkit tune-thresholds``."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch.utils.data import Dataset, Subset

from ..config import Config
from ..data import (
    CellDataset,
    build_coco,
    holdout_samples,
    image_to_tensor,
    num_classes_of,
    read_image,
    train_val_samples,
)
from ..data.coco import coco_from_dataset
from ..data.intensity import Intensity
from ..errors import ConfigError, DataError
from ..evaluation.coco import EvalReport, evaluate_predictions
from ..models.checkpoint import model_from_checkpoint
from ..models.devices import resolve_device
from ..outputs import check_writable_file, write_json
from ..runs import RunDir, checkpoint_path
from ..structures.coco_results import DropCounts
from ..structures.detections import Detections
from .predict import finalize, iter_detections

Split = Literal["train", "val", "holdout"]


class ImagesOnly(Dataset):
    """The images of a :class:`~cellkit.data.CellDataset` as ``(image (3, H, W) float32,
    {"image_id": id})``, without building instance masks (prediction does not need them)."""

    def __init__(self, dataset: CellDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, int]]:
        sample = self.dataset.samples[index]
        # the decoded image from the dataset's cache when it is there; else only the image file
        cached = self.dataset.cached(index)
        image = cached[0] if cached is not None else self.dataset.intensity.apply(read_image(sample.image_path))
        return image_to_tensor(image), {"image_id": sample.image_id}


@dataclass
class SplitPrediction:
    """A model's merged detections of a split (before thresholds), and where its ground truth is.

    Attributes:
        cfg: the config whose ``predict`` section made them (and finalises them).
        detections: one :class:`~cellkit.structures.detections.Detections` per image (id and size set).
        gt: the split's COCO ground truth (a ``val_gt.json`` path or a dict), None when not asked for.
    """

    cfg: Config
    detections: list[Detections]
    gt: Any = None
    counts: DropCounts = field(default_factory=DropCounts)

    def entries(self) -> list[dict[str, Any]]:
        """COCO result entries with ``cfg.predict``'s thresholds (drops counted in :attr:`counts`)."""
        out: list[dict[str, Any]] = []
        with torch.inference_mode():
            for det in self.detections:
                out.extend(finalize(det, self.cfg.predict, self.counts))
        return out

    def evaluate(self, **kwargs: Any) -> EvalReport:
        """:func:`~cellkit.evaluation.evaluate_predictions` of :meth:`entries` against :attr:`gt`
        (max_dets, backend, the cell-metric IoU and the bootstrap from ``cfg.eval`` unless given)."""
        if self.gt is None:
            raise DataError("<split>", "no ground truth to evaluate against")
        e = self.cfg.eval
        kwargs.setdefault("max_dets", e.max_dets)
        kwargs.setdefault("backend", e.backend)
        kwargs.setdefault("iou_threshold", e.iou_threshold)
        kwargs.setdefault("bootstrap", e.bootstrap)
        kwargs.setdefault("bootstrap_seed", e.bootstrap_seed)
        return evaluate_predictions(self.gt, self.entries(), num_classes=self.cfg.model.num_classes, **kwargs)


def predict_split(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    cfg: Config,
    split: Split = "val",
    *,
    dataset: Dataset | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    with_gt: bool = False,
    shard: tuple[int, int] = (0, 1),
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SplitPrediction:
    """Predict every image of a split with ``cfg.predict`` (TTA, tiling, batch size).

    Args:
        model: a model (or an ensemble) in any mode; it is used in eval mode and restored.
        cfg: the run's config (the split comes from ``cfg.data``; ``cfg.predict`` predicts).
        split: ``"val"`` or ``"train"`` (the split ``cellkit convert`` and training use), or
            ``"holdout"`` (``data.holdout_fraction``'s images).
        dataset: the images to predict instead of the split: a :class:`~cellkit.data.CellDataset`
            (its cache is used, no masks are built) or any dataset of ``(image, target)`` pairs.
        run_dir: a training run; its ``val_gt.json`` is the ground truth of the val split.
        with_gt: also build the split's ground truth (``run_dir/val_gt.json`` when present).
        shard: ``(rank, world_size)``: predict only the images ``rank, rank + world_size, ...``.
        device: move the model here first (default: leave it where it is).

    Raises:
        DataError: the split is empty (e.g. ``data.val_fraction`` is 0).
    """
    models = [model] if isinstance(model, torch.nn.Module) else list(model)
    if device is not None:
        models = [m.to(device) for m in models]
    samples = None
    if dataset is None:
        if split == "holdout":
            samples = holdout_samples(cfg.data, cfg.model.num_classes, progress)
        else:
            train, val = train_val_samples(cfg.data, cfg.model.num_classes, progress)
            samples = val if split == "val" else train
        if not samples:
            key = "holdout_fraction" if split == "holdout" else "val_fraction"
            raise DataError(run_dir or cfg.data.root or "<synthetic data>",
                            f"the {split} split is empty (data.{key} is {getattr(cfg.data, key)})")
        dataset = CellDataset(samples, cache=False, intensity=Intensity.from_config(cfg.data))
    images: Dataset = ImagesOnly(dataset) if isinstance(dataset, CellDataset) else dataset
    rank, world = shard
    if world > 1:
        images = Subset(images, list(range(rank, len(images), world)))  # type: ignore[arg-type]
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        dets = list(iter_detections(models, images, cfg.predict, progress=progress))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    gt: Any = None
    if with_gt:
        gt_path = RunDir(run_dir).val_gt if run_dir is not None and split == "val" else None
        if gt_path is not None and gt_path.is_file():
            gt = str(gt_path)
        elif isinstance(dataset, CellDataset):
            n = cfg.model.num_classes if cfg.model.num_classes is not None else num_classes_of(dataset.samples)
            gt = build_coco(dataset.samples, n, progress)
        else:
            if cfg.model.num_classes is None:
                raise ConfigError("model.num_classes: set it to build the ground truth of this dataset")
            gt = coco_from_dataset(dataset, cfg.model.num_classes, progress)
    return SplitPrediction(cfg, dets, gt)


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
    bootstrap: int | None = None,
    bootstrap_seed: int | None = None,
) -> EvalReport:
    """Predict the validation split of a run with one of its checkpoints and evaluate it.

    Args:
        run_dir: a training run directory (``config.yaml``, ``checkpoints/best.pth``, ``val_gt.json``).
        checkpoint: ``"best"``, ``"last"`` or a path to a ``.pth`` file.
        max_dets, backend: default to the run config's ``eval.max_dets`` and ``eval.backend``.
        iou_types, score_threshold, cell_metrics: see :func:`~cellkit.evaluation.evaluate_predictions`.
        iou_threshold: IoU of the cell-tool metrics (default: the run config's ``eval.iou_threshold``).
        device: ``cpu``, ``cuda`` ... (default: the run config's ``train.device``).
        save_predictions: write the predictions to ``run_dir/val_predictions.json`` (the best
            checkpoint's, which the error-analysis notebook reads) or, for another checkpoint,
            ``run_dir/val_predictions_<checkpoint name>.json``.
        bootstrap, bootstrap_seed: draws for the 95 % intervals (0: none) and their seed (default: the
            run config's ``eval.bootstrap`` and ``eval.bootstrap_seed``).

    Raises:
        DataError: no such run, checkpoint or validation split.
    """
    ckpt = checkpoint_path(run_dir, checkpoint)
    out = RunDir(run_dir).predictions(checkpoint)
    if save_predictions:  # before predicting, not after
        check_writable_file(out, "predictions file")
    model, cfg, _ = model_from_checkpoint(ckpt, "cpu")
    sp = predict_split(model, cfg, "val", run_dir=run_dir, with_gt=True, device=resolve_device(device or cfg.train.device),
                       progress=progress)
    entries = sp.entries()
    if save_predictions:
        write_json(entries, out)
    e = cfg.eval
    return evaluate_predictions(
        sp.gt, entries, iou_types=tuple(iou_types),  # type: ignore[arg-type]
        max_dets=max_dets or e.max_dets, backend=backend or e.backend,  # type: ignore[arg-type]
        num_classes=cfg.model.num_classes, cell_metrics=cell_metrics,
        iou_threshold=e.iou_threshold if iou_threshold is None else iou_threshold, score_threshold=score_threshold,
        bootstrap=e.bootstrap if bootstrap is None else bootstrap,
        bootstrap_seed=e.bootstrap_seed if bootstrap_seed is None else bootstrap_seed,
    )
