"""Hostile but realistic input: every case is a one-line error naming the key or file (exit 2),
never a traceback, a wrong result with exit 0, or a lost run. One section per kind of failure:

1. values and files that used to crash (config ranges, unwritable outputs, foreign checkpoints,
   malformed test indexes, tiny images);
2. wrong results with exit 0 (cut-short RLE, predictions of other images, multi-page TIFFs);
3. lost data (a run, a dataset or COCO files replaced by accident);
4. races (two trainings in one run directory; a stale lock);
5. misleading messages and unbounded work (broken links, huge claimed mask sizes);
6. files written as a set, killed with -9 at every step (a submission's json and zip,
   train_gt.json and val_gt.json, a synthetic dataset), and temporary files of dead writers;
7. a full disk (a real tmpfs that is full): one line, exit 2, the previous outputs as they were;
8. outputs that would destroy inputs (a test index, a checkpoint, a file of one's own);
9. resuming a run without last.pth, or with a key that cannot change mid-run;
10. hostile JSON and YAML (5000-digit integers, deep nesting, alias bombs, duplicate keys,
    ranges that bound memory), each one short line naming the file;
11. silent wrong results (no cells, label ids near 2**63);
12. a folder where a config file is expected.

Folders that really refuse writes even to root: a path under a regular file, and ``/proc``
(``chmod`` does not stop root, so a read-only folder made that way proves nothing).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from conftest import NARROW_HEADS
from pycocotools import mask as mask_utils

import cellkit
from cellkit.cli import main
from cellkit.config import Config, ModelConfig, load_config
from cellkit.data import read_image, read_test_index, scan_train, split_samples
from cellkit.errors import ConfigError, DataError
from cellkit.runs import RunDirLock, claim_run_dir
from cellkit.structures.rle import rle_decodes, rle_run_lengths

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = {"model.backbone": "resnet18", "model.num_classes": 4, "model.min_size": 128, "model.max_size": 160,
               "model.box_detections_per_img": 20, "model.rpn_post_nms_top_n_test": 100, **NARROW_HEADS}
TINY_TRAIN = ["--set", "model.backbone=resnet18", "--set", "model.resize_mode=fixed_scale",
              "--set", "model.rpn_pre_nms_top_n_train=200", "--set", "model.rpn_post_nms_top_n_train=100",
              "--set", "model.box_batch_size_per_image=32", "--set", "model.box_detections_per_img=50",
              "--set", "train.epochs=1", "--set", "train.iters_per_epoch=1", "--set", "data.augment.crop_size=96",
              *(a for k, v in NARROW_HEADS.items() for a in ("--set", f"{k}={v}")), "--no-progress"]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``cellkit ARGS`` in this process: (exit status, stdout, stderr). A traceback fails the test."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse rejects a flag value
        rc = int(e.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(rc: int, err: str, *names: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and "error:" in err
    for name in names:
        assert name in err, (name, err)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    """A run trained with nothing but its weights: config.yaml and checkpoints/best.pth of a
    resnet18 model of ``synth_root`` (a quarter of the images for validation)."""
    from cellkit.models.checkpoint import save_checkpoint

    cfg = load_config(None, {**SMALL_MODEL, "data.root": str(synth_root), "data.val_fraction": 0.25})
    torch.manual_seed(0)
    model = cellkit.build_model(cfg)
    run = tmp_path_factory.mktemp("run")
    cfg.save(run / "config.yaml")
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1},
                    run / "checkpoints" / "best.pth")
    return run


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    return f


# ============================================================================================
# 1. tracebacks -> one-line errors naming the key or the file


@pytest.mark.parametrize("key, value", [
    ("train.batch_size", "0"), ("train.accumulate", "0"), ("train.epochs", "-1"), ("train.epochs", "0"),
    ("data.val_fraction", "1.0"), ("data.val_fraction", "-0.1"), ("train.lr", "nan"), ("train.lr", "0"),
    ("train.lr", "-1e-3"), ("data.num_workers", "-1"), ("model.num_classes", "0"), ("predict.mask_thresh", "2"),
    ("predict.score_thresh", "-0.5"), ("eval.max_dets", "0"), ("train.iters_per_epoch", "0"),
    ("model.box_nms_thresh", "0"), ("train.momentum", "1.5"), ("train.plateau_factor", "1"),
    ("predict.tile_overlap", "4096"), ("data.augment.hflip", "1.5"), ("train.grad_clip", "inf"),
])
def test_out_of_range_keys_fail_when_the_config_is_built(capsys, synth_root: Path, tmp_path: Path,
                                                         key: str, value: str) -> None:
    # caught before any data is read or any folder is made; the key, not a data file, is blamed
    rc, _, err = cli(capsys, "train", "--data", synth_root, "--out", tmp_path / "run", "--set", f"{key}={value}",
                     "--no-progress")
    one_line_error(rc, err, key)
    assert not (tmp_path / "run").exists()


def test_ranges_hold_for_configs_changed_by_hand(synth_root: Path) -> None:
    cfg = load_config(None, {"data.root": str(synth_root)})
    cfg.train.accumulate = 0
    from cellkit.engine.defaults import DefaultTrainer

    with pytest.raises(ConfigError, match="train.accumulate: must be at least 1, got 0"):
        DefaultTrainer(cfg, None)
    with pytest.raises(ConfigError, match="model.num_classes: must be at least 1"):
        cellkit.build_model(ModelConfig(backbone="resnet18", num_classes=0))
    assert isinstance(Config().validate(), Config)


@pytest.mark.parametrize("args, name", [
    (["evaluate", "--gt", "{gt}", "--pred", "{gt}", "--iou-threshold", "2"], "--iou-threshold"),
    (["evaluate", "--gt", "{gt}", "--pred", "{gt}", "--score-threshold", "nan"], "--score-threshold"),
    (["tune-thresholds", "--run", "{run}", "--mask-grid", "0.5,2", "--device", "cpu"], "predict.mask_thresh"),
    (["tune-thresholds", "--run", "{run}", "--score-grid", "-1", "--device", "cpu"], "predict.score_thresh"),
    (["synth", "--out", "{tmp}/s", "--train", "0"], "--train"),
    (["synth", "--out", "{tmp}/s", "--max-size", "4"], "--max-size"),
])
def test_command_line_values_out_of_range(capsys, synth_root: Path, run_dir: Path, tmp_path: Path,
                                          args: list[str], name: str) -> None:
    fill = {"gt": synth_root / "test_gt.json", "run": run_dir, "tmp": tmp_path}
    rc, out, err = cli(capsys, *[a.format(**fill) for a in args])
    assert rc == 2 and name in err and "Traceback" not in err, err
    assert not (run_dir / "thresholds.json").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("fraction", ["1.0", "-0.1", "nan"])
def test_convert_val_fraction_out_of_range(capsys, synth_root: Path, tmp_path: Path, fraction: str) -> None:
    rc, _, err = cli(capsys, "convert", "--data", synth_root, "--out", tmp_path / "coco", "--val-fraction", fraction)
    assert rc == 2 and "--val-fraction" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match=r"data.val_fraction: must be in \[0, 1\)"):
        split_samples(scan_train(synth_root), float(fraction))


def test_config_file_that_is_not_utf8(capsys, tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\ntrain:\n  lr: 0.001\n".encode("latin-1"))
    rc, _, err = cli(capsys, "config", "--config", path)
    one_line_error(rc, err, str(path), "UTF-8")


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
@pytest.mark.parametrize("command", ["convert", "synth", "train", "predict", "demo", "ablate"])
def test_unwritable_outputs_fail_before_the_work(capsys, synth_root: Path, run_dir: Path, a_file: Path,
                                                  command: str, where: str) -> None:
    out = (a_file / "out") if where == "under_a_file" else Path("/proc/cellkit-out")
    args: dict[str, list[Any]] = {
        "convert": ["convert", "--data", synth_root, "--out", out],
        "synth": ["synth", "--out", out, "--train", 2, "--test", 1, "--max-size", 64],
        "train": ["train", "--data", synth_root, "--out", out, "--no-progress"],
        "predict": ["predict", "--checkpoint", run_dir / "checkpoints" / "best.pth", "--data", synth_root,
                    "--out", out / "test-results.json", "--device", "cpu", "--no-thresholds", "--no-progress"],
        "demo": ["demo", "--out", out],
        "ablate": ["ablate", "tiny", "--out", out, "--no-progress"],
    }
    rc, stdout, err = cli(capsys, *args[command])
    one_line_error(rc, err, str(out.parent if where == "under_a_file" else "/proc"))
    assert "predicting" not in stdout and "[1/5]" not in stdout  # refused before the long work


@pytest.mark.parametrize("command", ["tune-thresholds", "evaluate"])
def test_run_outputs_that_are_folders_fail_before_predicting(capsys, run_dir: Path, command: str) -> None:
    # thresholds.json / val_predictions.json taken by a folder: an error before predicting, not after
    name = "thresholds.json" if command == "tune-thresholds" else "val_predictions.json"
    (run_dir / name).mkdir()
    try:
        args = ["--run", run_dir, "--no-progress"] + (["--device", "cpu"] if command == "tune-thresholds" else [])
        rc, _, err = cli(capsys, command, *args)
        one_line_error(rc, err, str(run_dir / name), "is a folder")
    finally:
        (run_dir / name).rmdir()


@pytest.fixture(scope="module")
def other_backbone_checkpoint(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's weights under a stored config that names another backbone."""
    ckpt = torch.load(run_dir / "checkpoints" / "best.pth", weights_only=True)
    ckpt["config"]["model"]["backbone"] = "mobilenet_v3_large"
    path = tmp_path_factory.mktemp("foreign") / "mislabelled.pth"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("case", ["set_backbone", "mislabelled"])
