"""TensorBoard for every run: event files in the run directory, written by a trainer hook.

:class:`TensorBoardHook` (a default hook while ``train.tensorboard`` is true) writes, per epoch,
every number of the epoch's ``metrics.jsonl`` line as a scalar (losses, learning rate, val
AP50/AP/AP75, images/s, peak memory, seconds; tags from :func:`scalar_tag`), at every validation
``train.tensorboard_images`` validation images with ground truth and predictions drawn side by side
(``val/<image name>``), and once the resolved config as text. ``tensorboard --logdir RUN_DIR``
shows one run; ``tensorboard --logdir GRID_OUT`` every run of an ablation grid, side by side.

The hook runs before the checkpoint hook and flushes every epoch, so whatever ``last.pth`` holds
is on disk; a resumed run purges the events of epochs after its checkpoint (``purge_step``), so an
interrupted and resumed run shows each epoch once, exactly like its ``metrics.jsonl``.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from ..structures.label_maps import MaskRegion
from ..viz.overlay import instances_from_coco, render
from .hooks import VALIDATION
from .train_loop import Hook

__all__ = ["SCALAR_TAGS", "TensorBoardHook", "read_scalars", "scalar_tag", "scalars_of"]

SCALAR_TAGS: dict[str, str] = {
    "loss": "loss/total",
    "lr": "train/lr",
    "val_ap50": "val/AP50",
    "val_ap50_lo": "val/AP50_lo",
    "val_ap50_hi": "val/AP50_hi",
    "val_ap": "val/AP",
    "val_ap75": "val/AP75",
    "images_per_s": "speed/images_per_s",
    "train_seconds": "time/train_seconds",
    "val_seconds": "time/val_seconds",
    "peak_mem_mb": "memory/peak_mem_mb",
}
"""metrics.jsonl key -> TensorBoard tag (other ``loss_*`` keys go to ``loss/``, the rest to ``train/``)."""


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a ``metrics.jsonl`` key (``loss_mask`` -> ``loss/loss_mask``)."""
    if key in SCALAR_TAGS:
        return SCALAR_TAGS[key]
    if key.startswith("loss_"):
        return f"loss/{key}"
    return f"train/{key}"


def scalars_of(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of an epoch's metrics that become scalars: tag -> value (booleans, strings and
    the epoch itself are left out)."""
    out = {}
    for k, v in metrics.items():
        if k == "epoch" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[scalar_tag(k)] = float(v)
    return out


class TensorBoardHook(Hook):
    """Event files in the run directory (see the module docstring).

    Args:
        images: validation images drawn at every evaluation (None: ``train.tensorboard_images``).
        min_score: predictions below this score are not drawn.
        max_side: drawn images are shrunk (by an integer step) to at most this many pixels.
    """

    priority = 65  # before CheckpointHook (70): what last.pth holds is already flushed
    main_process_only = True

    def __init__(self, images: int | None = None, min_score: float = 0.5, max_side: int = 768) -> None:
        self.images, self.min_score, self.max_side = images, min_score, max_side
        self.writer: Any = None

    def before_train(self) -> None:
        t = self.trainer
        if t.run_dir is None:
            return
        # events of epochs after the checkpoint we resume from (an interrupted attempt) are purged
        self.writer = SummaryWriter(log_dir=str(t.run_dir), purge_step=t.epoch + 1, flush_secs=30)
        if t.epoch == 0:
            text = _yaml(t.cfg.to_dict())
            self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)
        self.writer.flush()

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(metrics["epoch"])
        for tag, value in scalars_of(metrics).items():
            self.writer.add_scalar(tag, value, step)
        n = self.trainer.cfg.train.tensorboard_images if self.images is None else self.images
        if metrics.get("val_ap50") is not None and n > 0:
            val = self.trainer.storage.get(VALIDATION)
            if val is not None and val.predictions is not None:
                for name, arr in self.drawings(val.predictions, n):
                    self.writer.add_image(f"val/{name}", arr, step, dataformats="HWC")
        self.writer.flush()

    def after_train(self, summary: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def drawings(self, predictions: list[dict[str, Any]], n: int) -> list[tuple[str, np.ndarray]]:
        """The first ``n`` validation images: ground truth (outlines) beside the predictions scoring at
        least ``min_score`` (filled), ``(H, 2W + 4, 3)`` uint8 each."""
        ds = self.trainer.val_set
        out = []
        for i in range(min(n, len(ds))):  # type: ignore[arg-type]
            name, image_id, image, gt = _val_item(ds, i)
            preds = instances_from_coco(p for p in predictions
                                        if int(p["image_id"]) == image_id and p["score"] >= self.min_score)
            left = render(image, gt, mode="outline")
            right = render(image, preds, mode="both")
            arr = np.concatenate([left, np.full((left.shape[0], 4, 3), 255, np.uint8), right], axis=1)
            f = -(-max(arr.shape[:2]) // self.max_side)
            out.append((name, np.ascontiguousarray(arr[::f, ::f]) if f > 1 else arr))
        return out


def _val_item(ds: Any, i: int) -> tuple[str, int, np.ndarray, list[Any]]:
    """(name, image_id, ``(H, W, 3)`` uint8 image, ground-truth regions) of validation image ``i``."""
    if hasattr(ds, "samples") and hasattr(ds, "load"):  # a CellDataset: decoded label maps
        image, label_maps = ds.load(i)
        if image.dtype == np.uint16:
            image = (image / 257).astype(np.uint8)
        sample = ds.samples[i]
        return str(sample.name), int(sample.image_id), image[..., :3], list(label_maps.regions())
    image, target = ds[i]  # any dataset of (image (3, H, W) float in [0, 1], target)
    arr = (np.asarray(image.detach().cpu().permute(1, 2, 0)) * 255).clip(0, 255).astype(np.uint8)
    masks = np.asarray(target["masks"].detach().cpu()).astype(bool)
    labels = [int(x) for x in target["labels"]]
    gt = [MaskRegion(m, 0, 0, k) for m, k in zip(masks, labels)]
    return f"image{i}", int(target["image_id"]), arr, gt


def _yaml(d: dict[str, Any]) -> str:
    return yaml.safe_dump(d, sort_keys=False)


def read_scalars(run_dir: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a run's event files, read back with TensorBoard's own reader (purged steps
    of an interrupted attempt left out): tag -> ``[(step, value), ...]`` in step order."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: sorted((int(e.step), float(e.value)) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}
