"""Post-processing of Mask R-CNN detections before they become results: mask NMS on RLEs, flips,
mask resampling and weighted fusion of test-time-augmented views (pasting and encoding are
:mod:`cellkit.structures.coco_results`).

Detections travel between the steps as :class:`~cellkit.structures.detections.Detections`: boxes in original-image pixels and
the low-resolution mask probabilities, never full-size masks. Merging (mask NMS, weighted fusion
of test-time-augmented views) works on RLEs or on the low-resolution masks.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor
from torchvision.ops import box_iou

from ..structures.detections import Detections
from ..structures.rle import RLE

# --------------------------------------------------------------------------------------------
# mask NMS (RLE level)


def mask_nms(
    rles: Sequence[RLE],
    scores: Tensor,
    iou_thresh: float,
    labels: Tensor | None = None,
    groups: Tensor | None = None,
    overlap: str = "iou",
    priority: Tensor | None = None,
) -> Tensor:
    """Greedy NMS on mask overlap computed from RLEs (pycocotools), never on full-size masks.

    A detection is dropped when a higher-ranked one of the same label overlaps it by more than
    ``iou_thresh``. Candidate pairs are found from the masks' bounding boxes first, so the cost
    is one pycocotools call per kept detection over its box neighbours.

    Args:
        rles: N RLEs of one image.
        scores: ``(N,)`` float; rank is by descending score (stable).
        labels: ``(N,)`` int; suppression only within a label (None: class-agnostic).
        groups: ``(N,)`` int; suppression only between *different* groups (e.g. tiles); None: any.
        overlap: ``"iou"`` (intersection over union) or ``"iomin"`` (intersection over the
            smaller mask: catches a cut-off part of a cell inside its whole).
        priority: ``(N,)`` int, ranked before the score (lower first), e.g. "touches a tile border".

    Returns:
        int64 indices of the kept detections, best first.
    """
    n = len(rles)
    if n == 0:
        return torch.zeros((0,), dtype=torch.int64)
    order = _rank(scores, priority)
    bb = torch.as_tensor(mask_utils.toBbox(list(rles)), dtype=torch.float64).reshape(-1, 4)
    xyxy = torch.cat([bb[:, :2], bb[:, :2] + bb[:, 2:]], dim=1)
    lab = labels.cpu() if labels is not None else torch.zeros(n, dtype=torch.int64)
    grp = groups.cpu() if groups is not None else None
    suppressed = np.zeros(n, dtype=bool)
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        cand = _neighbours(i, xyxy, lab, grp, rank, suppressed)
        if cand.size:
            ov = _overlap(rles, i, cand, overlap)
            suppressed[cand[ov > iou_thresh]] = True
    return torch.as_tensor(keep, dtype=torch.int64)


def _rank(scores: Tensor, priority: Tensor | None) -> Tensor:
    order = torch.argsort(scores.cpu().double(), descending=True, stable=True)
    if priority is not None:
        order = order[torch.argsort(priority.cpu()[order], stable=True)]
    return order


def _neighbours(i: int, xyxy: Tensor, lab: Tensor, grp: Tensor | None, rank: Tensor,
                suppressed: np.ndarray) -> np.ndarray:
    """Lower-ranked, not yet suppressed detections of the same label whose mask boxes intersect i's."""
    b = xyxy[i]
    hit = (xyxy[:, 0] < b[2]) & (xyxy[:, 2] > b[0]) & (xyxy[:, 1] < b[3]) & (xyxy[:, 3] > b[1])
    hit &= (lab == lab[i]) & (rank > rank[i])
    if grp is not None:
        hit &= grp != grp[i]
    idx = torch.nonzero(hit).flatten().numpy()
    return idx[~suppressed[idx]]


def _overlap(rles: Sequence[RLE], i: int, cand: np.ndarray, kind: str) -> np.ndarray:
    others = [rles[j] for j in cand]
    if kind == "iou":
        return np.asarray(mask_utils.iou([rles[i]], others, [0] * len(others))).reshape(-1)
    if kind == "iomin":  # pycocotools' crowd IoU is intersection / area of the first argument
        over_i = np.asarray(mask_utils.iou([rles[i]], others, [1] * len(others))).reshape(-1)
        over_j = np.asarray(mask_utils.iou(others, [rles[i]], [1])).reshape(-1)
        return np.maximum(over_i, over_j)
    raise ValueError(f"overlap must be 'iou' or 'iomin', got {kind!r}")


# --------------------------------------------------------------------------------------------
# low-resolution mask geometry: flips, resampling, weighted fusion


def flip_detections(det: Detections, flip: str, height: int, width: int) -> Detections:
    """Map detections of a flipped image back onto the unflipped image.

    Args:
        flip: ``""``, ``"h"`` (left-right), ``"v"`` (up-down) or ``"hv"``.
        height, width: size of the image that was flipped.
    """
    boxes, masks = det.boxes.clone(), det.masks
    if "h" in flip:
        boxes[:, 0], boxes[:, 2] = width - det.boxes[:, 2], width - det.boxes[:, 0]
        masks = masks.flip(-1)
    if "v" in flip:
        boxes[:, 1], boxes[:, 3] = height - det.boxes[:, 3], height - det.boxes[:, 1]
        masks = masks.flip(-2)
    return det.replace(boxes=boxes, masks=masks)