def test_predict_with_weights_of_another_backbone(capsys, synth_root: Path, run_dir: Path, tmp_path: Path,
                                                  other_backbone_checkpoint: Path, case: str) -> None:
    if case == "set_backbone":
        ckpt = run_dir / "checkpoints" / "best.pth"
        extra = ["--set", "model.backbone=mobilenet_v3_large"]
        names = [str(ckpt), "trained with backbone resnet18", "asks for mobilenet_v3_large"]
    else:
        ckpt, extra, names = other_backbone_checkpoint, [], [str(other_backbone_checkpoint), "mobilenet_v3_large"]
    rc, _, err = cli(capsys, "predict", "--checkpoint", ckpt, "--data", synth_root, "--out", tmp_path / "s.json",
                     "--device", "cpu", "--no-thresholds", "--no-progress", *extra)
    one_line_error(rc, err, *names, "differ in shape")


def test_resume_with_another_backbone(capsys, synth_root: Path, run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.copy(run / "checkpoints" / "best.pth", run / "checkpoints" / "last.pth")
    rc, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "model.backbone=mobilenet_v3_large",
                     "--no-progress")
    one_line_error(rc, err, "model.backbone cannot change when resuming", "resnet18", "mobilenet_v3_large")


@pytest.mark.parametrize("stored", [["a", "list"], "text", 3])
def test_checkpoint_whose_config_is_not_a_mapping(capsys, synth_root: Path, run_dir: Path, tmp_path: Path,
                                                  stored: Any) -> None:
    ckpt = torch.load(run_dir / "checkpoints" / "best.pth", weights_only=True)
    ckpt["config"] = stored
    path = tmp_path / "odd.pth"
    torch.save(ckpt, path)
    rc, _, err = cli(capsys, "predict", "--checkpoint", path, "--data", synth_root, "--out", tmp_path / "s.json",
                     "--device", "cpu", "--no-thresholds", "--no-progress")
    one_line_error(rc, err, str(path), "not a mapping")


@pytest.mark.parametrize("file_name", [5, None, ["a.tif"], "../escape.tif", ""])
def test_test_index_file_name_of_the_wrong_kind(capsys, synth_root: Path, run_dir: Path, tmp_path: Path,
                                                file_name: Any) -> None:
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    index = root / "test_image_name_to_ids.json"
    entries = json.loads(index.read_text())
    entries[1]["file_name"] = file_name
    index.write_text(json.dumps(entries))
    with pytest.raises(DataError, match="entry 1: file_name must be"):
        read_test_index(root)
    rc, _, err = cli(capsys, "predict", "--checkpoint", run_dir / "checkpoints" / "best.pth", "--data", root,
                     "--out", tmp_path / "s.json", "--device", "cpu", "--no-progress")
    one_line_error(rc, err, str(index), "entry 1")


