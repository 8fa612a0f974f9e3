"""Mask geometry: where an ``M x M`` box-relative mask lies in the image, both ways.

Two conventions, chosen by ``model.mask_geometry``:

``exact`` (the default): pixel ``(x, y)`` covers ``[x, x + 1] x [y, y + 1]`` with its centre at
``(x + 0.5, y + 0.5)``; cell ``j`` of an ``M x M`` mask of box ``(x0, y0, x1, y1)`` covers
``[x0 + j w / M, x0 + (j + 1) w / M]`` (``w = x1 - x0``), likewise in y. Training targets are
the ground-truth masks sampled at the cell centres by ``roi_align(..., aligned=True)``
(:func:`exact_mask_targets`); the paste (:func:`paste_masks`, :func:`paste_region`,
:func:`paste_regions`) samples the mask bilinearly at every pixel centre inside the box, the cell
values sitting at the cell centres (``grid_sample`` with ``align_corners=False``), and is zero
outside the box. The two are
inverse to each other up to the resolution of the mask: a mask sampled at a box and pasted back
at the same box lands where it came from. Detectron2's ``_do_paste_mask`` samples the same way
but lets the mask fade to zero over the outer half cell *inside* the box (zero padding); here the
outermost cells hold up to the box edge (``padding_mode="border"``, then zero outside the box),
so a mask that fills its box pastes to the whole box (with zero padding its corners are lost
once a cell is wider than a pixel) and large cells round-trip slightly better.

``torchvision``: torchvision's Mask R-CNN. Targets come from ``roi_align(..., aligned=False)``
(``project_masks_on_boxes``), which samples half a pixel down-right of the cell centres, and
the paste (``paste_masks_in_image``) pads the mask by one cell, truncates the box to integers
and stretches the mask over ``x1 - x0 + 1`` pixels (its ``TO_REMOVE = 1``): each pasted mask is
shifted and one pixel wider than the box. On the real sample's class-2 cells (median box side
19 px) a perfect mask head loses 6 % of IoU at 28 x 28 and 12 % at 56 x 56 this way
(``benchmarks/mask_roundtrip.py``).

:func:`mask_geometry_of` tells which convention a model was built with (read at prediction time
by :mod:`cellkit.inference.predict` and ``cellkit tune-thresholds``).
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Literal, Sequence, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import project_masks_on_boxes
from torchvision.ops import roi_align

from ..errors import ConfigError

MaskGeometry = Literal["exact", "torchvision"]
GEOMETRIES: tuple[str, ...] = get_args(MaskGeometry)


def check_geometry(geometry: str) -> MaskGeometry:
    """``geometry`` if it is ``exact`` or ``torchvision``, else ValueError."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"mask geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
    return geometry  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# targets


def exact_mask_targets(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, size: int) -> Tensor:
    """Ground-truth masks sampled into boxes as ``size x size`` targets, ``roi_align(aligned=True)``.

    Cell ``j`` of the target of box ``(x0, y0, x1, y1)`` is the ground-truth mask averaged at
    bilinear sample points inside ``[x0 + j w / size, x0 + (j + 1) w / size]`` (RoIAlign's
    adaptive sampling: ``ceil(w / size)`` points per cell and axis). One batched ``roi_align``
    call; only the ground-truth masks some box refers to are converted to float.

    Args:
        gt_masks: ``(N, H, W)`` uint8, bool or float ground-truth masks of one image.
        boxes: ``(R, 4)`` float xyxy boxes in the masks' pixels (pixel-edge coordinates).
        matched_idxs: ``(R,)`` int64 index into ``gt_masks`` of each box's instance.
        size: M, the side of the targets.

    Returns:
        ``(R, size, size)`` targets in ``boxes``' dtype (float32 in [0, 1] for binary masks).
    """
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, size, size))
    used, which = torch.unique(matched_idxs, return_inverse=True)
    planes = gt_masks[used][:, None].to(boxes.dtype)
    rois = torch.cat([which.to(boxes.dtype)[:, None], boxes], dim=1)
    return roi_align(planes, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)[:, 0]


