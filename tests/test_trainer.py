"""The Trainer: run directory, schedules read back from metrics.jsonl, non-finite losses, gradient
accumulation and clipping, resume after SIGKILL, atomic checkpoints, DDP with two CPU processes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import NARROW_HEADS
from tb_helpers import assert_tensorboard_equals_history, event_images, event_text
from torch.utils.data import DataLoader

import cellkit
from cellkit.data import collate
from cellkit.engine.defaults import DefaultTrainer
from cellkit.engine.hooks import CheckpointHook, CurvePlotHook
from cellkit.engine.schedule import lr_trajectory
from cellkit.engine.train_loop import Hook, Trainer, amp_dtype
from cellkit.errors import TrainingError
from cellkit.models.checkpoint import load_checkpoint, save_checkpoint

TINY: dict[str, Any] = {
    "name": "tiny",
    "data": {"synth_train": 6, "synth_test": 2, "synth_seed": 5, "synth_max_size": 128, "val_fraction": 0.34,
             "augment": {"crop_size": 96}},
    "model": {"backbone": "resnet18", "num_classes": 4, "resize_mode": "fixed_scale", "rpn_pre_nms_top_n_train": 300,
              "rpn_post_nms_top_n_train": 150, "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 150,
              "box_batch_size_per_image": 64, "box_detections_per_img": 100,
              **{k.removeprefix("model."): v for k, v in NARROW_HEADS.items()}},
    "train": {"epochs": 2, "batch_size": 2, "iters_per_epoch": 2, "lr": 5e-4},
}


def tiny_config(tmp_path: Path, **overrides: Any) -> tuple[Path, cellkit.Config]:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path, cellkit.load_config(path, overrides)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cellkit", *args], capture_output=True, text=True, timeout=900, **kw)


@pytest.mark.slow
def test_run_directory_and_lr_read_back(tmp_path: Path) -> None:
    # warm-up epoch at 10 %, then MultiStepLR at 50 % / 75 % of 4 epochs, SGD with momentum
    _, cfg = tiny_config(tmp_path, **{"train.epochs": 4, "train.iters_per_epoch": 1, "train.optimizer": "sgd",
                                      "train.lr": 0.01, "train.momentum": 0.8, "train.weight_decay": 5e-4,
                                      "train.scheduler": "multistep", "train.milestones": [0.5, 0.75],
                                      "train.warmup_epochs": 1, "train.warmup_factor": 0.1})
    run = tmp_path / "run"
    trainer = DefaultTrainer(cfg, run, progress=False)
    summary = trainer.fit()
    group = load_checkpoint(run / "checkpoints/last.pth")["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"]) == (0.8, 5e-4)
    lines = read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    assert [m["lr"] for m in lines] == pytest.approx([0.001, 0.01, 0.001, 0.0001])
    assert [m["lr"] for m in lines] == pytest.approx(lr_trajectory(cfg.train))
    for key in ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg",
                "val_ap50", "val_ap", "train_seconds", "images_per_s", "peak_mem_mb"):
        assert all(key in m and np.isfinite(m[key]) for m in lines), key
    # the run's config is the one asked for with what training measured filled in (classes, largest cell)
    resolved = cfg.replace({"model.num_classes": 4, "model.max_cell_diameter": trainer.cfg.model.max_cell_diameter})
    stored, want = cellkit.load_config(run / "config.yaml").flat(), resolved.flat()
    assert trainer.cfg.model.max_cell_diameter > 0
    assert {k: (stored[k], want[k]) for k in want if stored[k] != want[k]} == {}
    last = load_checkpoint(run / "checkpoints/last.pth")
    assert {"model", "optimizer", "scaler", "epoch", "config", "history", "rng", "hooks"} <= set(last)
    assert {"ValidationHook", "LRScheduleHook", "EarlyStoppingHook", "CheckpointHook"} <= set(last["hooks"])
    assert last["hooks"]["CheckpointHook"]["best"] == pytest.approx(max(m["val_ap50"] for m in read_jsonl(run / "metrics.jsonl")))
    ckpt = load_checkpoint(run / "checkpoints/best.pth")
    assert {"model", "epoch", "config", "history"} <= set(ckpt) and "optimizer" not in ckpt  # for inference
    best = max(lines, key=lambda m: m["val_ap50"])
    assert ckpt["epoch"] == best["epoch"]
    from cellkit.evaluation.coco import coco_evaluate

    rescored = coco_evaluate(run / "val_gt.json", run / "val_predictions.json", max_dets=cfg.eval.max_dets)
    assert rescored.ap50 == pytest.approx(best["val_ap50"], abs=1e-9)
    assert json.loads((run / "metrics.json").read_text())["best_val_ap50"] == pytest.approx(best["val_ap50"])
    assert (run / "plots/curves.png").stat().st_size > 10_000
    assert summary["epochs_run"] == 4
    # TensorBoard: every metrics.jsonl number as a scalar, the validation images with predictions
    # at every evaluation, the resolved config as text
    assert_tensorboard_equals_history(run, lines)
    images = event_images(run)
    val_epochs = [m["epoch"] for m in lines if m.get("val_ap50") is not None]
    assert len(images) == min(cfg.train.tensorboard_images, 2)  # 2 validation images
    assert all([step for step, _, _ in shots] == val_epochs for shots in images.values())
    assert all(w > h for shots in images.values() for _, w, h in shots)  # ground truth | predictions
    assert cellkit.Config.from_dict(yaml.safe_load("\n".join(line[4:] for line in event_text(run).splitlines()))) == resolved
    gt = json.loads((run / "val_gt.json").read_text())
    assert len(gt["images"]) == 2 and gt["annotations"]

    # evaluating another checkpoint leaves the best epoch's predictions (what notebook 04 reads) alone
    from cellkit.inference.split import evaluate_run

    before = (run / "val_predictions.json").read_bytes()
    report = evaluate_run(run, checkpoint="last", iou_types=("segm",), cell_metrics=False, progress=False)
    assert (run / "val_predictions.json").read_bytes() == before
    assert (run / "val_predictions_last.json").is_file() and report.cells is None

    # predict_split from the best checkpoint reproduces the best epoch's validation exactly
    from cellkit.inference.split import predict_split
    from cellkit.models.checkpoint import model_from_checkpoint

    model, run_cfg, _ = model_from_checkpoint(run / "checkpoints/best.pth")
    sp = predict_split(model, run_cfg, run_dir=run, with_gt=True, progress=False)
    assert sp.gt == str(run / "val_gt.json") and [d.image_id for d in sp.detections] == [im["id"] for im in gt["images"]]
    again = sp.evaluate(iou_types=("segm",), cell_metrics=False).results["segm"]
    assert again.ap50 == pytest.approx(best["val_ap50"], abs=1e-9)


class CurveSnapshots(Hook):
    """The bytes of plots/curves.png after every epoch's CurvePlotHook (80) and after its after_train."""

    priority = 81

    def before_train(self) -> None:
        self.seen: list[bytes] = []

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        self.seen.append((self.trainer.run_dir / "plots/curves.png").read_bytes())

    def after_train(self, summary: dict[str, Any]) -> None:
        self.final = (self.trainer.run_dir / "plots/curves.png").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0.0, float("inf")])