def flip_image(image: Tensor, flip: str) -> Tensor:
    """``(C, H, W)`` image flipped left-right (``h``), up-down (``v``) or both (``hv``)."""
    dims = [d for c, d in (("v", -2), ("h", -1)) if c in flip]
    return image.flip(dims) if dims else image


def resample_masks(masks: Tensor, src_boxes: Tensor, dst_boxes: Tensor, size: int | None = None) -> Tensor:
    """Resample box-relative masks from their own boxes onto other boxes.

    Cell ``j`` of an ``M x M`` mask covers ``[x0 + j w / M, x0 + (j + 1) w / M]`` of its box, as
    RoIAlign produced it; each output cell takes the bilinear value of the source mask at its
    centre (zero outside the source box).

    Args:
        masks: ``(N, 1, M, M)`` float.
        src_boxes, dst_boxes: ``(N, 4)`` xyxy.
        size: output side (default M).

    Returns:
        ``(N, 1, size, size)`` float.
    """
    n, m = masks.shape[0], masks.shape[-1]
    size = size or m
    if n == 0:
        return masks.new_zeros((0, 1, size, size))
    t = (torch.arange(size, dtype=masks.dtype, device=masks.device) + 0.5) / size  # (size,)
    src, dst = src_boxes.to(masks), dst_boxes.to(masks)
    xs = dst[:, 0:1] + t[None] * (dst[:, 2:3] - dst[:, 0:1])  # (N, size) image x of output cells
    ys = dst[:, 1:2] + t[None] * (dst[:, 3:4] - dst[:, 1:2])
    u = 2 * (xs - src[:, 0:1]) / (src[:, 2:3] - src[:, 0:1]).clamp(min=1e-6) - 1
    v = 2 * (ys - src[:, 1:2]) / (src[:, 3:4] - src[:, 1:2]).clamp(min=1e-6) - 1
    grid = torch.stack(torch.broadcast_tensors(u[:, None, :], v[:, :, None]), dim=-1)  # (N, size, size, 2)
    return F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def weighted_fusion(det: Detections, n_views: int, iou_thresh: float) -> Detections:
    """Weighted fusion of the detections of several views (TTA, ensembles), class by class.

    Detections are taken by descending score; each joins the cluster of the first (highest
    scoring) cluster leader of its class whose box IoU with it is ``>= iou_thresh``, or starts a
    cluster. A cluster becomes one detection: box and mask probabilities averaged with the
    scores as weights (masks resampled onto the fused box first), score ``sum / max(n_views,
    size)`` (the mean over views, a view without a match counting as 0), as in weighted boxes
    fusion. Identical copies fuse back into the original detection.

    Args:
        det: detections of all views together, in one image's coordinates.
        n_views: number of views merged.
    """
    if len(det) == 0:
        return det
    clusters = _clusters(det.boxes, det.labels, det.scores, iou_thresh)
    parts = [_fuse(det[torch.as_tensor(c)], n_views) for c in clusters]
    return Detections.cat(parts)


def _clusters(boxes: Tensor, labels: Tensor, scores: Tensor, iou_thresh: float) -> list[list[int]]:
    """Index lists of the clusters (leader first), by descending leader score."""
    clusters: list[list[int]] = []
    for lab in labels.unique().tolist():
        idx = torch.nonzero(labels == lab).flatten()
        idx = idx[torch.argsort(scores[idx], descending=True, stable=True)]
        leaders = torch.empty((len(idx), 4), dtype=boxes.dtype)
        members: list[list[int]] = []
        for i in idx.tolist():
            if members:
                hits = torch.nonzero(box_iou(boxes[i : i + 1], leaders[: len(members)])[0] >= iou_thresh).flatten()
                if hits.numel():
                    members[int(hits[0])].append(i)
                    continue
            leaders[len(members)] = boxes[i]
            members.append([i])
        clusters.extend(members)
    clusters.sort(key=lambda c: -float(scores[c[0]]))
    return clusters


def _fuse(c: Detections, n_views: int) -> Detections:
    if len(c) == 1:  # nothing to average: only the score is shared out over the views
        return c.replace(scores=c.scores / n_views)
    w = c.scores.clamp(min=1e-12)
    box = (c.boxes * w[:, None]).sum(0, keepdim=True) / w.sum()
    masks = resample_masks(c.masks, c.boxes, box.expand(len(c), 4))
    mask = (masks * w[:, None, None, None]).sum(0, keepdim=True) / w.sum()
    score = c.scores.sum(0, keepdim=True) / max(n_views, len(c))
    first = c[:1]
    return first.replace(boxes=box, scores=score, masks=mask)
