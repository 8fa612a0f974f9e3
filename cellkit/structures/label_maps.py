"""Ground-truth instances as packed label maps, and the one walk over them.

An image with 660 cells at 2500 x 2000 px would cost 660 x 5 MB = 3.3 GB as uint8 masks; as a
label map it costs 10-20 MB. cellkit therefore keeps label maps and expands instances only where
they are used, through :meth:`LabelMaps.regions`: each instance's mask inside its bounding box.
COCO conversion (:meth:`LabelMaps.to_coco`), training targets (:meth:`LabelMaps.to_target`, after
cropping and augmentation) and overlays all read that walk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np
import scipy.ndimage as ndi
from pycocotools import mask as mask_utils

from .rle import encode_region

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class MaskRegion:
    """One instance: its mask inside its bounding box, where the box sits, its class and score.

    Attributes:
        mask: ``(h, w)`` bool, the instance inside its bounding box.
        top, left: position of ``mask[0, 0]`` in the image (pixels).
        label: class (1-based).
        score: detection score (1.0 for ground truth).
        status: optional ``"tp"`` / ``"fp"`` / ``"fn"`` for error views.
        instance_id: the id in the label map (0 when not from one).
    """

    mask: np.ndarray
    top: int
    left: int
    label: int
    score: float = 1.0
    status: str | None = None
    instance_id: int = 0

    @property
    def area(self) -> int:
        """Pixels of the mask."""
        return int(self.mask.sum())

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` in pixel-edge coordinates (a one-pixel cell at column 5 spans x 5..6)."""
        h, w = self.mask.shape
        return self.left, self.top, self.left + w, self.top + h


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
        """N, the ids in :attr:`labels` (some may have no pixels left after cropping)."""
        return len(self.labels) - 1

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        return int(self.layers.shape[-2]), int(self.layers.shape[-1])

    @property
    def nbytes(self) -> int:
        return int(self.layers.nbytes + self.labels.nbytes)

    def class_counts(self, num_classes: int) -> np.ndarray:
        """``(num_classes,)`` int64 number of instances per class."""
        return np.bincount(self.labels[1:], minlength=num_classes + 1)[1:]

    @classmethod
    def from_class_maps(cls, class_maps: Mapping[int, np.ndarray], shape: tuple[int, int]) -> "LabelMaps":
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
        return cls(np.stack(layers), np.asarray(labels, dtype=np.int64))

    def regions(self) -> Iterator[MaskRegion]:
        """Every instance that has pixels, by increasing id: its mask inside its bounding box.

        One pass of ``scipy.ndimage.find_objects`` per layer finds every box; each mask is
        compared inside its box only, so the walk costs the sum of the boxes, not N full images.
        """
        found: list[tuple[int, int, tuple[slice, slice]]] = []
        for li, layer in enumerate(self.layers):
            for idx, sl in enumerate(ndi.find_objects(layer)):
                if sl is not None:
                    found.append((idx + 1, li, sl))
        found.sort(key=lambda f: f[0])
        for inst, li, (ys, xs) in found:
            yield MaskRegion(self.layers[li, ys, xs] == inst, ys.start, xs.start, int(self.labels[inst]),
                             instance_id=inst)

    def to_coco(self, image_id: int, first_ann_id: int = 1) -> list[dict[str, Any]]:
        """COCO annotations of every instance: RLE ``segmentation`` (str counts), ``bbox``
        ``[x, y, w, h]``, ``area`` (pixels), ``category_id``, ``iscrowd`` 0, ids from ``first_ann_id``."""
        h, w = self.shape
        anns = []
        for i, r in enumerate(self.regions()):
            rle = encode_region(r.mask, r.top, r.left, h, w)
            anns.append({
                "id": first_ann_id + i, "image_id": int(image_id), "segmentation": rle, "area": float(r.area),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "category_id": r.label, "iscrowd": 0,
            })
        return anns

    def to_target(self) -> dict[str, "torch.Tensor"]:
        """The target torchvision's Mask R-CNN trains on, for the instances that have pixels.

        Returns:
            ``masks`` ``(n, H, W)`` uint8, ``boxes`` ``(n, 4)`` float32 xyxy in pixel-edge
            coordinates, ``labels`` ``(n,)`` int64, ``area`` ``(n,)`` float32 pixel counts,
            ``iscrowd`` ``(n,)`` int64 zeros and ``instance_ids`` ``(n,)`` int64 (increasing).
            Instances cropped away are left out; n may be 0.
        """
        import torch  # here only: the structures face (and so the evaluation) stays torch-free

        regions = list(self.regions())
        n = len(regions)
        h, w = self.shape
        masks = torch.zeros((n, h, w), dtype=torch.uint8)
        for i, r in enumerate(regions):
            rh, rw = r.mask.shape
            masks[i, r.top : r.top + rh, r.left : r.left + rw] = torch.from_numpy(r.mask)
        return {
            "boxes": torch.tensor([r.box for r in regions], dtype=torch.float32).reshape(n, 4),
            "labels": torch.tensor([r.label for r in regions], dtype=torch.int64),
            "masks": masks,
            "area": torch.tensor([r.area for r in regions], dtype=torch.float32),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
            "instance_ids": torch.tensor([r.instance_id for r in regions], dtype=torch.int64),
        }