def test_the_curve_plot_keeps_to_its_share_of_the_time(tmp_path: Path, budget: float) -> None:
    # budget 0: drawing may take no time, so only the first epoch and the end are drawn; an
    # unlimited budget draws every epoch and leaves nothing to draw at the end
    _, cfg = tiny_config(tmp_path, **{"train.epochs": 3, "train.iters_per_epoch": 1})
    snap = CurveSnapshots()
    Trainer(cfg, tmp_path / "run", hooks=[CurvePlotHook(budget=budget), snap], progress=False).fit()
    one, two, three = snap.seen
    if budget == 0:
        assert one == two == three and snap.final != one
    else:
        assert len({one, two, three}) == 3 and snap.final == three


class LastSnapshots(Hook):
    """The epoch checkpoints/last.pth holds after every epoch's CheckpointHook (70), and after training;
    stops the run after ``stop_at`` epochs, after the CheckpointHook has run (priority 90)."""

    priority = 90

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.seen, self.final = stop_at, [], None

    def held(self) -> int | None:
        last = self.trainer.run_dir / "checkpoints/last.pth"
        return load_checkpoint(last)["epoch"] if last.exists() else None

    def after_epoch(self, metrics: dict[str, Any]) -> None:
        self.seen.append(self.held())
        if metrics["epoch"] == self.stop_at:
            self.trainer.request_stop("stopped by the test")

    def after_train(self, summary: dict[str, Any]) -> None:
        self.final = self.held()


