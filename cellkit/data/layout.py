"""The dataset layout (``train/<id>/image.tif``, ``classK.tif``, ``test_release/``) and its index."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..documents import read_json, short
from ..errors import ConfigError, DataError
from .io import PathLike, tiff_shape

CLASS_FILE = re.compile(r"^class(\d+)\.tiff?$", re.IGNORECASE)
TEST_INDEX = "test_image_name_to_ids.json"
SYNTH_INFO = "synth_info.json"
"""What a synthetic dataset writes beside ``train/``: how it was made, its classes included."""


@dataclass(frozen=True)
class TrainSample:
    """One annotated image folder.

    Attributes:
        image_id: COCO image id, 1-based, in sorted folder-name order (stable across runs).
        name: the folder name.
        image_path: ``train/<name>/image.tif``.
        class_paths: class index (1-based) -> ``classK.tif``; absent classes have no entry.
    """

    image_id: int
    name: str
    image_path: Path
    class_paths: dict[int, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class TestImage:
    """One entry of ``test_image_name_to_ids.json`` with its file."""

    image_id: int
    file_name: str
    path: Path
    height: int
    width: int


def scan_train(root: PathLike, num_classes: int | None = None) -> list[TrainSample]:
    """List the annotated images under ``root/train`` (or ``root`` itself if it holds image folders).

    Args:
        num_classes: the classes a label map may belong to, ``1..num_classes`` (None: any
            ``classK.tif`` with K >= 1; :func:`num_classes_of` then says how many there are).

    Raises:
        DataError: no train folder, no image folders, a folder without image.tif, a class file
            outside 1..num_classes (or class 0).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    train = root / "train" if (root / "train").is_dir() else root
    folders = sorted(p for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(train, "no image folders found (expected train/<id>/image.tif with classK.tif label maps)")
    samples = []
    for i, folder in enumerate(folders, start=1):
        image = folder / "image.tif"
        if not image.is_file():
            if image.is_symlink():
                raise DataError(image, f"broken symbolic link (it points to {os.readlink(image)}, which does not exist)")
            raise DataError(folder, "image folder has no image.tif" if not image.exists() else "image.tif is not a file")
        classes: dict[int, Path] = {}
        for f in sorted(folder.iterdir()):
            m = CLASS_FILE.match(f.name)
            if not m:
                continue
            k = int(m.group(1))
            if k < 1 or (num_classes is not None and k > num_classes):
                raise DataError(f, f"class {k} is outside 1..{num_classes}" if num_classes is not None
                                else "class 0 is the background; classes are numbered from 1 (class1.tif ...)")
            if k in classes:
                raise DataError(f, f"two label maps for class {k} ({classes[k].name} and {f.name})")
            classes[k] = f
        samples.append(TrainSample(i, folder.name, image, classes))
    return samples


def num_classes_of(samples: list[TrainSample]) -> int:
    """The number of classes of a dataset: what its ``synth_info.json`` declares (a synthetic
    dataset), else its highest ``classK.tif`` (a class no image has in between still counts, so
    class ids keep their meaning).

    Raises:
        DataError: no image has any label map (nothing to learn from).
    """
    found = [k for s in samples for k in s.class_paths]
    if not found:
        where = samples[0].image_path.parent.parent if samples else Path(".")
        raise DataError(where, "no image folder has a label map (classK.tif): there are no cells to learn from")
    declared = declared_num_classes(samples[0].image_path.parents[2])
    return max(found) if declared is None else max(declared, max(found))


def declared_num_classes(root: PathLike) -> int | None:
    """The classes a dataset folder declares: ``synth_info.json``'s ``n_classes`` (4 for synthetic
    datasets written before it was recorded); None for a folder that declares none (real data)."""
    info = Path(root) / SYNTH_INFO
    if not info.is_file():
        return None
    try:
        n = read_json(info, "synth_info.json").get("n_classes", 4)
    except (DataError, AttributeError):
        return None
    return n if isinstance(n, int) and n >= 1 else None


def read_test_index(root: PathLike, check_files: bool = True) -> list[TestImage]:
    """Read ``test_image_name_to_ids.json`` and match it against ``test_release/``.

    Args:
        root: the dataset folder holding the json and ``test_release/``.
        check_files: verify every entry's file exists with the stated height and width, and that
            no tif in ``test_release/`` is missing from the json.

    Raises:
        DataError: unreadable json, malformed entries, duplicate ids or file names, entries that
            do not match the files.
    """
    root = Path(root).expanduser()
    index = root / TEST_INDEX
    entries = read_json(index, "test index")  # limits on size, depth and integer digits
    if not isinstance(entries, list):
        raise DataError(index, "expected a list of {file_name, id, height, width} entries")
    folder = root / "test_release"
    out: list[TestImage] = []
    seen_ids: dict[int, int] = {}
    seen_names: dict[str, int] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not {"file_name", "id", "height", "width"} <= set(e):
            raise DataError(index, f"entry {i} must have file_name, id, height and width, got {short(e)}")
        if not all(isinstance(e[k], int) and not isinstance(e[k], bool) for k in ("id", "height", "width")):
            raise DataError(index, f"entry {i}: id, height and width must be integers, got {short(e)}")
        name = e["file_name"]
        if not isinstance(name, str) or not name.strip() or Path(name).name != name or name in (".", ".."):
            raise DataError(index, f"entry {i}: file_name must be the name of a file in test_release/ (a string), "
                                   f"got {short(name)}")
        if e["height"] < 1 or e["width"] < 1:
            raise DataError(index, f"entry {i}: height and width must be at least 1, got {e['height']} x {e['width']}")
        if e["id"] in seen_ids:
            raise DataError(index, f"duplicate id {e['id']} (entries {seen_ids[e['id']]} and {i})")
        if e["file_name"] in seen_names:
            raise DataError(index, f"duplicate file_name {short(e['file_name'])} (entries {seen_names[e['file_name']]} and {i})")
        seen_ids[e["id"]] = i
        seen_names[e["file_name"]] = i
        out.append(TestImage(e["id"], e["file_name"], folder / e["file_name"], e["height"], e["width"]))
    if check_files:
        if not folder.is_dir():
            raise DataError(folder, "test image folder not found")
        for i, t in enumerate(out):
            if not t.path.is_file():
                if t.path.is_symlink():
                    raise DataError(t.path, f"broken symbolic link (it points to {os.readlink(t.path)}, which does not exist)")
                raise DataError(index, f"entry {i} names {t.file_name}, which is not in {folder}")
            h, w = tiff_shape(t.path)
            if (h, w) != (t.height, t.width):
                raise DataError(t.path, f"image is {h} x {w} but {TEST_INDEX} entry {i} says {t.height} x {t.width}")
        listed = set(seen_names)
        extra = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".tif", ".tiff") and p.name not in listed)
        if extra:
            raise DataError(folder, f"{len(extra)} test image(s) missing from {TEST_INDEX}: {', '.join(extra[:5])}")
    return out


