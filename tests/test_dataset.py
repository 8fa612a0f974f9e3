"""The torch Dataset: what Mask R-CNN trains on, augmentation that keeps boxes on masks, caching."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from cellkit.config import AugmentConfig
from cellkit.data import CellDataset, build_train_transforms, collate, scan_train
from cellkit.data.transforms import RandomCropUpTo, RandomRescale, RandomRot90
from cellkit.structures import LabelMaps


def _check_target(img: torch.Tensor, t: dict) -> None:
    n = len(t["labels"])
    assert img.dtype == torch.float32 and img.ndim == 3 and img.shape[0] == 3
    assert 0 <= img.min() and img.max() <= 1
    assert t["boxes"].shape == (n, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].dtype == torch.int64 and ((t["labels"] >= 1) & (t["labels"] <= 4)).all()
    assert t["masks"].shape == (n, *img.shape[1:]) and t["masks"].dtype == torch.uint8
    assert t["area"].shape == (n,) and t["iscrowd"].shape == (n,) and isinstance(t["image_id"], int)
    if n:
        # boxes follow the masks exactly (pixel-edge coordinates), every instance has pixels
        expect = masks_to_boxes(t["masks"].bool()).float()
        expect[:, 2:] += 1
        assert torch.equal(t["boxes"], expect)
        assert torch.equal(t["area"], t["masks"].sum((1, 2)).float())
        assert (t["area"] > 0).all()
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()


def test_fixture_item_without_augmentation(fixture_root: Path) -> None:
    ds = CellDataset(scan_train(fixture_root))
    img, t = ds[0]
    _check_target(img, t)
    assert img.shape == (3, 397, 482)
    assert torch.bincount(t["labels"]).tolist() == [0, 2, 159]
    assert t["image_id"] == 1


def test_augmented_items_keep_boxes_on_masks(synth_root: Path) -> None:
    torch.manual_seed(0)
    ds = CellDataset(scan_train(synth_root), build_train_transforms(AugmentConfig(crop_size=96)))
    for i in range(len(ds)):
        for _ in range(3):
            _check_target(*ds[i])


def test_geometric_augmentation_moves_masks_with_pixels(fixture_root: Path) -> None:
    # paint the label map into the image; after exact transforms (flips, 90-degree turns, crops)
    # the painted pixels must coincide with the union of the instance masks
    ds = CellDataset(scan_train(fixture_root))
    _, maps = ds.load(0)
    layer = torch.from_numpy(maps.layers.astype(np.int32))
    image = tv_tensors.Image((layer > 0).to(torch.uint8).expand(3, -1, -1) * 255)
    tf = v2.Compose([RandomCropUpTo(200), v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()])
    torch.manual_seed(1)
    shapes = set()
    for _ in range(12):
        img, lay = tf(image, tv_tensors.Mask(layer))
        t = LabelMaps(lay.as_subclass(torch.Tensor).numpy(), maps.labels).to_target()
        assert torch.equal(t["masks"].amax(0).bool(), img[0] > 0)
        shapes.add(tuple(img.shape[1:]))
    assert shapes == {(200, 200)}


def test_rot90_is_exact_and_rejects_boxes() -> None:
    x = tv_tensors.Mask(torch.arange(12).reshape(1, 3, 4))
    torch.manual_seed(0)
    outs = {tuple(RandomRot90()(x).shape) for _ in range(20)}
    assert outs == {(1, 3, 4), (1, 4, 3)}
    with pytest.raises(TypeError):
        torch.manual_seed(3)
        for _ in range(10):
            RandomRot90()(tv_tensors.BoundingBoxes([[0, 0, 1, 1]], format="XYXY", canvas_size=(3, 4)))


def test_rescale_and_crop_sizes() -> None:
    x = tv_tensors.Image(torch.zeros(3, 100, 50, dtype=torch.uint8))
    torch.manual_seed(0)
    for _ in range(10):
        y = RandomRescale((0.5, 2.0))(x)
        h, w = y.shape[1:]
        assert 50 <= h <= 200 and abs(h / w - 2) < 0.1
    assert RandomCropUpTo(64)(x).shape[1:] == (64, 50)  # small side kept whole


def test_instances_cut_to_nothing_are_dropped_and_empty_samples_are_valid(fixture_root: Path) -> None:
    ds = CellDataset(scan_train(fixture_root))
    _, maps = ds.load(0)
    layer = torch.from_numpy(maps.layers.astype(np.int32))
    crop = layer[:, :3, :3]
    t = LabelMaps(crop.numpy(), maps.labels).to_target()
    assert len(t["labels"]) == len(torch.unique(crop[crop > 0]))
    empty = LabelMaps(np.zeros((1, 8, 9), np.int32), np.zeros(1, np.int64)).to_target()
    _check_target(torch.zeros(3, 8, 9), {**empty, "image_id": 1})
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 8, 9)


def test_empty_sample_trains_mask_rcnn(tmp_path: Path) -> None:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    empty = LabelMaps(np.zeros((1, 64, 64), np.int32), np.zeros(1, np.int64)).to_target()
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5, min_size=64, max_size=64)
    losses = model([torch.rand(3, 64, 64)], [empty])
    assert all(torch.isfinite(v) for v in losses.values())


def test_cache_serves_items_after_files_are_gone(fixture_copy: Path) -> None:
    ds = CellDataset(scan_train(fixture_copy), cache=True)
    nbytes = ds.preload(progress=False)
    assert nbytes == ds.cache_bytes() > 0
    shutil.rmtree(fixture_copy / "train")
    img, t = ds[0]  # decoded images come from memory, not from the (deleted) tifs
    assert len(t["labels"]) == 161


def test_collate_keeps_lists(fixture_root: Path) -> None:
    ds = CellDataset(scan_train(fixture_root))
    images, targets = collate([ds[0], ds[0]])
    assert isinstance(images, list) and len(images) == 2 and targets[1]["image_id"] == 1


def test_uint16_images_scale_to_unit_range(tmp_path: Path, fixture_copy: Path) -> None:
    import tifffile

    path = fixture_copy / "train/sample-0001/image.tif"
    rgb = tifffile.imread(path)[..., :3].astype(np.uint16) * 257
    tifffile.imwrite(path, rgb, photometric="rgb")
    img, _ = CellDataset(scan_train(fixture_copy))[0]
    np.testing.assert_allclose(img.mean((1, 2)).numpy(), [0.687, 0.592, 0.627], atol=1e-3)


def test_images_only_reads_no_label_maps(fixture_copy: Path) -> None:
    from cellkit.inference.split import ImagesOnly

    ds = CellDataset(scan_train(fixture_copy), cache=False)
    for p in (fixture_copy / "train/sample-0001").glob("class*.tif"):
        p.write_bytes(b"broken")  # prediction must not need (or decode) the label maps
    img, meta = ImagesOnly(ds)[0]
    assert img.shape == (3, 397, 482) and meta == {"image_id": 1}
