"""The built-in synthetic dataset: H&E-like stained tissue with four classes of nuclei.

``write_synthetic(out, n_train, n_test, seed)`` writes the exact on-disk layout of the real
dataset (RGBA LZW tifs, float64 label maps with non-contiguous ids, no file for an absent class,
``test_release/`` with ``test_image_name_to_ids.json``), plus ``test_gt.json`` (COCO ground truth
of the test images, which the real release does not have) and ``synth_info.json``.

The four classes differ in size, shape, colour and texture (learnable, not trivial):

=====  =========  ===============================================  ==================
class  share      look                                             like
=====  =========  ===============================================  ==================
1      ~47 %      large, round-oval, pale purple-brown, granular  larger pale nuclei
2      ~49 %      small, compact, dark brown, smooth              dense dark nuclei
3      ~2 %       elongated spindle, blue-purple                  fibroblast-like
4      ~2 %       large, lobed, magenta with a dark nucleolus     rare large cells
=====  =========  ===============================================  ==================

Other class counts (``n_classes``, ``data.synth_classes``) keep the first classes of the table
and add rare classes whose styles vary those of classes 3 and 4 (size, colour, elongation), so a
2-class or a 6-class dataset is as learnable as the 4-class one.

Cells are placed in clusters, touch and crowd each other (a later cell only takes free pixels)
and run off the image border. Image sides range from tiny (~35 px) through typical (250-550 px)
to a few large ones (~1000-1300 px). Everything is deterministic for a seed.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import tifffile

from ..errors import DataError
from ..outputs import check_writable_dir, disk_errors, remove_dead_temporaries, replace_folder
from ..progress import bar
from ..structures.rle import encode_mask
from .coco import categories, write_json
from .layout import SYNTH_INFO, TEST_INDEX

SYNTH_VERSION = 1
SYNTH_CLASSES = 4
"""Classes of the synthetic dataset unless asked otherwise: it imitates the hw3 data."""


@dataclass(frozen=True)
class CellStyle:
    share: float
    radius: tuple[float, float]  # equivalent radius in px
    elongation: tuple[float, float]  # major / minor axis
    wobble: float  # boundary harmonics amplitude
    color: tuple[float, float, float]  # RGB in [0, 1]
    texture: float  # granular texture strength
    rim: float  # darker rim strength
    nucleolus: bool = False


STYLES: dict[int, CellStyle] = {
    1: CellStyle(0.47, (10.0, 13.5), (1.0, 1.5), 0.07, (0.56, 0.40, 0.42), 0.30, 0.35),
    2: CellStyle(0.49, (8.0, 10.5), (1.0, 1.3), 0.05, (0.30, 0.17, 0.16), 0.10, 0.10),
    3: CellStyle(0.02, (7.5, 9.5), (2.8, 4.0), 0.04, (0.33, 0.27, 0.52), 0.10, 0.0),
    4: CellStyle(0.02, (13.0, 17.0), (1.0, 1.3), 0.16, (0.62, 0.28, 0.55), 0.25, 0.15, nucleolus=True),
}


def class_styles(n_classes: int) -> dict[int, CellStyle]:
    """The styles of classes 1..``n_classes``: :data:`STYLES` for the first four, then rare variants."""
    styles = {k: STYLES[k] for k in range(1, min(n_classes, 4) + 1)}
    for k in range(5, n_classes + 1):
        base = STYLES[3 + (k % 2)]  # alternately spindle-like and large lobed cells
        step = (k - 3) // 2  # 1, 1, 2, 2, ...
        turn = 0.12 * step * (1 if k % 2 else -1)
        color = tuple(float(np.clip(c + turn * d, 0.05, 0.95)) for c, d in zip(base.color, (1.0, -0.6, 0.4)))
        radius = (base.radius[0] * (1 + 0.15 * step), base.radius[1] * (1 + 0.15 * step))
        styles[k] = CellStyle(base.share, radius, base.elongation, base.wobble, color, base.texture,  # type: ignore[arg-type]
                              base.rim, base.nucleolus)
    return styles


def _image_size(rng: np.random.Generator, max_size: int | None) -> tuple[int, int]:
    u = rng.random()
    if u < 0.08:
        lo, hi = 33, 90
    elif u < 0.92:
        lo, hi = 250, 560
    else:
        lo, hi = 950, 1300
    h, w = (int(rng.integers(lo, hi + 1)) for _ in range(2))
    if max_size is not None:
        h, w = min(h, max_size), min(w, max_size)
    return h, w


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with features of about ``scale`` px."""
    f = max(1, int(scale // 2))
    small = rng.standard_normal((shape[0] // f + 2, shape[1] // f + 2)).astype(np.float32)
    small = ndi.gaussian_filter(small, sigma=max(scale / f / 2, 0.5))
    big = ndi.zoom(small, f, order=1)[: shape[0], : shape[1]]
    big -= big.mean()
    return big / (big.std() + 1e-6)


def _background(rng: np.random.Generator, h: int, w: int, stain: np.ndarray) -> np.ndarray:
    base = np.array([0.93, 0.88, 0.92], dtype=np.float32) * stain
    img = np.broadcast_to(base, (h, w, 3)).copy()
    img *= 1.0 + 0.03 * _smooth_noise(rng, (h, w), 50)[..., None]
    # wavy fibres: thin ridges along the zero-crossings of smooth random fields
    for color, strength, scale in (((0.74, 0.68, 0.84), 0.45, 28), ((0.84, 0.62, 0.74), 0.35, 40)):
        field = _smooth_noise(rng, (h, w), scale)
        ridges = np.exp(-((field / 0.3) ** 2)) * np.clip(0.6 + 0.6 * _smooth_noise(rng, (h, w), 80), 0, 1)
        mix = (strength * ridges)[..., None]
        img = img * (1 - mix) + np.asarray(color, dtype=np.float32) * stain * mix
    # faint, unannotated pale nuclei out of the focal plane
    n_ghosts = int(h * w / 5000)
    ys, xs = rng.integers(0, h, n_ghosts), rng.integers(0, w, n_ghosts)
    ghost = np.zeros((h, w), dtype=np.float32)
    ghost[ys, xs] = 1.0
    ghost = ndi.gaussian_filter(ghost, 6) * 6 * 6 * 2 * np.pi
    ghost_color = np.array([0.66, 0.54, 0.62], dtype=np.float32) * stain
    g = np.clip(ghost * 0.5, 0, 0.5)[..., None]
    return img * (1 - g) + ghost_color * g


def _cell_shape(rng: np.random.Generator, style: CellStyle) -> tuple[np.ndarray, np.ndarray]:
    """A cell in its own window: (soft alpha (h, w) float32, normalised radius rho (h, w))."""
    r = rng.uniform(*style.radius)
    e = rng.uniform(*style.elongation)
    a, b = r * np.sqrt(e), r / np.sqrt(e)
    half = int(np.ceil(a * (1 + 3 * style.wobble))) + 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    yy += rng.uniform(-0.5, 0.5)
    xx += rng.uniform(-0.5, 0.5)
    th = rng.uniform(0, np.pi)
    u = xx * np.cos(th) + yy * np.sin(th)
    v = -xx * np.sin(th) + yy * np.cos(th)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    ang = np.arctan2(v / b, u / a)
    boundary = np.ones_like(rho)
    for k in range(2, 6):
        boundary += style.wobble * rng.uniform(0, 1) / (k - 1) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    alpha = np.clip((boundary - rho) * b + 0.5, 0, 1)  # ~1 px anti-aliased edge
    return alpha, rho / boundary


def _paint_cells(
    rng: np.random.Generator, img: np.ndarray, class_share: np.ndarray, stain: np.ndarray, density: float | None,
    styles: dict[int, CellStyle],
) -> tuple[np.ndarray, list[int]]:
    """Paint cells into ``img`` in place. Returns an (H, W) int32 instance map and each instance's class."""
    h, w = img.shape[:2]
    owner = np.zeros((h, w), dtype=np.int32)
    classes: list[int] = []
    if density is None:
        density = rng.uniform(0.9, 1.8) / 1000.0  # attempts per px^2
    attempts = max(1, int(density * h * w))
    n_clusters = max(1, int(h * w / 25000))
    centres = np.stack([rng.uniform(0, h, n_clusters), rng.uniform(0, w, n_clusters)], axis=1)
    spread = rng.uniform(25, 60)
    for _ in range(attempts):
        if rng.random() < 0.7:
            cy, cx = centres[rng.integers(n_clusters)] + rng.normal(0, spread, 2)
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        k = int(rng.choice(len(class_share), p=class_share)) + 1
        style = styles[k]
        alpha, rho = _cell_shape(rng, style)
        half = alpha.shape[0] // 2
        y0, x0 = int(round(cy)) - half, int(round(cx)) - half
        ys, xs = slice(max(y0, 0), min(y0 + alpha.shape[0], h)), slice(max(x0, 0), min(x0 + alpha.shape[1], w))
        if ys.stop <= ys.start or xs.stop <= xs.start:
            continue
        local = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
        a = alpha[local]
        free = owner[ys, xs] == 0
        inside = a >= 0.5
        owned = inside & free
        full_area = float((alpha >= 0.5).sum())
        if owned.sum() < max(12, 0.6 * full_area):
            continue
        a = a * free
        # colour: base with per-cell variation, granular texture and a darker rim
        color = np.asarray(style.color, dtype=np.float32) * stain * rng.uniform(0.9, 1.1, 3).astype(np.float32)
        tex = rng.standard_normal(a.shape).astype(np.float32)
        tex = ndi.gaussian_filter(tex, 0.8) * 2.0
        shade = 1.0 + style.texture * tex - style.rim * np.clip(rho[local] - 0.6, 0, 1)
        if style.nucleolus:
            shade -= 0.45 * np.exp(-(((rho[local] - rng.uniform(0.0, 0.3)) / 0.18) ** 2))
        cell = np.clip(color * shade[..., None], 0, 1)
        region = img[ys, xs]
        region[:] = region * (1 - a[..., None]) + cell * a[..., None]
        classes.append(k)
        owner[ys, xs][owned] = len(classes)
    return owner, classes


def synth_image(
    rng: np.random.Generator, h: int, w: int, density: float | None = None, n_classes: int = SYNTH_CLASSES
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One synthetic image.

    Args:
        density: cell placement attempts per px^2 (None: random, about 1 per 700 px^2).
        n_classes: classes of cells (see :func:`class_styles`).

    Returns:
        image ``(h, w, 4)`` uint8 RGBA, instance map ``(h, w)`` int32 (1..N) and the class of each instance.
    """
    stain = rng.uniform(0.92, 1.08, 3).astype(np.float32)
    styles = class_styles(n_classes)
    share = np.array([s.share for s in styles.values()])
    if n_classes >= 2:
        share[:2] = share[:2].sum() * np.array(rng.dirichlet([4, 4]))  # images differ in their 1:2 mix
    for k in range(2, n_classes):  # rare classes appear in about a third of the images, often there
        share[k] = share[k] / 0.35 if rng.random() < 0.35 else 0.0
    share /= share.sum()
    img = _background(rng, h, w, stain)
    owner, classes = _paint_cells(rng, img, share, stain, density, styles)
    img = ndi.gaussian_filter(img, (0.9, 0.9, 0))
    img += rng.normal(0, 0.015, img.shape).astype(np.float32)
    rgb = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full((h, w, 1), 255, np.uint8)], axis=-1)
    return rgba, owner, classes


def _class_maps(rng: np.random.Generator, owner: np.ndarray, classes: list[int]) -> dict[int, np.ndarray]:
    """Per-class float64 label maps with non-contiguous ids (absent classes left out)."""
    cls = np.asarray([0] + classes)
    out = {}
    for k in range(1, max(classes, default=0) + 1):
        members = np.flatnonzero(cls == k)
        if len(members) == 0:
            continue
        ids = np.sort(rng.choice(np.arange(1, 3 * len(members) + 10), len(members), replace=False)).astype(np.float64)
        lut = np.zeros(len(cls), dtype=np.float64)
        lut[members] = rng.permutation(ids)
        out[k] = lut[owner]
    return out


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63)), version=4))


def write_synthetic(
    out: str | os.PathLike[str],
    n_train: int = 40,
    n_test: int = 8,
    seed: int = 0,
    max_size: int | None = None,
    progress: bool = True,
    n_classes: int = SYNTH_CLASSES,
) -> Path:
    """Write a synthetic dataset in the real layout to ``out`` and return ``out``.

    ``out`` must be new, empty, or a previous synthetic dataset (it holds ``synth_info.json``),
    which is then replaced as a whole. The dataset is written into a temporary folder beside
    ``out`` and swapped in at the end in one step (:func:`cellkit.outputs.replace_folder`), so an
    error, a full disk, Ctrl-C or kill -9 leaves ``out`` as it was (or the whole new dataset).

    Args:
        n_train: annotated images under ``train/<uuid>/``.
        n_test: images under ``test_release/``; the first is tiny (about 33 x 35 px).
        max_size: cap on each image side (None: realistic sizes up to about 1300 px).
        n_classes: classes of cells (4 imitates the hw3 data).

    Raises:
        DataError: ``out`` is a folder with other content (a real dataset, say), or cannot be
            written (a full disk: ``no space left on device``).
    """
    out = check_writable_dir(Path(out).resolve(), "dataset folder")
    if out.is_dir() and any(out.iterdir()) and not (out / SYNTH_INFO).is_file():
        raise DataError(out, "the folder is not empty and is not a synthetic dataset written before (no "
                        "synth_info.json); refusing to write into it; choose a new or empty folder")
    remove_dead_temporaries(out.parent, out.name)  # folders of killed writers
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with disk_errors(out):
            _write_synthetic(tmp, n_train, n_test, seed, max_size, progress, n_classes)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_synthetic(out: Path, n_train: int, n_test: int, seed: int, max_size: int | None, progress: bool,
                     n_classes: int) -> None:
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "test_release").mkdir(parents=True, exist_ok=True)
    root_rng = np.random.default_rng(seed)
    names = [_uuid(root_rng) for _ in range(n_train + n_test)]
    index, test_images, test_anns = [], [], []
    for i in bar(range(n_train + n_test), desc="synthesising images", enabled=progress):
        rng = np.random.default_rng([seed, i])
        h, w = (33, 35) if i == n_train else _image_size(rng, max_size)
        rgba, owner, classes = synth_image(rng, h, w, n_classes=n_classes)
        if i < n_train:
            folder = out / "train" / names[i]
            folder.mkdir(exist_ok=True)
            tifffile.imwrite(folder / "image.tif", rgba, photometric="rgb", compression="lzw", predictor=True)
            for k, m in _class_maps(rng, owner, classes).items():
                tifffile.imwrite(folder / f"class{k}.tif", m)
        else:
            image_id = i - n_train + 1
            file_name = f"{names[i]}.tif"
            tifffile.imwrite(out / "test_release" / file_name, rgba, photometric="rgb", compression="lzw", predictor=True)
            index.append({"file_name": file_name, "id": image_id, "height": h, "width": w})
            test_images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            for inst, k in enumerate(classes, start=1):
                m = owner == inst
                rle = encode_mask(m)
                ys, xs = np.nonzero(m)
                test_anns.append({
                    "id": len(test_anns) + 1, "image_id": image_id, "category_id": k, "segmentation": rle,
                    "area": float(m.sum()), "iscrowd": 0,
                    "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
                })
    (out / TEST_INDEX).write_text(json.dumps(index, indent=1))
    write_json({"images": test_images, "annotations": test_anns, "categories": categories(n_classes)},
               out / "test_gt.json")
    info: dict[str, Any] = {"version": SYNTH_VERSION, "n_train": n_train, "n_test": n_test, "seed": seed, "max_size": max_size,
                            "n_classes": n_classes}
    (out / SYNTH_INFO).write_text(json.dumps(info))


def default_cache_dir() -> Path:
    """Where generated datasets are kept: ``$CELLKIT_CACHE`` or ``~/.cache/cellkit``."""
    return Path(os.environ.get("CELLKIT_CACHE", Path.home() / ".cache" / "cellkit"))


def ensure_synthetic(n_train: int, n_test: int, seed: int, max_size: int | None, progress: bool = True,
                     n_classes: int = SYNTH_CLASSES) -> Path:
    """The synthetic dataset for these parameters, generated into the cache on first use."""
    classes = "" if n_classes == SYNTH_CLASSES else f"-classes{n_classes}"  # the 4-class datasets keep their names
    tag = f"synth-v{SYNTH_VERSION}-train{n_train}-test{n_test}-seed{seed}-max{max_size or 'none'}{classes}"
    root = default_cache_dir() / tag
    if not (root / SYNTH_INFO).is_file():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        write_synthetic(tmp, n_train, n_test, seed, max_size, progress, n_classes)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return root