@pytest.mark.slow
def test_last_checkpoint_every_n_epochs_at_the_end_and_when_stopped(tmp_path: Path) -> None:
    # every 2 epochs and after the last one (3)
    _, cfg = tiny_config(tmp_path, **{"train.epochs": 3, "train.iters_per_epoch": 1, "train.checkpoint_every": 2})
    snap = LastSnapshots()
    Trainer(cfg, tmp_path / "a", hooks=[CheckpointHook(), snap], progress=False).fit()
    assert (snap.seen, snap.final) == ([None, 2, 3], 3)
    # a hook that stops the run after the checkpoint hook has run still leaves last.pth at the
    # epoch the run ended, to resume from: a run of 2 epochs (every 4), resumed for 6 and stopped
    # after epoch 3, before any epoch of the cadence
    cfg = cfg.replace({"train.epochs": 2, "train.checkpoint_every": 4})
    snap = LastSnapshots()
    Trainer(cfg, tmp_path / "b", hooks=[CheckpointHook(), snap], progress=False).fit()
    assert (snap.seen, snap.final) == ([None, 2], 2)
    snap = LastSnapshots(stop_at=3)
    Trainer(cfg.replace({"train.epochs": 6}), tmp_path / "b", hooks=[CheckpointHook(), snap],
            progress=False).fit(resume=True)
    assert (snap.seen, snap.final) == ([2], 3)


