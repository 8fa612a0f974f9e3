"""The submission file: validate it entry by entry, and write it (json plus zip) atomically.

A submission is ``test-results.json``, zipped: a list of
``{image_id, category_id (1..4), score, bbox [x, y, w, h], segmentation {size: [H, W], counts: str}}``
where ``image_id`` comes from ``test_image_name_to_ids.json`` and the RLE is that of the mask at
the image's original resolution. :func:`check_submission` reports every problem with the index
of the entry at fault; ``cellkit check-submission`` prints them.
"""
from __future__ import annotations

import io
import json
import math
import numbers
import os
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from ..documents import loads_json
from ..errors import DataError
from ..outputs import check_replaceable, check_writable_file, read_head, write_files_together
from ..structures.rle import rle_decodes, rle_run_lengths, rle_string_ok
from .inputs import is_int, read_json, short_repr

PathLike = str | os.PathLike[str]
SUBMISSION_NAME = "test-results.json"
TEST_INDEX = "test_image_name_to_ids.json"  # as cellkit.data.layout.TEST_INDEX (importing that pulls in torch)
REQUIRED_KEYS = ("image_id", "category_id", "score", "bbox", "segmentation")


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`check_submission`.

    Attributes:
        index: position of the entry in the list (None for a problem of the whole file).
        message: what is wrong, in words a user can act on.
        severity: ``"error"`` (the file would be rejected or mis-scored) or ``"warning"`` (valid
            but suspicious, e.g. a box that looks like x1,y1,x2,y2 or an empty mask).
    """

    index: int | None
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = f"entry {self.index}" if self.index is not None else "file"
        return f"{self.severity}: {where}: {self.message}"


# --------------------------------------------------------------------------------------------
# the test index


def read_image_sizes(path: PathLike) -> dict[int, tuple[int, int]]:
    """Image id -> ``(height, width)`` from a ``test_image_name_to_ids.json``-style file.

    ``path`` may also be a dataset folder holding that file. ``test_release/`` need not exist.

    Raises:
        DataError: missing or invalid file, entries without integer id/height/width, duplicate ids.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / TEST_INDEX
    entries = read_json(path, "test index")
    if not isinstance(entries, list):
        raise DataError(path, "expected a list of {file_name, id, height, width} entries")
    sizes: dict[int, tuple[int, int]] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping) or not all(is_int(e.get(k)) for k in ("id", "height", "width")):
            raise DataError(path, f"entry {i} must have integer id, height and width, got {e!r}")
        if int(e["id"]) in sizes:
            raise DataError(path, f"duplicate id {e['id']} (entry {i})")
        sizes[int(e["id"])] = (int(e["height"]), int(e["width"]))
    return sizes


def _sizes_of(test_index: Any) -> dict[int, tuple[int, int]]:
    if isinstance(test_index, (str, os.PathLike)):
        return read_image_sizes(test_index)
    if isinstance(test_index, Mapping):
        out = {}
        for k, v in test_index.items():
            if isinstance(v, Mapping):
                out[int(k)] = (int(v["height"]), int(v["width"]))
            else:
                out[int(k)] = (int(v[0]), int(v[1]))
        return out
    out = {}
    for t in test_index:
        if hasattr(t, "image_id") and hasattr(t, "height") and hasattr(t, "width"):  # cellkit.data.layout.TestImage
            out[int(t.image_id)] = (int(t.height), int(t.width))
        elif isinstance(t, Mapping):
            out[int(t["id"])] = (int(t["height"]), int(t["width"]))
        else:
            raise DataError("<test index>", f"cannot read a test image entry from {t!r}")
    return out


# --------------------------------------------------------------------------------------------
# checking


