"""Sliding-window inference: overlapping tiles, and merging their detections without seams.

An image whose longer side exceeds ``tile_above`` is cut into ``tile_size`` tiles that overlap by
at least ``tile_overlap`` pixels. The tiles' *cores* partition the image: along each axis the
boundary between two neighbouring cores is the middle of their overlap. A tile keeps the
detections whose box centre lies in its core, or within a few pixels of it (``slack``). A cell no
larger than the overlap therefore survives, from a tile that holds it whole (its centre is at most
half the overlap from the core boundary, so it ends inside the tile), while the cut-off part of it
that a neighbouring tile sees has its box centre on that tile's far side of the boundary. The
slack is there for a cell on the boundary: each tile sees it with its own context, so the two
boxes differ by a pixel or two, and each centre can fall on the other tile's side; kept by
neither core, the cell would be lost. What is kept twice (such cells, boxes that model noise
pushes over the boundary, cells somewhat larger than the overlap) is caught by a cross-tile
duplicate removal on the masks (intersection over the smaller mask), which prefers a tile's first
choices: detections whose centre is in its core and that do not touch an inner tile border. The
overlap should exceed the largest cell (``predict.tile_overlap: auto`` takes the largest cell the
model was trained on, ``model.max_cell_diameter``): a cell much larger than the overlap is seen
only in parts.

How many tiles: tiles of at most ``tile_size`` px whose neighbours overlap by the overlap. For a
model whose input scale does not depend on the tile (``fixed_scale``), the tiles start at
multiples of the network's stride (32 input px), so each tile's feature maps lie on the untiled
image's grid and cells are found as in the untiled image, and their length and step are those
that cover the image with the fewest pixels (the last row and column end at the image's edge):
a 2048 px image in 512 px tiles with 35 px of overlap is 5 x 5 tiles every 448 px, 512 px long
and 256 px in the last row and column (1.27 x the pixels the network sees), where evenly spaced
512 px tiles overlapping by 128 px were 1.56 x. A
``min_size`` model resizes every tile to ``min_size``, so its tiles keep ``tile_size``, evenly
spaced (a smaller tile would show it larger cells).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..structures.detections import Detections
from ..structures.rle import RLE
from .postprocess import mask_nms


@dataclass(frozen=True)
class Tile:
    """One window of an image, in image pixels (``y1``/``x1`` exclusive).

    Attributes:
        core: ``(cy0, cx0, cy1, cx1)``, the part of the image this tile is responsible for.
        inner: which of its borders (top, left, bottom, right) lie inside the image.
    """

    y0: int
    x0: int
    y1: int
    x1: int
    core: tuple[float, float, float, float]
    inner: tuple[bool, bool, bool, bool]

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``[0, size)``, evenly spaced, neighbours
    overlapping by at least ``overlap`` (one tile when ``size <= tile``)."""
    if tile <= overlap or overlap < 0:
        raise ConfigError(f"predict.tile_overlap ({overlap}) must lie in [0, predict.tile_size) (tile_size {tile})")
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / (tile - overlap)) + 1
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def axis_spans(size: int, tile: int, overlap: int, align: int | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` of the tiles along one axis of ``size`` px, neighbours overlapping by at
    least ``overlap``.

    Args:
        align: None: the fewest tiles of ``tile`` px, evenly spaced (:func:`tile_starts`). A
            number of px (the network's stride in image px): tiles start at multiples of it, so
            that a tile's feature maps sit on the untiled image's grid and its cells come out as
            the untiled image's do; their length (a multiple of it, at most ``tile``) and step are
            those that cover the axis with the fewest pixels (the last tile ends at the image's
            edge, shorter).

    Raises:
        ConfigError: ``overlap`` not in ``[0, tile)``.
    """
    if tile <= overlap or overlap < 0:
        raise ConfigError(f"predict.tile_overlap ({overlap}) must lie in [0, predict.tile_size) (tile_size {tile})")
    if size <= tile:
        return [(0, size)]
    best: tuple[int, int, int, int] | None = None
    if align is not None and align >= 1:
        for length in range(tile // align * align, overlap, -align):  # longest first: ties keep more overlap
            step = (length - overlap) // align * align
            if step <= 0:
                break
            n = math.ceil((size - length) / step) + 1
            cost = (n - 1) * length + math.ceil((size - (n - 1) * step) / align) * align  # pixels the network sees
            if best is None or cost < best[0]:
                best = (cost, length, step, n)
    if best is None:  # no alignment asked for (or the tile leaves no aligned step)
        return [(s, s + tile) for s in tile_starts(size, tile, overlap)]
    _, length, step, n = best
    return [(k * step, min(k * step + length, size)) for k in range(n)]


def _cores(spans: list[tuple[int, int]], size: int) -> list[tuple[float, float]]:
    """Each tile's share of the axis: the boundary between neighbours is the middle of their overlap."""
    bounds = [0.0] + [(spans[i][0] + spans[i - 1][1]) / 2 for i in range(1, len(spans))] + [float(size)]
    return [(bounds[i], bounds[i + 1]) for i in range(len(spans))]


def tile_grid(height: int, width: int, tile: int, overlap: int, align: int | None = None) -> list[Tile]:
    """The tiles of a ``height x width`` image, row by row (``align``: see :func:`axis_spans`)."""
    ys, xs = axis_spans(height, tile, overlap, align), axis_spans(width, tile, overlap, align)
    cy, cx = _cores(ys, height), _cores(xs, width)
    tiles = []
    for (y, y1), (cy0, cy1) in zip(ys, cy):
        for (x, x1), (cx0, cx1) in zip(xs, cx):
            y1, x1 = min(y1, height), min(x1, width)
            tiles.append(Tile(y, x, y1, x1, (cy0, cx0, cy1, cx1), (y > 0, x > 0, y1 < height, x1 < width)))
    return tiles


def needs_tiling(height: int, width: int, tile_size: int | None, tile_above: int) -> bool:
    return tile_size is not None and max(height, width) > tile_above


def place_tile(det: Detections, tile: Tile, index: int, margin: float = 2.0, slack: float = 8.0) -> Detections:
    """Map one tile's detections into image coordinates and keep those whose box centre lies in
    the tile's core or within ``slack`` px of it (non-finite ones pass, to be counted later);
    marks each with its tile ``index`` and ``fringe``: its box touches an inner border, or its
    centre lies outside the core proper (second choices for :func:`dedupe_tiles`).

    Args:
        det: detections in tile pixels (boxes ``(N, 4)`` xyxy).
        margin: a box edge within this many pixels of an inner tile border "touches" it.
        slack: px beyond the core (on its inner sides) where a box centre still counts: a cell on
            a core boundary, boxed a pixel or two apart by the two tiles, is then kept by both
            (and deduplicated) rather than by neither.
    """
    b = det.boxes
    top, left, bottom, right = tile.inner
    fringe = torch.zeros(len(det), dtype=torch.bool)
    fringe |= torch.as_tensor(top) & (b[:, 1] <= margin)
    fringe |= torch.as_tensor(left) & (b[:, 0] <= margin)
    fringe |= torch.as_tensor(bottom) & (b[:, 3] >= tile.height - margin)
    fringe |= torch.as_tensor(right) & (b[:, 2] >= tile.width - margin)
    boxes = b + torch.tensor([tile.x0, tile.y0, tile.x0, tile.y0], dtype=b.dtype)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    cy0, cx0, cy1, cx1 = tile.core
    in_core = (cx >= cx0) & (cx < cx1) & (cy >= cy0) & (cy < cy1)
    sy0, sx0, sy1, sx1 = (slack * s for s in tile.inner)  # the image's own borders get none
    keep = (cx >= cx0 - sx0) & (cx < cx1 + sx1) & (cy >= cy0 - sy0) & (cy < cy1 + sy1)
    placed = det.replace(boxes=boxes, tile=torch.full((len(det),), index, dtype=torch.int64),
                         fringe=fringe | ~in_core)
    keep |= ~placed.finite()  # passed on, to be dropped and counted with the others
    return placed[keep]


def dedupe_tiles(det: Detections, rles: Sequence[RLE], overlap_thresh: float = 0.5) -> Tensor:
    """Indices of the detections to keep after cross-tile duplicate removal.

    Between detections of *different* tiles (class-agnostic: a cell cut by a border may be
    classified differently in each tile), the one ranked lower is dropped when the two masks
    overlap by more than ``overlap_thresh`` of the smaller one. Rank: a tile's first choices (not
    ``fringe``: centre in its core, not touching an inner tile border) first, then by score.

    Args:
        det: placed detections with ``tile`` and ``fringe`` set, N of them.
        rles: their N masks in image coordinates.

    Returns:
        int64 indices into ``det``, in their original order.
    """
    if det.tile is None or len(det) == 0 or int(det.tile.unique().numel()) < 2:
        return torch.arange(len(det))
    priority = det.fringe.long() if det.fringe is not None else None
    keep = mask_nms(rles, det.scores, overlap_thresh, labels=None, groups=det.tile, overlap="iomin",
                    priority=priority)
    return keep.sort().values