def mask_targets(
    gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, size: int, geometry: MaskGeometry = "exact"
) -> Tensor:
    """``(R, size, size)`` float mask targets of one image in ``geometry``.

    ``exact``: :func:`exact_mask_targets`; ``torchvision``: torchvision's
    ``project_masks_on_boxes`` (``roi_align`` with ``aligned=False``), called as it is.
    Arguments as in :func:`exact_mask_targets`.
    """
    if check_geometry(geometry) == "torchvision":
        return project_masks_on_boxes(gt_masks, boxes, matched_idxs, size)
    return exact_mask_targets(gt_masks, boxes, matched_idxs, size)


# --------------------------------------------------------------------------------------------
# paste (exact geometry)


def _centre_coords(start: int, stop: int, lo: Tensor, hi: Tensor) -> Tensor:
    """grid_sample coordinates (-1 at ``lo``, 1 at ``hi``) of the centres of pixels ``start..stop-1``.

    ``lo``/``hi`` are ``(N, 1)`` (or 0-d) float tensors; the result is ``(N, stop - start)``.
    The full-size and the per-box paste both go through here, so their coordinates, and
    therefore their pasted values, are the same bit for bit.
    """
    centres = torch.arange(start, stop, dtype=lo.dtype, device=lo.device) + 0.5
    return (centres - lo) / (hi - lo) * 2 - 1


def _inside(start: int, stop: int, lo: Tensor, hi: Tensor) -> Tensor:
    """``(N, stop - start)`` bool: pixel centre in ``[lo, hi]`` (and the box not empty)."""
    centres = torch.arange(start, stop, dtype=lo.dtype, device=lo.device) + 0.5
    return (centres >= lo) & (centres <= hi) & (hi > lo)