@pytest.mark.slow
def test_channels_last_training_runs_its_convolutions_in_channels_last(tmp_path: Path) -> None:
    # train.channels_last crashed on the first step ("required rank 4 tensor to use channels_last
    # format": it converted each (3, H, W) image); now the weights carry the layout, the first
    # convolution answers in it, and the step's losses are the contiguous run's
    _, cfg = tiny_config(tmp_path, **{"train.epochs": 1, "train.iters_per_epoch": 1, "train.eval_every": 0})
    losses, layouts = {}, []
    for channels_last in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(cfg.replace({"train.channels_last": channels_last}), None, progress=False)
        conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        seen = conv.register_forward_hook(
            lambda m, i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
        summary = trainer.fit()
        seen.remove()
        losses[channels_last] = {k: v for k, v in trainer.history[0].items() if k.startswith("loss")}
        assert summary["epochs_run"] == 1
    assert layouts == [False, True]
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


@pytest.mark.slow
def test_user_datasets_from_a_notebook(tmp_path: Path) -> None:
    # any torch Dataset of (image, target) pairs trains and validates; the validation ground truth
    # comes from its targets and equals the one built from the label maps
    from torch.utils.data import Subset

    from cellkit.data import CellDataset, build_coco, train_val_samples

    _, cfg = tiny_config(tmp_path, **{"train.epochs": 1, "train.iters_per_epoch": 1})
    train_s, val_s = train_val_samples(cfg.data, cfg.model.num_classes, progress=False)
    train_set = Subset(CellDataset(train_s), range(len(train_s)))
    val_set = Subset(CellDataset(val_s), range(len(val_s)))
    t = DefaultTrainer(cfg, tmp_path / "run", train_set=train_set, val_set=val_set, progress=False)
    summary = t.fit()
    assert summary["best_val_ap50"] is not None
    gt, ref = t.val_gt, build_coco(val_s, 4, progress=False)
    assert [im["id"] for im in gt["images"]] == [im["id"] for im in ref["images"]]
    assert sorted(a["area"] for a in gt["annotations"]) == sorted(a["area"] for a in ref["annotations"])
    assert json.loads((tmp_path / "run" / "val_gt.json").read_text())["images"] == gt["images"]
    # TensorBoard draws validation images of any dataset of (image, target) pairs
    assert set(event_images(tmp_path / "run")) == {"val/image0", "val/image1"}


@pytest.mark.slow
def test_plateau_decays_hold_in_a_real_run(tmp_path: Path) -> None:
    # patience 0: every epoch without a new best decays the lr; the run's lrs must follow the
    # schedule driven by the run's own validation AP50
    _, cfg = tiny_config(tmp_path, **{"train.epochs": 4, "train.iters_per_epoch": 1, "train.lr": 1e-3,
                                      "train.scheduler": "plateau", "train.plateau_patience": 0,
                                      "train.plateau_factor": 0.5})
    t = DefaultTrainer(cfg, None, progress=False)
    t.fit()
    lrs = [m["lr"] for m in t.history]
    assert lrs == pytest.approx(lr_trajectory(cfg.train, [m["val_ap50"] for m in t.history]))


def test_amp_is_off_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None and amp_dtype("fp16", cpu) is None and amp_dtype("bf16", cpu) is None
    cuda = torch.device("cuda", 0)
    assert amp_dtype("auto", cuda) is torch.float16 and amp_dtype("bf16", cuda) is torch.bfloat16
    assert amp_dtype("off", cuda) is None


def test_tensorboard_hook_follows_the_config() -> None:
    from cellkit.engine.defaults import default_hooks
    from cellkit.engine.hooks import CheckpointHook
    from cellkit.engine.tensorboard import TensorBoardHook, scalar_tag

    on, off = cellkit.load_config("demo"), cellkit.load_config("demo", {"train.tensorboard": False})
    assert sum(isinstance(h, TensorBoardHook) for h in default_hooks(on)) == 1
    assert not any(isinstance(h, TensorBoardHook) for h in default_hooks(off))
    # it flushes before last.pth is written, so a resumed run neither loses nor repeats an epoch
    assert TensorBoardHook.priority < CheckpointHook.priority
    assert [scalar_tag(k) for k in ("loss", "loss_mask", "val_ap50", "lr", "images_per_s", "peak_mem_mb", "steps")] == [
        "loss/total", "loss/loss_mask", "val/AP50", "train/lr", "speed/images_per_s", "memory/peak_mem_mb", "train/steps"]


def _with_batches(trainer: Trainer, batches: list[tuple[list, list]]) -> None:
    trainer._loader = DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


@pytest.mark.slow
def test_nonfinite_loss_skips_the_step_and_is_counted(tmp_path: Path) -> None:
    _, cfg = tiny_config(tmp_path, **{"train.iters_per_epoch": 4, "train.eval_every": 0})
    t = DefaultTrainer(cfg, None, progress=False)
    good = collate([t.train_set[0], t.train_set[1]])
    bad_img = [good[0][0].clone() * float("nan"), good[0][1]]
    _with_batches(t, [good, (bad_img, good[1]), good, good])
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    m = t.train_one_epoch(0)
    assert m["nonfinite_steps"] == 1 and m["steps"] == 3 and m["images"] == 6
    assert np.isfinite(m["loss"])
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


@pytest.mark.slow
def test_nonfinite_losses_in_a_row_stop_the_run(tmp_path: Path) -> None:
    _, cfg = tiny_config(tmp_path, **{"train.iters_per_epoch": 4, "train.eval_every": 0, "train.max_nonfinite": 3})
    t = DefaultTrainer(cfg, None, progress=False)
    good = collate([t.train_set[0], t.train_set[1]])
    bad = ([im * float("nan") for im in good[0]], good[1])
    _with_batches(t, [good, bad, bad, bad])
    with pytest.raises(TrainingError, match="3 non-finite losses in a row .*epoch 1, batch 4"):
        t.train_one_epoch(0)


@pytest.mark.slow
def test_accumulation_and_clipping(tmp_path: Path) -> None:
    _, cfg = tiny_config(tmp_path, **{"train.iters_per_epoch": 2, "train.accumulate": 2, "train.eval_every": 0,
                                      "train.optimizer": "sgd", "train.momentum": 0.0, "train.weight_decay": 0.0,
                                      "train.lr": 1.0, "train.grad_clip": 1e-3})
    t = DefaultTrainer(cfg, None, progress=False)
    batch = collate([t.train_set[0], t.train_set[1]])
    _with_batches(t, [batch] * 4)
    before = torch.cat([p.detach().flatten().clone() for p in t.params])
    m = t.train_one_epoch(0)
    assert m["steps"] == 2 and m["images"] == 8
    after = torch.cat([p.detach().flatten() for p in t.params])
    # two SGD steps of lr 1 with the gradient norm clipped to 1e-3 move the weights by <= 2e-3
    assert 0 < float((after - before).norm()) <= 2e-3 * (1 + 1e-4)


def test_repeat_factor_sampler_oversamples_rare_classes(tmp_path: Path) -> None:
    from cellkit.data.sampling import RepeatFactorSampler

    _, cfg = tiny_config(tmp_path, **{"train.sampler": "repeat_factor", "train.repeat_threshold": 0.9,
                                      "data.synth_train": 10})
    t = DefaultTrainer(cfg, None, progress=False)
    t.train_set.preload(False)
    sampler = t.train_loader().sampler
    assert isinstance(sampler, RepeatFactorSampler)
    presence = t.train_set.class_presence(4)
    rare = presence[:, 2:].any(1)
    assert rare.any() and (~rare).any()
    assert sampler.factors[torch.from_numpy(rare)].min() > sampler.factors[torch.from_numpy(~rare)].max() - 1e-9


def _wait_for(pred, timeout: float, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read() if proc.stderr else ''}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.05)


