"""torch Datasets that yield what torchvision's Mask R-CNN trains on and predicts from."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from ..progress import bar
from ..structures.label_maps import LabelMaps
from .copy_paste import CopyPaste, InstanceBank
from .instances import load_sample
from .intensity import DEFAULT, Intensity
from .io import read_image
from .layout import TestImage, TrainSample

Target = dict[str, Any]


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8/uint16 array -> ``(3, H, W)`` float32 tensor in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if t.dtype == torch.uint16:
        return t.to(torch.float32) / 65535.0
    return F.to_dtype(t, torch.float32, scale=True)


class CellDataset(Dataset):
    """Annotated cell images as ``(image, target)`` pairs for torchvision's Mask R-CNN.

    Args:
        samples: image folders from :func:`cellkit.data.layout.scan_train` (or a split of them).
        transforms: a joint transform called as ``transforms(image, label_maps)`` with a
            ``tv_tensors.Image`` and a ``tv_tensors.Mask`` ``(L, H, W)`` int32 of instance ids,
            e.g. :func:`cellkit.data.transforms.build_train_transforms`. None for validation.
        cache: keep decoded images and label maps in memory (an epoch then decodes nothing).
        copy_paste: cells of other images of this dataset pasted onto each augmented crop
            (:class:`cellkit.data.copy_paste.CopyPaste`, from
            :func:`~cellkit.data.copy_paste.build_copy_paste`); None: off.
        intensity: how raw values become [0, 1] (``data.intensity``, see
            :class:`cellkit.data.intensity.Intensity`), applied once where an image is decoded.

    Each item is ``(image, target)``: image ``(3, H, W)`` float32 in [0, 1]; target with
    ``boxes`` ``(N, 4)`` float32 xyxy, ``labels`` ``(N,)`` int64 in 1..K, ``masks``
    ``(N, H, W)`` uint8, ``image_id`` int, ``area`` ``(N,)`` float32, ``iscrowd`` ``(N,)``
    int64. N may be 0 (a crop without cells is still a valid sample).
    """

    def __init__(
        self,
        samples: Sequence[TrainSample],
        transforms: Callable[..., Any] | None = None,
        cache: bool = True,
        copy_paste: CopyPaste | None = None,
        intensity: Intensity = DEFAULT,
    ) -> None:
        self.samples = list(samples)
        self.intensity = intensity
        self.transforms = transforms
        self.cache = cache
        self.copy_paste = copy_paste
        self._cache: dict[int, tuple[np.ndarray, LabelMaps]] = {}
        self._bank: InstanceBank | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, LabelMaps]:
        """Decoded image ``(H, W, 3)`` and label maps of one sample (from the cache when enabled)."""
        hit = self._cache.get(index)
        if hit is not None:
            return hit
        image, maps = load_sample(self.samples[index])
        item = (self.intensity.apply(image), maps)
        if self.cache:
            self._cache[index] = item
        return item

    def cached(self, index: int) -> tuple[np.ndarray, LabelMaps] | None:
        """The cached decoded sample, or None when it has not been decoded (or caching is off)."""
        return self._cache.get(index)

    def preload(self, progress: bool = True) -> int:
        """Decode every sample into the cache (before DataLoader workers fork, so they share it).

        Returns:
            bytes held by the cache.
        """
        if self.cache:
            for i in bar(range(len(self)), desc="decoding images", enabled=progress):
                self.load(i)
        return self.cache_bytes()

    def cache_bytes(self) -> int:
        return sum(im.nbytes + lm.nbytes for im, lm in self._cache.values())

    def class_presence(self, num_classes: int) -> np.ndarray:
        """``(len(self), num_classes)`` bool: which classes each image contains."""
        out = np.zeros((len(self), num_classes), dtype=bool)
        for i in range(len(self)):
            out[i] = self.load(i)[1].class_counts(num_classes) > 0
        return out

    def instance_bank(self) -> InstanceBank:
        """The cells copy-paste draws from (built once, from the decoded label maps)."""
        if self._bank is None:
            self._bank = InstanceBank.build(self.load, len(self))
        return self._bank

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image, maps = self.load(index)
        img: torch.Tensor = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        if img.dtype == torch.uint16:
            img = tv_tensors.Image(img.to(torch.float32) / 65535.0)
        layers: torch.Tensor = tv_tensors.Mask(torch.from_numpy(maps.layers.astype(np.int32)))
        if self.transforms is not None:
            img, layers = self.transforms(img, layers)
        labels = maps.labels
        if self.copy_paste is not None:
            img, layers, labels = self.copy_paste(img, layers, labels, self, index)
        target = LabelMaps(layers.as_subclass(torch.Tensor).numpy(), labels).to_target()
        target["image_id"] = self.samples[index].image_id
        image_t = F.to_dtype(img.as_subclass(torch.Tensor), torch.float32, scale=True).contiguous()
        return image_t, target


class TestImageDataset(Dataset):
    """Test images (``test_release/``) as ``(image (3, H, W) float32 in [0, 1], TestImage)`` pairs."""

    def __init__(self, images: Sequence[TestImage], intensity: Intensity = DEFAULT) -> None:
        self.images = list(images)
        self.intensity = intensity

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, TestImage]:
        meta = self.images[index]
        return image_to_tensor(self.intensity.apply(read_image(meta.path))), meta


def collate(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Collate for detection: ``[(img, tgt), ...] -> ([img, ...], [tgt, ...])`` (sizes may differ)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
