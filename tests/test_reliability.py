"""Hostile but realistic input: every case is a one-line error naming the key or file (exit 2),
never a traceback, a wrong result with exit 0, or a lost run. One section per kind of failure:

1. values and files that used to crash (config ranges, unwritable outputs, foreign checkpoints,
   malformed test indexes, tiny images);
2. wrong results with exit 0 (cut-short RLE, predictions of other images, multi-page TIFFs);
3. lost data (a run, a dataset or COCO files replaced by accident);
4. races (two trainings in one run directory; a stale lock);
5. misleading messages and unbounded work (broken links, huge claimed mask sizes).

Folders that really refuse writes even to root: a path under a regular file, and ``/proc``
(``chmod`` does not stop root, so a read-only folder made that way proves nothing).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
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
               "model.box_detections_per_img": 20, "model.rpn_post_nms_top_n_test": 100}
TINY_TRAIN = ["--set", "model.backbone=resnet18", "--set", "model.resize_mode=fixed_scale",
              "--set", "model.rpn_pre_nms_top_n_train=200", "--set", "model.rpn_post_nms_top_n_train=100",
              "--set", "model.box_batch_size_per_image=32", "--set", "model.box_detections_per_img=50",
              "--set", "train.epochs=1", "--set", "train.iters_per_epoch=1", "--set", "data.augment.crop_size=96",
              "--no-progress"]


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
    one_line_error(rc, err, str(run / "checkpoints" / "last.pth"), "resnet18", "mobilenet_v3_large")


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
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # break an image of the validation split of another seed: train_gt.json used to be written already
    _, val = split_samples(scan_train(root), 0.25, seed=2)
    data = val[0].image_path.read_bytes()
    val[0].image_path.write_bytes(data[: len(data) // 2])
    rc, _, err = cli(capsys, "convert", "--data", root, "--out", out, "--val-fraction", "0.25", "--seed", 2)
    one_line_error(rc, err, val[0].name)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


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
