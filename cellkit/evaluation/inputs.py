"""Reading and checking what COCO evaluation consumes: ground truth and prediction lists.

Ground truth is validated (and, where safe, completed) before pycocotools sees it; predictions are
*sanitised* before ``COCO.loadRes``: entries that would crash or silently corrupt the evaluation
(NaN/Inf boxes or scores, zero-size boxes, empty masks, unknown image or category ids, masks of the
wrong size) are dropped and counted by reason. Used by :mod:`cellkit.evaluation.coco` and
:mod:`cellkit.evaluation.cellmetrics`.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import math
import numbers
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ..documents import read_json as read_document
from ..documents import short
from ..errors import DataError
from ..structures.rle import check_rle_strings, rle_runs_fit, rle_string_ok, to_rle

PathLike = str | os.PathLike[str]

DROP_REASONS: tuple[str, ...] = (
    "malformed",  # not a dict, or a required key missing / of the wrong type
    "unknown_image",  # image_id not among the ground-truth images
    "unknown_category",  # category_id not an integer among the ground-truth categories
    "nonfinite_score",  # score NaN, Inf or not a number
    "nonfinite_box",  # bbox not 4 finite numbers
    "degenerate_box",  # bbox width or height <= 0
    "wrong_size",  # RLE segmentation whose size is not the image's height and width
    "bad_mask",  # segmentation not an RLE/polygon pycocotools can read (or runs not covering the image)
    "empty_mask",  # RLE area 0
)
"""Why :func:`sanitize_predictions` drops an entry (the first reason that applies is counted)."""

AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e5**2),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}
"""pycocotools' default area ranges (px^2) for the AP breakdown by object size."""



