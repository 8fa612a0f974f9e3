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
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import psutil
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
from .tiling import Tile, dedupe_tiles, needs_tiling, place_tile, tile_grid

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


@contextlib.contextmanager
def score_floor(model: nn.Module, thresh: float) -> Iterator[None]:
    """Temporarily make the box stage drop detections scoring below ``thresh`` (torchvision's
    ``roi_heads.score_thresh``, which runs before the per-image cap and the mask head). The
    detections at or above it are exactly those a later ``scores >= thresh`` keeps: the class-wise
    NMS only lets higher scores suppress lower ones, and the cap keeps the best."""
    heads = model.roi_heads
    old = heads.score_thresh
    # torchvision keeps scores > score_thresh; the float32 just below thresh makes it ">= thresh"
    floor = float(np.nextafter(np.float32(thresh), np.float32(-np.inf)))
    if thresh > 0 and floor > old:
        heads.score_thresh = floor
    try:
        yield
    finally:
        heads.score_thresh = old


def _as_list(models: Models) -> list[nn.Module]:
    return [models] if isinstance(models, nn.Module) else list(models)


def _channels_last(model: nn.Module) -> bool:
    """Whether the model's convolution weights (4-D, kernel larger than 1) are in channels_last."""
    found = [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    return bool(found) and all(p.is_contiguous(memory_format=torch.channels_last) for p in found)


@contextlib.contextmanager
def memory_format(models: Models, channels_last: bool) -> Iterator[None]:
    """Temporarily hold the models' weights in channels_last (``predict.channels_last``): oneDNN's
    CPU convolutions then take and give channels_last feature maps, the demo model's forward in
    0.7 x the time with scores equal to 1e-5 (docs/benchmarks.md). The weights' values do not
    change, and their layout is restored afterwards (a model that trains goes on as it was)."""
    changed = []
    if channels_last:
        with torch.inference_mode(False):  # weights converted inside inference mode could not train again
            for model in _as_list(models):
                if not _channels_last(model):
                    model.to(memory_format=torch.channels_last)
                    changed.append(model)
    try:
        yield
    finally:
        with torch.inference_mode(False):
            for model in changed:
                model.to(memory_format=torch.contiguous_format)


def detect_views(models: Models, crops: Sequence[Tensor], cfg: PredictConfig,
                 batch_size: int | None = None) -> list[list[Detections]]:
    """Every view's detections of every crop, mapped back onto the unflipped crop (on the CPU).

    Crops are run ``batch_size`` (default ``cfg.batch_size``) at a time per model and view.

    Returns:
        ``[crop][view]`` -> :class:`Detections` in crop pixels.
    """
    batch_size = cfg.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise ConfigError(f"predict.batch_size must be at least 1, got {batch_size}")
    out: list[list[Detections]] = [[] for _ in crops]
    geometry = mask_geometry_of(models)
    views = tta_views(cfg)
    # one model, one view: nothing is merged, so detections below the score threshold can go in the
    # box stage, before the mask head runs on them (merged views average scores: all must stay)
    floor = cfg.score_thresh if len(_as_list(models)) == 1 and len(views) == 1 else 0.0
    for model in _as_list(models):
        for view in views:
            with scaled_input_size(model, view.scale), score_floor(model, floor):
                for start in range(0, len(crops), batch_size):
                    chunk = crops[start : start + batch_size]
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


FALLBACK_OVERLAP = 128
"""Tile overlap in image pixels of ``predict.tile_overlap: auto`` for a model that does not know
its largest cell (a checkpoint from before ``model.max_cell_diameter``, a plain torchvision model)."""


def _input_scale(model: nn.Module) -> float:
    """Input pixels per image pixel of a fixed-scale model (1.0 for a ``min_size`` one)."""
    t = model.transform
    return float(t.scale) if getattr(t, "resize_mode", None) == "fixed_scale" else 1.0


def tile_overlap(models: Models, cfg: PredictConfig) -> int:
    """``predict.tile_overlap`` in image pixels: the number given, or for ``auto`` the largest
    cell any of the models expects (``model.max_cell_diameter`` in input pixels over its input
    scale, rounded up; :data:`FALLBACK_OVERLAP` for a model that does not say)."""
    if cfg.tile_overlap != "auto":
        return int(cfg.tile_overlap)
    sizes = []
    for model in _as_list(models):
        d = getattr(model, "max_cell_diameter", None)
        sizes.append(math.ceil(d / _input_scale(model)) if d else FALLBACK_OVERLAP)
    return max(sizes)


def _stride_px(models: Models) -> int | None:
    """The network's input stride (``size_divisible``, 32) in image pixels, when every model has
    a fixed scale (tiles are then aligned to it); None when a tile's size changes its scale."""
    units = []
    for model in _as_list(models):
        t = model.transform
        if getattr(t, "resize_mode", None) != "fixed_scale":
            return None
        units.append(max(1, round(getattr(t, "size_divisible", 32) / float(t.scale))))
    return min(units) if units else None


def image_tiles(models: Models, cfg: PredictConfig, height: int, width: int) -> list[Tile] | None:
    """The tiles :func:`detect` cuts a ``height x width`` image into (None: it is predicted whole):
    tiles of at most :func:`tiling_limits`' size overlapping by :func:`tile_overlap`, aligned to
    the network's stride for fixed-scale models (:func:`~cellkit.inference.tiling.axis_spans`).

    Raises:
        ConfigError: the overlap is not smaller than the tiles (``auto`` names the cell size).
    """
    tile_size, tile_above = tiling_limits(models, cfg)
    if not needs_tiling(height, width, tile_size, tile_above):
        return None
    overlap = tile_overlap(models, cfg)
    if overlap >= int(tile_size):  # type: ignore[arg-type]
        known = all(getattr(m, "max_cell_diameter", None) for m in _as_list(models))
        why = (f"{overlap} px" if cfg.tile_overlap != "auto" else
               f"auto: the largest cell the model expects, {overlap} px in the image (model.max_cell_diameter)" if known
               else f"auto: {overlap} px, as the model does not know its largest cell (no model.max_cell_diameter)")
        raise ConfigError(f"predict.tile_overlap ({why}) must be less than the tiles, {tile_size} px (predict.tile_size, "
                          f"at most model.max_size / model.scale); set a smaller predict.tile_overlap or larger tiles")
    return tile_grid(height, width, int(tile_size), overlap, align=_stride_px(models))  # type: ignore[arg-type]


FORWARD_BYTES_PER_PIXEL = 250
"""Memory of one forward pass in bytes per input pixel (at the model's scale): measured 200-270 for
the demo's ResNet-18 with a 96-channel FPN, 520 for a ResNet-50 with 256 channels
(docs/benchmarks.md). The check of :func:`check_tile_batch` takes the low figure, so that it
refuses only what cannot fit; an allocation that fails later is reported the same way."""


def check_tile_batch(models: Models, cfg: PredictConfig, tile_h: int, tile_w: int,
                     available: int | None = None) -> None:
    """Refuse a batch of ``cfg.tile_batch`` tiles of ``tile_h x tile_w`` image px that cannot fit
    in memory, before any work.

    Args:
        available: bytes free (default: what the system reports as available).

    Raises:
        ConfigError: the estimate (:data:`FORWARD_BYTES_PER_PIXEL` per input pixel) exceeds it.
    """
    scale = max(_input_scale(m) for m in _as_list(models))
    need = cfg.tile_batch * tile_h * tile_w * scale**2 * FORWARD_BYTES_PER_PIXEL
    free = psutil.virtual_memory().available if available is None else available
    if need > free:
        raise ConfigError(_too_large(cfg, tile_h, tile_w, f"about {need / 2**30:.1f} GB for one forward pass, "
                                                          f"{free / 2**30:.1f} GB are available"))


def _too_large(cfg: PredictConfig, tile_h: int, tile_w: int, why: str) -> str:
    return (f"predict.tile_batch: {cfg.tile_batch} tile(s) of {tile_w} x {tile_h} px need {why}; "
            f"lower predict.tile_batch or predict.tile_size")


def detect(models: Models, images: Sequence[Tensor], cfg: PredictConfig,
           image_ids: Sequence[int] | None = None) -> list[Detections]:
    """Merged detections of each image, before thresholds and pasting (CPU, image pixels).

    Images are run ``cfg.batch_size`` at a time. Large images (longer side above
    ``cfg.tile_above``) are cut into the tiles of :func:`image_tiles` (views of the image, no
    copy), run ``cfg.tile_batch`` at a time; their detections carry ``tile``/``fringe`` for
    :func:`finalize`'s cross-tile duplicate removal.

    Args:
        images: ``(3, H, W)`` float tensors in [0, 1].
        image_ids: the images' COCO ids (default 0 each), stored in the detections.

    Raises:
        ConfigError: a tile batch that cannot fit in memory (:func:`check_tile_batch`, or an
            allocation that fails), an overlap not smaller than the tiles.
    """
    with memory_format(models, cfg.channels_last):
        return [det for det, _ in _detect(models, images, cfg, image_ids)]


def detect_encoded(models: Models, images: Sequence[Tensor], cfg: PredictConfig,
                   image_ids: Sequence[int] | None = None,
                   counts: DropCounts | None = None) -> list[tuple[Detections, list[RLE]]]:
    """:func:`detect` with the first half of :func:`finalize` (:func:`encode_part`) applied to
    each tile as soon as it is predicted: per image, the detections above ``cfg.score_thresh``
    with non-empty masks, their masks let go, and their RLEs (finish with :func:`finish`). Memory
    then holds one tile's masks at a time, whatever the number of cells of the image."""
    with memory_format(models, cfg.channels_last):
        return _detect(models, images, cfg, image_ids, encode=True, counts=counts)


def _detect(models: Models, images: Sequence[Tensor], cfg: PredictConfig, image_ids: Sequence[int] | None,
            encode: bool = False, counts: DropCounts | None = None) -> list[tuple[Detections, list[RLE]]]:
    ids = [int(i) for i in image_ids] if image_ids is not None else [0] * len(images)
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    out: list[tuple[Detections, list[RLE]] | None] = [None] * len(images)

    def done(i: int, det: Detections) -> tuple[Detections, list[RLE]]:
        det = det.replace(image_id=ids[i], image_size=sizes[i])
        return encode_part(det, cfg, counts) if encode else (det, [])

    whole = []
    for i, img in enumerate(images):
        tiles = image_tiles(models, cfg, *sizes[i])
        if tiles is None:
            whole.append(i)
            continue
        check_tile_batch(models, cfg, tiles[0].height, tiles[0].width)  # the first tile is a full one
        # tiles of one size per batch (the last row and column are shorter): no padding between them
        shapes: dict[tuple[int, int], list[int]] = {}
        for k, t in enumerate(tiles):
            shapes.setdefault((t.height, t.width), []).append(k)
        parts: list[tuple[Detections, list[RLE]]] = [(Detections.empty(), [])] * len(tiles)
        try:
            for group in shapes.values():
                for start in range(0, len(group), cfg.tile_batch):  # each batch placed (and encoded) at once
                    chunk = group[start : start + cfg.tile_batch]
                    crops = [img[:, tiles[k].y0 : tiles[k].y1, tiles[k].x0 : tiles[k].x1] for k in chunk]
                    for k, views in zip(chunk, detect_views(models, crops, cfg, cfg.tile_batch)):
                        t = tiles[k]
                        parts[k] = done(i, place_tile(merge_views(views, cfg, t.height, t.width), t, k))
        except RuntimeError as e:  # the allocator's "can't allocate memory", deep inside a layer
            if "allocate" not in str(e):
                raise
            raise ConfigError(_too_large(cfg, tiles[0].height, tiles[0].width,
                                         "more memory than there is (an allocation failed)")) from None
        det = Detections.cat([d for d, _ in parts]).replace(image_id=ids[i], image_size=sizes[i])
        out[i] = (det, [r for _, rles in parts for r in rles])
    if whole:
        per_image = detect_views(models, [images[i] for i in whole], cfg, cfg.batch_size)
        for i, views in zip(whole, per_image):
            out[i] = done(i, merge_views(views, cfg, *sizes[i]))
    return out  # type: ignore[return-value]


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


def encode_part(det: Detections, cfg: PredictConfig,
                counts: DropCounts | None = None) -> tuple[Detections, list[RLE]]:
    """The first half of :func:`finalize`, on any part of one image's detections (a tile): drop
    non-finite ones (counted), keep ``score >= cfg.score_thresh``, paste at ``cfg.mask_thresh`` into
    the ``image_size`` image and RLE-encode, drop empty masks (counted).

    Returns:
        (the detections kept, their ``M x M`` masks let go (``(N, 1, 0, 0)``), their RLEs).
    """
    ok = det.finite()
    if counts is not None:
        counts.add(det.image_id, nonfinite=int((~ok).sum()))
    det = det[ok]
    det = det[det.scores >= cfg.score_thresh]
    det, rles, empty = encode_detections(det, cfg.mask_thresh)
    if counts is not None:
        counts.add(det.image_id, empty=empty)
    return det.replace(masks=det.masks.new_zeros((len(det), 1, 0, 0))), rles


def finish(det: Detections, rles: list[RLE], cfg: PredictConfig,
           counts: DropCounts | None = None) -> list[dict[str, Any]]:
    """The second half of :func:`finalize`: cross-tile duplicate removal and ``cfg.nms_thresh``
    on the encoded detections of a whole image, then its COCO result entries."""
    det, rles = suppress(det, rles, cfg.nms_thresh)
    return det.to_coco(rles=rles, counts=counts)


def finalize(det: Detections, cfg: PredictConfig, counts: DropCounts | None = None) -> list[dict[str, Any]]:
    """COCO result entries of one image's merged detections: drop non-finite ones (counted),
    ``score >= cfg.score_thresh``, paste at ``cfg.mask_thresh``, drop empty masks (counted),
    remove cross-tile duplicates and apply ``cfg.nms_thresh`` (:func:`encode_part`, then
    :func:`finish`)."""
    det, rles = encode_part(det, cfg, counts)
    return finish(det, rles, cfg, counts)


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
        det, rles = detect_encoded(models, [image], cfg, [image_id], counts)[0]
        return finish(det, rles, cfg, counts)


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
    for batch in _batches(models, dataset, cfg, image_ids, progress, total):
        with torch.inference_mode():
            yield from detect(models, [img for _, img in batch], cfg, [image_id for image_id, _ in batch])


def _batches(models: Models, dataset: Iterable[tuple[Tensor, Any]], cfg: PredictConfig,
             image_ids: Sequence[int] | None, progress: bool, total: int | None) -> Iterator[list[tuple[int, Tensor]]]:
    """``[(image id, image), ...]`` of ``cfg.batch_size`` images at a time, the bar advancing after each."""
    if total is None and hasattr(dataset, "__len__"):
        total = len(dataset)  # type: ignore[arg-type]
    batch: list[tuple[int, Tensor]] = []
    # the weights' layout changes once for all the images, not once per batch
    with bar(total=total, desc="predicting", enabled=progress, unit="img") as pbar, \
            memory_format(models, cfg.channels_last):
        for k, (image, meta) in enumerate(dataset):
            batch.append((image_ids[k] if image_ids is not None else _image_id(meta), image))
            if len(batch) == cfg.batch_size:
                yield batch
                pbar.update(len(batch))
                batch = []
        if batch:
            yield batch
            pbar.update(len(batch))


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
    yields), for one model or an ensemble, with ``cfg``'s TTA, tiling and thresholds (each tile
    encoded as it is predicted: :func:`detect_encoded`)."""
    entries: list[dict[str, Any]] = []
    for batch in _batches(models, dataset, cfg, image_ids, progress, None):
        with torch.inference_mode():
            for det, rles in detect_encoded(models, [img for _, img in batch], cfg,
                                            [image_id for image_id, _ in batch], counts):
                entries.extend(finish(det, rles, cfg, counts))
    return entries
