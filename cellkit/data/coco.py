"""COCO ground truth from the dataset: RLE encoding, conversion and the train/validation files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import scipy.ndimage as ndi
from pycocotools import mask as mask_utils

from ..progress import bar
from .instances import LabelMaps, load_sample
from .layout import TrainSample, scan_train, split_samples


def categories(num_classes: int = 4) -> list[dict[str, Any]]:
    """COCO categories ``1..num_classes`` named ``class1``..``classN``."""
    return [{"id": k, "name": f"class{k}", "supercategory": "cell"} for k in range(1, num_classes + 1)]


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """RLE of a full-size ``(H, W)`` binary mask, with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def encode_region(region: np.ndarray, top: int, left: int, height: int, width: int) -> dict[str, Any]:
    """RLE (str counts) of the ``height x width`` mask that equals ``region`` at ``(top, left)``
    and 0 elsewhere, computed from the region alone (no full-size buffer).

    The same RLE as pycocotools' ``encode`` of the full mask, without allocating it: memory and
    time follow the region's size, not the image's (1000 cells of a 2000 x 2000 image encode in
    0.05 s instead of 1.5 s through a full-size buffer; benchmarks/paste_memory.py). Runs follow
    the column-major order of COCO RLE; each region column is framed by a 0 above and below (the
    pixels outside the region), and a change at the bottom of one column that the top of the next
    undoes (full-height regions) cancels out. pycocotools turns the run lengths into its string.

    Args:
        region: ``(h, w)`` bool/uint8; parts outside the image are clipped.
        top, left: position of ``region[0, 0]`` in the image (may be negative).
    """
    h, w = region.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, height), min(left + w, width)
    total = height * width
    counts: list[int] = [total]
    if y1 > y0 and x1 > x0:
        r = region[y0 - top : y1 - top, x0 - left : x1 - left]
        rh = r.shape[0]
        framed = np.zeros((r.shape[1], rh + 2), dtype=np.int8)
        framed[:, 1:-1] = r.T
        col, row = np.divmod(np.flatnonzero(np.diff(framed.ravel())) + 1, rh + 2)
        pos = (x0 + col) * height + y0 + row - 1  # image index of the first pixel after each change
        twin = np.flatnonzero(pos[1:] == pos[:-1])
        keep = np.ones(len(pos), dtype=bool)
        keep[twin] = False
        keep[twin + 1] = False
        pos = pos[keep]
        if len(pos):
            counts = np.diff(np.concatenate([[0], pos[pos < total], [total]])).tolist()
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def label_map_annotations(maps: LabelMaps, image_id: int, first_ann_id: int = 1) -> list[dict[str, Any]]:
    """COCO annotations (RLE, bbox xywh, area, iscrowd 0) of every instance of one image."""
    _, h, w = maps.layers.shape
    anns = []
    found: dict[int, dict[str, Any]] = {}
    for layer in maps.layers:
        for idx, sl in enumerate(ndi.find_objects(layer)):
            if sl is None:
                continue
            inst = idx + 1
            local = layer[sl] == inst
            rle = encode_region(local, sl[0].start, sl[1].start, h, w)
            found[inst] = {
                "segmentation": rle,
                "area": float(local.sum()),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "category_id": int(maps.labels[inst]),
                "iscrowd": 0,
            }
    for i, inst in enumerate(sorted(found)):
        ann = {"id": first_ann_id + i, "image_id": int(image_id)}
        ann.update(found[inst])
        anns.append(ann)
    return anns


def build_coco(
    samples: Sequence[TrainSample],
    num_classes: int = 4,
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
        annotations.extend(label_map_annotations(maps, sample.image_id, len(annotations) + 1))
    return {"images": images, "annotations": annotations, "categories": categories(num_classes)}


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write JSON atomically (temporary file, then rename): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
    return path


def convert(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    val_fraction: float = 0.1,
    seed: int = 0,
    num_classes: int = 4,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Write ``out/train_gt.json`` and ``out/val_gt.json`` for the dataset at ``root``.

    The split is :func:`cellkit.data.layout.split_samples` with the same fraction and seed that
    training uses, so ``val_gt.json`` is exactly what a run validates on.
    """
    samples = scan_train(root, num_classes)
    train, val = split_samples(samples, val_fraction, seed)
    out = Path(out)
    train_path = write_json(build_coco(train, num_classes, progress), out / "train_gt.json")
    val_path = write_json(build_coco(val, num_classes, progress), out / "val_gt.json")
    return train_path, val_path
