from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cellkit import load_config
from cellkit.config import Config, all_keys, parse_set_args
from cellkit.errors import ConfigError


def test_defaults_are_the_dataclass_defaults() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.box_detections_per_img == 1000
    assert cfg.eval.max_dets == 1000


def test_yaml_then_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.01\n  epochs: 3\nmodel:\n  backbone: resnet18\n")
    cfg = load_config(p, {"train.lr": "1e-3", "model__anchor_sizes": [4, 8, 16, 32, 64]})
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.epochs == 3
    assert cfg.model.backbone == "resnet18"
    assert cfg.model.anchor_sizes == (4, 8, 16, 32, 64)


def test_base_file_is_extended(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.5\n  epochs: 7\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  epochs: 2\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.lr, cfg.train.epochs) == (0.5, 2)


@pytest.mark.parametrize(
    "key, suggestion",
    [("train.lrr", "train.lr"), ("model.lr", "train.lr"), ("trian", "train"),
     ("data.augment.hlfip", "data.augment.hflip"), ("model.detections_per_img", "model.box_detections_per_img")],
)
def test_unknown_key_suggests_nearest(key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'.*did you mean '{suggestion}'"):
        load_config(None, {key: 1})


def test_unknown_key_in_yaml_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\n  shedule: cosine\n")
    with pytest.raises(ConfigError, match="train.shedule.*train.scheduler"):
        load_config(p)


@pytest.mark.parametrize(
    "key, value, message",
    [("train.epochs", "three", "expected an integer"), ("train.lr", True, "expected a number"),
     ("train.optimizer", "adamww", "did you mean 'adamw'"), ("model.mask_roi_size", 20, "not one of 14, 28"),
     ("data.augment.scale_range", [1.0], "expected 2 values"), ("train.amp", "yes", "not one of")],
)
def test_bad_values(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {key: value})


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, {"train.scheduler": "plateau", "model.anchor_sizes": [8, 16, 32, 64, 128]})
    path = cfg.save(tmp_path / "config.yaml")
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["train"]["scheduler"] == "plateau"


def test_flat_keys_cover_every_leaf_and_replace_applies() -> None:
    cfg = Config()
    flat = cfg.flat()
    assert set(flat) <= set(all_keys())
    assert flat["train.lr"] == cfg.train.lr
    assert cfg.replace({"train.lr": 0.5}).train.lr == 0.5
    assert cfg.train.lr != 0.5


def test_parse_set_args() -> None:
    assert parse_set_args(["train.lr=0.1", "name=a=b"]) == {"train.lr": "0.1", "name": "a=b"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set_args(["train.lr"])


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_recipes_load_by_name() -> None:
    assert load_config("demo") == load_config(Path(__file__).parents[1] / "configs" / "demo.yaml")
    assert load_config("ablation/resnet50_cbam").model.backbone == "resnet50_cbam"
    with pytest.raises(ConfigError, match="did you mean recipe 'demo'"):
        load_config("dmeo")