@pytest.mark.parametrize("side", [1, 30])
def test_training_on_a_tiny_only_image(side: int) -> None:
    # a lone image of at most 32 px left a 1 x 1 map at stride 32: BatchNorm could not train on it
    torch.manual_seed(0)
    cfg = load_config(None, {"model.backbone": "resnet18", "model.num_classes": 4, "model.norm": "bn", "model.resize_mode": "fixed_scale",
                             "model.rpn_post_nms_top_n_train": 50, "model.box_batch_size_per_image": 16})
    model = cellkit.build_model(cfg).train()
    image = torch.rand(3, side, side)
    half = max(1, side // 2)
    masks = torch.zeros(1, side, side, dtype=torch.uint8)
    masks[0, :half, :half] = 1
    target = {"boxes": torch.tensor([[0.0, 0.0, float(half), float(half)]]), "labels": torch.tensor([1]),
              "masks": masks, "image_id": 1}
    losses = model([image], [target])
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    model.eval()
    with torch.no_grad():  # inference pads as before: the same shapes as torchvision's
        assert model.transform([image])[0].tensors.shape[-1] == 32


# ============================================================================================
# 2. wrong results with exit 0


def test_cut_short_rle_fails_check_submission(capsys, synth_root: Path, tmp_path: Path) -> None:
    gt = json.loads((synth_root / "test_gt.json").read_text())
    entries = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9, "bbox": a["bbox"],
                "segmentation": dict(a["segmentation"])} for a in gt["annotations"]]
    h, w = entries[0]["segmentation"]["size"]
    counts = entries[0]["segmentation"]["counts"]
    # the longest prefix that is a well-formed string whose runs stop short of h * w pixels and that
    # pycocotools decodes without a word (the rest of its mask is uninitialised memory)
    cut = next(counts[:k] for k in range(len(counts) - 1, 0, -1)
               if (r := rle_run_lengths(counts[:k])) is not None and 0 < sum(r) < h * w
               and _pycocotools_decodes({"size": [h, w], "counts": counts[:k]}))
    entries[0]["segmentation"]["counts"] = cut
    assert not rle_decodes({"size": [h, w], "counts": cut})
    (tmp_path / "sub.json").write_text(json.dumps(entries))
    rc, out, _ = cli(capsys, "check-submission", tmp_path / "sub.json", "--ids", synth_root)
    assert rc == 1 and "INVALID" in out and "entry 0" in out and "cut short" in out


def _pycocotools_decodes(rle: dict) -> bool:
    try:
        mask_utils.decode(rle)
    except ValueError:
        return False
    return True


def test_run_lengths_are_pycocotools(synth_root: Path) -> None:
    # our reading of the counts string against pycocotools' own encoder, on every test mask
    gt = json.loads((synth_root / "test_gt.json").read_text())
    for a in gt["annotations"]:
        seg = a["segmentation"]
        runs = rle_run_lengths(seg["counts"])
        assert runs is not None and sum(runs) == seg["size"][0] * seg["size"][1]
        again = mask_utils.frPyObjects({"size": seg["size"], "counts": runs}, *seg["size"])
        assert again["counts"].decode() == seg["counts"]


