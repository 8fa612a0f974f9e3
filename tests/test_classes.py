"""The number of classes comes from the data (or the config, or the checkpoint), never from a
default: a 2-class and a 6-class synthetic dataset train, predict and evaluate end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellkit.cli import main
from cellkit.data.synth import write_synthetic
from cellkit.engine.defaults import train
from cellkit.evaluation.coco import evaluate_predictions
from cellkit.inference.submit import predict_submission
from cellkit.models.checkpoint import model_from_checkpoint

pytestmark = pytest.mark.usefixtures("torch_threads")


@pytest.mark.slow
@pytest.mark.parametrize("classes", [2, 6])
def test_a_dataset_of_k_classes_trains_predicts_and_evaluates(classes: int, tiny_config, tmp_path: Path) -> None:
    data = write_synthetic(tmp_path / "data", n_train=6, n_test=2, seed=classes, max_size=128, progress=False,
                           n_classes=classes)
    cfg = tiny_config(**{"data.root": str(data)})
    assert cfg.model.num_classes is None  # nothing in the config says how many there are
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["epochs_run"] == 1
    model, stored, _ = model_from_checkpoint(tmp_path / "run" / "checkpoints" / "best.pth")
    assert stored.model.num_classes == classes  # read from the data, stored with the run
    assert model.roi_heads.box_predictor.cls_score.out_features == classes + 1
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == classes + 1
    val_gt = json.loads((tmp_path / "run" / "val_gt.json").read_text())
    assert [c["id"] for c in val_gt["categories"]] == list(range(1, classes + 1))
    problems = predict_submission([tmp_path / "run" / "checkpoints" / "best.pth"], data, tmp_path / "sub.json",
                                  progress=False)
    assert not [p for p in problems if p.severity == "error"]
    entries = json.loads((tmp_path / "sub.json").read_text())
    assert entries and {e["category_id"] for e in entries} <= set(range(1, classes + 1))
    report = evaluate_predictions(data / "test_gt.json", entries, iou_types=("segm",), cell_metrics=False)
    assert set(report.results["segm"].per_class) == {f"class{k}" for k in range(1, classes + 1)}
    # check-submission reads the classes from the dataset beside the test index
    assert main(["check-submission", str(tmp_path / "sub.json"), "--ids", str(data)]) == 0


def test_classes_outside_the_config_are_refused(fixture_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folder,) = (fixture_copy / "train").iterdir()
    (folder / "class2.tif").rename(folder / "class7.tif")  # the data now has classes 1 and 7
    assert main(["stats", "--data", str(fixture_copy), "--set", "model.num_classes=4"]) == 2
    assert "class7.tif: class 7 is outside 1..4" in capsys.readouterr().err
    assert main(["stats", "--data", str(fixture_copy)]) == 0
    out = capsys.readouterr().out
    assert "class7" in out and "class8" not in out  # 7 classes, read from the data
