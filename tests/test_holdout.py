"""The hold-out split (data.holdout_fraction): disjoint and deterministic, never trained on nor used
to choose the epoch, scored once with the chosen epoch's weights; and the validation interval in
every epoch's metrics."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cellkit.config import load_config
from cellkit.data import holdout_samples, scan_train, split_holdout, split_samples, train_val_samples
from cellkit.engine.defaults import DefaultTrainer, train
from cellkit.errors import ConfigError
from cellkit.evaluation.coco import coco_evaluate
from cellkit.inference.split import predict_split
from cellkit.models.checkpoint import model_from_checkpoint
from cellkit.runs import RunDir

pytestmark = pytest.mark.usefixtures("torch_threads")


def test_the_hold_out_split_is_disjoint_deterministic_and_leaves_validation_alone(synth_root: Path) -> None:
    samples = scan_train(synth_root)
    train, val, hold = split_holdout(samples, 0.25, 0.25, seed=3)
    ids = [{s.image_id for s in part} for part in (train, val, hold)]
    assert (len(train), len(val), len(hold)) == (4, 2, 2)
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2]) and set.union(*ids) == {s.image_id for s in samples}
    assert split_holdout(samples, 0.25, 0.25, seed=3) == (train, val, hold)  # the same every time
    assert split_samples(samples, 0.25, seed=3)[1] == val  # the same validation images as without a hold-out
    assert split_samples(samples, 0.25, seed=3, holdout_fraction=0.25) == (train, val)  # training leaves it out
    assert split_holdout(samples, 0.25, 0.0, seed=3)[2] == []
    assert len(split_holdout(samples, 0.25, 0.01, seed=3)[2]) == 1  # asked for: at least one image
    with pytest.raises(ConfigError, match="data.holdout_fraction"):
        split_holdout(samples[:2], 0.25, 0.25)
    with pytest.raises(ConfigError, match="holdout_fraction: with val_fraction 0.5 nothing is left to train on"):
        load_config("demo", {"data.val_fraction": 0.5, "data.holdout_fraction": 0.5})
    cfg = load_config("demo", {"data.root": str(synth_root), "data.val_fraction": 0.25, "data.holdout_fraction": 0.25,
                               "data.split_seed": 3}).data
    assert holdout_samples(cfg, None, progress=False) == hold
    assert train_val_samples(cfg, None, progress=False) == (train, val)


@pytest.mark.slow
def test_a_run_scores_its_hold_out_once_with_the_chosen_epoch(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(**{"train.epochs": 2, "data.holdout_fraction": 0.25, "eval.bootstrap": 200})
    run = RunDir(tmp_path / "run")
    summary = train(cfg, run.path, progress=False)
    metrics = json.loads(run.summary_file.read_text())
    assert metrics["holdout_epoch"] == metrics["best_epoch"] == summary["best_epoch"]
    hold_gt = json.loads(run.holdout_gt.read_text())
    val_gt = json.loads(run.val_gt.read_text())
    hold_ids, val_ids = {im["file_name"] for im in hold_gt["images"]}, {im["file_name"] for im in val_gt["images"]}
    assert len(hold_ids) == metrics["holdout_images"] == 2 and not hold_ids & val_ids
    # the numbers are those of the written files, with an interval around them
    preds = json.loads(run.predictions(split="holdout").read_text())
    assert len(preds) > 10  # an untrained model still proposes cells (low scores)
    res = coco_evaluate(hold_gt, preds, bootstrap=200)
    assert metrics["holdout_ap50"] == res.ap50
    assert [metrics["holdout_ap50_lo"], metrics["holdout_ap50_hi"]] == list(res.interval("ap50"))
    # the predictions are best.pth's (the chosen epoch), as `cellkit predict` would make them
    model, ckpt_cfg, _ = model_from_checkpoint(run.checkpoint("best"))
    again = predict_split(model, ckpt_cfg, "holdout", progress=False).entries()
    assert [(p["image_id"], p["category_id"], round(p["score"], 5)) for p in again] == \
        [(p["image_id"], p["category_id"], round(p["score"], 5)) for p in preds]
    # every validation recorded its interval
    history = run.history()
    assert all(h["val_ap50_lo"] <= h["val_ap50"] <= h["val_ap50_hi"] for h in history)
    assert metrics["best_val_ap50_lo"] == next(h["val_ap50_lo"] for h in history if h["epoch"] == metrics["best_epoch"])


@pytest.mark.slow
def test_without_a_run_directory_the_chosen_weights_are_kept_in_memory(tiny_config) -> None:
    cfg = tiny_config(**{"train.epochs": 2, "data.holdout_fraction": 0.25, "eval.bootstrap": 0})
    t = DefaultTrainer(cfg, None, progress=False)
    summary = t.fit()
    assert summary["holdout_epoch"] == summary["best_epoch"]
    assert summary["holdout_ap50_lo"] is None and 0.0 <= summary["holdout_ap50"] <= 1.0  # no bootstrap: no interval
    hook = next(h for h in t.hooks if h.name == "HoldoutHook")
    assert hook.report is not None and hook.report.results["segm"].ap50 == summary["holdout_ap50"]
    if summary["best_epoch"] != summary["epochs_run"]:  # the kept weights are not the last ones
        last = {k: v for k, v in t.eval_model.state_dict().items()}
        assert any(not torch.equal(last[k], v) for k, v in hook._weights.items())
