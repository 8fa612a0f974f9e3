"""COCO run-length encoding helpers (pycocotools underneath): encode masks and box regions, read
any COCO segmentation as a compressed RLE, check RLE strings, measure areas. No torch."""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

RLE = dict[str, Any]
"""``{"size": [H, W], "counts": str}`` (compressed, column-major, as COCO results carry it)."""

# characters of pycocotools' compressed RLE string: chr(48) .. chr(48 + 63)
_RLE_CHARS = re.compile(r"^[0-o]*$")


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """RLE of a full-size ``(H, W)`` binary mask, with ``counts`` as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def encode_region(region: np.ndarray, top: int, left: int, height: int, width: int) -> dict[str, Any]:
    """RLE (str counts) of the ``height x width`` mask that equals ``region`` at ``(top, left)``
    and 0 elsewhere, computed from the region alone (no full-size buffer).

    The same RLE as pycocotools' ``encode`` of the full mask, without allocating it: memory and
    time follow the region's size, not the image's (1000 cells of a 2000 x 2000 image encode in
    0.05 s instead of 1.5 s through a full-size buffer; benchmarks/paste_memory.py). Runs follow
    the column-major order of COCO RLE; each region column is framed by a 0 above and below (the
    pixels outside the region), and a change at the bottom of one column that the top of the next
    undoes (full-height regions) cancels out. pycocotools turns the run lengths into its string.

    Args:
        region: ``(h, w)`` bool/uint8; parts outside the image are clipped.
        top, left: position of ``region[0, 0]`` in the image (may be negative).
    """
    h, w = region.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, height), min(left + w, width)
    total = height * width
    counts: list[int] = [total]
    if y1 > y0 and x1 > x0:
        r = region[y0 - top : y1 - top, x0 - left : x1 - left]
        rh = r.shape[0]
        framed = np.zeros((r.shape[1], rh + 2), dtype=np.int8)
        framed[:, 1:-1] = r.T
        col, row = np.divmod(np.flatnonzero(np.diff(framed.ravel())) + 1, rh + 2)
        pos = (x0 + col) * height + y0 + row - 1  # image index of the first pixel after each change
        twin = np.flatnonzero(pos[1:] == pos[:-1])
        keep = np.ones(len(pos), dtype=bool)
        keep[twin] = False
        keep[twin + 1] = False
        pos = pos[keep]
        if len(pos):
            counts = np.diff(np.concatenate([[0], pos[pos < total], [total]])).tolist()
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_region(rle: Mapping[str, Any]) -> tuple[np.ndarray, int, int]:
    """The mask of a compressed RLE inside its bounding box, the inverse of :func:`encode_region`.

    pycocotools decodes into a full-size array; here only the foreground runs are expanded, so
    memory and time follow the cell, not the image (a 30 px cell of a 5000 x 5000 image costs
    a few kB instead of 25 MB).

    Args:
        rle: ``{"size": [H, W], "counts": str | bytes}`` (pycocotools' compressed form).

    Returns:
        ``(region (h, w) bool, top, left)``: the mask's rows ``top..top+h-1`` and columns
        ``left..left+w-1``; a ``(0, 0)`` region at ``(0, 0)`` for an empty mask.

    Raises:
        ValueError: ``counts`` is not a compressed RLE string whose runs fit ``size``.
    """
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if not rle_runs_fit(counts, height, width):
        raise ValueError(f"not a compressed RLE of a {height} x {width} mask")
    runs = np.asarray(rle_run_lengths(counts), dtype=np.int64)
    starts = np.cumsum(runs) - runs
    fg_start, fg_len = starts[1::2], runs[1::2]  # runs alternate background, foreground
    nonempty = fg_len > 0
    fg_start, fg_len = fg_start[nonempty], fg_len[nonempty]
    if not len(fg_len):
        return np.zeros((0, 0), dtype=bool), 0, 0
    offsets = np.cumsum(fg_len) - fg_len
    idx = np.arange(int(fg_len.sum()), dtype=np.int64) + np.repeat(fg_start - offsets, fg_len)
    col, row = np.divmod(idx, height)  # column-major, as COCO
    top, left = int(row.min()), int(col.min())
    region = np.zeros((int(row.max()) - top + 1, int(col.max()) - left + 1), dtype=bool)
    region[row - top, col - left] = True
    return region, top, left


def to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A compressed RLE (pycocotools form) of a COCO segmentation: RLE (str/bytes or list counts)
    or polygons, for an image of ``height x width``."""
    if isinstance(segmentation, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, Mapping) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(dict(segmentation), height, width)
    return dict(segmentation)


def rle_string_ok(counts: str) -> bool:
    """Whether ``counts`` is lexically a pycocotools compressed RLE string: characters ``'0'..'o'``
    and a final character that does not announce a continuation. (pycocotools' ``area`` and
    ``toBbox`` read any string without complaint; ``decode`` checks the run lengths.)"""
    if not _RLE_CHARS.match(counts):
        return False
    return not counts or not (ord(counts[-1]) - 48) & 0x20


def rle_run_lengths(counts: str | bytes) -> list[int] | None:
    """The run lengths of a pycocotools compressed RLE string (the inverse of its ``rleToString``),
    or None when the string is not one (characters outside ``'0'..'o'``, a number cut short).

    Each run length is 5-bit groups, lowest first, with bit 0x20 announcing another group and bit
    0x10 of the last group its sign; from the fourth run on, the value is stored as the difference
    from the run two before. Runs are not checked here (see :func:`rle_runs_fit`).
    """
    text = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
    out: list[int] = []
    x = shift = 0
    for c in text:
        c -= 48
        if not 0 <= c <= 63:
            return None
        x |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            x -= 1 << shift
        if len(out) > 2:
            x += out[-2]
        out.append(x)
        x = shift = 0
    return None if shift else out


def rle_runs_fit(counts: str | bytes, height: int, width: int) -> bool:
    """Whether ``counts`` is a compressed RLE string whose runs are all >= 0 and sum to exactly
    ``height * width``, which is what decoding it needs: pycocotools decodes a string cut short
    without complaint, leaving the rest of the mask uninitialised memory, and one whose runs add
    up to more writes past its buffer. Nothing of ``height x width`` is allocated."""
    runs = rle_run_lengths(counts)
    return runs is not None and all(r >= 0 for r in runs) and sum(runs) == height * width


_LONGEST_GROUP = 8
"""5-bit groups of a run length the vectorised check reads (40 bits, with room for its sign);
longer ones (no real mask has them) get the exact walk of :func:`rle_run_lengths`."""
_CHUNK_CHARS = 1 << 20
"""Characters checked in one go: bounds the memory, and keeps every sum of runs of at most 40
bits within an int64."""


def check_rle_strings(counts: Sequence[str], pixels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rle_string_ok` and :func:`rle_runs_fit` of many compressed RLE strings at once
    (numpy over all their characters instead of a Python walk per string), with each mask's area.

    Args:
        counts: N compressed RLE strings.
        pixels: ``(N,)`` the ``height * width`` each must cover.

    Returns:
        ``(ok, area)``: ``(N,)`` bool, whether the string is lexically an RLE and its run lengths
        are all >= 0 and sum to exactly its pixels (what decoding needs; see
        :func:`rle_runs_fit`); ``(N,)`` int64 foreground pixels (the odd runs), 0 where not ok.
    """
    n = len(counts)
    pixels = np.asarray(pixels, dtype=np.int64).reshape(n)
    ok = np.zeros(n, dtype=bool)
    area = np.zeros(n, dtype=np.int64)
    lengths = np.fromiter(map(len, counts), dtype=np.int64, count=n)
    bounds = np.searchsorted(np.cumsum(lengths), np.arange(_CHUNK_CHARS, int(lengths.sum()), _CHUNK_CHARS))
    for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), n]):
        if hi > lo:
            ok[lo:hi], area[lo:hi] = _check_chunk(list(counts[lo:hi]), pixels[lo:hi], lengths[lo:hi])
    return ok, area


def _check_chunk(strings: list[str], pixels: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(strings)
    ok = np.ones(n, dtype=bool)
    area = np.zeros(n, dtype=np.int64)
    exact = np.zeros(n, dtype=bool)  # strings for the exact walk: non-ASCII, absurdly long run lengths
    for i, text in enumerate(strings):
        if not text.isascii():
            exact[i], strings[i], lengths[i] = True, "", 0
    c = np.frombuffer("".join(strings).encode("ascii"), dtype=np.uint8) - np.uint8(48)  # bad characters wrap
    filled = np.flatnonzero(lengths > 0)
    if len(filled) == 0:  # only empty strings: no runs, which cover an empty image only
        return ok & (pixels == 0) & ~exact, area
    ends_at = np.cumsum(lengths)
    bad = np.flatnonzero(c > 63)  # outside '0'..'o'
    ok[np.searchsorted(ends_at, bad, side="right")] = False
    ends = (c & 0x20) == 0  # a character without the continuation bit ends a run length
    last = ends_at[filled] - 1
    ok[filled[~ends[last]]] = False  # cut short: the last run length is unfinished
    ends[last] = True  # run lengths never continue into the next string
    gend = np.flatnonzero(ends)
    gstart = np.concatenate(([0], gend[:-1] + 1))
    glen = gend - gstart + 1
    low = (c & 0x1F).astype(np.int64)
    x = low[gstart]
    longer = np.flatnonzero(glen > 1)
    for k in range(1, _LONGEST_GROUP):  # the few run lengths of more than one 5-bit group
        x[longer] += low[gstart[longer] + k] << (5 * k)
        longer = longer[glen[longer] > k + 1]
    x -= np.where((c[gend] & 0x10) != 0, np.int64(1) << (5 * np.minimum(glen, _LONGEST_GROUP)), 0)
    # the runs of each non-empty string: groups first[j] .. first[j] + per[j] - 1
    last_group = np.searchsorted(gend, last)
    per = np.zeros(n, dtype=np.int64)
    per[filled] = np.diff(last_group, prepend=-1)
    first = last_group - per[filled] + 1
    exact[filled] |= np.add.reduceat(glen > _LONGEST_GROUP, first) > 0
    # from the fourth run on, a run is stored as the difference from the run two before: running
    # sums over the runs of one parity of one string (the first run stands alone)
    index = np.arange(len(gend)) - np.repeat(first, per[filled])  # of each run within its string
    # both parities from two running sums: of y and of y signed by parity (odd +, even -)
    odd = index % 2 == 1
    y = np.where(index >= 1, x, 0)
    owner = np.repeat(np.arange(len(filled)), per[filled])  # of each run, among the non-empty strings
    both = np.cumsum(y)
    signed = np.cumsum(np.where(odd, y, -y))
    both -= np.concatenate(([0], both))[first][owner]  # running sums within each string
    signed -= np.concatenate(([0], signed))[first][owner]
    runs = np.where(index == 0, x, np.where(odd, both + signed, both - signed) // 2)
    out_of_range = (runs < 0) | (runs > pixels[filled][owner])
    clipped = np.clip(runs, 0, None)  # within [0, pixels] where ok: the sums below stay exact
    ok[filled] &= (np.add.reduceat(out_of_range, first) == 0) & (np.add.reduceat(clipped, first) == pixels[filled])
    ok[lengths == 0] &= pixels[lengths == 0] == 0
    area[filled] = np.add.reduceat(np.where(odd, clipped, 0), first)
    for i in np.flatnonzero(exact):
        runs_i = rle_run_lengths(strings[i]) if strings[i] else None
        ok[i] = runs_i is not None and rle_string_ok(strings[i]) and rle_runs_fit(strings[i], 1, int(pixels[i]))
        area[i] = sum(runs_i[1::2]) if ok[i] and runs_i is not None else 0
    area[~ok] = 0
    return ok, area


def rle_decodes(rle: Mapping[str, Any]) -> bool:
    """Whether ``rle`` is a sound compressed RLE: ``size`` two integers >= 0 and str/bytes
    ``counts`` whose runs sum to exactly ``H * W`` (:func:`rle_runs_fit`); checked without
    decoding, so a size claiming a huge mask allocates nothing."""
    counts, size = rle.get("counts"), rle.get("size")
    if isinstance(counts, str):
        if not rle_string_ok(counts):
            return False
    elif not isinstance(counts, bytes):
        return False
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in size):
        return False
    return rle_runs_fit(counts, int(size[0]), int(size[1]))


def rle_areas(rles: Sequence[RLE]) -> np.ndarray:
    """``(N,)`` int64 pixel counts of RLEs.

    pycocotools' ``area`` of a list fails beyond 255 masks under numpy 2 (it sizes a uint8 array
    from the count), so it is called on chunks of at most 255.
    """
    out = [np.asarray(mask_utils.area(list(rles[i : i + 255])), dtype=np.int64) for i in range(0, len(rles), 255)]
    return np.concatenate(out) if out else np.zeros((0,), dtype=np.int64)


def mask_iou(dts: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]], crowd: bool = False) -> np.ndarray:
    """``(len(dts), len(gts))`` float64 mask IoU of two lists of RLEs (pycocotools' ``iou``;
    ``crowd``: intersection over the area of the ``dts`` mask)."""
    if not len(dts) or not len(gts):
        return np.zeros((len(dts), len(gts)))
    iou = mask_utils.iou(list(dts), list(gts), [int(crowd)] * len(gts))
    return np.asarray(iou, dtype=np.float64).reshape(len(dts), len(gts))