def check_submission(
    entries_or_path: Any,
    test_index: Any,
    num_classes: int | None = None,
    check_coverage: bool = True,
) -> list[Problem]:
    """Validate a submission entry by entry.

    Checks: the top level is a list; each entry is an object with ``image_id``, ``category_id``,
    ``score``, ``bbox`` and ``segmentation``; ``image_id`` is an integer id of the test index;
    ``category_id`` an integer in ``1..num_classes`` (at least 1 when the number is not given); ``score`` a finite number; ``bbox`` 4 finite
    numbers ``[x, y, w, h]`` with ``w, h >= 0``; ``segmentation`` has ``size == [H, W]`` of that
    image and str ``counts`` that pycocotools decodes to that size. Warnings (the file is still
    valid): bboxes that look like ``[x1, y1, x2, y2]`` (reported when at least half the entries
    do: it reaches beyond the image, or equals the
    mask's box written as corners), an empty mask, test images without any prediction.

    Args:
        entries_or_path: the parsed list or a path to the json (a ``.zip`` holding one json works).
        test_index: ``test_image_name_to_ids.json`` (path, or dataset folder), a list of
            :class:`~cellkit.data.layout.TestImage` or of its raw entries, or id -> (H, W).
        num_classes: valid category ids are ``1..num_classes`` (None: any id of at least 1).
        check_coverage: warn about test images without predictions.

    Returns:
        The problems found, in entry order (file-level ones first); empty when the file is valid.

    Raises:
        DataError: the submission or the test index cannot be read at all (missing file, not JSON).
    """
    sizes = _sizes_of(test_index)
    entries = _read_submission(entries_or_path) if isinstance(entries_or_path, (str, os.PathLike)) else entries_or_path
    if not isinstance(entries, list):
        return [Problem(None, f"the top level must be a list of result objects, got {type(entries).__name__}")]
    problems: list[Problem] = []
    if not entries:
        problems.append(Problem(None, "the submission is empty (no predictions)", "warning"))
    seen_images: set[int] = set()
    for i, e in enumerate(entries):
        problems.extend(_check_entry(i, e, sizes, num_classes, seen_images))
    problems = _corner_boxes_if_systematic(problems, len(entries))
    if check_coverage and entries:
        missing = sorted(set(sizes) - seen_images)
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            problems.insert(0, Problem(
                None, f"{len(missing)} of {len(sizes)} test images have no prediction (ids {shown})", "warning"
            ))
    return problems


def _corner_boxes_if_systematic(problems: list[Problem], n_entries: int) -> list[Problem]:
    """Keep the ``[x1, y1, x2, y2]`` warnings only when at least half the entries draw one: a
    file written with corner boxes has them nearly everywhere, while a model's own box can be
    off its thresholded mask now and then (at the image border, say) without being one."""
    def is_corner(p: Problem) -> bool:
        return p.severity == "warning" and ("fits as [x1, y1, x2, y2]" in p.message
                                            or "looks like [x1, y1, x2, y2]" in p.message)

    corner = [p for p in problems if is_corner(p)]
    if corner and len(corner) * 2 < n_entries:
        return [p for p in problems if not is_corner(p)]
    return problems


def _check_entry(
    i: int, e: Any, sizes: Mapping[int, tuple[int, int]], num_classes: int | None, seen_images: set[int]
) -> list[Problem]:
    if not isinstance(e, Mapping):
        return [Problem(i, f"expected an object, got {type(e).__name__}")]
    out: list[Problem] = []
    missing = [k for k in REQUIRED_KEYS if k not in e]
    if missing:
        out.append(Problem(i, f"missing key(s) {', '.join(missing)}"))
    hw = None
    if "image_id" in e:
        image_id = e["image_id"]
        if not is_int(image_id):
            out.append(Problem(i, f"image_id must be an integer, got {image_id!r}"))
        elif int(image_id) not in sizes:
            out.append(Problem(i, f"image_id {image_id} is not in the test index"))
        else:
            hw = sizes[int(image_id)]
            seen_images.add(int(image_id))
    if "category_id" in e:
        c = e["category_id"]
        if not is_int(c):
            out.append(Problem(i, f"category_id must be an integer, got {c!r}"))
        elif int(c) < 1 or (num_classes is not None and int(c) > num_classes):
            out.append(Problem(i, f"category_id {c} is outside 1..{num_classes if num_classes is not None else 'K'}"))
    if "score" in e:
        s = e["score"]
        if not _is_number(s):
            out.append(Problem(i, f"score must be a number, got {s!r}"))
        elif not math.isfinite(float(s)):
            out.append(Problem(i, f"score is {s} (must be finite)"))
    bbox = None
    if "bbox" in e:
        bb = e["bbox"]
        if not isinstance(bb, list) or len(bb) != 4 or not all(_is_number(v) for v in bb):
            out.append(Problem(i, f"bbox must be a list of 4 numbers [x, y, w, h], got {short_repr(bb, 80)}"))
        elif not all(math.isfinite(float(v)) for v in bb):
            out.append(Problem(i, f"bbox has non-finite values {bb}"))
        elif bb[2] < 0 or bb[3] < 0:
            out.append(Problem(i, f"bbox width/height must be >= 0 ([x, y, w, h]), got {bb}"))
        else:
            bbox = [float(v) for v in bb]
    rle = None
    if "segmentation" in e:
        rle, seg_problems = _check_segmentation(i, e["segmentation"], hw)
        out.extend(seg_problems)
    if rle is not None:
        area = int(mask_utils.area(rle))
        if area == 0:
            out.append(Problem(i, "the mask is empty (area 0)", "warning"))
    if bbox is not None and hw is not None:
        xyxy = _xyxy_warning(bbox, hw, rle)
        if xyxy:
            out.append(Problem(i, xyxy, "warning"))
    return out