RECORDER = """
import json, os
from cellkit.engine.train_loop import Hook


class CallRecorder(Hook):
    \"\"\"A hook from outside the package: records every call; its record is its resumable state.\"\"\"

    def __init__(self):
        self.calls = []

    def before_train(self):
        self.calls.append(["before_train"])

    def before_epoch(self, epoch):
        self.calls.append(["before_epoch", epoch])

    def after_step(self, step):
        self.calls.append(["after_step", step["epoch"], step["iteration"]])

    def after_epoch(self, metrics):
        self.calls.append(["after_epoch", metrics["epoch"], "val_ap50" in metrics])

    def after_train(self, summary):
        self.calls.append(["after_train", summary["epochs_run"]])
        with open(os.environ["RECORDER_OUT"], "w") as f:
            json.dump(self.calls, f)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"] + [["resumed"]]
"""


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_with_a_custom_hook(tmp_path: Path) -> None:
    # a hook defined outside the package (train.hooks) sees every call in order, and its state
    # comes back from last.pth: the calls of the epoch the kill cut short are not in its record
    (tmp_path / "recorder.py").write_text(RECORDER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "RECORDER_OUT": str(tmp_path / "calls.json")}
    cfg_path, cfg = tiny_config(tmp_path)
    overrides = ["--set", "train.epochs=4", "--set", "train.iters_per_epoch=3", "--set", "train.scheduler=multistep",
                 "--set", "train.milestones=[0.5,0.75]", "--set", "train.warmup_epochs=1",
                 "--set", "train.hooks=[recorder:CallRecorder]", "--no-progress"]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cellkit", "train", "--config", str(cfg_path), "--out", str(run),
                             *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = run / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(read_jsonl(metrics)) >= 2, 600, proc)
    time.sleep(1.0)  # into epoch 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(run / "checkpoints/last.pth")["epoch"]
    assert 2 <= done < 4, "the kill must land before the run finished"
    r = run_cli("train", "--out", str(run), "--resume", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {run / 'checkpoints/last.pth'} after epoch {done}" in r.stdout
    lines = read_jsonl(metrics)
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    expected = lr_trajectory(cellkit.load_config(run / "config.yaml").train)
    assert [m["lr"] for m in lines] == pytest.approx(expected)
    assert expected == pytest.approx([5e-5, 5e-4, 5e-5, 5e-6])
    assert load_checkpoint(run / "checkpoints/last.pth")["epoch"] == 4
    # TensorBoard: two event files (killed, resumed), each epoch once: the epoch the kill cut
    # short, if its events were written, is purged
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    assert_tensorboard_equals_history(run, lines)

    n = lines[0]["steps"]  # optimiser steps per epoch (4 training images in batches of 2)
    assert all(m["steps"] == n for m in lines) and n >= 2

    def epoch_calls(e: int) -> list[list]:
        return [["before_epoch", e], *(["after_step", e, n * e + k] for k in range(1, n + 1)), ["after_epoch", e + 1, True]]

    calls = json.loads((tmp_path / "calls.json").read_text())
    assert calls == [["before_train"], *(c for e in range(done) for c in epoch_calls(e)), ["resumed"], ["before_train"],
                     *(c for e in range(done, 4) for c in epoch_calls(e)), ["after_train", 4]]


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.pth"
    save_checkpoint({"model": {"w": torch.arange(10)}, "epoch": 1}, path)
    code = (
        "import torch\nfrom cellkit.models.checkpoint import save_checkpoint\n"
        f"save_checkpoint({{'model': {{'w': torch.ones(600_000_000, dtype=torch.uint8)}}, 'epoch': 2}}, {str(path)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    tmp_files = lambda: [p for p in path.parent.iterdir() if p.name.startswith(".last.pth.tmp")]  # noqa: E731
    _wait_for(lambda: any(p.stat().st_size > 1_000_000 for p in tmp_files()), 120, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp_files(), "the kill should have landed mid-write"
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.arange(10))


@pytest.mark.slow
def test_cli_train_is_quiet_in_logs_and_prints_epoch_lines(tmp_path: Path) -> None:
    cfg_path, _ = tiny_config(tmp_path)
    r = run_cli("train", "--config", str(cfg_path), "--out", str(tmp_path / "run"), "--set", "train.epochs=1",
                "--set", "train.iters_per_epoch=1")
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1 | loss" in r.stdout and "run directory:" in r.stdout
    assert "it/s" not in r.stderr and "s/it" not in r.stderr  # no progress bars when not on a terminal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    cfg_path, cfg = tiny_config(tmp_path, **{"data.synth_train": 9})
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "cellkit", "train", "--config", str(cfg_path), "--out", str(run), "--no-progress"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in lines] == [1, 2]  # rank 0 alone writes
    # 6 training images: 3 per rank in batches of 2 and 1; the counts sum over both ranks
    assert all(m["images"] == 6 for m in lines)
    assert all(m["steps"] == 2 for m in lines)
    assert r.stdout.count("epoch 1/2 |") == 1
    assert load_checkpoint(run / "checkpoints/last.pth")["epoch"] == 2
    names = {p.name for p in run.iterdir()}
    events = {n for n in names if n.startswith("events.out.tfevents.")}
    assert len(events) == 1  # rank 0 alone writes TensorBoard events
    assert names - events <= {"checkpoints", "config.yaml", "metrics.json", "metrics.jsonl", "plots", "val_gt.json",
                              "val_predictions.json"}
    assert_tensorboard_equals_history(run, lines)
    # each rank predicted its own shard of the 3 validation images; rank 0 gathered all of them
    gt_ids = {im["id"] for im in json.loads((run / "val_gt.json").read_text())["images"]}
    pred_ids = {p["image_id"] for p in json.loads((run / "val_predictions.json").read_text())}
    assert len(gt_ids) == 3 and pred_ids == gt_ids