def split_samples(
    samples: list[TrainSample], val_fraction: float, seed: int = 0, holdout_fraction: float = 0.0
) -> tuple[list[TrainSample], list[TrainSample]]:
    """Deterministic train/validation split: the same seed always gives the same split.

    At least one image goes to validation when ``val_fraction > 0`` and there are two or more
    images; no image is ever in both parts. Order within each part follows ``image_id``. With
    ``holdout_fraction`` the hold-out images (:func:`split_holdout`) are left out of the training part.

    Raises:
        ConfigError: ``val_fraction`` outside [0, 1) (a ``ValueError`` too).
    """
    train, val, _ = split_holdout(samples, val_fraction, holdout_fraction, seed)
    return train, val


def split_holdout(
    samples: list[TrainSample], val_fraction: float, holdout_fraction: float, seed: int = 0
) -> tuple[list[TrainSample], list[TrainSample], list[TrainSample]]:
    """Training, validation and hold-out images: one permutation of the images from ``seed``, its first
    ``val_fraction`` validation (the same images whatever the hold-out), the next ``holdout_fraction``
    held out, the rest training. Disjoint and deterministic; order within each part follows ``image_id``.

    A hold-out fraction above 0 holds out at least one image while two are left for training and
    validation; training always keeps one image.

    Raises:
        ConfigError: a fraction outside [0, 1), or the two together leaving nothing to train on.
    """
    if not 0 <= val_fraction < 1:  # NaN fails too
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
    if not 0 <= holdout_fraction < 1:
        raise ConfigError(f"data.holdout_fraction: must be in [0, 1), got {holdout_fraction}")
    n = len(samples)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    n_hold = int(round(n * holdout_fraction))
    if holdout_fraction > 0 and n - n_val >= 2:
        n_hold = min(max(n_hold, 1), n - n_val - 1)
    elif holdout_fraction > 0:
        raise ConfigError(f"data.holdout_fraction: {n} image(s) with {n_val} for validation leave none to hold out "
                          f"and train on")
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    hold_idx = set(order[n_val:n_val + n_hold].tolist())
    train = [s for i, s in enumerate(samples) if i not in val_idx and i not in hold_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    holdout = [s for i, s in enumerate(samples) if i in hold_idx]
    return train, val, holdout
