"""Instances kept as packed label maps, expanded to per-instance masks only when needed.

An image with 660 cells at 2500 x 2000 px would cost 660 x 5 MB = 3.3 GB as uint8 masks; as a
label map it costs 10-20 MB. cellkit therefore caches label maps and builds instance masks after
cropping and augmentation (see docs/data.md for the numbers).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import torch

from .io import read_image, read_label_map
from .layout import TrainSample


@dataclass
class LabelMaps:
    """All instances of one image.

    Attributes:
        layers: ``(L, H, W)`` uint16 or int32. 0 is background; values 1..N are instance ids,
            unique across the whole image. Classes whose maps do not overlap share a layer, so
            L is usually 1.
        labels: ``(N + 1,)`` int64, the class (1-based) of each instance id; ``labels[0] = 0``.
    """

    layers: np.ndarray
    labels: np.ndarray

    @property
    def num_instances(self) -> int:
        return len(self.labels) - 1

    @property
    def nbytes(self) -> int:
        return int(self.layers.nbytes + self.labels.nbytes)

    def class_counts(self, num_classes: int = 4) -> np.ndarray:
        """``(num_classes,)`` int64 number of instances per class."""
        return np.bincount(self.labels[1:], minlength=num_classes + 1)[1:]


def pack_label_maps(class_maps: dict[int, np.ndarray], shape: tuple[int, int]) -> LabelMaps:
    """Relabel per-class maps of original ids to global ids 1..N and pack them into few layers.

    Args:
        class_maps: class index -> ``(H, W)`` integer map of original instance ids (0 background).
        shape: (H, W), used when there are no class maps at all.

    Each distinct non-zero id of a class map is one instance (never connected components).
    """
    layers: list[np.ndarray] = []
    labels = [0]
    total = sum(int(len(np.unique(m))) for m in class_maps.values())  # upper bound on N + classes
    dtype = np.uint16 if total < np.iinfo(np.uint16).max else np.int32
    for k in sorted(class_maps):
        ids, inverse = np.unique(class_maps[k], return_inverse=True)
        inverse = inverse.reshape(class_maps[k].shape)
        has_bg = ids[0] == 0
        n = len(ids) - int(has_bg)
        if n == 0:
            continue
        offset = len(labels) - int(has_bg)  # dense index 1..n (or 0..n-1 without background)
        fg = inverse > 0 if has_bg else np.ones_like(inverse, dtype=bool)
        relabelled = np.where(fg, inverse + offset, 0).astype(dtype)
        labels.extend([k] * n)
        for layer in layers:
            if not (layer[fg] > 0).any():
                layer[fg] = relabelled[fg]
                break
        else:
            layers.append(relabelled)
    if not layers:
        layers.append(np.zeros(shape, dtype=dtype))
    return LabelMaps(np.stack(layers), np.asarray(labels, dtype=np.int64))


def load_sample(sample: TrainSample) -> tuple[np.ndarray, LabelMaps]:
    """Decode one training image and its label maps.

    Returns:
        image ``(H, W, 3)`` uint8/uint16 and its :class:`LabelMaps`.

    Raises:
        DataError: any unreadable or inconsistent file (named in the message).
    """
    image = read_image(sample.image_path)
    shape = image.shape[:2]
    maps = {k: read_label_map(p, shape) for k, p in sample.class_paths.items()}
    return image, pack_label_maps(maps, shape)


def instances_from_label_maps(layers: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Expand label maps into the target torchvision's Mask R-CNN trains on.

    Each instance's mask is written only inside its bounding box (found by
    ``scipy.ndimage.find_objects`` in one pass over the map), so the cost is one zeroed
    ``(n, H, W)`` uint8 tensor, the masks themselves, and nothing more.

    Args:
        layers: ``(L, H, W)`` integer CPU tensor of instance ids (0 background).
        labels: ``(N + 1,)`` int64 class of each id.

    Returns:
        dict with ``masks`` ``(n, H, W)`` uint8, ``boxes`` ``(n, 4)`` float32 xyxy in pixel-edge
        coordinates (a one-pixel cell at column 5 spans x 5..6), ``labels`` ``(n,)`` int64,
        ``area`` ``(n,)`` float32 pixel counts, ``iscrowd`` ``(n,)`` int64 zeros and
        ``instance_ids`` ``(n,)`` int64, for the n instances that still have pixels (instances
        cropped away are dropped).
    """
    h, w = layers.shape[-2:]
    found = []
    for li, layer in enumerate(layers):
        for idx, sl in enumerate(ndi.find_objects(layer.numpy())):
            if sl is not None:
                found.append((idx + 1, li, sl))
    n = len(found)
    masks = torch.zeros((n, h, w), dtype=torch.uint8)
    boxes = torch.empty((n, 4), dtype=torch.float32)
    area = torch.empty((n,), dtype=torch.float32)
    ids = torch.empty((n,), dtype=torch.int64)
    for i, (inst, li, (ys, xs)) in enumerate(found):
        local = layers[li, ys, xs] == inst
        masks[i, ys, xs] = local
        boxes[i] = torch.tensor([xs.start, ys.start, xs.stop, ys.stop], dtype=torch.float32)
        area[i] = local.sum()
        ids[i] = inst
    return {
        "boxes": boxes,
        "labels": labels[ids].long(),
        "masks": masks,
        "area": area,
        "iscrowd": torch.zeros(n, dtype=torch.int64),
        "instance_ids": ids,
    }
