"""The built-in synthetic dataset: the real layout, learnable classes, determinism."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellkit.data import load_sample, read_test_index, scan_train, write_synthetic
from cellkit.data.synth import _image_size, synth_image


def test_layout_matches_the_real_dataset(synth_root: Path, fixture_root: Path) -> None:
    samples = scan_train(synth_root)
    assert len(samples) == 8
    real = tifffile.TiffFile(fixture_root / "train/sample-0001/image.tif")
    for s in samples:
        with tifffile.TiffFile(s.image_path) as t:
            page = t.pages[0]
            assert page.shape[-1] == 4 and page.dtype == np.uint8
            assert page.compression == real.pages[0].compression  # LZW
            assert (t.asarray()[..., 3] == 255).all()
        for path in s.class_paths.values():
            m = tifffile.imread(path)
            assert m.dtype == np.float64
            ids = np.unique(m)[1:]
            assert len(ids) and not np.array_equal(ids, np.arange(1, len(ids) + 1))  # non-contiguous
    real.close()
    # a class absent from an image has no file
    assert any(len(s.class_paths) < 4 for s in samples)
    tests = read_test_index(synth_root)  # validates files against the json
    assert len(tests) == 3 and (tests[0].height, tests[0].width) == (33, 35)
    gt = json.loads((synth_root / "test_gt.json").read_text())
    assert {i["id"] for i in gt["images"]} == {t.image_id for t in tests}


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = write_synthetic(tmp_path / "a", 2, 1, seed=11, max_size=128, progress=False)
    b = write_synthetic(tmp_path / "b", 2, 1, seed=11, max_size=128, progress=False)
    c = write_synthetic(tmp_path / "c", 2, 1, seed=12, max_size=128, progress=False)
    sa, sb, sc = scan_train(a), scan_train(b), scan_train(c)
    assert [s.name for s in sa] == [s.name for s in sb] != [s.name for s in sc]
    for x, y in zip(sa, sb):
        assert np.array_equal(tifffile.imread(x.image_path), tifffile.imread(y.image_path))
        assert x.class_paths.keys() == y.class_paths.keys()


@pytest.mark.slow
def test_classes_are_imbalanced_and_differ_in_size_and_colour() -> None:
    counts = np.zeros(5)
    area = {k: [] for k in range(1, 5)}
    colour = {k: [] for k in range(1, 5)}
    for i in range(12):
        rng = np.random.default_rng([0, i])
        rgba, owner, classes = synth_image(rng, 320, 320)
        cls = np.asarray([0] + classes)
        sizes = np.bincount(owner.ravel(), minlength=len(cls))
        for inst in range(1, len(cls)):
            area[cls[inst]].append(sizes[inst])
            colour[cls[inst]].append(rgba[owner == inst, :3].mean(0))
        counts += np.bincount(cls[1:], minlength=5)
    share = counts[1:] / counts[1:].sum()
    assert 0.35 < share[0] < 0.6 and 0.35 < share[1] < 0.6
    assert 0.005 < share[2] < 0.05 and 0.005 < share[3] < 0.05
    med = {k: np.median(v) for k, v in area.items()}
    assert med[4] > med[1] > med[2]  # class 4 largest, class 2 smaller than class 1
    mean_rgb = {k: np.mean(v, axis=0) for k, v in colour.items()}
    assert mean_rgb[2].sum() < mean_rgb[1].sum()  # class 2 darker
    assert mean_rgb[3][2] > mean_rgb[3][0]  # class 3 bluish
    assert mean_rgb[4][0] > mean_rgb[2][0] + 0.1 * 255  # class 4 magenta, brighter red than class 2


def test_cells_touch_and_crowd() -> None:
    rng = np.random.default_rng(5)
    _, owner, classes = synth_image(rng, 300, 300)
    assert len(classes) > 60
    a, b = owner[:, :-1], owner[:, 1:]
    touching = (a > 0) & (b > 0) & (a != b)
    assert touching.sum() > 50


def test_image_sizes_span_tiny_to_large() -> None:
    rng = np.random.default_rng(0)
    sides = np.array([max(_image_size(rng, None)) for _ in range(400)])
    assert (sides < 100).mean() > 0.03
    assert ((sides >= 250) & (sides <= 560)).mean() > 0.6
    assert (sides > 1000).mean() > 0.02
    assert max(_image_size(rng, 200)) <= 200


def test_fixture_and_synthetic_share_instance_scale(synth_root: Path, fixture_root: Path) -> None:
    _, real = load_sample(scan_train(fixture_root)[0])
    real_area = np.median(np.bincount(real.layers[0].ravel())[1:])
    syn = [np.bincount(load_sample(s)[1].layers[0].ravel())[1:] for s in scan_train(synth_root)]
    syn_area = np.median(np.concatenate([a[a > 0] for a in syn]))
    assert 0.5 < syn_area / real_area < 2
