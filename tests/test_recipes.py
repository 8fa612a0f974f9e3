"""Every shipped recipe loads and builds its model (weights none, meta device: no memory, no
download), with the knobs its comment promises; the public leaderboard recipes by name."""
from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import MaskRCNN

from cellkit.config import load_config
from cellkit.models import build_model
from cellkit.models.maskrcnn import count_trainable_parameters
from cellkit.resources import RECIPES

NAMES = sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.yaml")
               if "grids" not in p.parts and p.stem != "_base")


def test_the_leaderboard_recipes_ship() -> None:
    assert {"r101_dc5", "x101_fpn", "cascade_copy_paste", "leaderboard"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_loads_and_builds(name: str) -> None:
    text = (RECIPES / f"{name}.yaml").read_text()
    assert text.startswith("#"), "every recipe starts with a comment naming its source"
    cfg = load_config(name, {"model.weights": "none", "model.num_classes": 4})
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model, MaskRCNN)
    assert count_trainable_parameters(model) < 200_000_000  # the task's rule
    assert model.roi_heads.detections_per_img == cfg.model.box_detections_per_img
    assert model.roi_heads.nms_thresh == cfg.model.box_nms_thresh
    if cfg.model.resize_mode == "fixed_scale":
        assert model.transform.scale == cfg.model.scale


def test_public_recipes_carry_their_source_knobs() -> None:
    r1 = load_config("r101_dc5")
    assert (r1.model.backbone, r1.model.min_size, r1.model.max_size) == ("resnet101_dc5", 608, 1333)
    assert (r1.model.box_nms_thresh, r1.model.box_detections_per_img, r1.model.box_score_thresh) == (0.2, 800, 0.0)
    x = load_config("x101_fpn")
    assert (x.model.backbone, x.model.anchor_sizes, x.model.mask_roi_size) == ("resnext101_32x8d", (8, 16, 32, 64, 128), 28)
    assert (x.train.sampler, x.model.box_detections_per_img, x.predict.tta_merge) == ("repeat_factor", 1000, "wbf")
    for name in ("cascade_copy_paste", "leaderboard"):
        c = load_config(name)
        assert (c.model.roi_head, c.train.sampler) == ("cascade", "repeat_factor")
        assert c.data.augment.copy_paste > 0 and c.data.augment.copy_paste_class_weights is None  # class-aware


def test_copy_paste_grid_expands_to_three_settings_times_two_seeds() -> None:
    from cellkit.grid import expand_grid

    runs = expand_grid("copy_paste")
    assert [r.name for r in runs] == [f"{n}-seed{s}" for s in (0, 1) for n in ("off", "class_aware", "uniform")]
    for r in runs:
        aug = r.cfg.data.augment
        assert r.cfg.name == "demo" and r.cfg.train.seed == int(r.name[-1]) and r.cfg.train.epochs == 4
        if r.name.startswith("off"):
            assert aug.copy_paste == 0.0
        else:
            assert aug.copy_paste == 0.5
            assert aug.copy_paste_class_weights == ((1.0,) * 4 if r.name.startswith("uniform") else None)


def test_copy_paste_full_grid_runs_the_whole_demo() -> None:
    from cellkit.grid import expand_grid

    runs = expand_grid("copy_paste_full")
    assert [r.name for r in runs] == ["off-seed0", "class_aware-seed0", "off-seed1", "class_aware-seed1"]
    demo = load_config("demo")
    for r in runs:
        assert (r.cfg.train.epochs, r.cfg.train.iters_per_epoch) == (demo.train.epochs, demo.train.iters_per_epoch)
        assert r.cfg.data.augment.copy_paste == (0.0 if r.name.startswith("off") else 0.5)


def test_copy_paste_seeds_grid_has_three_replicates_against_off() -> None:
    from cellkit.grid import expand_grid
    from cellkit.grid.spec import baseline_of, load_grid

    runs = expand_grid("copy_paste_seeds")
    assert [(r.name, r.cfg.train.seed) for r in runs] == [
        (f"{name}-seed={s}", s) for name in ("off", "class_aware") for s in range(3)]
    assert {r.cfg.data.augment.copy_paste for r in runs if r.name.startswith("off")} == {0.0}
    assert {r.cfg.data.augment.copy_paste for r in runs if r.name.startswith("class_aware")} == {0.5}
    assert baseline_of(load_grid("copy_paste_seeds"), runs) == "off"
