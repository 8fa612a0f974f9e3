"""COCO conversion: valid files, exact round trip of every instance, deterministic split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cellkit.data import convert, read_label_map, scan_train, split_samples
from cellkit.structures.rle import encode_mask, encode_region


def _check_round_trip(root: Path, gt_path: Path) -> int:
    coco = COCO(str(gt_path))
    samples = {s.image_id: s for s in scan_train(root)}
    checked = 0
    for img in coco.dataset["images"]:
        s = samples[img["id"]]
        assert img["file_name"] == f"{s.name}/image.tif"
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        expected = {}
        for k, p in s.class_paths.items():
            raw = read_label_map(p)
            for rid in np.unique(raw)[1:]:
                expected.setdefault(k, []).append(raw == rid)
        assert len(anns) == sum(len(v) for v in expected.values())
        for ann in anns:
            assert isinstance(ann["segmentation"]["counts"], str)
            assert ann["iscrowd"] == 0
            m = coco.annToMask(ann).astype(bool)
            assert m.shape == (img["height"], img["width"])
            matches = [i for i, e in enumerate(expected[ann["category_id"]]) if np.array_equal(e, m)]
            assert len(matches) == 1, "decoded mask is not exactly one instance of its class"
            expected[ann["category_id"]].pop(matches[0])
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["area"] == m.sum()
            checked += 1
        assert all(len(v) == 0 for v in expected.values())
    return checked


@pytest.mark.slow
def test_convert_real_fixture_round_trip(fixture_root: Path, tmp_path: Path) -> None:
    train, val = convert(fixture_root, tmp_path, val_fraction=0.0, progress=False)
    assert _check_round_trip(fixture_root, train) == 161
    d = json.loads(train.read_text())
    assert [c["id"] for c in d["categories"]] == [1, 2]  # the classes of the data: class1.tif, class2.tif
    train4, _ = convert(fixture_root, tmp_path / "four", val_fraction=0.0, num_classes=4, progress=False)
    assert [c["id"] for c in json.loads(train4.read_text())["categories"]] == [1, 2, 3, 4]
    assert {"id", "file_name", "height", "width"} <= set(d["images"][0])
    assert json.loads(val.read_text())["images"] == []


def test_convert_synthetic_split_round_trip(synth_root: Path, tmp_path: Path) -> None:
    train, val = convert(synth_root, tmp_path, val_fraction=0.25, seed=1, progress=False)
    n = _check_round_trip(synth_root, train) + _check_round_trip(synth_root, val)
    assert n > 50
    ids_t = {i["id"] for i in json.loads(train.read_text())["images"]}
    ids_v = {i["id"] for i in json.loads(val.read_text())["images"]}
    assert len(ids_v) == 2 and len(ids_t) == 6 and not ids_t & ids_v
    ann_ids = [a["id"] for a in json.loads(train.read_text())["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)


def test_split_is_deterministic_and_disjoint(synth_root: Path) -> None:
    samples = scan_train(synth_root)
    a = split_samples(samples, 0.3, seed=5)
    b = split_samples(samples, 0.3, seed=5)
    c = split_samples(samples, 0.3, seed=6)
    assert a == b
    assert {s.name for s in a[1]} != {s.name for s in c[1]}
    assert not {s.name for s in a[0]} & {s.name for s in a[1]}
    assert len(a[0]) + len(a[1]) == len(samples)
    assert len(split_samples(samples[:2], 0.01)[1]) == 1  # a split always validates on something
    with pytest.raises(ValueError):
        split_samples(samples, 1.0)


def test_encode_region_equals_full_encode() -> None:
    rng = np.random.default_rng(0)
    for top, left, h, w in [(0, 0, 5, 7), (35, 45, 10, 10), (-3, -4, 8, 9), (10, 20, 1, 1)]:
        region = rng.random((h, w)) > 0.4
        full = np.zeros((40, 50), bool)
        y0, x0 = max(top, 0), max(left, 0)
        full[y0:top + h, x0:left + w] = region[y0 - top:, x0 - left:][: 40 - y0, : 50 - x0]
        assert encode_region(region, top, left, 40, 50) == encode_mask(full)
        assert np.array_equal(mask_utils.decode(encode_region(region, top, left, 40, 50)).astype(bool), full)
