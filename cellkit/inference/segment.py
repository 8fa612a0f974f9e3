"""Your own images: segment any TIFF/PNG with a trained checkpoint and write what the field's tools
read (``cellkit segment``).

Per image ``NAME`` (the file name without its suffix), into ``OUT/NAME/``:

* ``labels``: ``image.tif`` (the image as read, its own dtype) and ``class1.tif`` .. ``classK.tif``
  float64 label maps (0 background, each distinct value one cell; no file for a class without
  cells): the training layout, so ``OUT`` can be corrected and trained on (``--data OUT``);
* ``overlay``: ``overlay.png``, the cells' outlines in the class colours on the image;
* ``csv``: ``cells.csv``, one row of measurements per cell (:mod:`cellkit.inference.measure`);
* ``rois``: ``rois.zip``, an ImageJ / Fiji ROI set (:mod:`cellkit.inference.imagej`);
* ``geojson``: ``cells.geojson`` for QuPath (:mod:`cellkit.inference.qupath`);
* always ``segment.json``: where the image came from, the checkpoint, thresholds, intensity
  mapping, scale, tiles and the number of cells.

The pipeline of one image: read it without changing its values (16-bit stays 16-bit,
:func:`cellkit.data.io.read_image`), map it to [0, 1] as the model was trained
(``data.intensity`` from the checkpoint), predict with :func:`cellkit.inference.predict.predict_image`
(tiles of at most ``predict.tile_size`` above ``predict.tile_above``, overlapping by the largest cell
the model was trained on, ``predict.tile_batch`` per forward; the model's own transform applies its
``model.scale``; ``predict.score_thresh`` and ``predict.mask_thresh`` applied and each tile's
masks RLE-encoded as it is predicted, cross-tile duplicates removed), then one cell per pixel
(:func:`cellkit.inference.cells.claim_pixels`). Memory: masks stay at the mask head's ``M x M``
size until each is pasted into its own box and RLE-encoded; the full-size arrays are the image,
the ``int32`` label image and one class map at a time.

Outputs are never half-written: each image's files go into a hidden temporary folder beside the
target, which is renamed into place when complete (an existing folder is replaced only with
``overwrite``; all are checked before any work). A file that cannot be read is skipped and named.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import tifffile
from PIL import Image
from torch import nn

from ..config import Config
from ..data import image_to_tensor, read_image
from ..data.intensity import Intensity
from ..data.io import IMAGE_SUFFIXES
from ..errors import ConfigError, DataError
from ..models.checkpoint import model_from_checkpoint
from ..models.devices import resolve_device
from ..outputs import check_writable_dir, disk_errors, remove_dead_temporaries, replace_folder
from ..progress import bar
from ..structures.coco_results import DropCounts
from ..structures.label_maps import MaskRegion
from ..viz.overlay import render
from .cells import cells_from_coco, claim_pixels, class_label_maps
from .imagej import write_imagej_rois
from .measure import measure_cells, measurements_csv
from .predict import Models, image_tiles, predict_image, tile_overlap, tta_views
from .qupath import cell_features, geojson_text
from .submit import prediction_overrides

FORMATS = ("labels", "overlay", "csv", "rois", "geojson")
"""What ``cellkit segment`` can write per image (all by default)."""
FILES = {"labels": "image.tif + classK.tif", "overlay": "overlay.png", "csv": "cells.csv", "rois": "rois.zip",
         "geojson": "cells.geojson"}
PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------
# one image


@dataclass
class Segmentation:
    """The cells of one image.

    Attributes:
        name: the image's name (its file name without suffix).
        image: ``(H, W, 3)`` uint8 / uint16, the image as read.
        cells: non-overlapping box-region masks, ``instance_id`` 1..N by descending score,
            ``label`` 1..K, ``score``.
        label_image: ``(H, W)`` int32, ``n`` where cell ``n`` is (0 background).
        class_names: ``class1`` .. ``classK``.
        intensity: how ``image`` became the model's input.
        tiles: the tiles it was predicted in (1: whole).
        seconds: prediction and post-processing time.
        counts: detections dropped (non-finite, empty masks); ``duplicates``: cells dropped by
            :func:`~cellkit.inference.cells.claim_pixels`.
    """

    name: str
    image: np.ndarray
    cells: list[MaskRegion]
    label_image: np.ndarray
    class_names: list[str]
    intensity: Intensity
    tiles: int = 1
    seconds: float = 0.0
    counts: DropCounts = field(default_factory=DropCounts)
    duplicates: int = 0

    def measurements(self) -> list[dict[str, Any]]:
        """One row per cell (:func:`cellkit.inference.measure.measure_cells`)."""
        return measure_cells(self.image, self.cells, self.class_names, self.name)

    def label_maps(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(class k, (H, W) float64 label map)`` for each class with cells."""
        return class_label_maps(self.label_image, self.cells)

    def overlay(self, mode: str = "outline") -> np.ndarray:
        """``(H, W, 3)`` uint8: the cells drawn on the image as the model saw it."""
        return render(self.intensity.apply(self.image), self.cells, mode=mode)


