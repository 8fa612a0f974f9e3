"""Input normalisation and resizing: torchvision's ``GeneralizedRCNNTransform`` with a resize policy.

``min_size`` (torchvision's behaviour): the shorter side goes to ``min_size``, the longer side
is capped at ``max_size``. A 256 px training crop and a 500 px validation image are then scaled
by different factors, so the same cell has a different size in each.

``fixed_scale``: every image is scaled by the constant ``scale`` (1.0: native resolution), the
longer side still capped at ``max_size``. Cells keep one size whatever the image size.

Both modes resize target masks as uint8 with nearest interpolation (torchvision converts them to
float32 first, four times the memory of N x H x W masks; nearest gives the same pixels either
way) and leave image and target untouched when the factor is exactly 1.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes, resize_keypoints

ResizeMode = Literal["min_size", "fixed_scale"]


class ResizeTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` whose resize step follows ``resize_mode``.

    Args:
        min_size: shorter side after resizing in ``min_size`` mode (a sequence: one is drawn per
            training image, the last is used in eval, as in torchvision).
        max_size: cap on the longer side after resizing, both modes.
        image_mean, image_std: per-channel normalisation of the [0, 1] input.
        resize_mode: ``min_size`` or ``fixed_scale``.
        scale: the factor of ``fixed_scale`` mode.

    ``forward(images, targets)`` is torchvision's: images ``list[(3, H, W) float]`` in [0, 1],
    targets ``list[dict]`` with ``boxes`` ``(N, 4)`` float xyxy and ``masks`` ``(N, H, W)``
    uint8/bool; returns an ``ImageList`` (batched, padded to a multiple of 32) and the resized
    targets (masks uint8).
    """

    def __init__(
        self,
        min_size: int | Sequence[int],
        max_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        resize_mode: ResizeMode = "min_size",
        scale: float = 1.0,
        size_divisible: int = 32,
    ) -> None:
        super().__init__(min_size, max_size, list(image_mean), list(image_std), size_divisible=size_divisible)
        if resize_mode not in ("min_size", "fixed_scale"):
            raise ValueError(f"resize_mode must be min_size or fixed_scale, got {resize_mode!r}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.resize_mode = resize_mode
        self.scale = float(scale)

    def scale_factor(self, height: int, width: int) -> float:
        """The factor an image of this size is resized by (training draws ``min_size`` at random)."""
        longest = max(height, width)
        if self.resize_mode == "fixed_scale":
            return min(self.scale, self.max_size / longest)
        size = self.torch_choice(list(self.min_size)) if self.training else self.min_size[-1]
        return min(size / min(height, width), self.max_size / longest)

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
        """Resize ``image`` ``(3, H, W)`` and its target by :meth:`scale_factor` (bilinear image, nearest uint8 masks)."""
        if self.training and self._skip_resize:
            return image, target
        h, w = image.shape[-2:]
        factor = self.scale_factor(h, w)
        if factor == 1.0:
            return image, target
        image = F.interpolate(
            image[None], scale_factor=factor, mode="bilinear", recompute_scale_factor=True, align_corners=False
        )[0]
        if target is None:
            return image, target
        target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
        if "masks" in target:
            target["masks"] = resize_masks(target["masks"], factor)
        if "keypoints" in target:
            target["keypoints"] = resize_keypoints(target["keypoints"], (h, w), image.shape[-2:])
        return image, target

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        """torchvision's zero-padded batch; in training at least ``2 * size_divisible`` px per side.

        A batch of one image of at most 32 px (the real test set has a 33 x 35 image; a crop or
        a dataset can be smaller) would leave a 1 x 1 map at stride 32, and BatchNorm in training
        cannot normalise a single value per channel. Padding (bottom and right, as torchvision
        pads) leaves the image, its boxes and masks where they are. Inference pads as torchvision.
        """
        batched = super().batch_images(images, size_divisible)
        floor = 2 * size_divisible
        if self.training and min(batched.shape[-2:]) < floor:
            pad_h, pad_w = max(0, floor - batched.shape[-2]), max(0, floor - batched.shape[-1])
            batched = F.pad(batched, (0, pad_w, 0, pad_h))
        return batched

    def __repr__(self) -> str:
        mode = f"scale={self.scale}" if self.resize_mode == "fixed_scale" else f"min_size={self.min_size}"
        return (f"{self.__class__.__name__}(\n    Normalize(mean={self.image_mean}, std={self.image_std})\n"
                f"    Resize({self.resize_mode}: {mode}, max_size={self.max_size}, image bilinear, masks nearest uint8)\n)")


def resize_masks(masks: Tensor, factor: float) -> Tensor:
    """``(N, H, W)`` uint8/bool masks -> ``(N, floor(H * factor), floor(W * factor))`` uint8, nearest.

    The same pixels as torchvision's ``interpolate(masks[:, None].float(), scale_factor=factor,
    recompute_scale_factor=True).byte()`` without the float32 copy.
    """
    if masks.dtype != torch.uint8:
        masks = masks.to(torch.uint8)
    return F.interpolate(masks[:, None], scale_factor=factor, mode="nearest", recompute_scale_factor=True)[:, 0]
