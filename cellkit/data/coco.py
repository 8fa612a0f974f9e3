"""COCO ground truth from the dataset: conversion and the train/validation files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from ..outputs import (
    check_replaceable,
    check_writable_dir,
    read_head,
    write_files_together,
    write_json,  # noqa: F401  (re-exported: the one atomic JSON writer lives in cellkit.outputs)
)
from ..progress import bar
from ..structures.label_maps import LabelMaps
from ..structures.rle import encode_mask
from .instances import load_sample
from .layout import TrainSample, num_classes_of, scan_train, split_samples

GT_FILES = ("train_gt.json", "val_gt.json")
"""What :func:`convert` writes, together."""


def categories(num_classes: int) -> list[dict[str, Any]]:
    """COCO categories ``1..num_classes`` named ``class1``..``classN``."""
    return [{"id": k, "name": f"class{k}", "supercategory": "cell"} for k in range(1, num_classes + 1)]


def build_coco(
    samples: Sequence[TrainSample],
    num_classes: int,
    progress: bool = True,
    loaded: Iterable[tuple[np.ndarray, LabelMaps]] | None = None,
) -> dict[str, Any]:
    """COCO ground-truth dict (images, annotations, categories) of ``samples``.

    Args:
        loaded: already decoded ``(image, label_maps)`` per sample (e.g. from a dataset cache);
            decoded from disk when None.
    """
    images, annotations = [], []
    items = loaded if loaded is not None else (load_sample(s) for s in samples)
    for sample, (image, maps) in bar(zip(samples, items), total=len(samples), desc="encoding masks", enabled=progress):
        h, w = image.shape[:2]
        images.append({"id": sample.image_id, "file_name": f"{sample.name}/image.tif", "height": h, "width": w})
        annotations.extend(maps.to_coco(sample.image_id, len(annotations) + 1))
    return {"images": images, "annotations": annotations, "categories": categories(num_classes)}


def coco_from_dataset(dataset: Any, num_classes: int, progress: bool = False) -> dict[str, Any]:
    """COCO ground truth of any dataset of ``(image (3, H, W), target)`` pairs whose targets carry
    ``masks`` ``(N, H, W)`` and ``labels`` ``(N,)`` (torchvision's Mask R-CNN format); the image id
    is ``target["image_id"]``, else the position + 1."""
    images, annotations = [], []
    for i in bar(range(len(dataset)), desc="encoding masks", enabled=progress):
        image, target = dataset[i]
        h, w = int(image.shape[-2]), int(image.shape[-1])
        image_id = int(target.get("image_id", i + 1))
        images.append({"id": image_id, "file_name": str(image_id), "height": h, "width": w})
        for mask, label in zip(target["masks"], target["labels"]):
            m = np.asarray(mask, dtype=np.uint8)
            if not m.any():
                continue
            rle = encode_mask(m)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label), "segmentation": rle,
                "area": float(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            })
    return {"images": images, "annotations": annotations, "categories": categories(num_classes)}


def convert(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    val_fraction: float = 0.1,
    seed: int = 0,
    num_classes: int | None = None,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Write ``out/train_gt.json`` and ``out/val_gt.json`` for the dataset at ``root``.

    Categories are ``1..num_classes`` (None: up to the dataset's highest ``classK.tif``).

    The split is :func:`cellkit.data.layout.split_samples` with the same fraction and seed that
    training uses, so ``val_gt.json`` is exactly what a run validates on. Both files are built in
    memory and then replaced as one change (:func:`cellkit.outputs.write_files_together`): a bad
    image, an error, a full disk, Ctrl-C or kill -9 leaves the previous pair, never a new train
    file beside a stale val file of another split.

    Raises:
        DataError: ``out`` cannot be written, or holds a ``train_gt.json``/``val_gt.json`` that is
            not COCO ground truth (checked first); a dataset file is bad; the disk is full.
        ConfigError: ``val_fraction`` outside [0, 1).
    """
    out = check_writable_dir(out)
    for name in GT_FILES:
        check_replaceable(out / name, "COCO ground-truth file", looks_like_coco)
    samples = scan_train(root, num_classes)
    num_classes = num_classes if num_classes is not None else num_classes_of(samples)
    train, val = split_samples(samples, val_fraction, seed)
    texts = {out / GT_FILES[0]: json.dumps(build_coco(train, num_classes, progress)),
             out / GT_FILES[1]: json.dumps(build_coco(val, num_classes, progress))}
    train_path, val_path = write_files_together(texts)
    return train_path, val_path


def looks_like_coco(path: Path) -> bool:
    """Whether an existing file is COCO ground truth (a JSON object with ``images``,
    ``annotations`` or ``categories`` in its first bytes), e.g. from an earlier ``convert``."""
    head = read_head(path).lstrip()
    return head.startswith(b"{") and any(k in head for k in (b'"images"', b'"annotations"', b'"categories"'))