def _check_segmentation(
    i: int, seg: Any, hw: tuple[int, int] | None
) -> tuple[dict[str, Any] | None, list[Problem]]:
    if not isinstance(seg, Mapping):
        return None, [Problem(i, f"segmentation must be an RLE object {{size, counts}}, got {type(seg).__name__}")]
    out: list[Problem] = []
    size, counts = seg.get("size"), seg.get("counts")
    size_ok = isinstance(size, list) and len(size) == 2 and all(is_int(v) and v >= 0 for v in size)
    if not size_ok:
        out.append(Problem(i, f"segmentation.size must be [height, width] integers, got {short_repr(size, 80)}"))
    elif hw is not None and tuple(size) != hw:
        out.append(Problem(i, f"segmentation.size is {size} but the image is {list(hw)} (height, width)"))
        size_ok = False  # never decode at a size the test index does not give (46341 x 46341 is 2 GB)
    if not isinstance(counts, str):
        kind = "bytes (decode them to str)" if isinstance(counts, bytes) else type(counts).__name__
        out.append(Problem(i, f"segmentation.counts must be a compressed RLE str, got {kind}"))
        return None, out
    if not size_ok:
        return None, out
    rle = {"size": [int(v) for v in size], "counts": counts}
    if not rle_decodes(rle):
        runs = rle_run_lengths(counts) if rle_string_ok(counts) else None
        why = ("not a compressed RLE string" if runs is None else "a negative run" if any(r < 0 for r in runs)
               else f"its runs cover {sum(runs)} of {size[0] * size[1]} pixels: cut short or corrupt")
        out.append(Problem(i, f"segmentation.counts does not decode to a {size[0]} x {size[1]} mask ({why})"))
        return None, out
    return rle, out


def _xyxy_warning(bbox: list[float], hw: tuple[int, int], rle: dict[str, Any] | None) -> str | None:
    """A message when ``bbox`` looks like [x1, y1, x2, y2] rather than [x, y, w, h]."""
    h, w = hw
    x, y, bw, bh = bbox
    corner_like = bw > x and bh > y and bw <= w + 1 and bh <= h + 1
    if rle is not None and mask_utils.area(rle) > 0:
        mx, my, mw, mh = (float(v) for v in mask_utils.toBbox(rle))
        as_xywh = max(abs(x - mx), abs(y - my), abs(bw - mw), abs(bh - mh))
        as_xyxy = max(abs(x - mx), abs(y - my), abs(bw - (mx + mw)), abs(bh - (my + mh)))
        # near the image origin the two readings coincide (they differ by mx, my): no verdict there
        if as_xyxy <= 2.0 < as_xywh and max(mx, my) > 4.0:
            return f"bbox {_box(bbox)} looks like [x1, y1, x2, y2] of the mask; the format is [x, y, width, height]"
    if (x + bw > w + 1 or y + bh > h + 1) and corner_like:
        return (f"bbox {_box(bbox)} reaches beyond the {h} x {w} image as [x, y, w, h] but fits as [x1, y1, x2, y2]; "
                "the format is [x, y, width, height]")
    return None


def _read_submission(path: PathLike) -> Any:
    path = Path(path).expanduser()
    if path.suffix.lower() == ".zip" and path.is_file():
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.lower().endswith(".json")]
                if len(names) != 1:
                    raise DataError(path, f"expected one .json file in the zip, found {len(names)}")
                return loads_json(z.read(names[0]), f"{path} ({names[0]} in the zip)")
        except zipfile.BadZipFile as e:
            raise DataError(path, f"not a valid zip file ({e})") from None
    return read_json(path, "submission file")


