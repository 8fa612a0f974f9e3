"""Reading the dataset, the synthetic dataset, COCO conversion and the torch Datasets.

This face loads torch only when a torch part is first asked for (:class:`CellDataset`,
:class:`TestImageDataset`, :func:`collate`, :func:`image_to_tensor`, copy-paste and the training
transforms): ``cellkit convert`` and ``cellkit synth`` read and write the dataset without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config, DataConfig
from .coco import build_coco, convert
from .instances import load_sample
from .io import read_image, read_label_map
from .layout import (
    TestImage,
    TrainSample,
    num_classes_of,
    read_test_index,
    scan_train,
    split_holdout,
    split_samples,
)
from .synth import ensure_synthetic, write_synthetic

if TYPE_CHECKING:  # torch-free face: for type checkers only, the torch parts load in __getattr__
    from .copy_paste import CopyPaste, InstanceBank, build_copy_paste  # torch-free face: as above
    from .dataset import CellDataset, TestImageDataset, collate, image_to_tensor  # torch-free face: as above
    from .transforms import build_train_transforms  # torch-free face: as above


def __getattr__(name: str) -> Any:
    """The torch parts of the face, loaded on first use (PEP 562)."""
    if name in ("CellDataset", "TestImageDataset", "collate", "image_to_tensor"):
        from . import dataset as module  # torch-free face: torch loads with the first torch part asked for
    elif name in ("CopyPaste", "InstanceBank", "build_copy_paste"):
        from . import copy_paste as module  # torch-free face: as above
    elif name == "build_train_transforms":
        from . import transforms as module  # torch-free face: as above
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)


def resolve_root(cfg: DataConfig, progress: bool = True) -> Path:
    """The dataset folder of ``cfg``: ``cfg.root``, or the cached synthetic dataset when it is None."""
    if cfg.root is not None:
        return Path(cfg.root).expanduser()
    return ensure_synthetic(cfg.synth_train, cfg.synth_test, cfg.synth_seed, cfg.synth_max_size, progress,
                            cfg.synth_classes)


def train_val_samples(cfg: DataConfig, num_classes: int | None,
                      progress: bool = True) -> tuple[list[TrainSample], list[TrainSample]]:
    """The training and validation image folders of ``cfg`` (the split ``cellkit convert`` writes;
    the training part without the hold-out images of ``cfg.holdout_fraction``).

    Args:
        num_classes: label maps of classes above it are an error (None: any class).
    """
    samples = scan_train(resolve_root(cfg, progress), num_classes)
    return split_samples(samples, cfg.val_fraction, cfg.split_seed, cfg.holdout_fraction)


def holdout_samples(cfg: DataConfig, num_classes: int | None, progress: bool = True) -> list[TrainSample]:
    """The hold-out image folders of ``cfg`` (``data.holdout_fraction``; empty when it is 0): never
    trained on, never used to choose the epoch (:func:`cellkit.data.layout.split_holdout`)."""
    if cfg.holdout_fraction <= 0:
        return []
    samples = scan_train(resolve_root(cfg, progress), num_classes)
    return split_holdout(samples, cfg.val_fraction, cfg.holdout_fraction, cfg.split_seed)[2]


def resolve_num_classes(cfg: Config, progress: bool = True) -> Config:
    """``cfg`` with ``model.num_classes`` set: as it is when the config says, else read from the
    training data (its highest ``classK.tif``, :func:`~cellkit.data.layout.num_classes_of`).

    Raises:
        DataError: the data holds no label map at all, or one of a class above ``model.num_classes``.
    """
    samples = scan_train(resolve_root(cfg.data, progress), cfg.model.num_classes)
    if cfg.model.num_classes is not None:
        return cfg
    return cfg.replace({"model.num_classes": num_classes_of(samples)})


__all__ = [
    "CellDataset", "TestImageDataset", "collate", "image_to_tensor",
    "load_sample", "read_image", "read_label_map", "TestImage", "TrainSample", "read_test_index", "scan_train",
    "split_samples", "split_holdout", "holdout_samples", "ensure_synthetic", "write_synthetic",
    "build_train_transforms", "build_coco", "convert",
    "resolve_root", "train_val_samples", "CopyPaste", "InstanceBank", "build_copy_paste", "num_classes_of",
    "resolve_num_classes",
]