def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file within :mod:`cellkit.documents`' limits; a missing, unparsable or
    hostile file (an integer of 5000 digits, nesting a thousand levels deep) is a
    :class:`DataError` naming it."""
    return read_document(path, what)


# --------------------------------------------------------------------------------------------
# ground truth


@dataclass
class GroundTruth:
    """A validated COCO ground-truth dataset, safe to hand to pycocotools or faster-coco-eval.

    Attributes:
        dataset: ``{"images", "annotations", "categories"}``; annotation dicts are private copies
            (COCOeval writes ``ignore`` and RLE fields into them).
        source: the file it came from, or a description (used in error messages).
        notes: what was filled in (``iscrowd``, ``area``, image sizes) for ground truth from elsewhere.
        coco: the pycocotools ``COCO`` index when one was given or built (see :meth:`pycoco`).
    """

    dataset: dict[str, Any]
    source: str = "<ground truth>"
    notes: list[str] = field(default_factory=list)
    coco: Any = None

    @property
    def images(self) -> dict[int, dict[str, Any]]:
        """Image id -> image entry (``id``, ``height``, ``width`` ...)."""
        return {int(im["id"]): im for im in self.dataset["images"]}

    @property
    def category_ids(self) -> list[int]:
        """Sorted category ids (COCOeval's order of the K axis)."""
        return sorted(int(c["id"]) for c in self.dataset["categories"])

    @property
    def num_classes(self) -> int:
        """The highest category id (classes are ``1..num_classes``; ids need not all have cells)."""
        return max(self.category_ids)

    @property
    def category_names(self) -> dict[int, str]:
        """Category id -> name (``class1`` ... for cellkit ground truth)."""
        return {int(c["id"]): str(c.get("name", f"class{c['id']}")) for c in self.dataset["categories"]}

    def pycoco(self) -> Any:
        """The pycocotools ``COCO`` index of :attr:`dataset` (built once, quietly)."""
        if self.coco is None:
            coco = COCO()
            coco.dataset = self.dataset
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self.coco = coco
        return self.coco


def load_ground_truth(gt: Any, num_classes: int | None = None, need_masks: bool = True) -> GroundTruth:
    """Read and validate COCO ground truth.

    Args:
        gt: a path to a COCO json, a COCO dict, a pycocotools ``COCO`` or a :class:`GroundTruth`.
        num_classes: categories must have ids in ``1..num_classes`` (None: any id of at least 1;
            the ground truth says which classes there are).
        need_masks: every annotation must have a ``segmentation`` (segm evaluation, cell metrics).

    Returns:
        A :class:`GroundTruth`. Annotations without ``iscrowd`` get 0 and those without ``area``
        get the area of their mask (or box), each with a note; images without ``height``/``width``
        take them from an RLE of theirs.

    Raises:
        DataError: missing/invalid file, no ``images``/``annotations``/``categories``, category ids
            outside ``1..num_classes``, annotations of unknown images or categories, missing masks.
    """
    if isinstance(gt, GroundTruth):
        return gt
    coco = None
    if isinstance(gt, (str, os.PathLike)):
        source = str(gt)
        data = read_json(gt, "ground-truth file")
    elif isinstance(gt, Mapping):
        source, data = "<ground-truth dict>", gt
    elif hasattr(gt, "dataset") and hasattr(gt, "getImgIds"):  # pycocotools (or compatible) COCO
        source, data, coco = "<COCO object>", gt.dataset, gt
    else:
        raise DataError("<ground truth>", f"expected a COCO json path, dict or COCO object, got {type(gt).__name__}")
    if not isinstance(data, Mapping):
        raise DataError(source, f"expected a COCO dict with images, annotations and categories, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(source, f"not COCO ground truth: no '{key}' list")
    if not data["categories"]:
        raise DataError(source, "'categories' is empty (cellkit ground truth has categories 1..K, one per class)")
    notes: list[str] = []
    cat_ids = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, Mapping) or not is_int(c.get("id")):
            raise DataError(source, f"category {i} has no integer id: {c!r}")
        if int(c["id"]) < 1 or (num_classes is not None and int(c["id"]) > num_classes):
            raise DataError(source, f"category id {c['id']} is outside 1..{num_classes if num_classes is not None else 'K'}")
        cat_ids.add(int(c["id"]))
    images: dict[int, dict[str, Any]] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, Mapping) or not is_int(im.get("id")):
            raise DataError(source, f"image entry {i} has no integer id: {short_repr(im)}")
        if int(im["id"]) in images:
            raise DataError(source, f"duplicate image id {im['id']}")
        images[int(im["id"])] = dict(im)

    anns: list[dict[str, Any]] = []
    missing = Counter()
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, Mapping):
            raise DataError(source, f"annotation {i} is not an object")
        for key in ("image_id", "category_id"):
            if not is_int(a.get(key)):
                raise DataError(source, f"annotation {i} has no integer {key}")
        if int(a["image_id"]) not in images:
            raise DataError(source, f"annotation {i} refers to image id {a['image_id']}, which is not in 'images'")
        if int(a["category_id"]) not in cat_ids:
            raise DataError(source, f"annotation {i} has category_id {a['category_id']}, which is not in 'categories'")
        seg = a.get("segmentation")
        if need_masks and not seg:
            raise DataError(source, f"annotation {i} has no segmentation (segm evaluation needs masks)")
        if "bbox" not in a and not seg:
            raise DataError(source, f"annotation {i} has neither bbox nor segmentation")
        a = dict(a)
        im = images[int(a["image_id"])]
        if not (is_int(im.get("height")) and is_int(im.get("width"))):
            if isinstance(seg, Mapping) and isinstance(seg.get("size"), (list, tuple)) and len(seg["size"]) == 2:
                im["height"], im["width"] = (int(v) for v in seg["size"])
                missing["size"] += 1
            else:
                raise DataError(source, f"image id {im['id']} has no height/width")
        if "iscrowd" not in a:
            a["iscrowd"] = 0
            missing["iscrowd"] += 1
        if "area" not in a:
            if seg:
                try:
                    a["area"] = float(mask_utils.area(to_rle(seg, int(im["height"]), int(im["width"]))))
                except (TypeError, ValueError, KeyError) as e:
                    raise DataError(source, f"annotation {i}: unreadable segmentation ({e})") from None
            else:
                a["area"] = float(a["bbox"][2] * a["bbox"][3])
            missing["area"] += 1
        if "bbox" not in a:
            a["bbox"] = [float(v) for v in mask_utils.toBbox(to_rle(seg, int(im["height"]), int(im["width"])))]
            missing["bbox"] += 1
        if "id" not in a:
            missing["id"] += 1
        anns.append(a)
    if missing["id"]:
        for k, a in enumerate(anns, start=1):
            a["id"] = k
    for im in images.values():
        if not (is_int(im.get("height")) and is_int(im.get("width"))):
            raise DataError(source, f"image id {im['id']} has no height/width")
    labels = {"iscrowd": "iscrowd set to 0", "area": "area computed from the mask", "bbox": "bbox computed from the mask",
              "id": "annotation ids assigned 1..N", "size": "image height/width taken from an RLE"}
    for key, n in missing.items():
        notes.append(f"ground truth: {labels[key]} for {n} annotation(s) that lacked it")
    dataset = {"images": list(images.values()), "annotations": anns, "categories": [dict(c) for c in data["categories"]]}
    if "info" in data:
        dataset["info"] = data["info"]
    if coco is not None and not missing:
        # the caller's own COCO object stays in use (pycocotools' usual behaviour): no re-indexing
        return GroundTruth(dict(coco.dataset), source, notes, coco)
    return GroundTruth(dataset, source, notes)


