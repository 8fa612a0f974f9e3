"""Validation during training: predict the validation split, then COCO segm AP."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from ..config import Config
from ..data import CellDataset, image_to_tensor, read_image


class ImagesOnly(Dataset):
    """The images of a :class:`CellDataset` as ``(image (3, H, W) float32, {"image_id": id})``,
    without building instance masks (prediction does not need them)."""

    def __init__(self, dataset: CellDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, int]]:
        sample = self.dataset.samples[index]
        # the decoded image from the dataset's cache when it is there; else only the image file
        cached = self.dataset.cached(index)
        image = cached[0] if cached is not None else read_image(sample.image_path)
        return image_to_tensor(image), {"image_id": sample.image_id}


def evaluate_model(
    model: torch.nn.Module,
    dataset: CellDataset,
    gt: dict[str, Any],
    cfg: Config,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[Any, list[dict[str, Any]]]:
    """COCO segm evaluation of ``model`` on ``dataset``.

    Predictions use ``cfg.predict`` (thresholds, TTA, tiling) and are scored with
    ``cfg.eval.max_dets`` detections per image and class.

    Returns:
        (:class:`cellkit.engine.evaluate.EvalResult`, the COCO result entries it scored).
    """
    from .evaluate import coco_evaluate
    from .predict import predict_images

    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    try:
        preds = predict_images(model, ImagesOnly(dataset), cfg.predict, progress=progress)
    finally:
        model.train(was_training)
    return coco_evaluate(gt, preds, "segm", cfg.eval.max_dets, cfg.eval.backend, cfg.model.num_classes), preds
