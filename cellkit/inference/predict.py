"""Prediction: raw detections, test-time augmentation, ensembles, tiles, COCO results.

The pipeline for one image::

    tiles (large images only) -> views (models x flips x scales) -> raw_detections per view
    -> undo the flip -> merge the views (weighted fusion or mask NMS)          [per tile]
    -> keep each tile's core -> score threshold -> paste_and_encode (lean)
    -> cross-tile duplicate removal -> optional mask NMS -> COCO result entries

Masks stay at the mask head's ``M x M`` resolution until the last step, where each one is pasted
into its box only and RLE-encoded at once (see :mod:`cellkit.inference.postprocess`), in the mask
geometry the model was trained in (``model.mask_geometry``, read from the model by
:func:`~cellkit.structures.mask_geometry.mask_geometry_of` and carried by each
:class:`~cellkit.structures.detections.Detections`).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import resize_boxes

from ..config import PredictConfig
from ..errors import ConfigError
from ..progress import bar
from ..structures.coco_results import DropCounts, paste_and_encode
from ..structures.detections import Detections
from ..structures.mask_geometry import mask_geometry_of
from ..structures.rle import RLE, rle_areas
from .postprocess import flip_detections, flip_image, mask_nms, weighted_fusion
from .tiling import dedupe_tiles, needs_tiling, place_tile, tile_grid

Models = nn.Module | Sequence[nn.Module]
FLIPS = ("h", "v", "hv")


# --------------------------------------------------------------------------------------------
# one forward pass without the full-size paste


def raw_detections(model: nn.Module, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """Run a torchvision Mask R-CNN (any GeneralizedRCNN with ``transform/backbone/rpn/roi_heads``)
    in eval mode and return its detections *without* pasting the masks into full-size images.

    Args:
        model: the detector; it is put in eval mode for the call and restored afterwards.
        images: ``(3, H, W)`` float tensors in [0, 1] (sizes may differ); moved to the model's device.

    Returns:
        per image, on the model's device: ``boxes`` ``(N, 4)`` float32 xyxy in the original image's
        pixels (as ``model(images)`` returns them), ``labels`` ``(N,)`` int64, ``scores`` ``(N,)``
        float32 and ``masks`` ``(N, 1, M, M)`` float32 mask probabilities relative to each box.
    """
    device = next(model.parameters()).device
    images = [img.to(device) for img in images]
    original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    with torch.inference_mode(), _eval_mode(model):
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = model.rpn(batch, features)
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    out = []
    for det, size, original in zip(detections, batch.image_sizes, original_sizes):
        out.append({
            "boxes": resize_boxes(det["boxes"], list(size), list(original)),
            "labels": det["labels"], "scores": det["scores"], "masks": det["masks"],
        })
    return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# views: test-time augmentation and ensembles


@dataclass(frozen=True)
class View:
    """One test-time view: a flip (``""``, ``"h"``, ``"v"``, ``"hv"``) at a resize scale."""

    flip: str = ""
    scale: float = 1.0


def tta_views(cfg: PredictConfig) -> list[View]:
    """The views of ``cfg``: the identity only, or identity + ``tta_flips``, at each ``tta_scales``.

    Raises:
        ConfigError: an unknown flip or a non-positive scale.
    """
    if not cfg.tta:
        return [View()]
    flips = [""]
    for f in cfg.tta_flips:
        norm = "".join(sorted(f))  # "vh" -> "hv"
        if norm and norm not in FLIPS:
            raise ConfigError(f"predict.tta_flips: {f!r} is not one of h, v, hv")
        if norm not in flips:
            flips.append(norm)
    scales = list(dict.fromkeys(cfg.tta_scales)) or [1.0]
    if any(s <= 0 for s in scales):
        raise ConfigError(f"predict.tta_scales: scales must be positive, got {list(cfg.tta_scales)}")
    return [View(f, s) for s in scales for f in flips]


@contextlib.contextmanager
def scaled_input_size(model: nn.Module, scale: float) -> Iterator[None]:
    """Temporarily scale the network input resolution: the model transform's ``min_size`` and
    ``max_size`` (and ``scale`` of a fixed-scale transform such as cellkit's ``ResizeTransform``).
    Scaling the image itself would be undone by the transform's own resize."""
    t = model.transform
    old = (t.min_size, t.max_size, getattr(t, "scale", None))
    if scale != 1.0:
        t.min_size = tuple(max(1, round(s * scale)) for s in t.min_size)
        t.max_size = max(1, round(t.max_size * scale))
        if isinstance(old[2], float):
            t.scale = old[2] * scale
    try:
        yield
    finally:
        t.min_size, t.max_size = old[0], old[1]
        if old[2] is not None:
            t.scale = old[2]


def _as_list(models: Models) -> list[nn.Module]:
    return [models] if isinstance(models, nn.Module) else list(models)


def detect_views(models: Models, crops: Sequence[Tensor], cfg: PredictConfig) -> list[list[Detections]]:
    """Every view's detections of every crop, mapped back onto the unflipped crop (on the CPU).

    Crops are run ``cfg.batch_size`` at a time per model and view.

    Returns:
        ``[crop][view]`` -> :class:`Detections` in crop pixels.
    """
    if cfg.batch_size < 1:
        raise ConfigError(f"predict.batch_size must be at least 1, got {cfg.batch_size}")
    out: list[list[Detections]] = [[] for _ in crops]
    geometry = mask_geometry_of(models)
    for model in _as_list(models):
        for view in tta_views(cfg):
            with scaled_input_size(model, view.scale):
                for start in range(0, len(crops), cfg.batch_size):
                    chunk = crops[start : start + cfg.batch_size]
                    raw = raw_detections(model, [flip_image(c, view.flip) for c in chunk])
                    for k, (crop, r) in enumerate(zip(chunk, raw)):
                        h, w = int(crop.shape[-2]), int(crop.shape[-1])
                        det = Detections.from_output(r, image_size=(h, w), geometry=geometry).to("cpu")
                        out[start + k].append(flip_detections(det, view.flip, h, w))
    return out


def merge_views(views: Sequence[Detections], cfg: PredictConfig, height: int, width: int) -> Detections:
    """Merge the views of one crop (``height x width``) into one set of detections.

    ``cfg.tta_merge == "wbf"``: :func:`~cellkit.inference.postprocess.weighted_fusion` at box IoU
    ``cfg.tta_iou``; ``"nms"``: class-wise mask NMS (RLE IoU ``> cfg.tta_iou``, masks thresholded
    at ``cfg.mask_thresh``). Non-finite detections pass through untouched (dropped and counted
    later). One view is returned as it is.
    """
    if len(views) == 1:
        return views[0]
    det = Detections.cat(views)
    ok = det.finite()
    good, bad = det[ok], det[~ok]
    if cfg.tta_merge == "wbf":
        merged = weighted_fusion(good, len(views), cfg.tta_iou)
    else:
        rles = paste_and_encode(good.boxes, good.masks, height, width, cfg.mask_thresh, geometry=good.geometry)
        merged = good[mask_nms(rles, good.scores, cfg.tta_iou, labels=good.labels)]
    return Detections.cat([merged, bad])


# --------------------------------------------------------------------------------------------
# images (tiled when large) -> merged detections


def tiling_limits(models: Models, cfg: PredictConfig) -> tuple[int | None, int]:
    """``(tile size, tile above)`` for ``cfg`` and these models.

    A fixed-scale model (cellkit's ``ResizeTransform`` with ``resize_mode: fixed_scale``) shrinks
    an image whose longer side exceeds ``max_size / scale`` below its training scale (the
    ``max_size`` cap wins), so such images are tiled instead, in tiles that fit: the cells keep
    the size the model learnt whatever the image size.
    """
    tile, above = cfg.tile_size, cfg.tile_above
    if tile is None:
        return None, above
    for model in _as_list(models):
        t = model.transform
        if getattr(t, "resize_mode", None) == "fixed_scale":
            fit = int(t.max_size / t.scale)
            tile, above = min(tile, fit), min(above, fit)
    return tile, above


def detect(models: Models, images: Sequence[Tensor], cfg: PredictConfig,
           image_ids: Sequence[int] | None = None) -> list[Detections]:
    """Merged detections of each image, before thresholds and pasting (CPU, image pixels).

    Large images (longer side above ``cfg.tile_above``) are cut into tiles; their detections
    carry ``tile``/``edge`` for :func:`finalize`'s cross-tile duplicate removal.

    Args:
        images: ``(3, H, W)`` float tensors in [0, 1].
        image_ids: the images' COCO ids (default 0 each), stored in the detections.
    """
    crops: list[Tensor] = []
    owners: list[tuple[int, int, Any]] = []  # (image index, tile index, Tile or None)
    tile_size, tile_above = tiling_limits(models, cfg)
    for i, img in enumerate(images):
        h, w = int(img.shape[-2]), int(img.shape[-1])
        if needs_tiling(h, w, tile_size, tile_above):
            for t_idx, tile in enumerate(tile_grid(h, w, int(tile_size), cfg.tile_overlap)):  # type: ignore[arg-type]
                crops.append(img[:, tile.y0 : tile.y1, tile.x0 : tile.x1])
                owners.append((i, t_idx, tile))
        else:
            crops.append(img)
            owners.append((i, 0, None))
    per_crop = detect_views(models, crops, cfg)
    parts: list[list[Detections]] = [[] for _ in images]
    for crop, views, (i, t_idx, tile) in zip(crops, per_crop, owners):
        merged = merge_views(views, cfg, int(crop.shape[-2]), int(crop.shape[-1]))
        if tile is not None:
            merged = place_tile(merged, tile, t_idx)
        parts[i].append(merged)
    ids = list(image_ids) if image_ids is not None else [0] * len(images)
    out = []
    for p, img, image_id in zip(parts, images, ids):
        det = p[0] if len(p) == 1 else Detections.cat(p)
        out.append(det.replace(image_id=int(image_id), image_size=(int(img.shape[-2]), int(img.shape[-1]))))
    return out


# --------------------------------------------------------------------------------------------
# merged detections -> COCO results


def encode_detections(det: Detections, mask_thresh: float) -> tuple[Detections, list[RLE], int]:
    """Paste finite detections into their ``image_size`` image (in their mask geometry) and
    RLE-encode them; drop those whose mask is empty.

    Returns:
        (the detections kept, their RLEs, number of empty masks dropped).
    """
    height, width = det.image_size
    rles = paste_and_encode(det.boxes, det.masks, height, width, mask_thresh, geometry=det.geometry)
    if not rles:
        return det, rles, 0
    nonempty = torch.as_tensor(rle_areas(rles) > 0)
    kept = [r for r, k in zip(rles, nonempty.tolist()) if k]
    return det[nonempty], kept, int((~nonempty).sum())


def suppress(det: Detections, rles: list[RLE], nms_thresh: float | None) -> tuple[Detections, list[RLE]]:
    """Cross-tile duplicate removal (tiled images), then class-wise mask NMS at ``nms_thresh``
    (None: off). Returns the survivors by descending score (tile-deduped order otherwise)."""
    if det.tile is not None:
        keep = dedupe_tiles(det, rles)
        det, rles = det[keep], [rles[i] for i in keep.tolist()]
    if nms_thresh is not None and len(det):
        keep = mask_nms(rles, det.scores, nms_thresh, labels=det.labels)
        det, rles = det[keep], [rles[i] for i in keep.tolist()]
    return det, rles


def finalize(det: Detections, cfg: PredictConfig, counts: DropCounts | None = None) -> list[dict[str, Any]]:
    """COCO result entries of one image's merged detections: drop non-finite ones (counted),
    ``score >= cfg.score_thresh``, paste at ``cfg.mask_thresh``, drop empty masks (counted),
    remove cross-tile duplicates and apply ``cfg.nms_thresh``."""
    ok = det.finite()
    if counts is not None:
        counts.add(det.image_id, nonfinite=int((~ok).sum()))
    det = det[ok]
    det = det[det.scores >= cfg.score_thresh]
    det, rles, empty = encode_detections(det, cfg.mask_thresh)
    det, rles = suppress(det, rles, cfg.nms_thresh)
    if counts is not None:
        counts.add(det.image_id, empty=empty)
    return det.to_coco(rles=rles, counts=counts)


# --------------------------------------------------------------------------------------------
# public entry points


def predict_image(
    models: Models, image: Tensor, cfg: PredictConfig, image_id: int = 0, counts: DropCounts | None = None
) -> list[dict[str, Any]]:
    """COCO result entries (``image_id, category_id, score, bbox [x, y, w, h], segmentation``)
    of one ``(3, H, W)`` float image in [0, 1], with ``cfg``'s TTA, tiling and thresholds.

    Args:
        models: one model or several (an ensemble, merged like TTA views).
    """
    with torch.inference_mode():
        det = detect(models, [image], cfg, [image_id])[0]
        return finalize(det, cfg, counts)


def iter_detections(
    models: Models, dataset: Iterable[tuple[Tensor, Any]], cfg: PredictConfig, image_ids: Sequence[int] | None = None,
    progress: bool = True, total: int | None = None,
) -> Iterator[Detections]:
    """The merged detections of each image of ``dataset`` (with its id and size), predicted
    ``cfg.batch_size`` images at a time, with a progress bar over images.

    Args:
        dataset: yields ``(image (3, H, W) float, meta)``; ``meta`` is a
            :class:`~cellkit.data.layout.TestImage`, a target dict with ``image_id``, or anything
            when ``image_ids`` is given.
        image_ids: ids in dataset order (overrides the ids in ``meta``).
    """
    if total is None and hasattr(dataset, "__len__"):
        total = len(dataset)  # type: ignore[arg-type]
    batch: list[tuple[int, Tensor]] = []
    with bar(total=total, desc="predicting", enabled=progress, unit="img") as pbar:
        for k, (image, meta) in enumerate(dataset):
            batch.append((image_ids[k] if image_ids is not None else _image_id(meta), image))
            if len(batch) == cfg.batch_size:
                yield from _run_batch(models, batch, cfg)
                pbar.update(len(batch))
                batch = []
        if batch:
            yield from _run_batch(models, batch, cfg)
            pbar.update(len(batch))


def _run_batch(models: Models, batch: list[tuple[int, Tensor]], cfg: PredictConfig) -> Iterator[Detections]:
    with torch.inference_mode():
        yield from detect(models, [img for _, img in batch], cfg, [image_id for image_id, _ in batch])


def _image_id(meta: Any) -> int:
    if isinstance(meta, dict) and "image_id" in meta:
        return int(meta["image_id"])
    if hasattr(meta, "image_id"):
        return int(meta.image_id)
    raise ValueError(f"cannot tell the image id of {type(meta).__name__}; pass image_ids")


def predict_images(
    models: Models,
    dataset: Iterable[tuple[Tensor, Any]],
    cfg: PredictConfig,
    image_ids: Sequence[int] | None = None,
    progress: bool = True,
    counts: DropCounts | None = None,
) -> list[dict[str, Any]]:
    """COCO result entries of every image of ``dataset`` (see :func:`iter_detections` for what it
    yields), for one model or an ensemble, with ``cfg``'s TTA, tiling and thresholds."""
    entries: list[dict[str, Any]] = []
    for det in iter_detections(models, dataset, cfg, image_ids, progress):
        with torch.inference_mode():
            entries.extend(finalize(det, cfg, counts))
    return entries