@pytest.mark.parametrize("mismatch", ["other_images", "other_sizes"])
def test_evaluate_predictions_of_other_images_is_an_error(capsys, synth_root: Path, tmp_path: Path,
                                                          mismatch: str) -> None:
    from cellkit.data import build_coco

    test_gt = synth_root / "test_gt.json"
    train_gt = build_coco(scan_train(synth_root), 4, progress=False)
    if mismatch == "other_images":  # the train split's ids (1..8) against the test ground truth (1..3)
        preds = [dict(a, score=0.9) for a in train_gt["annotations"] if a["image_id"] > 3]
    else:  # ids the test ground truth has, masks of the train images' sizes (which differ for ids 1 and 2)
        sizes = {im["id"]: (im["height"], im["width"]) for im in train_gt["images"]}
        test_sizes = {im["id"]: (im["height"], im["width"]) for im in json.loads(test_gt.read_text())["images"]}
        preds = [dict(a, score=0.9) for a in train_gt["annotations"]
                 if a["image_id"] in test_sizes and sizes[a["image_id"]] != test_sizes[a["image_id"]]]
        assert preds
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    rc, out, err = cli(capsys, "evaluate", "--gt", test_gt, "--pred", tmp_path / "pred.json")
    one_line_error(rc, err, str(tmp_path / "pred.json"), "do not match the ground truth")
    assert "AP50" not in out
    # a few strays among matching predictions are still dropped and counted, not an error
    good = [dict(a, score=0.9) for a in json.loads(test_gt.read_text())["annotations"]]
    (tmp_path / "mixed.json").write_text(json.dumps(good + preds[: len(good) // 2]))
    rc, out, _ = cli(capsys, "evaluate", "--gt", test_gt, "--pred", tmp_path / "mixed.json", "--no-cell-metrics")
    assert rc == 0 and "AP50   1.0000" in out and "dropped before evaluation" in out


def test_multi_page_tiff_is_refused(tmp_path: Path) -> None:
    stack = np.random.default_rng(0).integers(0, 255, (3, 40, 50), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")  # three grey pages
    with pytest.raises(DataError, match="3 pages"):
        read_image(tmp_path / "stack.tif")
    tifffile.imwrite(tmp_path / "planar.tif", stack, photometric="rgb", planarconfig="separate")  # one RGB page
    assert read_image(tmp_path / "planar.tif").shape == (40, 50, 3)


# ============================================================================================
# 3. data lost


def fake_run(run: Path) -> dict[str, bytes]:
    files = {"checkpoints/best.pth": b"best of the old run", "checkpoints/last.pth": b"last of the old run",
             "metrics.jsonl": b'{"epoch": 1}\n', "metrics.json": b"{}", "thresholds.json": b"{}",
             "notes.txt": b"mine"}
    for name, data in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(data)
    return files


@pytest.mark.slow
def test_train_into_an_existing_run_needs_resume_or_overwrite(capsys, synth_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    files = fake_run(run)
    rc, _, err = cli(capsys, "train", "--data", synth_root, "--out", run, *TINY_TRAIN)
    one_line_error(rc, err, str(run), "--resume", "--overwrite")
    assert {n: (run / n).read_bytes() for n in files} == files
    with pytest.raises(DataError, match="holds a previous run"):
        with claim_run_dir(run):
            pass
    # --overwrite: the old run's outputs go, other files stay, the new run is whole
    rc, out, err = cli(capsys, "train", "--data", synth_root, "--out", run, "--overwrite",
                       "--set", "data.val_fraction=0", *TINY_TRAIN)
    assert rc == 0, err
    assert "replaced the previous run" in out
    assert not (run / "thresholds.json").exists() and (run / "notes.txt").read_bytes() == b"mine"
    from cellkit.models.checkpoint import load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "best.pth")["epoch"] == 1
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.slow
def test_overwrite_replaces_the_old_runs_tensorboard_events(capsys, synth_root: Path, tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from cellkit.engine.tensorboard import read_scalars, scalar_tag

    run = tmp_path / "run"
    fake_run(run)
    with SummaryWriter(str(run)) as w:  # the old run's events: 3 epochs of a loss curve
        for epoch in (1, 2, 3):
            w.add_scalar(scalar_tag("loss"), 9.0, epoch)
    old_events = {f.name for f in run.glob("events.out.tfevents.*")}
    assert old_events
    rc, _, err = cli(capsys, "train", "--data", synth_root, "--out", run, "--overwrite",
                     "--set", "data.val_fraction=0", *TINY_TRAIN)
    assert rc == 0, err
    loss = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    steps = read_scalars(run)[scalar_tag("loss")]
    assert [s for s, _ in steps] == [1] and abs(steps[0][1] - loss) < 1e-4
    assert not old_events & {f.name for f in run.glob("events.out.tfevents.*")}  # the old file went with its run


def test_synth_refuses_a_folder_with_other_content(capsys, synth_root: Path, tmp_path: Path) -> None:
    ds = tmp_path / "dataset"
    shutil.copytree(synth_root, ds)
    (ds / "synth_info.json").unlink()  # a dataset of one's own, not a synthetic one
    before = sorted(p.relative_to(ds) for p in ds.rglob("*"))
    index = (ds / "test_image_name_to_ids.json").read_bytes()
    rc, _, err = cli(capsys, "synth", "--out", ds, "--train", 2, "--test", 1, "--max-size", 64)
    one_line_error(rc, err, str(ds), "not empty")
    assert sorted(p.relative_to(ds) for p in ds.rglob("*")) == before
    assert (ds / "test_image_name_to_ids.json").read_bytes() == index


def test_synth_replaces_its_own_previous_output_whole(capsys, tmp_path: Path) -> None:
    out = tmp_path / "synth"
    assert cli(capsys, "synth", "--out", out, "--train", 3, "--test", 1, "--max-size", 48, "--seed", 1)[0] == 0
    assert cli(capsys, "synth", "--out", out, "--train", 2, "--test", 1, "--max-size", 48, "--seed", 2)[0] == 0
    assert len(list((out / "train").iterdir())) == 2  # not 3 + 2
    assert json.loads((out / "synth_info.json").read_text())["seed"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]  # no temporary folder left


def test_convert_leaves_the_previous_pair_when_an_image_is_bad(capsys, synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    out = tmp_path / "coco"
    assert cli(capsys, "convert", "--data", root, "--out", out, "--val-fraction", "0.25", "--seed", 1)[0] == 0
    before = contents(out)
    # break an image of the validation split of another seed: train_gt.json used to be written already
    _, val = split_samples(scan_train(root), 0.25, seed=2)
    data = val[0].image_path.read_bytes()
    val[0].image_path.write_bytes(data[: len(data) // 2])
    rc, _, err = cli(capsys, "convert", "--data", root, "--out", out, "--val-fraction", "0.25", "--seed", 2)
    one_line_error(rc, err, val[0].name)
    assert contents(out) == before


# ============================================================================================
# 4. races


HOLDER = """
import sys, time
from cellkit.runs import claim_run_dir
with claim_run_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_training_in_a_locked_run_dir_is_refused(capsys, synth_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        writing = run / "checkpoints" / f".last.pth.tmp{holder.pid}"  # the holder's checkpoint, mid-write
        writing.write_bytes(b"half a checkpoint")
        rc, _, err = cli(capsys, "train", "--data", synth_root, "--out", run, *TINY_TRAIN)
        one_line_error(rc, err, str(run), "in use by another training", f"pid {holder.pid}")
        with pytest.raises(DataError, match=f"pid {holder.pid}"):
            with claim_run_dir(run):
                pass
        assert writing.read_bytes() == b"half a checkpoint"  # the refused process cleaned up nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing: its lock is taken over, its half-written file removed
    said: list[str] = []
    with claim_run_dir(run, log=said.append) as lock:
        assert lock is not None and lock.locked and lock.taken_over["pid"] == holder.pid
        assert not writing.exists()
    assert any(f"pid {holder.pid}" in s and "took over" in s for s in said)


def test_lock_is_released_and_a_stale_record_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunDirLock(run) as first:
        assert first.locked and first.taken_over is None
        with pytest.raises(DataError, match="in use"):
            RunDirLock(run).acquire()
    assert not (run / ".lock").exists()  # a clean exit leaves no lock file behind
    with RunDirLock(run) as again:
        assert again.taken_over is None
    (run / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere"}))  # a dead process's record
    with RunDirLock(run) as taker:
        assert taker.locked and taker.taken_over == {"pid": 999999, "host": "elsewhere"}


# ============================================================================================
# 5. misleading messages, unbounded work


def test_dangling_image_symlink_is_named_a_broken_link(capsys, synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    image = scan_train(root)[0].image_path
    image.unlink()
    image.symlink_to(tmp_path / "moved-away.tif")
    rc, _, err = cli(capsys, "stats", "--data", root)
    one_line_error(rc, err, str(image), "broken symbolic link", "moved-away.tif")


@pytest.mark.parametrize("image_id", [1, 999])
def test_huge_claimed_mask_size_is_not_decoded(synth_root: Path, tmp_path: Path, image_id: int) -> None:
    # a well-formed RLE of an empty 46341 x 46341 mask (2 GB decoded): refused on its size (known
    # image) or checked run by run without decoding (unknown image); memory stays small
    side = 46341
    rle = mask_utils.frPyObjects({"size": [side, side], "counts": [side * side]}, side, side)
    entry = {"image_id": image_id, "category_id": 1, "score": 0.5, "bbox": [1.0, 1.0, 2.0, 2.0],
             "segmentation": {"size": [side, side], "counts": rle["counts"].decode()}}
    (tmp_path / "sub.json").write_text(json.dumps([entry]))
    # peak RSS of this process alone: VmHWM starts afresh at exec (ru_maxrss would carry pytest's own)
    code = ("import re, sys\nfrom cellkit.cli import main\n"
            f"rc = main(['check-submission', {str(tmp_path / 'sub.json')!r}, '--ids', {str(synth_root)!r}])\n"
            "kb = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "print('PEAK_MB', int(kb) // 1024)\nsys.exit(rc)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    assert ("segmentation.size is [46341, 46341]" if image_id == 1 else "image_id 999") in r.stdout
    assert "Traceback" not in r.stderr
    peak = int(r.stdout.split("PEAK_MB")[1].split()[0])
    assert peak < 1000, f"peak memory {peak} MB: the mask was decoded"


# ============================================================================================
# 6. outputs written as a set, under kill -9 at every step (issue 19)


KILL_AFTER = r"""
import os, signal, sys
limit, count_file = int(sys.argv[1]), sys.argv[2]
calls = 0


def counting(fn):
    # a real SIGKILL right after the limit-th change of a name (rename, link), wherever it is
    def wrapped(*args, **kwargs):
        global calls
        result = fn(*args, **kwargs)
        calls += 1
        with open(count_file, "w") as f:
            f.write(str(calls))
        if calls == limit:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped


for name in ("replace", "rename", "symlink", "link"):
    setattr(os, name, counting(getattr(os, name)))
import cellkit.outputs
if hasattr(cellkit.outputs, "_rename_exchange"):
    cellkit.outputs._rename_exchange = counting(cellkit.outputs._rename_exchange)
"""
RUN_CLI = "from cellkit.cli import main\nsys.exit(main(sys.argv[3:]))\n"
WRITE_SET = ("from cellkit.outputs import write_files_together\n"
             "folder, tag = sys.argv[3], sys.argv[4]\n"
             "write_files_together({f'{folder}/{n}': f'{tag} {n}' for n in ('a.json', 'b.zip', 'c.txt')})\n")


def killed_at(limit: int, body: str, *args: Any, tmp: Path) -> tuple[int, int]:
    """Run ``body`` in a fresh process that SIGKILLs itself right after its ``limit``-th rename
    or link (0: never). Returns (exit status, renames and links done)."""
    count = tmp / f"count-{os.getpid()}-{limit}"
    count.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", KILL_AFTER + body, str(limit), str(count), *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode in (0, -signal.SIGKILL), r.stderr[-3000:]
    return r.returncode, int(count.read_text()) if count.exists() else 0


def shown(folder: Path, names: tuple[str, ...]) -> dict[str, bytes | None]:
    """What a reader of each name sees (None: no such file)."""
    return {n: (folder / n).read_bytes() if (folder / n).is_file() else None for n in names}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.slow
@pytest.mark.parametrize("before", ["nothing", "files of an earlier cellkit", "a set"])
def test_a_set_of_files_is_all_old_or_all_new_when_killed_at_any_step(tmp_path: Path, before: str) -> None:
    names = ("a.json", "b.zip", "c.txt")
    start = tmp_path / "start"
    start.mkdir()
    if before == "files of an earlier cellkit":
        for n in names:
            (start / n).write_bytes(f"old {n}".encode())
    elif before == "a set":
        assert killed_at(0, WRITE_SET, start, "old", tmp=tmp_path)[0] == 0
    old = shown(start, names)
    new = {n: f"new {n}".encode() for n in names}
    clean = tmp_path / "clean"
    shutil.copytree(start, clean, symlinks=True)
    _, steps = killed_at(0, WRITE_SET, clean, "new", tmp=tmp_path)
    assert shown(clean, names) == new and steps >= 2
    for k in range(1, steps + 1):
        work = tmp_path / f"killed-after-{k}"
        shutil.copytree(start, work, symlinks=True)
        assert killed_at(k, WRITE_SET, work, "new", tmp=tmp_path)[0] == -signal.SIGKILL
        assert shown(work, names) in (old, new), f"killed after step {k} of {steps}: a mix of old and new files"
        # the next writer finishes its own change and removes what the killed one left
        assert killed_at(0, WRITE_SET, work, "newer", tmp=tmp_path)[0] == 0
        assert shown(work, names) == {n: f"newer {n}".encode() for n in names}
        left = hidden(work)
        assert len(left) == 2 and left[0] == ".a.json+b.zip+c.txt", left  # the pointer and its one version


@pytest.mark.slow
def test_predict_killed_between_the_json_and_the_zip(synth_root: Path, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "test-results.json"
    args = ["predict", "--checkpoint", run_dir / "checkpoints" / "best.pth", "--data", synth_root, "--out", out,
            "--device", "cpu", "--no-thresholds", "--no-progress"]

    def pair() -> tuple[bytes, bytes]:
        with zipfile.ZipFile(out.with_suffix(".zip")) as z:
            inner = z.read("test-results.json")
        return out.read_bytes(), inner

    assert killed_at(0, RUN_CLI, *args, "--set", "predict.mask_thresh=0.3", tmp=tmp_path)[0] == 0
    old = pair()
    seen = []
    for k in (1, 2):  # right after the first rename of the new submission, and after the second
        assert killed_at(k, RUN_CLI, *args, "--set", "predict.mask_thresh=0.7", tmp=tmp_path)[0] == -signal.SIGKILL
        seen.append(pair())
    assert killed_at(0, RUN_CLI, *args, "--set", "predict.mask_thresh=0.7", tmp=tmp_path)[0] == 0
    new = pair()
    assert old[0] != new[0]  # the two thresholds give different masks: a mix would show
    for k, (js, inner) in enumerate(seen, start=1):
        assert js == inner, f"killed after rename {k}: the json is not the one in the zip"
        assert js in (old[0], new[0])
    assert len(hidden(out.parent)) == 2  # no temporary file of the killed writers is left


@pytest.mark.slow
def test_convert_killed_between_train_gt_and_val_gt(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "coco"
    args = ["convert", "--data", synth_root, "--out", out, "--val-fraction", "0.25"]

    def split() -> tuple[list[int], list[int]]:
        ids = [sorted(im["id"] for im in json.loads((out / n).read_text())["images"])
               for n in ("train_gt.json", "val_gt.json")]
        return ids[0], ids[1]

    def split_of(seed: int) -> tuple[list[int], list[int]]:
        train, val = split_samples(scan_train(synth_root), 0.25, seed)
        return sorted(s.image_id for s in train), sorted(s.image_id for s in val)

    assert split_of(1) != split_of(2)
    assert killed_at(0, RUN_CLI, *args, "--seed", 1, tmp=tmp_path)[0] == 0
    for k in (1, 2):
        assert killed_at(k, RUN_CLI, *args, "--seed", 2, tmp=tmp_path)[0] == -signal.SIGKILL
        assert split() in (split_of(1), split_of(2)), f"killed after rename {k}: train and val of two splits"
    assert killed_at(0, RUN_CLI, *args, "--seed", 2, tmp=tmp_path)[0] == 0
    assert split() == split_of(2)
    assert hidden(out) == [".train_gt.json+val_gt.json", hidden(out)[1]] and len(hidden(out)) == 2


@pytest.mark.slow
def test_synth_killed_while_swapping_the_dataset(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    args = ["synth", "--out", out, "--test", 1, "--max-size", 48]
    assert killed_at(0, RUN_CLI, *args, "--train", 2, tmp=tmp_path)[0] == 0
    rc, steps = killed_at(1, RUN_CLI, *args, "--train", 3, tmp=tmp_path)
    assert rc == -signal.SIGKILL and steps == 1
    info = json.loads((out / "synth_info.json").read_text())  # the old dataset or the new one, whole
    assert len(list((out / "train").iterdir())) == info["n_train"]
    assert killed_at(0, RUN_CLI, *args, "--train", 4, tmp=tmp_path)[0] == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing of the killed writer


def test_temporary_files_of_dead_writers_are_removed_and_those_of_live_ones_kept(tmp_path: Path) -> None:
    from cellkit.outputs import write_atomic, write_files_together

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        out = tmp_path / "coco"
        out.mkdir()
        leftovers = {f".val_gt.json.tmp{dead.pid}": "file", f".train_gt.json+val_gt.json.v1f-{dead.pid}": "dir",
                     f".metrics.json.tmp{dead.pid}": "file"}
        mine = {f".val_gt.json.tmp{live.pid}": "file", f".metrics.json.tmp{live.pid}": "file"}
        for name, kind in {**leftovers, **mine}.items():
            (out / name).mkdir() if kind == "dir" else (out / name).write_text("half written")
        write_files_together({out / "train_gt.json": "{}", out / "val_gt.json": "{}"})
        write_atomic(out / "metrics.json", "{}")
        names = {p.name for p in out.iterdir()}
        assert not names & set(leftovers), names
        assert set(mine) <= names  # a live writer's file is its own business
    finally:
        live.kill()
        live.wait()


# ============================================================================================
# 7. a full disk: one line naming the file, exit 2, the previous outputs as they were


@pytest.fixture
def small_disk(tmp_path: Path):
    """``small_disk(kib)``: a folder on a tmpfs of that size, so that writes really fail with ENOSPC
    (mounting needs root or CAP_SYS_ADMIN; unmounted afterwards)."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): the full-disk tests need root")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Fill ``disk`` up to ``leave`` bytes (0: completely; a write of one more byte fails)."""
    st = os.statvfs(disk)
    with open(disk / "filler", "wb", buffering=0) as f:  # unbuffered: no write left over for close()
        try:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
            while not leave and f.write(b"\0" * 4096):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC


def contents(folder: Path) -> dict[str, bytes]:
    """Every file a reader sees under ``folder`` (through links), but the filler."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "filler"}


def full_disk_error(rc: int, err: str, *names: str) -> None:
    short_line_error(rc, err, *names)
    assert "no space left on device" in err, err


def short_line_error(rc: int, err: str, *names: str, limit: int = 300) -> None:
    """One line (exit 2, no traceback) naming ``names``, not longer than ``limit`` characters."""
    one_line_error(rc, err, *names)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) <= limit, err[:2000]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["convert", "synth", "predict"])
def test_a_full_disk_is_one_line_and_the_previous_outputs_stay(capsys, small_disk, synth_root: Path,
                                                               run_dir: Path, command: str) -> None:
    disk = small_disk(2048)
    first: dict[str, list[Any]] = {
        "convert": ["convert", "--data", synth_root, "--out", disk / "coco", "--seed", 1],
        "synth": ["synth", "--out", disk / "synth", "--train", 2, "--test", 1, "--max-size", 48, "--seed", 1],
        "predict": ["predict", "--checkpoint", run_dir / "checkpoints" / "best.pth", "--data", synth_root,
                    "--out", disk / "sub" / "test-results.json", "--device", "cpu", "--no-thresholds", "--no-progress",
                    "--set", "predict.mask_thresh=0.3"],
    }
    second = {"convert": ["--seed", 2], "synth": ["--seed", 2], "predict": ["--set", "predict.mask_thresh=0.7"]}
    rc, _, err = cli(capsys, *first[command])
    assert rc == 0, err
    before = contents(disk)
    fill(disk)
    rc, _, err = cli(capsys, *first[command], *second[command])
    full_disk_error(rc, err, str(disk))
    assert contents(disk) == before
    assert not [p for p in disk.rglob(".*tmp*")]  # nothing half written is left


@pytest.mark.slow
def test_training_on_a_full_disk_keeps_the_last_checkpoint(capsys, small_disk, tiny_run: Path) -> None:
    size = sum(p.stat().st_size for p in tiny_run.rglob("*") if p.is_file())
    disk = small_disk(size // 1024 + 1024)
    run = Path(shutil.copytree(tiny_run, disk / "run"))
    before = contents(run)
    fill(disk, leave=256 * 1024)  # room for config.yaml and metrics, not for a checkpoint
    rc, out, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=3", "--no-progress")
    full_disk_error(rc, err, str(run / "checkpoints"), "last.pth")
    after = contents(run)
    assert b"epochs: 3" in after.pop("config.yaml")  # the config of the run as resumed (written first)
    assert after == {k: v for k, v in before.items() if k != "config.yaml"}
    assert not list((run / "checkpoints").glob(".*"))


def test_a_stray_full_disk_error_is_one_line(capsys, monkeypatch: pytest.MonkeyPatch, small_disk) -> None:
    # a write past cellkit's writers (a library writing its own file): still one line, exit 2
    disk = small_disk(64)
    fill(disk)
    import cellkit.cli.info as info

    def write_elsewhere(args: Any) -> int:
        with open(disk / "elsewhere.txt", "w") as f:
            f.write("x" * 100_000)
        return 0

    monkeypatch.setattr(info, "cmd_models", write_elsewhere)
    rc, _, err = cli(capsys, "models")
    full_disk_error(rc, err)


# ============================================================================================
# 8. outputs that would destroy inputs


@pytest.mark.parametrize("target", ["test index", "the checkpoint", "another checkpoint", "own json", "zip of a checkpoint"])
def test_predict_refuses_an_output_that_is_an_input_or_not_its_own(capsys, synth_root: Path, run_dir: Path,
                                                                   tmp_path: Path, target: str) -> None:
    ds = Path(shutil.copytree(synth_root, tmp_path / "ds"))
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    best = run / "checkpoints" / "best.pth"
    shutil.copy(best, run / "checkpoints" / "last.pth")
    (tmp_path / "notes.json").write_text('{"mine": true}')
    shutil.copy(best, tmp_path / "weights.zip")
    out, refused = {
        "test index": (ds / "test_image_name_to_ids.json", None), "the checkpoint": (best, None),
        "another checkpoint": (run / "checkpoints" / "last.pth", None), "own json": (tmp_path / "notes.json", None),
        "zip of a checkpoint": (tmp_path / "weights.json", tmp_path / "weights.zip"),
    }[target]
    refused = refused or out
    before = {p: p.read_bytes() for p in (ds / "test_image_name_to_ids.json", best, run / "checkpoints" / "last.pth",
                                          tmp_path / "notes.json", tmp_path / "weights.zip")}
    rc, stdout, err = cli(capsys, "predict", "--checkpoint", best, "--data", ds, "--out", out, "--device", "cpu",
                          "--no-thresholds", "--no-progress")
    short_line_error(rc, err, str(refused))
    assert "predicting" not in stdout  # refused before the work
    assert {p: p.read_bytes() for p in before} == before
    assert not out.with_suffix(".zip").exists() or out.with_suffix(".zip") in before


def test_convert_refuses_to_replace_a_file_that_is_not_coco(capsys, synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "coco"
    out.mkdir()
    shutil.copy(synth_root / "test_image_name_to_ids.json", out / "val_gt.json")  # someone's file of that name
    before = contents(out)
    rc, _, err = cli(capsys, "convert", "--data", synth_root, "--out", out)
    short_line_error(rc, err, str(out / "val_gt.json"), "refusing to replace")
    assert contents(out) == before
    (out / "val_gt.json").unlink()  # COCO ground truth of an earlier convert (a plain file) is replaced
    (out / "train_gt.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    assert cli(capsys, "convert", "--data", synth_root, "--out", out)[0] == 0
    assert json.loads((out / "train_gt.json").read_text())["images"]


# ============================================================================================
# 9. resuming what is not there, or with what cannot change


@pytest.mark.slow
def test_resume_without_last_checkpoint_is_refused(capsys, tiny_run_copy: Path) -> None:
    run = tiny_run_copy
    (run / "checkpoints" / "last.pth").unlink()
    before = contents(run)
    rc, out, err = cli(capsys, "train", "--out", run, "--resume", "--no-progress")
    short_line_error(rc, err, str(run / "checkpoints" / "last.pth"), "nothing to resume", "--overwrite")
    assert "starting from scratch" not in out
    assert contents(run) == before


@pytest.mark.slow
@pytest.mark.parametrize("key, value", [("train.optimizer", "sgd"), ("train.lr", "0.01"),
                                        ("model.mask_head_layers", "2"), ("data.split_seed", "7")])
def test_resume_with_a_key_that_cannot_change_is_refused(capsys, tiny_run_copy: Path, key: str, value: str) -> None:
    run = tiny_run_copy
    before = contents(run)
    rc, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", f"{key}={value}", "--no-progress")
    short_line_error(rc, err, key, "cannot change when resuming", "train.epochs")
    assert contents(run) == before


@pytest.mark.slow
def test_resume_with_more_epochs_goes_on(capsys, tiny_run_copy: Path) -> None:
    run = tiny_run_copy
    rc, out, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.epochs=3", "--no-progress")
    assert rc == 0, err
    assert "resumed from" in out
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ============================================================================================
# 10. hostile JSON and YAML: limits where the data enters


def _huge_int(text: str, key: str) -> str:
    """``text`` (JSON) with the first integer value of ``key`` replaced by one of 5000 digits."""
    m = re.search(rf'"{key}": ?(\d+)', text)
    assert m
    return text[: m.start(1)] + "9" * 5000 + text[m.end(1):]


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("kind", ["huge int", "deep"])
@pytest.mark.parametrize("where", ["test index", "test index (predict)", "submission", "predictions", "ground truth"])
def test_hostile_json_is_one_short_line(capsys, synth_root: Path, run_dir: Path, tmp_path: Path,
                                        kind: str, where: str) -> None:
    ds = Path(shutil.copytree(synth_root, tmp_path / "ds"))
    gt_text = (ds / "test_gt.json").read_text()
    preds = [dict(a, score=0.9) for a in json.loads(gt_text)["annotations"]]
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    files = {"test index": ds / "test_image_name_to_ids.json", "test index (predict)": ds / "test_image_name_to_ids.json",
             "submission": tmp_path / "pred.json", "predictions": tmp_path / "pred.json", "ground truth": ds / "test_gt.json"}
    bad = files[where]
    key = {"test index": "id", "test index (predict)": "id", "ground truth": "id"}.get(where, "image_id")
    bad.write_text(_huge_int(bad.read_text(), key) if kind == "huge int" else DEEP)
    args = {
        "test index": ["check-submission", tmp_path / "pred.json", "--ids", ds],
        "test index (predict)": ["predict", "--checkpoint", run_dir / "checkpoints" / "best.pth", "--data", ds,
                                 "--out", tmp_path / "s.json", "--device", "cpu", "--no-progress"],
        "submission": ["check-submission", tmp_path / "pred.json", "--ids", ds],
        "predictions": ["evaluate", "--gt", ds / "test_gt.json", "--pred", tmp_path / "pred.json"],
        "ground truth": ["evaluate", "--gt", ds / "test_gt.json", "--pred", tmp_path / "pred.json"],
    }[where]
    rc, _, err = cli(capsys, *args)
    short_line_error(rc, err, str(bad), "5000 digits" if kind == "huge int" else "nested too deeply")


BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
train:
  hooks: *h
"""


@pytest.mark.parametrize("case, text, names", [
    ("alias bomb", BOMB, ["aliases expand to"]),
    ("alias in itself", "train: &t\n  hooks: [*t]\n", ["refers to the node it is part of"]),
    ("duplicate key", "train:\n  lr: 0.001\n  epochs: 3\n  lr: 0.1\n", ["duplicate key 'lr'", "line 4"]),
    ("huge int", "train:\n  epochs: " + "9" * 5000 + "\n", ["5000 digits"]),
    ("deep", "train: " + "[" * 20_000 + "]" * 20_000 + "\n", ["nested"]),
    ("huge file", "name: run\n" + "# filler\n" * 200_000, ["larger than 1 MiB"]),
    ("range of a file's value", "data:\n  augment:\n    preset: lsj\n    crop_size: 100000\n",
     ["data.augment.crop_size", "must be in [1, 4096]"]),
])
@pytest.mark.parametrize("command", ["config", "train"])
def test_hostile_yaml_config_is_one_short_line(capsys, tmp_path: Path, synth_root: Path, case: str, text: str,
                                               names: list[str], command: str) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    args = ["config", "--config", path] if command == "config" else \
        ["train", "--config", path, "--data", synth_root, "--out", tmp_path / "run", "--no-progress"]
    t0 = time.perf_counter()
    rc, _, err = cli(capsys, *args)
    assert time.perf_counter() - t0 < 20
    short_line_error(rc, err, str(path), *names)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, names", [
    ("[os:system]", ["train.hooks", "os:system", "not a subclass"]),
    ("[&a [x,x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], "
     "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]",
     ["--set train.hooks", "aliases expand to"]),
    ("x" * 100_000, ["train.hooks", "expected a list"]),
])
def test_hostile_set_values_are_one_short_line(capsys, synth_root: Path, tmp_path: Path, value: str,
                                               names: list[str]) -> None:
    rc, _, err = cli(capsys, "train", "--data", synth_root, "--out", tmp_path / "run", "--set", f"train.hooks={value}",
                     "--no-progress")
    short_line_error(rc, err, *names)
    assert not (tmp_path / "run").exists()


def test_crop_size_that_would_take_all_memory_fails_when_the_config_is_built(capsys, synth_root: Path,
                                                                            tmp_path: Path) -> None:
    rc, _, err = cli(capsys, "train", "--data", synth_root, "--out", tmp_path / "run", "--set",
                     "data.augment.preset=lsj", "--set", "data.augment.crop_size=100000", "--no-progress")
    short_line_error(rc, err, "data.augment.crop_size", "must be in [1, 4096]")
    with pytest.raises(ConfigError, match="lsj_scale_range"):
        load_config(None, {"data.augment.lsj_scale_range": [0.1, 1000]})
    with pytest.raises(ConfigError, match="model.max_size"):
        load_config(None, {"model.max_size": 100_000})


def test_hostile_grid_file_is_one_short_line(capsys, tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(BOMB.replace("train:\n  hooks: *h\n", "grid:\n  train.lr: *h\n"))
    rc, _, err = cli(capsys, "ablate", path, "--out", tmp_path / "g", "--dry-run")
    short_line_error(rc, err, str(path), "aliases expand to")
    path.write_text("name: g\nname: h\n")
    rc, _, err = cli(capsys, "ablate", path, "--out", tmp_path / "g", "--dry-run")
    short_line_error(rc, err, str(path), "duplicate key 'name'")


# ============================================================================================
# 11. silent wrong results


def _zero_label_maps(samples: list[Any]) -> None:
    for s in samples:
        for p in s.class_paths.values():
            m = tifffile.imread(p)
            tifffile.imwrite(p, np.zeros_like(m))


@pytest.mark.slow
def test_a_dataset_without_cells_is_an_error(capsys, synth_root: Path, tmp_path: Path) -> None:
    ds = Path(shutil.copytree(synth_root, tmp_path / "ds"))
    _zero_label_maps(scan_train(ds))
    rc, _, err = cli(capsys, "train", "--data", ds, "--out", tmp_path / "run", *TINY_TRAIN)
    short_line_error(rc, err, str(ds / "train"), "hold no cell")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_validation_split_without_cells_warns_and_writes_no_nan(capsys, synth_root: Path, tmp_path: Path) -> None:
    ds = Path(shutil.copytree(synth_root, tmp_path / "ds"))
    _zero_label_maps(split_samples(scan_train(ds), 0.25, 0)[1])
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", "--data", ds, "--out", run, "--set", "data.val_fraction=0.25", *TINY_TRAIN)
    assert rc == 0, err
    assert "warning" in out and "validation images hold no cell" in out

    def no_nan(constant: str) -> Any:
        raise AssertionError(f"{constant} in a metrics file")

    summary = json.loads((run / "metrics.json").read_text(), parse_constant=no_nan)
    assert summary["best_val_ap50"] is None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=no_nan)


@pytest.mark.parametrize("dtype, ids", [(np.uint64, [2**63 + 5, 2**64 - 1]), (np.float64, [2.0**63, 2.0**63 + 4096])])
def test_label_map_ids_near_two_to_the_63_stay_cells_on_a_background(tmp_path: Path, dtype: Any, ids: list) -> None:
    from cellkit.data import build_coco

    folder = tmp_path / "ds" / "train" / "a"
    folder.mkdir(parents=True)
    tifffile.imwrite(folder / "image.tif", np.zeros((20, 30, 3), np.uint8), photometric="rgb")
    m = np.zeros((20, 30), dtype)
    m[2:6, 2:8] = ids[0]  # 24 px
    m[10:15, 10:20] = ids[1]  # 50 px
    tifffile.imwrite(folder / "class1.tif", m)
    coco = build_coco(scan_train(tmp_path / "ds"), 1, progress=False)
    assert sorted(a["area"] for a in coco["annotations"]) == [24, 50]  # and not the 526 px of background


# ============================================================================================
# 12. a folder where a file is expected


def test_config_that_is_a_folder(capsys, tmp_path: Path) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    rc, _, err = cli(capsys, "config", "--config", folder)
    short_line_error(rc, err, str(folder), "is a folder, not a config file")
    top = tmp_path / "top.yaml"
    top.write_text("_base_: configs\ntrain:\n  lr: 0.001\n")
    rc, _, err = cli(capsys, "config", "--config", top)
    short_line_error(rc, err, str(folder), "is a folder", f"the _base_ of {top}")
    top.write_text("_base_: missing.yaml\n")
    rc, _, err = cli(capsys, "config", "--config", top)
    short_line_error(rc, err, str(tmp_path / "missing.yaml"), "not found", f"the _base_ of {top}")
