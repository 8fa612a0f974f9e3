"""``model.scale: auto`` and the per-class diameters of ``cellkit stats``, on the real sample."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cellkit.cli import main
from cellkit.config import load_config
from cellkit.engine.defaults import DefaultTrainer
from cellkit.errors import ConfigError
from cellkit.inference.predict import tiling_limits
from cellkit.models import build_model
from cellkit.models.checkpoint import load_checkpoint, model_from_checkpoint


def median_diameters(gt: dict) -> dict[int, float]:
    """Median sqrt(4 area / pi) per category (0: all), from the COCO ground truth (RLE areas)."""
    by = {0: [a["area"] for a in gt["annotations"]]}
    for a in gt["annotations"]:
        by.setdefault(a["category_id"], []).append(a["area"])
    return {k: float(np.median(np.sqrt(4 * np.asarray(v) / np.pi))) for k, v in by.items()}


@pytest.mark.slow
def test_scale_auto_measures_the_cells_and_the_checkpoint_keeps_the_factor(
        fixture_root: Path, real_gt: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(None, {
        "data.root": str(fixture_root), "data.val_fraction": 0.0, "data.augment.crop_size": 64,
        "model.backbone": "resnet18", "model.scale": "auto", "model.target_cell_diameter": 30,
        "model.max_size": 256, "model.rpn_pre_nms_top_n_train": 100, "model.rpn_post_nms_top_n_train": 50,
        "model.box_batch_size_per_image": 32, "train.epochs": 1, "train.iters_per_epoch": 1,
        "train.batch_size": 1, "train.eval_every": 0, "train.tensorboard": False})
    median = median_diameters(real_gt)[0]
    assert 10 < median < 30  # the real sample: 161 cells of about 100-600 px
    trainer = DefaultTrainer(cfg, tmp_path / "run", progress=False)
    factor = trainer.cfg.model.scale
    assert math.isclose(factor, 30 / median, rel_tol=1e-3)
    assert trainer.cfg.model.resize_mode == "fixed_scale" and trainer.model.transform.scale == factor
    assert f"scale {factor:g}" in capsys.readouterr().out  # printed
    trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pth")
    assert ckpt["config"]["model"]["scale"] == factor
    assert load_config(tmp_path / "run" / "config.yaml").model.scale == factor
    model, pcfg, _ = model_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.pth")
    assert model.transform.scale == factor
    assert tiling_limits(model, pcfg.predict)[0] == min(pcfg.predict.tile_size, int(256 / factor))
    assert model.transform.scale_factor(100, 120) == factor  # an image under the cap: cells at the target size
    assert tiling_limits(model, pcfg.predict)[1] == int(256 / factor)  # larger ones are tiled at that scale


def test_scale_auto_config() -> None:
    m = load_config(None, {"model.scale": "auto"}).model
    assert (m.scale, m.target_cell_diameter) == ("auto", 30.0)
    assert load_config(None, {"model.scale": "1.5"}).model.scale == 1.5
    with pytest.raises(ConfigError, match="model.scale"):
        load_config(None, {"model.scale": "automatic"})
    with pytest.raises(ConfigError, match="model.target_cell_diameter"):
        load_config(None, {"model.target_cell_diameter": 0})
    with pytest.raises(ConfigError, match="auto"):
        build_model(load_config(None, {"model.scale": "auto", "model.backbone": "resnet18", "model.num_classes": 4}))


def test_stats_prints_the_median_diameter_per_class(fixture_root: Path, real_gt: dict,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    want = median_diameters(real_gt)
    assert main(["stats", "--data", str(fixture_root)]) == 0
    assert "class3" not in capsys.readouterr().out  # the data has classes 1 and 2: class1.tif, class2.tif
    assert main(["stats", "--data", str(fixture_root), "--set", "model.num_classes=4"]) == 0
    out = capsys.readouterr().out
    assert "median diameter (px)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("class")}
    assert float(rows["class1"][4]) == round(want[1], 1) and float(rows["class2"][4]) == round(want[2], 1)
    assert rows["class3"][4] == "-"  # no class-3 cells in the sample
    assert f"median cell diameter (all classes): {want[0]:.1f} px" in out


def test_new_keys_are_in_cellkit_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "data.augment.copy_paste=0.5", "--set", "model.scale=auto"]) == 0
    out = capsys.readouterr().out
    for key in ("preset: default", "lsj_scale_range:", "copy_paste: 0.5", "copy_paste_max: 8",
                "copy_paste_class_weights: null", "copy_paste_max_covered: 0.5", "copy_paste_blur: 1.0",
                "scale: auto", "target_cell_diameter: 30.0"):
        assert key in out, key