def count_tiles(models: Models, cfg: Config, height: int, width: int) -> int:
    """How many tiles :func:`~cellkit.inference.predict.detect` cuts a ``height x width`` image into."""
    tiles = image_tiles(models, cfg.predict, height, width)
    return 1 if tiles is None else len(tiles)


@contextlib.contextmanager
def tile_progress(models: Models, total: int, enabled: bool = True, desc: str = "tiles") -> Iterator[None]:
    """A progress bar that advances with every image the models' backbones see (tiles x views x
    models); ``detect`` has no callback, so a forward hook counts the batches."""
    mods = [models] if isinstance(models, nn.Module) else list(models)
    with bar(total=total, desc=desc, enabled=enabled, unit="tile") as pbar:

        def count(_module: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
            pbar.update(int(inputs[0].shape[0]))  # returns None: a hook's return value would replace the output

        hooks = [m.backbone.register_forward_hook(count) for m in mods]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()


def predict_cells(models: Models, image: np.ndarray, cfg: Config, progress: bool = True,
                  counts: DropCounts | None = None) -> tuple[list[MaskRegion], int]:
    """The model's cells of one image before one-cell-per-pixel:
    :func:`~cellkit.inference.predict.predict_image` (tiled above ``predict.tile_above``, each
    tile thresholded and encoded as it is predicted, cross-tile duplicates), each mask decoded
    into its box.

    Args:
        image: ``(H, W, 3)`` uint8 / uint16 raw image; mapped by ``cfg.data.intensity``.
        counts: tally of dropped detections, updated in place.

    Returns:
        (cells by the model's order, possibly overlapping; the number of tiles).
    """
    intensity = Intensity.from_config(cfg.data)
    n_tiles = count_tiles(models, cfg, int(image.shape[0]), int(image.shape[1]))
    n_views = len(tta_views(cfg.predict)) * (1 if isinstance(models, nn.Module) else len(models))
    with tile_progress(models, n_tiles * n_views, progress and n_tiles > 1):
        entries = predict_image(models, image_to_tensor(intensity.apply(image)), cfg.predict, counts=counts)
    return cells_from_coco(entries), n_tiles


def segment_array(models: Models, image: np.ndarray, cfg: Config, name: str = "", progress: bool = True) -> Segmentation:
    """Segment one image.

    Args:
        models: a model (or an ensemble) in eval mode, e.g. from :func:`load_segmenter`.
        image: ``(H, W, 3)`` uint8 / uint16 raw image (:func:`cellkit.data.io.read_image`).
        cfg: the checkpoint's config (``data.intensity*``, ``predict.*``, ``model.num_classes``).
        progress: a bar over tiles when the image is tiled.
    """
    start = time.perf_counter()
    intensity = Intensity.from_config(cfg.data)
    h, w = int(image.shape[0]), int(image.shape[1])
    counts = DropCounts()
    found, n_tiles = predict_cells(models, image, cfg, progress, counts)
    cells, owner = claim_pixels(found, (h, w), cfg.predict.min_kept)
    num_classes = int(cfg.model.num_classes or max([c.label for c in cells], default=1))
    return Segmentation(name, image, cells, owner, [f"class{k}" for k in range(1, num_classes + 1)], intensity,
                        n_tiles, time.perf_counter() - start, counts, len(found) - len(cells))


# --------------------------------------------------------------------------------------------
# writing one image's folder


def write_segmentation(seg: Segmentation, folder: PathLike, formats: Sequence[str] = FORMATS,
                       info: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``seg``'s outputs into ``folder`` as one change: a hidden temporary folder beside it,
    renamed into place when every file is written (an error or a kill leaves the old folder, or
    none, and at most a hidden ``.NAME.tmp<pid>`` folder that the next run removes).

    Args:
        formats: a subset of :data:`FORMATS`.
        info: extra entries for ``segment.json`` (checkpoint, settings).
        overwrite: replace an existing ``folder``; without it an existing folder is an error.

    Raises:
        DataError: ``folder`` exists and ``overwrite`` is False.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise DataError(folder, "already exists; pass --overwrite (overwrite=True) to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(folder.parent, folder.name)  # what a killed run left (live runs' are kept)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    tmp.mkdir()
    try:
        with disk_errors(folder):  # a full disk: one line, the old folder kept
            _write_files(seg, tmp, formats, info or {})
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_files(seg: Segmentation, folder: Path, formats: Sequence[str], info: dict[str, Any]) -> None:
    rows = seg.measurements() if {"csv", "geojson"} & set(formats) else []
    if "labels" in formats:
        tifffile.imwrite(folder / "image.tif", seg.image, photometric="rgb", compression="zlib")
        for k, label_map in seg.label_maps():
            tifffile.imwrite(folder / f"class{k}.tif", label_map, compression="zlib")
            del label_map
    if "overlay" in formats:
        buf = io.BytesIO()
        Image.fromarray(seg.overlay()).save(buf, format="PNG", optimize=True)
        (folder / "overlay.png").write_bytes(buf.getvalue())
    if "csv" in formats:
        (folder / "cells.csv").write_text(measurements_csv(rows))
    if "rois" in formats:
        write_imagej_rois(seg.cells, folder / "rois.zip", seg.class_names)
    if "geojson" in formats:
        (folder / "cells.geojson").write_text(geojson_text(cell_features(seg.cells, seg.class_names, rows, seg.name)))
    per_class = np.bincount([c.label for c in seg.cells], minlength=len(seg.class_names) + 1)[1:]
    meta = {
        **info, "image": seg.name, "height": int(seg.image.shape[0]), "width": int(seg.image.shape[1]),
        "dtype": str(seg.image.dtype), "intensity": seg.intensity.describe(), "cells": len(seg.cells),
        "cells_per_class": {n: int(v) for n, v in zip(seg.class_names, per_class)},
        "dropped": {"nonfinite": seg.counts.nonfinite, "empty": seg.counts.empty, "duplicates": seg.duplicates},
        "tiles": seg.tiles, "seconds": round(seg.seconds, 3), "formats": list(formats),
    }
    (folder / "segment.json").write_text(json.dumps(meta, indent=2))


# --------------------------------------------------------------------------------------------
# many images


def expand_inputs(items: Sequence[PathLike]) -> list[Path]:
    """The image files of command-line items: files, folders (their ``.tif``/``.tiff``/``.png``
    files, not recursive) and glob patterns (``**`` recurses), in order, each once.

    Raises:
        DataError: an item that does not exist, a file of another kind, a folder or pattern
            without images, or nothing at all.
    """
    out: dict[Path, None] = {}
    for item in items:
        text = os.path.expanduser(os.fspath(item))
        p = Path(text)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
                           and not f.is_dir())
            if not found:
                raise DataError(p, "folder holds no TIFF or PNG image (.tif, .tiff, .png)")
        elif os.path.lexists(p):  # a file (or a broken link: named when it cannot be read)
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(p, "not a TIFF or PNG image (.tif, .tiff, .png)")
            found = [p]
        elif glob.has_magic(text):
            found = sorted(Path(f) for f in glob.glob(text, recursive=True)
                           if Path(f).suffix.lower() in IMAGE_SUFFIXES and not Path(f).is_dir())
            if not found:
                raise DataError(text, "the pattern matches no TIFF or PNG image")
        else:
            raise DataError(p, "file not found")
        for f in found:
            out.setdefault(f, None)
    if not out:
        raise DataError(".", "no images given")
    return list(out)


def image_names(paths: Sequence[Path]) -> list[str]:
    """The output folder name of each image (its file name without suffix).

    Raises:
        DataError: two images would share a folder (``a/x.tif`` and ``b/x.png``).
    """
    seen: dict[str, Path] = {}
    for p in paths:
        name = p.stem
        if name in seen:
            raise DataError(p, f"has the same name as {seen[name]}; both would be written to {name}/ "
                               f"(segment them into different --out folders)")
        seen[name] = p
    return list(seen)


def load_segmenter(checkpoint: PathLike, device: str = "auto", set_items: Sequence[str] = (),
                   use_thresholds: bool = True) -> tuple[nn.Module, Config]:
    """The checkpoint's model (eval mode, on ``device``) and its config with the run's tuned
    thresholds (``thresholds.json`` beside it, when present) and ``set_items`` applied."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise DataError(path, "checkpoint not found")
    overrides, _ = prediction_overrides(path, set_items, use_thresholds=use_thresholds)
    model, cfg, _ = model_from_checkpoint(path, resolve_device(device), overrides)
    return model, cfg


@dataclass
class SegmentReport:
    """What :func:`segment_images` did: the folders written and the files skipped (path, problem)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cells: int = 0
    megapixels: float = 0.0
    seconds: float = 0.0


def segment_images(
    inputs: Sequence[PathLike], checkpoint: PathLike, out: PathLike, formats: Sequence[str] = FORMATS,
    overwrite: bool = False, set_items: Sequence[str] = (), device: str = "auto", use_thresholds: bool = True,
    progress: bool = True, log: Any = print,
) -> SegmentReport:
    """Segment image files with a checkpoint and write each one's outputs to ``out/NAME/``.

    Args:
        inputs: files, folders and glob patterns (:func:`expand_inputs`).
        formats: a subset of :data:`FORMATS`.
        overwrite: replace existing ``out/NAME/`` folders (otherwise any is an error, before work).
        set_items: ``KEY=VALUE`` config overrides (``predict.score_thresh=0.5`` ...).

    Returns:
        a :class:`SegmentReport`; an image that cannot be read is skipped (named in
        ``skipped`` and in the log), the others are written.

    Raises:
        DataError: missing inputs, clashing names, existing outputs without ``overwrite``, an
            unwritable ``out``, a bad checkpoint. ConfigError: an unknown format or key.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--formats: {', '.join(unknown) or 'none given'}; choose from {', '.join(FORMATS)}")
    paths = expand_inputs(inputs)
    names = image_names(paths)
    out = check_writable_dir(out)
    existing = [out / n for n in names if os.path.lexists(out / n)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise DataError(existing[0], f"already exists{more}; pass --overwrite to replace the outputs of these images")
    model, cfg = load_segmenter(checkpoint, device, set_items, use_thresholds)
    pc = cfg.predict
    info = {
        "checkpoint": str(Path(checkpoint).expanduser().resolve()),
        "score_thresh": pc.score_thresh, "mask_thresh": pc.mask_thresh, "nms_thresh": pc.nms_thresh,
        "min_kept": pc.min_kept, "tta": pc.tta, "tile_size": pc.tile_size, "tile_above": pc.tile_above,
        "tile_overlap": tile_overlap(model, pc), "tile_batch": pc.tile_batch,
        "resize_mode": cfg.model.resize_mode, "scale": cfg.model.scale,
    }
    log(f"segmenting {len(paths)} image(s) with {Path(checkpoint).name}: score_thresh={pc.score_thresh} "
        f"mask_thresh={pc.mask_thresh} intensity: {Intensity.from_config(cfg.data).describe()}; "
        f"model.scale {cfg.model.scale} ({cfg.model.resize_mode})")
    report = SegmentReport()
    start = time.perf_counter()
    for path, name in bar(list(zip(paths, names)), desc="images", enabled=progress and len(paths) > 1, unit="img"):
        try:
            image = read_image(path)
        except DataError as e:
            report.skipped.append((str(path), e.problem))
            log(f"skipped {path}: {e.problem}")
            continue
        seg = segment_array(model, image, cfg, name, progress)
        folder = write_segmentation(seg, out / name, formats, {**info, "source": str(path.resolve())}, overwrite)
        report.written.append(folder)
        report.cells += len(seg.cells)
        report.megapixels += image.shape[0] * image.shape[1] / 1e6
        log(f"{name}: {len(seg.cells)} cells, {image.shape[1]} x {image.shape[0]} px"
            f"{f' in {seg.tiles} tiles' if seg.tiles > 1 else ''}, {seg.seconds:.1f} s -> {folder}")
    report.seconds = time.perf_counter() - start
    log(f"wrote {len(report.written)} image folder(s) to {out} ({report.cells} cells)"
        + (f"; skipped {len(report.skipped)} unreadable file(s)" if report.skipped else ""))
    return report