# --------------------------------------------------------------------------------------------
# predictions


def load_predictions(predictions: Any) -> list[Any]:
    """A prediction list from a path to a COCO results json or a list (returned as is).

    Raises:
        DataError: missing or invalid file, or a top level that is not a list.
    """
    if isinstance(predictions, (str, os.PathLike)):
        data = read_json(predictions, "prediction file")
        if not isinstance(data, list):
            raise DataError(predictions, f"expected a list of COCO results, got {type(data).__name__}")
        return data
    if isinstance(predictions, list):
        return predictions
    if isinstance(predictions, tuple):
        return list(predictions)
    raise DataError("<predictions>", f"expected a list of COCO results or a json path, got {type(predictions).__name__}")


def sanitize_predictions(
    preds: Iterable[Any],
    gt_images: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    num_classes: int | None = None,
    iou_type: str = "segm",
    category_ids: Iterable[int] | None = None,
    copy: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Drop predictions that would crash or corrupt COCO evaluation; run it *before* ``loadRes``.

    Each entry is checked in the order of :data:`DROP_REASONS` and dropped for the first reason
    that applies: malformed entry, unknown image id, category id not in ``category_ids`` (default
    ``1..num_classes``), non-finite score, bbox that is not 4 finite numbers, bbox with width or
    height <= 0, an RLE whose size differs from the image, a segmentation pycocotools cannot read
    (for RLE strings: runs that do not cover exactly the image), an empty mask (RLE area 0).

    Kept entries are fresh dicts (the caller's are never modified, since ``loadRes`` writes into
    them) with ``image_id``/``category_id`` as int, ``score`` as float, ``bbox`` as 4 floats and
    the segmentation as a compressed RLE with str counts. When some entries carry a ``bbox`` and
    others do not, the missing ones get the mask's box (``loadRes`` decides from the first entry
    alone whether boxes are present).

    Args:
        preds: COCO result dicts ``{image_id, category_id, score, bbox?, segmentation?}``.
        gt_images: image id -> image entry with ``height`` and ``width``, or the list of entries.
        num_classes: valid category ids are ``1..num_classes`` unless ``category_ids`` is given.
        iou_type: ``"segm"`` requires a segmentation; ``"bbox"`` requires a bbox or a segmentation.
        category_ids: the valid category ids (e.g. those of the ground truth).
        copy: False for a list nobody else holds (just read from a file): entries already in
            the kept form (Python ints, float score and box, an RLE of the image's size with str
            counts) are kept themselves instead of copied.

    Returns:
        ``(kept, dropped)`` where ``dropped`` maps every reason of :data:`DROP_REASONS` to a count.
    """
    if isinstance(gt_images, Mapping):
        sizes = {int(k): (int(v["height"]), int(v["width"])) for k, v in gt_images.items()}
    else:
        sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in gt_images}
    if category_ids is None and num_classes is None:
        raise ValueError("sanitize_predictions needs num_classes or category_ids")
    valid_cats = set(int(c) for c in category_ids) if category_ids is not None else set(range(1, num_classes + 1))
    dropped = dict.fromkeys(DROP_REASONS, 0)
    kept: list[dict[str, Any] | None] = []
    # plain entries (what json gives) take a fast path whose RLE strings are checked all at once
    # at the end (bad_mask and empty_mask are the last reasons, so the first reason still counts)
    pending: list[int] = []
    strings: list[str] = []
    pixels: list[int] = []
    preds = preds if isinstance(preds, list) else list(preds)
    columns = _plain_columns(preds, sizes, valid_cats, copy)
    for k, p in enumerate(preds):
        entry = columns[k] if columns is not None else _plain_entry(p, sizes, valid_cats)
        if entry is not None:
            pending.append(len(kept))
            strings.append(entry["segmentation"]["counts"])
            pixels.append(sizes[entry["image_id"]][0] * sizes[entry["image_id"]][1])
            kept.append(entry)
            continue
        reason, entry = _check_prediction(p, sizes, valid_cats, iou_type)
        if reason is None:
            kept.append(entry)
        else:
            dropped[reason] += 1
    ok, area = check_rle_strings(strings, pixels)
    for k in np.flatnonzero(~ok | (area == 0)).tolist():
        dropped["bad_mask" if not ok[k] else "empty_mask"] += 1
        kept[pending[k]] = None
    kept = [e for e in kept if e is not None]
    if any("bbox" in e for e in kept):  # type: ignore[operator]
        for e in kept:
            if "bbox" not in e:
                e["bbox"] = [float(v) for v in mask_utils.toBbox(e["segmentation"])]
    return kept, dropped


def _plain_columns(preds: list[Any], sizes: Mapping[int, tuple[int, int]], valid_cats: set[int],
                   copy: bool = True) -> list[dict[str, Any] | None] | None:
    """:func:`_plain_entry` of every prediction, checked column by column (numpy over the values)
    when every entry has the same plain form (what json gives: dicts of Python ints and floats,
    list boxes, RLEs with list sizes and str counts); None when they do not, and then each
    entry is looked at by itself."""
    if not preds or _types(preds) != {dict} or not sizes:
        return None
    try:
        ids, cats = [p["image_id"] for p in preds], [p["category_id"] for p in preds]
        scores, segs = [p["score"] for p in preds], [p["segmentation"] for p in preds]
        if not (_types(ids) == _types(cats) == {int} and _types(scores) <= {float, int} and _types(segs) == {dict}):
            return None
        sizes_given, counts = [g["size"] for g in segs], [g["counts"] for g in segs]
    except KeyError:
        return None
    boxes = [p.get("bbox") for p in preds]
    if _types(counts) != {str} or _types(sizes_given) != {list} or set(map(len, sizes_given)) != {2} \
            or _types(itertools.chain.from_iterable(sizes_given)) != {int}:
        return None
    with_box = _types(boxes) == {list}
    box_types = _types(itertools.chain.from_iterable(boxes)) if with_box else set()
    if with_box and (set(map(len, boxes)) != {4} or not box_types <= {float, int}):
        return None
    if not with_box and _types(boxes) != {type(None)}:
        return None
    n = len(preds)
    known = np.array(sorted(sizes), dtype=np.int64)
    try:
        id_arr, cat_arr = np.array(ids, dtype=np.int64), np.array(cats, dtype=np.int64)
        given = np.fromiter(itertools.chain.from_iterable(sizes_given), dtype=np.int64, count=2 * n).reshape(n, 2)
    except OverflowError:  # an integer beyond int64: each entry by itself
        return None
    at = np.minimum(np.searchsorted(known, id_arr), len(known) - 1)
    good = known[at] == id_arr
    good &= np.isin(cat_arr, np.array(sorted(valid_cats), dtype=np.int64))
    score = np.array(scores, dtype=np.float64)
    good &= np.isfinite(score)
    good &= (given == np.array([sizes[int(k)] for k in known], dtype=np.int64).reshape(-1, 2)[at]).all(axis=1)
    if with_box:
        box = np.fromiter(itertools.chain.from_iterable(boxes), dtype=np.float64, count=4 * n).reshape(n, 4)
        good &= np.isfinite(box).all(axis=1) & (box[:, 2] > 0) & (box[:, 3] > 0)
    if with_box and (copy or box_types != {float}):  # fresh lists of floats (copies when they hold floats only)
        box_lists = [b[:] for b in boxes] if box_types == {float} else box.tolist()
    score_list = scores if _types(scores) == {float} else score.tolist()
    if not copy and score_list is scores and (not with_box or box_types == {float}):
        return [p if ok else None for p, ok in zip(preds, good.tolist())]  # already in the kept form
    if with_box:
        return [{"image_id": i, "category_id": c, "score": sc, "bbox": b,
                 "segmentation": {"size": hw[:], "counts": text}} if ok else None
                for i, c, sc, b, hw, text, ok in zip(ids, cats, score_list, box_lists, sizes_given, counts,
                                                     good.tolist())]
    return [{"image_id": i, "category_id": c, "score": sc, "segmentation": {"size": hw[:], "counts": text}}
            if ok else None for i, c, sc, hw, text, ok in zip(ids, cats, score_list, sizes_given, counts, good.tolist())]


def _types(values: Iterable[Any]) -> set[type]:
    return set(map(type, values))


def _plain_entry(p: Any, sizes: Mapping[int, tuple[int, int]], valid_cats: set[int]) -> dict[str, Any] | None:
    """The kept entry of a plain, valid prediction (a dict of Python numbers, a list bbox and an
    RLE with str counts of its image's size) but for its RLE string, which the caller checks
    (:func:`~cellkit.structures.rle.check_rle_strings`); None for anything else, which
    :func:`_check_prediction` then checks (and names the reason) the long way."""
    if type(p) is not dict:
        return None
    image_id, cat, score, seg = p.get("image_id"), p.get("category_id"), p.get("score"), p.get("segmentation")
    if type(image_id) is not int or type(cat) is not int or type(seg) is not dict or cat not in valid_cats:
        return None
    hw = sizes.get(image_id)
    size, counts = seg.get("size"), seg.get("counts")
    if hw is None or type(counts) is not str or type(size) is not list or len(size) != 2 \
            or type(size[0]) is not int or type(size[1]) is not int or (size[0], size[1]) != hw:
        return None
    if not ((type(score) is float and score - score == 0) or type(score) is int):  # finite: inf - inf is nan
        return None
    out: dict[str, Any] = {"image_id": image_id, "category_id": cat, "score": float(score)}
    bb = p.get("bbox")
    if bb is not None:
        if type(bb) is not list or len(bb) != 4:
            return None
        x, y, w, h = bb
        for v in bb:
            if not ((type(v) is float and v - v == 0) or type(v) is int):
                return None
        if not (w > 0 and h > 0):
            return None
        out["bbox"] = [float(x), float(y), float(w), float(h)]
    out["segmentation"] = {"size": [hw[0], hw[1]], "counts": counts}
    return out


def _check_prediction(
    p: Any, sizes: Mapping[int, tuple[int, int]], valid_cats: set[int], iou_type: str
) -> tuple[str | None, dict[str, Any] | None]:
    if type(p) is not dict and not isinstance(p, Mapping):
        return "malformed", None
    if "image_id" not in p or "category_id" not in p or "score" not in p:
        return "malformed", None
    seg = p.get("segmentation")
    if iou_type == "segm" and seg is None:
        return "malformed", None
    if iou_type == "bbox" and seg is None and p.get("bbox") is None:
        return "malformed", None
    if not is_int(p["image_id"]):
        return "unknown_image" if _is_real(p["image_id"]) else "malformed", None
    image_id = int(p["image_id"])
    if image_id not in sizes:
        return "unknown_image", None
    if not is_int(p["category_id"]) or int(p["category_id"]) not in valid_cats:
        return "unknown_category", None
    score = p["score"]
    if not _is_finite_real(score):
        return "nonfinite_score", None
    out: dict[str, Any] = {"image_id": image_id, "category_id": int(p["category_id"]), "score": float(score)}
    if p.get("bbox") is not None:
        bb = _finite_box(p["bbox"])
        if bb is None:
            return "nonfinite_box", None
        if bb[2] <= 0 or bb[3] <= 0:
            return "degenerate_box", None
        out["bbox"] = bb
    if seg is not None:
        h, w = sizes[image_id]
        if isinstance(seg, Mapping) and isinstance(seg.get("size"), (list, tuple)) and len(seg["size"]) == 2 \
                and all(is_int(v) for v in seg["size"]) and (int(seg["size"][0]), int(seg["size"][1])) != (h, w):
            return "wrong_size", None
        rle = _readable_rle(seg, h, w)
        if rle is None:
            return "bad_mask", None
        if int(mask_utils.area(rle)) == 0:
            return "empty_mask", None
        out["segmentation"] = rle
    return None, out


def _finite_box(bb: Any) -> list[float] | None:
    """``[x, y, w, h]`` as floats when ``bb`` is 4 finite numbers, else None."""
    if not isinstance(bb, (list, tuple, np.ndarray)) or len(bb) != 4:
        return None
    x, y, w, h = bb
    if _is_finite_real(x) and _is_finite_real(y) and _is_finite_real(w) and _is_finite_real(h):
        return [float(x), float(y), float(w), float(h)]
    return None


def _readable_rle(seg: Any, h: int, w: int) -> dict[str, Any] | None:
    """A compressed RLE with str counts of size ``[h, w]``, or None when ``seg`` is not one
    pycocotools can read for that image."""
    try:
        if isinstance(seg, list):
            if not seg or not all(isinstance(poly, list) and len(poly) >= 6 for poly in seg):
                return None
            rle = to_rle(seg, h, w)
        elif isinstance(seg, Mapping):
            size = seg.get("size")
            if (
                not isinstance(size, (list, tuple)) or len(size) != 2
                or size[0] != h or size[1] != w or not is_int(size[0]) or not is_int(size[1])
            ):
                return None
            counts = seg.get("counts")
            if isinstance(counts, list):
                rle = to_rle(seg, h, w)
            elif isinstance(counts, (str, bytes)):
                text = counts.decode("ascii") if isinstance(counts, bytes) else counts
                if not rle_string_ok(text) or not rle_runs_fit(text, h, w):  # cut short: garbage when decoded
                    return None
                rle = {"size": [h, w], "counts": text}
            else:
                return None
        else:
            return None
    except (TypeError, ValueError, UnicodeDecodeError):
        return None
    if isinstance(rle.get("counts"), bytes):
        rle["counts"] = rle["counts"].decode("ascii")
    rle["size"] = [h, w]
    return rle


def check_predictions_match(
    preds: Sequence[Any], ground: GroundTruth, dropped: Mapping[str, int], source: str = "<predictions>"
) -> None:
    """Refuse predictions that are mostly of other images than the ground truth's.

    When more than half of the predictions name an image id the ground truth does not have
    (``unknown_image``) or carry masks of another size (``wrong_size``), they belong to another
    split or dataset; evaluating the rest would print an AP (0.0 or worse, a number from a
    handful of entries) that looks like a result.

    Raises:
        DataError: naming ``source``, how many predictions do not match, and example image ids.
    """
    n = len(preds)
    unmatched = int(dropped.get("unknown_image", 0)) + int(dropped.get("wrong_size", 0))
    if not n or unmatched * 2 <= n:
        return
    images = ground.images
    foreign = sorted({int(p["image_id"]) for p in preds if isinstance(p, Mapping) and is_int(p.get("image_id"))
                      and int(p["image_id"]) not in images})
    ids = ", ".join(map(str, foreign[:5])) + (" ..." if len(foreign) > 5 else "")
    gt_ids = sorted(images)
    gt_show = ", ".join(map(str, gt_ids[:5])) + (" ..." if len(gt_ids) > 5 else "")
    parts = []
    if dropped.get("unknown_image"):
        parts.append(f"{dropped['unknown_image']} name images the ground truth does not have (ids {ids})")
    if dropped.get("wrong_size"):
        parts.append(f"{dropped['wrong_size']} have masks of another size than their ground-truth image")
    raise DataError(source, f"{unmatched} of {n} predictions do not match the ground truth {ground.source}: "
                            f"{'; '.join(parts)}; its images are ids {gt_show}. Predictions and ground truth "
                            "of different splits or datasets?")


def count_beyond_cap(preds: Sequence[Mapping[str, Any]], cap: int) -> int:
    """How many predictions COCOeval ignores with at most ``cap`` detections per image and class."""
    return count_beyond_caps(preds, (cap,))[0]


def count_beyond_caps(preds: Sequence[Mapping[str, Any]], caps: Sequence[int]) -> list[int]:
    """:func:`count_beyond_cap` of each cap, from one count of the predictions per image and class."""
    per = Counter((p["image_id"], p["category_id"]) for p in preds).values()
    return [int(sum(max(0, n - cap) for n in per)) for cap in caps]


def is_int(v: Any) -> bool:
    """Whether ``v`` is an integer (Python or numpy), not a bool (the checks of ids and sizes)."""
    t = type(v)
    return t is int or (t is not bool and isinstance(v, numbers.Integral))


def _is_real(v: Any) -> bool:
    t = type(v)
    return t is float or t is int or (t is not bool and isinstance(v, numbers.Real))


def _is_finite_real(v: Any) -> bool:
    t = type(v)
    if t is float or t is int:
        return math.isfinite(v)
    return t is not bool and isinstance(v, numbers.Real) and math.isfinite(float(v))


def short_repr(x: Any, n: int = 120) -> str:
    """``repr(x)`` cut to ``n`` characters (with ``...``), for error messages quoting bad input
    (safe for values of any size or depth: :func:`cellkit.documents.short`)."""
    return short(x, n)


# --------------------------------------------------------------------------------------------
# both at once


def prepare(
    gt: Any, predictions: Any, num_classes: int | None = None, iou_type: str = "segm"
) -> tuple[GroundTruth, list[dict[str, Any]], dict[str, int]]:
    """Ground truth and sanitised predictions, read once (every evaluation function accepts them again).

    Args:
        gt: COCO ground truth (json path, dict, pycocotools ``COCO`` or :class:`GroundTruth`);
            with masks when ``iou_type`` is ``"segm"``.
        predictions: COCO result dicts, or a json path to a list of them.
        num_classes: categories ``1..num_classes`` (None: the ground truth's categories).

    Returns:
        ``(ground, kept, dropped)``: the validated ground truth, the predictions
        :func:`sanitize_predictions` keeps (fresh dicts) and the count of those it dropped, by reason.

    Raises:
        DataError: unreadable input, or most predictions of other images (:func:`check_predictions_match`).
    """
    ground = load_ground_truth(gt, num_classes, need_masks=iou_type == "segm")
    raw = load_predictions(predictions)
    kept, dropped = sanitize_predictions(raw, ground.images, num_classes, iou_type, ground.category_ids)
    check_predictions_match(raw, ground, dropped,
                            str(predictions) if isinstance(predictions, (str, os.PathLike)) else "<predictions>")
    return ground, kept, dropped


def gt_rle(ann: Mapping[str, Any], images: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The compressed RLE (str counts) of a ground-truth annotation's segmentation.

    Args:
        images: image id -> image entry with ``height`` and ``width`` (``GroundTruth.images``).
    """
    im = images[int(ann["image_id"])]
    rle = to_rle(ann["segmentation"], int(im["height"]), int(im["width"]))
    if isinstance(rle.get("counts"), bytes):
        rle = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    return rle
