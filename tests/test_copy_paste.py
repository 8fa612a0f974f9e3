"""Copy-paste augmentation with real data flowing through: the real hw3 sample (161 crowded cells)
and the synthetic dataset (classes 1-3), checked pixel by pixel against the label maps before
pasting and the record of what was pasted where."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from torch.utils.data import DataLoader

from cellkit.config import load_config
from cellkit.data import CellDataset, CopyPaste, build_copy_paste, build_train_transforms, collate, scan_train
from cellkit.data.sampling import RepeatFactorSampler, repeat_factors
from cellkit.errors import ConfigError


def full_masks(layers: np.ndarray, n: int) -> dict[int, np.ndarray]:
    """id -> (H, W) bool for ids 1..n - 1 that have pixels."""
    out = {}
    for i in range(1, n):
        m = (layers == i).any(axis=0)
        if m.any():
            out[i] = m
    return out


def check_boxes(target: dict) -> None:
    """Every box is the extent of its mask, every id unique, every label a class."""
    ids = target["instance_ids"].tolist()
    assert len(ids) == len(set(ids)), "instance id collision"
    assert set(target["labels"].tolist()) <= {1, 2, 3, 4}
    for mask, box in zip(target["masks"], target["boxes"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert len(ys) > 0
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def check_paste(ds: CellDataset, cp: CopyPaste, index: int, target: dict, image: torch.Tensor, exact_pixels: bool) -> dict:
    """Compare one item of a dataset without geometric transforms against its decoded sample.

    Returns counts of pasted, trimmed, dropped and untouched cells.
    """
    before_img, maps = ds.load(index)
    n0 = len(maps.labels)
    H, W = maps.shape
    by_id = {int(i): m.numpy().astype(bool) for i, m in zip(target["instance_ids"], target["masks"])}
    labels = dict(zip(target["instance_ids"].tolist(), target["labels"].tolist()))
    placed = []
    for p in cp.last:
        full = np.zeros((H, W), bool)
        h, w = p.mask.shape
        full[p.top : p.top + h, p.left : p.left + w] = p.mask
        placed.append(full)
    assert [p.instance_id for p in cp.last] == list(range(n0, n0 + len(cp.last))), "pasted ids follow the old ones"
    bank = ds.instance_bank()
    union = np.zeros((H, W), bool)
    for k in range(len(cp.last) - 1, -1, -1):  # later cells lie on top
        p = cp.last[k]
        visible = placed[k] & ~union
        union |= placed[k]
        assert np.array_equal(by_id[p.instance_id], visible), "a pasted cell is its exact mask minus later ones"
        assert visible.sum() >= (1 - cp.max_covered) * placed[k].sum(), "a pasted cell mostly hidden"
        assert labels[p.instance_id] == p.label == bank.label[p.source]
        # the pasted pixels are the source cell's pixels (turned): same multiset of values
        src_img, src_maps = ds.load(int(bank.image[p.source]))
        src_mask = (src_maps.layers == bank.instance_id[p.source]).any(axis=0)
        assert np.array_equal(np.sort(src_img[src_mask], axis=0), np.sort(p.pixels[p.mask], axis=0))
        if exact_pixels:
            got = (image.permute(1, 2, 0).numpy()[visible] * 255).round().astype(np.uint8)
            h, w = p.mask.shape
            want = np.zeros((H, W, 3), np.uint8)
            want[p.top : p.top + h, p.left : p.left + w] = p.pixels
            assert np.array_equal(got, want[visible])
    if exact_pixels:  # a hard edge leaves every other pixel alone
        got = (image.permute(1, 2, 0).numpy()[~union] * 255).round().astype(np.uint8)
        assert np.array_equal(got, before_img[~union])
    counts = {"pasted": len(cp.last), "trimmed": 0, "dropped": 0, "untouched": 0}
    for i, m in full_masks(maps.layers, n0).items():
        rest = m & ~union
        covered = m.sum() - rest.sum()
        if covered > cp.max_covered * m.sum():
            assert i not in by_id, f"cell {i} covered {covered / m.sum():.2f} of its own area is kept"
            counts["dropped"] += 1
        else:
            assert np.array_equal(by_id[i], rest), f"cell {i} is not trimmed to its visible part"
            counts["trimmed" if covered else "untouched"] += 1
    assert set(by_id) == {i for i, m in full_masks(maps.layers, n0).items()
                          if m.sum() - (m & ~union).sum() <= cp.max_covered * m.sum()} | {p.instance_id for p in cp.last}
    check_boxes(target)
    return counts


@pytest.fixture(scope="module")
def real_twice(fixture_root: Path) -> list:
    """The real sample listed twice: each copy pastes cells of the other."""
    s = scan_train(fixture_root)[0]
    return [s, s]


@pytest.mark.parametrize("max_covered", [0.3, 0.7])
def test_pasted_cells_are_exact_instances_and_covered_cells_trimmed_or_dropped(real_twice: list, max_covered: float) -> None:
    cp = CopyPaste(prob=1.0, max_cells=40, max_covered=max_covered, blur=0.0, num_classes=4)
    ds = CellDataset(real_twice, None, copy_paste=cp)
    totals = {"pasted": 0, "trimmed": 0, "dropped": 0, "untouched": 0}
    for seed in range(3):
        torch.manual_seed(seed)
        image, target = ds[seed % 2]
        for k, v in check_paste(ds, cp, seed % 2, target, image, exact_pixels=True).items():
            totals[k] += v
    assert totals["pasted"] >= 30 and totals["trimmed"] > 0 and totals["dropped"] > 0 and totals["untouched"] > 0


def test_soft_edge_blends_only_around_the_pasted_cells(real_twice: list) -> None:
    cp = CopyPaste(prob=1.0, max_cells=10, blur=1.0, num_classes=4)
    ds = CellDataset(real_twice, None, copy_paste=cp)
    torch.manual_seed(0)
    image, target = ds[0]
    check_paste(ds, cp, 0, target, image, exact_pixels=False)  # masks stay exact under a soft edge
    before = ds.load(0)[0]
    after = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    changed = (after != before).any(axis=-1)
    near = np.zeros_like(changed)
    for p in cp.last:
        h, w = p.mask.shape
        near[p.top : p.top + h, p.left : p.left + w] = True  # the cell with its blur margin
    assert changed.any() and not (changed & ~near).any()
    # the rim of the topmost cell mixes cell and background; its core is the cell's own pixels
    p = cp.last[-1]
    h, w = p.mask.shape
    core = ndi.binary_erosion(p.mask, iterations=3)
    rim = p.mask & ~ndi.binary_erosion(p.mask)
    here = after[p.top : p.top + h, p.left : p.left + w].astype(int)
    assert (here[rim] != p.pixels[rim]).any()
    assert np.abs(here[core] - p.pixels[core].astype(int)).max() <= 2


def test_class_aware_draw_with_the_repeat_factor_sampler(synth_root: Path) -> None:
    samples = scan_train(synth_root)
    bank = CellDataset(samples).instance_bank()
    share = bank.class_counts(4) / len(bank)
    assert 0 < share[2] < 0.08  # class 3 is rare among the cells
    cfg = load_config(None, {"data.augment.copy_paste": 1.0, "data.augment.copy_paste_max": 6,
                             "data.augment.crop_size": 96})
    n0 = {s.image_id: len(CellDataset([s]).load(0)[1].labels) for s in samples}
    rare_share = {}
    for name, weights in (("class_aware", None), ("uniform", [1.0, 1.0, 1.0, 1.0])):
        aug = cfg.replace({"data.augment.copy_paste_class_weights": weights}).data.augment
        ds = CellDataset(samples, build_train_transforms(aug), copy_paste=build_copy_paste(aug, 4))
        sampler = RepeatFactorSampler(repeat_factors(ds.class_presence(4), 1.0), seed=0)
        assert len(sampler) > len(ds)  # images with class 3 repeat
        loader = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate)
        torch.manual_seed(0)
        pasted: list[int] = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            for images, targets in loader:
                for image, target in zip(images, targets):
                    assert image.shape[-2:] == target["masks"].shape[-2:]
                    check_boxes(target)
                    first = n0[target["image_id"]]
                    pasted += [lab for lab, i in zip(target["labels"].tolist(), target["instance_ids"].tolist())
                               if i >= first]
        assert len(pasted) > 40, name
        rare_share[name] = pasted.count(3) / len(pasted)
    # class-aware (inverse class frequency) pastes the 3 present classes about equally often;
    # uniform class weights paste cells in their natural shares
    assert rare_share["class_aware"] > 0.2 > 0.12 > rare_share["uniform"]


def test_draw_weights_follow_the_class_weights(synth_root: Path) -> None:
    bank = CellDataset(scan_train(synth_root)).instance_bank()
    g = torch.Generator().manual_seed(0)
    for weights, lo, hi in ((None, 0.28, 0.39), ([1, 1, 1, 1], 0.0, 0.08), ([0, 0, 1, 0], 1.0, 1.0)):
        w = torch.from_numpy(CopyPaste(1.0, 1, weights, num_classes=4).cell_weights(bank))
        drawn = bank.label[torch.multinomial(w, 3000, replacement=True, generator=g).numpy()]
        assert lo <= (drawn == 3).mean() <= hi, weights


def test_bank_leaves_out_cells_cut_by_the_image_border(fixture_root: Path) -> None:
    ds = CellDataset(scan_train(fixture_root))
    bank = ds.instance_bank()
    _, maps = ds.load(0)
    regions = list(maps.regions())
    H, W = maps.shape
    inside = [r for r in regions if r.top > 0 and r.left > 0 and r.top + r.mask.shape[0] < H and r.left + r.mask.shape[1] < W]
    assert 0 < len(bank) == len(inside) < len(regions)
    assert bank.instance_id.tolist() == [r.instance_id for r in inside]


def test_config_keys_and_errors() -> None:
    aug = load_config(None, {"data.augment.copy_paste": 0.5}).data.augment
    assert (aug.copy_paste, aug.copy_paste_max, aug.copy_paste_class_weights, aug.copy_paste_max_covered) == (0.5, 8, None, 0.5)
    assert build_copy_paste(load_config().data.augment, 4) is None
    with pytest.raises(ConfigError, match="data.augment.copy_paste"):
        load_config(None, {"data.augment.copy_paste": 1.5})
    with pytest.raises(ConfigError, match="copy_paste_class_weights"):
        load_config(None, {"data.augment.copy_paste_class_weights": [0, 0, 0, 0]})
    with pytest.raises(ConfigError, match="one weight per class"):
        build_copy_paste(load_config(None, {"data.augment.copy_paste": 1.0,
                                            "data.augment.copy_paste_class_weights": [1, 2]}).data.augment, 4)


def test_pasted_cells_clear_every_label_map_layer(fixture_copy: Path) -> None:
    """Class maps that overlap are packed into two layers: a pasted cell covers both."""
    import tifffile

    folder = next((fixture_copy / "train").iterdir())
    class2 = tifffile.imread(folder / "class2.tif")
    shifted = np.zeros_like(class2)
    shifted[6:, 6:] = class2[:-6, :-6]  # every class-2 cell again, shifted: overlaps the originals
    tifffile.imwrite(folder / "class3.tif", shifted)
    s = scan_train(fixture_copy)[0]
    cp = CopyPaste(prob=1.0, max_cells=30, blur=0.0, num_classes=4)
    ds = CellDataset([s, s], None, copy_paste=cp)
    assert ds.load(0)[1].layers.shape[0] == 2
    dropped = 0
    for seed in range(2):
        torch.manual_seed(seed)
        image, target = ds[seed]
        dropped += check_paste(ds, cp, seed, target, image, exact_pixels=True)["dropped"]
        assert any(p.label == 3 for p in cp.last)
    assert dropped > 0


def test_the_trainer_wires_copy_paste_into_its_training_set(synth_root: Path) -> None:
    from cellkit.engine.defaults import DefaultTrainer

    cfg = load_config(None, {"data.root": str(synth_root), "data.augment.copy_paste": 1.0,
                             "data.augment.crop_size": 96, "model.backbone": "resnet18", "train.batch_size": 2})
    trainer = DefaultTrainer(cfg, None, progress=False)
    assert isinstance(trainer.train_set.copy_paste, CopyPaste)
    assert trainer.val_set.copy_paste is None  # validation images stay as they are
    torch.manual_seed(0)
    images, targets = next(iter(trainer.train_loader()))
    n0 = {s.image_id: len(CellDataset([s]).load(0)[1].labels) for s in trainer.train_set.samples}
    for target in targets:
        check_boxes(target)
    assert sum(int((t["instance_ids"] >= n0[t["image_id"]]).sum()) for t in targets) > 0  # cells were pasted
