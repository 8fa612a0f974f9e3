"""Reading the real sample and every kind of bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile

from cellkit.data import load_sample, read_image, read_label_map, read_test_index, scan_train
from cellkit.errors import DataError

SAMPLE = "train/sample-0001"


def test_real_fixture_image(fixture_root: Path) -> None:
    img = read_image(fixture_root / SAMPLE / "image.tif")
    assert img.shape == (397, 482, 3) and img.dtype == np.uint8
    np.testing.assert_allclose(img.reshape(-1, 3).mean(0) / 255, [0.687, 0.592, 0.627], atol=1e-3)


def test_real_fixture_instances_come_from_ids_not_components(fixture_root: Path) -> None:
    (sample,) = scan_train(fixture_root)
    assert sample.class_paths.keys() == {1, 2}  # classes 3 and 4 have no file
    _, maps = load_sample(sample)
    assert maps.class_counts(4).tolist() == [2, 159, 0, 0]
    # splitting the class-2 foreground into connected components would merge touching cells
    raw = read_label_map(fixture_root / SAMPLE / "class2.tif")
    assert ndi.label(raw > 0)[1] == 145
    assert len(np.unique(raw)) - 1 == 159
    # ids are float64 on disk and not contiguous
    assert tifffile.imread(fixture_root / SAMPLE / "class2.tif").dtype == np.float64
    ids = np.unique(raw)[1:]
    assert ids.min() == 3 and ids.max() == 161


def test_packing_keeps_every_pixel_of_every_instance(fixture_root: Path) -> None:
    (sample,) = scan_train(fixture_root)
    _, maps = load_sample(sample)
    for k, path in sample.class_paths.items():
        raw = read_label_map(path)
        for rid in np.unique(raw)[1:]:
            pix = raw == rid
            owners = [np.unique(layer[pix]) for layer in maps.layers]
            hit = [o for o in owners if len(o) == 1 and o[0] > 0]
            assert len(hit) == 1 and maps.labels[hit[0][0]] == k
            assert (np.concatenate([layer[pix] for layer in maps.layers]) > 0).sum() == pix.sum()


@pytest.mark.parametrize("layout", ["grey", "rgb", "rgba", "uint16", "planar", "grey_alpha", "float"])
def test_image_layouts(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "image.tif"
    if layout == "grey":
        tifffile.imwrite(path, rgb[..., 0])
        expect = np.repeat(rgb[..., :1], 3, -1)
    elif layout == "rgb":
        tifffile.imwrite(path, rgb, photometric="rgb")
        expect = rgb
    elif layout == "rgba":
        tifffile.imwrite(path, np.dstack([rgb, np.full((20, 30), 7, np.uint8)]), photometric="rgb", compression="lzw")
        expect = rgb
    elif layout == "grey_alpha":
        tifffile.imwrite(path, np.dstack([rgb[..., 0], rgb[..., 1]]), photometric="minisblack", planarconfig="contig")
        expect = np.repeat(rgb[..., :1], 3, -1)
    elif layout == "uint16":
        tifffile.imwrite(path, rgb.astype(np.uint16) * 257, photometric="rgb")
        expect = rgb.astype(np.uint16) * 257
    elif layout == "planar":
        tifffile.imwrite(path, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
        expect = rgb
    else:
        tifffile.imwrite(path, rgb.astype(np.float32) / 255, photometric="rgb")
        expect = np.round(rgb.astype(np.float32) / 255 * 65535).astype(np.uint16)
    img = read_image(path)
    assert img.shape == (20, 30, 3) and img.dtype == expect.dtype
    np.testing.assert_array_equal(img, expect)


@pytest.mark.parametrize("cut", [100, 0.5])
def test_truncated_image(fixture_copy: Path, cut: float) -> None:
    path = fixture_copy / SAMPLE / "image.tif"
    data = path.read_bytes()
    path.write_bytes(data[: int(cut if cut > 1 else len(data) * cut)])
    with pytest.raises(DataError, match="image.tif") as e:
        read_image(path)
    assert "truncated" in str(e.value)


def test_truncated_pixel_data(tmp_path: Path) -> None:
    # header and directory intact, compressed strips cut off half way
    path = tmp_path / "image.tif"
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    tifffile.imwrite(path, rgb, photometric="rgb", compression="lzw", rowsperstrip=8)
    with tifffile.TiffFile(path) as t:
        assert t.pages[0].offset < t.pages[0].dataoffsets[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"image.tif: cannot read TIFF .* truncated"):
        read_image(path)


def test_not_a_tiff_and_missing(tmp_path: Path) -> None:
    bad = tmp_path / "image.tif"
    bad.write_text("hello")
    with pytest.raises(DataError, match=r"image.tif: cannot read TIFF"):
        read_image(bad)
    with pytest.raises(DataError, match="file not found"):
        read_image(tmp_path / "missing.tif")


def _write_map(path: Path, arr: np.ndarray) -> None:
    tifffile.imwrite(path, arr)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: m[:-1], "label map is 396 x 482 .* image is 397 x 482"),
        (lambda m: np.where(m == 5, np.nan, m), "NaN"),
        (lambda m: np.where(m == 5, -5.0, m), "negative ids"),
        (lambda m: np.where(m == 5, 5.5, m), "non-integer ids"),
        (lambda m: np.where(m == 5, np.inf, m), "infinite"),
    ],
)
def test_bad_label_maps(fixture_copy: Path, make, message: str) -> None:
    path = fixture_copy / SAMPLE / "class2.tif"
    _write_map(path, make(tifffile.imread(path)))
    (sample,) = scan_train(fixture_copy)
    with pytest.raises(DataError, match=message) as e:
        load_sample(sample)
    assert str(path) in str(e.value)


def test_integer_label_maps_are_accepted(fixture_copy: Path) -> None:
    path = fixture_copy / SAMPLE / "class2.tif"
    _write_map(path, tifffile.imread(path).astype(np.uint16))
    (sample,) = scan_train(fixture_copy)
    assert load_sample(sample)[1].class_counts(4).tolist() == [2, 159, 0, 0]


def test_folder_problems(fixture_copy: Path, tmp_path: Path) -> None:
    (fixture_copy / "train" / "empty-folder").mkdir()
    with pytest.raises(DataError, match="empty-folder: image folder has no image.tif"):
        scan_train(fixture_copy)
    shutil.rmtree(fixture_copy / "train" / "empty-folder")
    shutil.copy(fixture_copy / SAMPLE / "class1.tif", fixture_copy / SAMPLE / "class5.tif")
    with pytest.raises(DataError, match=r"class5.tif: class 5 is outside 1..4"):
        scan_train(fixture_copy, 4)
    assert {k for s in scan_train(fixture_copy) for k in s.class_paths} == {1, 2, 5}  # no number given: any class
    (tmp_path / "nodata" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no image folders"):
        scan_train(tmp_path / "nodata")
    with pytest.raises(DataError, match="dataset folder not found"):
        scan_train(tmp_path / "absent")


def _test_layout(root: Path, entries: list[dict], files: dict[str, tuple[int, int]]) -> Path:
    (root / "test_release").mkdir(parents=True, exist_ok=True)
    for name, (h, w) in files.items():
        tifffile.imwrite(root / "test_release" / name, np.zeros((h, w, 4), np.uint8), photometric="rgb")
    (root / "test_image_name_to_ids.json").write_text(json.dumps(entries))
    return root


def test_test_index_ok(tmp_path: Path) -> None:
    root = _test_layout(tmp_path, [{"file_name": "a.tif", "id": 1, "height": 33, "width": 35},
                                   {"file_name": "b.tif", "id": 7, "height": 10, "width": 12}],
                        {"a.tif": (33, 35), "b.tif": (10, 12)})
    idx = read_test_index(root)
    assert [(t.image_id, t.file_name, t.height, t.width) for t in idx] == [(1, "a.tif", 33, 35), (7, "b.tif", 10, 12)]


def test_real_test_index_parses(fixture_root: Path) -> None:
    idx = read_test_index(fixture_root, check_files=False)
    assert len(idx) == 101 and {t.image_id for t in idx} == set(range(1, 102))
    assert min(t.height for t in idx) == 33 and min(t.width for t in idx) == 35


@pytest.mark.parametrize(
    "entries, files, message",
    [
        ([{"file_name": "a.tif", "id": 1, "height": 33, "width": 35}], {}, "entry 0 names a.tif, which is not in"),
        ([{"file_name": "a.tif", "id": 1, "height": 30, "width": 35}], {"a.tif": (33, 35)}, "image is 33 x 35 but .* says 30 x 35"),
        ([{"file_name": "a.tif", "id": 1, "height": 33, "width": 35}], {"a.tif": (33, 35), "b.tif": (5, 5)}, "missing from .*: b.tif"),
        ([{"file_name": "a.tif", "id": 1, "height": 33, "width": 35}, {"file_name": "b.tif", "id": 1, "height": 5, "width": 5}],
         {"a.tif": (33, 35), "b.tif": (5, 5)}, "duplicate id 1"),
        ([{"file_name": "a.tif", "id": 1, "height": 33, "width": 35}, {"file_name": "a.tif", "id": 2, "height": 33, "width": 35}],
         {"a.tif": (33, 35)}, "duplicate file_name"),
        ([{"file_name": "a.tif", "id": "1", "height": 33, "width": 35}], {"a.tif": (33, 35)}, "must be integers"),
        ([{"file_name": "a.tif"}], {"a.tif": (33, 35)}, "must have file_name, id, height and width"),
    ],
)
def test_test_index_problems(tmp_path: Path, entries: list[dict], files: dict, message: str) -> None:
    root = _test_layout(tmp_path, entries, files)
    with pytest.raises(DataError, match=message):
        read_test_index(root)


def test_test_index_not_json(tmp_path: Path) -> None:
    (tmp_path / "test_image_name_to_ids.json").write_text("[{")
    with pytest.raises(DataError, match="test_image_name_to_ids.json: not valid JSON"):
        read_test_index(tmp_path)
