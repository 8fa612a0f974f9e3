"""Large-scale jitter (``data.augment.preset: lsj``) on the real sample and synthetic images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellkit.config import load_config
from cellkit.data import CellDataset, build_train_transforms, scan_train
from cellkit.errors import ConfigError


def test_lsj_crops_and_pads_to_a_fixed_size(synth_root: Path, fixture_root: Path) -> None:
    aug = load_config(None, {"data.augment.preset": "lsj", "data.augment.crop_size": 96}).data.augment
    assert aug.lsj_scale_range == (0.1, 2.0)
    ds = CellDataset(scan_train(synth_root) + scan_train(fixture_root), build_train_transforms(aug))
    torch.manual_seed(0)
    sizes = set()
    for i in range(len(ds)):
        image, target = ds[i]
        sizes.add(tuple(image.shape))
        assert target["masks"].shape[-2:] == (96, 96)
        for mask, box in zip(target["masks"], target["boxes"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert sizes == {(3, 96, 96)}
    # the original sizes differ (65 x 76 .. 397 x 482 px): lsj makes every crop the same size
    assert {(65, 76), (192, 192), (397, 482)} <= {ds.load(i)[0].shape[:2] for i in range(len(ds))}


def test_lsj_shrinks_relative_to_the_image_and_pads_with_background(fixture_root: Path) -> None:
    aug = load_config(None, {"data.augment.preset": "lsj", "data.augment.crop_size": 256,
                             "data.augment.lsj_scale_range": [0.5, 0.5], "data.augment.rot90": False,
                             "data.augment.hflip": 0.0, "data.augment.vflip": 0.0, "data.augment.brightness": 0.0,
                             "data.augment.contrast": 0.0, "data.augment.saturation": 0.0,
                             "data.augment.hue": 0.0}).data.augment
    ds = CellDataset(scan_train(fixture_root), build_train_transforms(aug))
    (h, w), n_cells = ds.load(0)[0].shape[:2], ds.load(0)[1].num_instances  # 397 x 482, 161 cells
    torch.manual_seed(0)
    image, target = ds[0]
    assert image.shape == (3, 256, 256)
    content = (image > 0).any(0)  # the real image has no black pixel; padding is black
    rows, cols = content.any(1).sum().item(), content.any(0).sum().item()
    assert (rows, cols) == (round(h * 0.5), round(w * 0.5))  # 199 x 241 px of image, padded to 256 x 256
    assert not target["masks"].any(0)[~content].any()  # padding is background in the targets
    assert 0.7 * n_cells < len(target["labels"]) <= n_cells
    assert np.isclose(target["area"].mean().item() / ds.load(0)[1].to_target()["area"].mean().item(), 0.25, rtol=0.25)


def test_lsj_needs_a_crop_size() -> None:
    with pytest.raises(ConfigError, match="crop_size"):
        load_config(None, {"data.augment.preset": "lsj", "data.augment.crop_size": None})
    with pytest.raises(ConfigError, match="lsj_scale_range"):
        load_config(None, {"data.augment.lsj_scale_range": [2.0, 0.1]})
    with pytest.raises(ConfigError, match="preset"):
        load_config(None, {"data.augment.preset": "lsjj"})
