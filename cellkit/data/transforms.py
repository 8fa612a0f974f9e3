"""Joint image / label-map augmentation with ``torchvision.transforms.v2``.

Geometric transforms run on the image (``tv_tensors.Image``) and on the packed label maps
(``tv_tensors.Mask``, nearest-neighbour, so instance ids survive exactly). Instance masks, boxes
and areas are built afterwards from the transformed label maps
(:meth:`cellkit.structures.LabelMaps.to_target`), so boxes always follow the masks and
instances cut to nothing disappear. Any v2 transform that handles ``Mask`` inputs can be added.

torchvision has no 90-degree rotation, relative rescale or crop-up-to-size transform; the three
small classes below add them on top of v2's machinery and functional kernels.
"""
from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2 import query_size

from ..config import AugmentConfig


class RandomRot90(v2.Transform):
    """Rotate image and masks by a random multiple of 90 degrees (exact, no interpolation)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, ()))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            raise TypeError("RandomRot90 does not transform boxes; cellkit recomputes boxes from masks")
        if params["k"] == 0:
            return inpt
        out = torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], dims=(-2, -1))
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class RandomRescale(v2.Transform):
    """Rescale by a factor drawn uniformly from ``scale_range`` (relative to the input size).

    Unlike ``v2.ScaleJitter`` and ``v2.RandomResize``, which target an absolute size, this keeps
    the cells' size distribution centred on their true size.
    """

    def __init__(self, scale_range: tuple[float, float] = (0.8, 1.25), antialias: bool = True) -> None:
        super().__init__()
        self.scale_range = scale_range
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        lo, hi = self.scale_range
        s = lo + float(torch.rand(())) * (hi - lo)
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=self.antialias)


class RandomCropUpTo(v2.Transform):
    """Random crop of ``min(size, H) x min(size, W)``: large images are cropped, small ones kept whole."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        ch, cw = min(self.size, h), min(self.size, w)
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def build_train_transforms(aug: AugmentConfig) -> v2.Compose:
    """The training augmentation of ``data.augment``: rescale, crop, flips, 90-degree turns, colour.

    ``preset: default`` rescales by ``scale_range`` and crops at most ``crop_size``; ``preset: lsj``
    (large-scale jitter) rescales by ``lsj_scale_range`` and then crops, padding where needed, to
    exactly ``crop_size`` x ``crop_size`` (``v2.RandomCrop`` with ``pad_if_needed``; padding is
    black in the image and background in the masks).

    Inputs are ``(tv_tensors.Image uint8/float (3, H, W), tv_tensors.Mask int (L, H, W))``.
    """
    steps: list[v2.Transform] = []
    if aug.preset == "lsj":
        assert aug.crop_size is not None  # AugmentConfig._validate
        steps.append(RandomRescale(tuple(aug.lsj_scale_range)))
        steps.append(v2.RandomCrop(aug.crop_size, pad_if_needed=True, fill=0, padding_mode="constant"))
    else:
        if aug.scale_range is not None and tuple(aug.scale_range) != (1.0, 1.0):
            steps.append(RandomRescale(tuple(aug.scale_range)))
        if aug.crop_size is not None:
            steps.append(RandomCropUpTo(aug.crop_size))
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip > 0:
        steps.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.rot90:
        steps.append(RandomRot90())
    if any((aug.brightness, aug.contrast, aug.saturation, aug.hue)):
        steps.append(v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
    return v2.Compose(steps)
