"""Detections of one image before pasting: the structure prediction, TTA, tiling and tuning share."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .coco_results import DropCounts, detections_to_coco, paste_and_encode
from .rle import RLE


@dataclass
class Detections:
    """A model's detections of one image (or one tile of it), masks still at the head's resolution.

    Attributes:
        boxes: ``(N, 4)`` float32 xyxy in pixels of the image the detections refer to.
        labels: ``(N,)`` int64 classes 1..K.
        scores: ``(N,)`` float32.
        masks: ``(N, 1, M, M)`` float32 mask probabilities relative to each box (M = 28 or 56).
        tile: ``(N,)`` int64 tile each detection came from (sliding-window inference), or None.
        fringe: ``(N,)`` bool, True for a tile's second choices (sliding-window inference): the box
            touches an inner tile border, or its centre lies just outside the tile's core; or None.
        image_id: COCO id of the image (0 when unknown).
        image_size: ``(height, width)`` of the image the boxes refer to ((0, 0) when unknown).
        geometry: how the masks map onto their boxes, the mask geometry of the model that made
            them (``"exact"`` or ``"torchvision"``, see :mod:`cellkit.structures.mask_geometry`):
            every paste of these masks uses it.

    Indexing with int64 indices or a bool mask (``det[keep]``) selects detections, keeping the
    image id and size; :meth:`cat` concatenates, :meth:`to` moves the tensors, :meth:`to_coco`
    pastes, encodes and writes COCO result entries.
    """

    boxes: Tensor
    labels: Tensor
    scores: Tensor
    masks: Tensor
    tile: Tensor | None = None
    fringe: Tensor | None = None
    image_id: int = 0
    image_size: tuple[int, int] = (0, 0)
    geometry: str = "exact"

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def mask_size(self) -> int:
        """M, the side of the masks."""
        return int(self.masks.shape[-1])

    def __getitem__(self, idx: Tensor | slice | Sequence[int]) -> "Detections":
        """The detections at ``idx`` (int64 indices, a bool mask or a slice), in that order."""
        if not isinstance(idx, (Tensor, slice)):
            idx = torch.as_tensor(idx, dtype=torch.int64)
        return self.replace(**{k: (None if v is None else v[idx]) for k, v in self._tensors().items()})

    def replace(self, **changes: Any) -> "Detections":
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to(self, device: str | torch.device) -> "Detections":
        """The same detections with every tensor on ``device``."""
        return self.replace(**{k: (None if v is None else v.to(device)) for k, v in self._tensors().items()})

    def _tensors(self) -> dict[str, Tensor | None]:
        return {"boxes": self.boxes, "labels": self.labels, "scores": self.scores, "masks": self.masks,
                "tile": self.tile, "fringe": self.fringe}

    @classmethod
    def empty(cls, mask_size: int = 28, image_id: int = 0, image_size: tuple[int, int] = (0, 0),
              geometry: str = "exact") -> "Detections":
        """No detections (masks ``(0, 1, mask_size, mask_size)``)."""
        return cls(torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64), torch.zeros((0,)),
                   torch.zeros((0, 1, mask_size, mask_size)), image_id=image_id, image_size=image_size,
                   geometry=geometry)

    @classmethod
    def from_output(cls, out: dict[str, Tensor], image_id: int = 0, image_size: tuple[int, int] = (0, 0),
                    geometry: str = "exact") -> "Detections":
        """From a :func:`cellkit.inference.predict.raw_detections` dict (``boxes/labels/scores/masks``)."""
        return cls(out["boxes"].float(), out["labels"].long(), out["scores"].float(), out["masks"].float(),
                   image_id=image_id, image_size=image_size, geometry=geometry)

    @classmethod
    def cat(cls, parts: Sequence["Detections"]) -> "Detections":
        """Concatenate detections of one image; masks of different resolutions are resampled to the
        largest. The image id and size are the first part's (parts of different images, or of
        different mask geometries, are an error)."""
        parts = list(parts)
        if not parts:
            return cls.empty()
        first = parts[0]
        if any(p.image_id != first.image_id for p in parts):
            raise ValueError(f"cannot concatenate detections of images {sorted({p.image_id for p in parts})}")
        if any(p.geometry != first.geometry for p in parts):
            raise ValueError(f"cannot concatenate masks of geometries {sorted({p.geometry for p in parts})}")
        size = max(p.mask_size for p in parts)
        masks = [p.masks if p.mask_size == size else resize_masks(p.masks, size) for p in parts]
        tile = None if any(p.tile is None for p in parts) else torch.cat([p.tile for p in parts])  # type: ignore[misc]
        fringe = (None if any(p.fringe is None for p in parts)
                  else torch.cat([p.fringe for p in parts]))  # type: ignore[misc]
        return cls(torch.cat([p.boxes for p in parts]), torch.cat([p.labels for p in parts]),
                   torch.cat([p.scores for p in parts]), torch.cat(masks), tile, fringe, first.image_id,
                   first.image_size, first.geometry)

    def finite(self) -> Tensor:
        """``(N,)`` bool: detections whose 4 box coordinates and score are all finite."""
        return torch.isfinite(self.boxes).all(dim=1) & torch.isfinite(self.scores)

    def to_coco(self, mask_thresh: float = 0.5, rles: Sequence[RLE] | None = None,
                counts: DropCounts | None = None) -> list[dict[str, Any]]:
        """COCO result entries ``{image_id, category_id, score, bbox [x, y, w, h], segmentation}``.

        Masks are pasted (in :attr:`geometry`) into the ``image_size`` image one box at a time and
        RLE-encoded at ``mask_thresh`` (see :func:`cellkit.structures.coco_results.paste_and_encode`) unless ``rles``
        (one per detection) are given. Non-finite detections and empty masks are left out and
        counted in ``counts``.
        """
        det = self
        if rles is None:
            ok = self.finite()
            det = self[ok]
            if counts is not None:
                counts.add(self.image_id, nonfinite=int((~ok).sum()))
            h, w = self.image_size
            rles = paste_and_encode(det.boxes, det.masks, h, w, mask_thresh, geometry=self.geometry)
        return detections_to_coco(det.image_id, det.boxes, det.labels, det.scores, rles, counts)


def resize_masks(masks: Tensor, size: int) -> Tensor:
    """``(N, 1, M, M)`` -> ``(N, 1, size, size)`` over the same boxes (bilinear)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, 1, size, size))
    return F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