# --------------------------------------------------------------------------------------------
# writing


def write_submission(entries: Sequence[Mapping[str, Any]], out_json: PathLike) -> tuple[Path, Path]:
    """Write the submission json and a zip holding it, as one change
    (:func:`cellkit.outputs.write_files_together`): killed at any instant or stopped by a full
    disk, the two files are the old pair or the new pair, never a new json beside an old zip.

    Args:
        entries: COCO result dicts; RLE ``counts`` given as bytes are written as str, numpy
            numbers as plain numbers.
        out_json: the json to write (``.../test-results.json``); a folder means
            ``folder/test-results.json``. The zip is the same path with ``.zip`` and holds the json
            under its own name.

    Returns:
        ``(json_path, zip_path)``.

    Raises:
        DataError: an entry holds NaN/Inf or something JSON cannot represent; the files cannot
            be written (a full disk: ``no space left on device``; the old pair is unchanged).
    """
    out, zip_path = submission_paths(out_json)
    try:
        text = json.dumps([_plain_entry(e) for e in entries], allow_nan=False, default=_json_default)
    except (ValueError, TypeError) as e:
        raise DataError(out, f"cannot write the submission: {e}") from None
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(out.name, text)
    write_files_together({out: text, zip_path: buf.getvalue()})
    return out, zip_path


def submission_paths(out_json: PathLike) -> tuple[Path, Path]:
    """``(json, zip)`` that :func:`write_submission` writes for ``out_json`` (a folder, or a path
    without suffix that does not exist, means ``folder/test-results.json``)."""
    out = Path(out_json).expanduser()
    if out.is_dir() or (not out.suffix and not out.exists()):
        out = out / SUBMISSION_NAME
    return out, out.with_suffix(".zip")


def check_submission_writable(out_json: PathLike) -> tuple[Path, Path]:
    """:func:`submission_paths`, after checking both can be written (call it before predicting):
    each is new, or a submission written before (:func:`looks_like_submission`); any other file
    there (a checkpoint, a test index, a file of one's own) is refused, not replaced.

    Raises:
        DataError: the json or the zip cannot be written there, or is a file of another kind.
    """
    out, zip_path = submission_paths(out_json)
    check_writable_file(out, "submission file")
    check_writable_file(zip_path, "submission zip")
    check_replaceable(out, "submission file", looks_like_submission)
    check_replaceable(zip_path, "submission zip", looks_like_submission)
    return out, zip_path


def looks_like_submission(path: PathLike) -> bool:
    """Whether an existing file is a submission (or a COCO result list) an earlier run wrote: a
    JSON list of result objects (or an empty one), or a zip holding one ``.json`` and nothing else.
    Judged from the first bytes (a checkpoint is a zip of many files; a test index is a list of
    ``file_name`` entries without ``image_id``)."""
    p = Path(path)
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (OSError, zipfile.BadZipFile):
            return False
        return len(names) == 1 and names[0].lower().endswith(".json")
    head = read_head(p).lstrip()
    return head.startswith(b"[") and (head[1:].lstrip().startswith(b"]") or b'"image_id"' in head)


def _plain_entry(e: Mapping[str, Any]) -> dict[str, Any]:
    d = dict(e)
    seg = d.get("segmentation")
    if isinstance(seg, Mapping):
        seg = dict(seg)
        if isinstance(seg.get("counts"), bytes):
            seg["counts"] = seg["counts"].decode("ascii")
        if "size" in seg:
            seg["size"] = [int(v) for v in seg["size"]]
        d["segmentation"] = seg
    return d


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, bytes):
        return x.decode("ascii")
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def summarize_problems(problems: Iterable[Problem]) -> str:
    """One line: counts of errors and warnings and the most frequent kinds."""
    problems = list(problems)
    n_err = sum(p.severity == "error" for p in problems)
    n_warn = len(problems) - n_err
    kinds = Counter(_kind(p.message) for p in problems if p.severity == "error")
    top = "; ".join(f"{k} ({n})" for k, n in kinds.most_common(3))
    return f"{n_err} error(s), {n_warn} warning(s)" + (f"; most frequent: {top}" if top else "")


def _kind(message: str) -> str:
    return message.split(" ", 1)[0] if message else message


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _box(bb: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in bb) + "]"