def pixel_span(lo: float, hi: float, size: int) -> tuple[int, int]:
    """``(start, stop)``: the pixels ``start..stop-1`` of ``[0, size)`` whose centres lie in ``[lo, hi]``.

    Empty (``stop <= start``) when ``hi <= lo`` or the interval misses the image.
    """
    if not hi > lo:
        return 0, 0
    return max(math.ceil(lo - 0.5), 0), min(math.floor(hi - 0.5) + 1, size)


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """Full-size exact paste of box-relative masks (for tests and small images: N x H x W floats).

    Pixel ``(x, y)`` of mask ``i`` takes the bilinear value of ``masks[i]`` at the pixel centre
    ``(x + 0.5, y + 0.5)``, mask cells sitting at their centres (``grid_sample``,
    ``align_corners=False``, the outermost cells holding up to the box edge), when that centre
    lies inside ``boxes[i]`` (edges included); 0 elsewhere. No extra pixel: a box
    ``(2, 3, 7, 9)`` covers pixels 2..6 x 3..8.

    Args:
        masks: ``(N, 1, M, M)`` float mask probabilities relative to each box.
        boxes: ``(N, 4)`` float xyxy in the image's pixels.
        height, width: size of the image.

    Returns:
        ``(N, 1, height, width)`` float (``masks``' dtype).
    """
    n = masks.shape[0]
    if n == 0:
        return masks.new_zeros((0, 1, height, width))
    b = boxes.to(masks)
    x0, y0, x1, y1 = (b[:, k : k + 1] for k in range(4))
    u = _centre_coords(0, width, x0, x1)  # (N, W)
    v = _centre_coords(0, height, y0, y1)  # (N, H)
    grid = torch.stack(torch.broadcast_tensors(u[:, None, :], v[:, :, None]), dim=-1)  # (N, H, W, 2)
    pasted = F.grid_sample(masks, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = _inside(0, height, y0, y1)[:, :, None] & _inside(0, width, x0, x1)[:, None, :]  # (N, H, W)
    return pasted * inside[:, None].to(pasted.dtype)


def paste_region(
    mask: Tensor, box: Tensor | Sequence[float], height: int, width: int, mask_thresh: float
) -> tuple[np.ndarray, int, int]:
    """The visible part of one exactly pasted, thresholded mask: ``(region, top, left)``.

    Bit for bit the box's part of ``paste_masks(mask, box, height, width) > mask_thresh``
    (``mask_thresh >= 0``), computed on the pixels whose centres lie in the box only.

    Args:
        mask: ``(M, M)`` float mask probabilities relative to ``box``.
        box: ``(4,)`` float xyxy in the image's pixels.
        height, width: size of the image.
        mask_thresh: a pixel is foreground where its pasted value is ``> mask_thresh``.

    Returns:
        region ``(h, w)`` bool numpy array (``(0, 0)`` when no pixel centre of the image lies in
        the box), and the image row and column of its top-left pixel.
    """
    return next(paste_regions(mask[None, None], torch.as_tensor(box)[None], height, width, mask_thresh))


def paste_regions(
    masks: Tensor, boxes: Tensor, height: int, width: int, mask_thresh: float, chunk: int = 256
) -> Iterator[tuple[np.ndarray, int, int]]:
    """:func:`paste_region` of each mask in turn (what the lean paste + encode consumes).

    The grid coordinates of ``chunk`` boxes are computed at once over the whole image width and
    height (``chunk x (H + W)`` floats, the same arithmetic as :func:`paste_masks`); each mask
    is then sampled on its own box's pixels only.

    Args:
        masks: ``(N, 1, M, M)`` float mask probabilities.
        boxes: ``(N, 4)`` float xyxy in the image's pixels.

    Yields:
        ``(region (h, w) bool numpy, top, left)`` per mask, in order.
    """
    for start in range(0, masks.shape[0], chunk):
        m = masks[start : start + chunk]
        b = boxes[start : start + chunk].to(m)
        x0, y0, x1, y1 = (b[:, k : k + 1] for k in range(4))
        us = _centre_coords(0, width, x0, x1)  # (n, W)
        vs = _centre_coords(0, height, y0, y1)  # (n, H)
        for i, (bx0, by0, bx1, by1) in enumerate(b.tolist()):
            cx0, cx1 = pixel_span(bx0, bx1, width)
            cy0, cy1 = pixel_span(by0, by1, height)
            if cx1 <= cx0 or cy1 <= cy0:
                yield np.zeros((0, 0), dtype=bool), 0, 0
                continue
            u, v = us[i, cx0:cx1], vs[i, cy0:cy1]
            grid = torch.stack(torch.broadcast_tensors(u[None, :], v[:, None]), dim=-1)[None]  # (1, h, w, 2)
            pasted = F.grid_sample(m[i : i + 1], grid, mode="bilinear", padding_mode="border", align_corners=False)
            yield (pasted[0, 0] > mask_thresh).cpu().numpy(), cy0, cx0


# --------------------------------------------------------------------------------------------
# which geometry a model uses


def mask_geometry_of(models: nn.Module | Sequence[nn.Module]) -> MaskGeometry:
    """The mask geometry of a model (or of every model of an ensemble).

    cellkit models carry it as ``model.roi_heads.mask_geometry`` (set by
    :func:`cellkit.models.maskrcnn.assemble`); a model without it (a plain torchvision Mask
    R-CNN) is ``torchvision``. DDP/DataParallel wrappers are looked through.

    Raises:
        ConfigError: the models of an ensemble disagree (their masks cannot be merged).
    """
    found = {_geometry_of_one(m) for m in ([models] if isinstance(models, nn.Module) else models)}
    if len(found) > 1:
        raise ConfigError(f"the models mix mask geometries {sorted(found)}; an ensemble needs one model.mask_geometry")
    return found.pop() if found else "torchvision"  # type: ignore[return-value]


def _geometry_of_one(model: Any) -> str:
    model = getattr(model, "module", model)
    return check_geometry(getattr(getattr(model, "roi_heads", None), "mask_geometry", "torchvision"))
