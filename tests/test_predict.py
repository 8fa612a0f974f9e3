"""Prediction: raw detections, thresholds, TTA and ensembles, sliding windows, tuning, the CLI."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NARROW_HEADS
from predict_helpers import gt_detections, instance_ids, tiny_model
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from cellkit.config import PredictConfig, load_config
from cellkit.data import image_to_tensor, read_test_index
from cellkit.data.coco import categories
from cellkit.data.synth import synth_image
from cellkit.errors import ConfigError
from cellkit.evaluation.submission import check_submission
from cellkit.inference.predict import (
    finalize,
    merge_views,
    predict_image,
    predict_images,
    raw_detections,
    scaled_input_size,
    tta_views,
)
from cellkit.inference.tiling import dedupe_tiles, place_tile, tile_grid, tile_starts
from cellkit.inference.tune import load_thresholds, tune_thresholds, write_thresholds
from cellkit.runs import find_thresholds
from cellkit.structures.detections import Detections
from cellkit.structures.rle import encode_mask

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(detections=15)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    rgba, _, _ = synth_image(np.random.default_rng(4), 150, 170)
    return image_to_tensor(rgba[..., :3])


def check_entries(entries: list[dict], image_id: int, h: int, w: int) -> None:
    for e in entries:
        assert e["image_id"] == image_id and e["category_id"] in (1, 2, 3, 4)
        assert isinstance(e["score"], float) and math.isfinite(e["score"])
        assert len(e["bbox"]) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in e["bbox"])
        assert e["segmentation"]["size"] == [h, w] and isinstance(e["segmentation"]["counts"], str)
        assert mask_utils.area(e["segmentation"]) > 0


# --------------------------------------------------------------------------------------------
# raw detections


def cellkit_model(detections: int = 15) -> torch.nn.Module:
    import cellkit

    torch.manual_seed(0)
    cfg = load_config(None, {"model.backbone": "resnet18", "model.num_classes": 4, "model.min_size": 128, "model.max_size": 160,
                             "model.box_detections_per_img": detections, "model.rpn_post_nms_top_n_test": 150})
    return cellkit.build_model(cfg).eval()


@pytest.mark.parametrize("which", ["torchvision", "cellkit"])
def test_raw_detections_equal_the_models_own_output(model, which):
    if which == "cellkit":
        model = cellkit_model()
    images = [torch.rand(3, 150, 170, generator=torch.Generator().manual_seed(0)),
              torch.rand(3, 96, 120, generator=torch.Generator().manual_seed(1))]
    with torch.inference_mode():
        ref = model(images)
    raw = raw_detections(model, images)
    for r, o, img in zip(ref, raw, images):
        assert len(o["boxes"]) == 15
        assert torch.equal(o["boxes"], r["boxes"]) and torch.equal(o["scores"], r["scores"])
        assert torch.equal(o["labels"], r["labels"])
        assert o["masks"].shape == (15, 1, 28, 28)
        assert torch.equal(paste_masks_in_image(o["masks"], o["boxes"], tuple(img.shape[-2:])), r["masks"])


def test_raw_detections_restore_training_mode(model):
    model.train()
    raw_detections(model, [torch.rand(3, 64, 64)])
    assert model.training
    model.eval()


# --------------------------------------------------------------------------------------------
# one image: thresholds, NMS, TTA, ensembles


def test_predict_image_thresholds(model, image):
    h, w = image.shape[-2:]
    everything = predict_image(model, image, PredictConfig(score_thresh=0.0, tile_size=None), image_id=3)
    check_entries(everything, 3, h, w)
    assert len(everything) > 5
    cut = sorted(e["score"] for e in everything)[len(everything) // 2]
    some = predict_image(model, image, PredictConfig(score_thresh=cut, tile_size=None), image_id=3)
    assert some == [e for e in everything if e["score"] >= cut]
    nms = predict_image(model, image, PredictConfig(nms_thresh=0.3, tile_size=None), image_id=3)
    assert 0 < len(nms) <= len(everything)
    rles = [e["segmentation"] for e in nms]
    ious = mask_utils.iou(rles, rles, [0] * len(rles))
    same = np.equal.outer([e["category_id"] for e in nms], [e["category_id"] for e in nms])
    assert (ious[same & ~np.eye(len(nms), dtype=bool)] <= 0.3).all()


def test_merging_identical_views_gives_the_single_view():
    rng = np.random.default_rng(8)
    _, owner, classes = synth_image(rng, 110, 130)
    det = gt_detections(owner, classes)
    order = torch.argsort(det.scores, descending=True)
    nms = merge_views([det, det, det], PredictConfig(tta_merge="nms", tta_iou=0.5), 110, 130)
    assert torch.equal(nms.boxes, det.boxes[order]) and torch.equal(nms.masks, det.masks[order])
    wbf = merge_views([det, det], PredictConfig(tta_merge="wbf", tta_iou=0.55), 110, 130)
    assert torch.allclose(wbf.boxes, det.boxes[order], atol=1e-4) and torch.allclose(wbf.scores, det.scores[order])


def test_ensemble_of_one_model_twice_equals_the_model(model, image):
    cfg = PredictConfig(tile_size=None, tta_merge="nms", tta_iou=0.5)
    single = predict_image(model, image, cfg, image_id=1)
    double = predict_image([model, model], image, cfg, image_id=1)
    key = lambda e: (-e["score"], e["segmentation"]["counts"])  # noqa: E731
    assert sorted(double, key=key) == sorted(single, key=key)
    wbf = predict_image([model, model], image, PredictConfig(tile_size=None, tta_merge="wbf", tta_iou=0.55), 1)
    assert len(wbf) == len(single)
    iou = mask_utils.iou([e["segmentation"] for e in sorted(wbf, key=key)],
                         [e["segmentation"] for e in sorted(single, key=key)], [0] * len(single))
    assert np.diag(iou).min() > 0.95


@pytest.mark.slow
def test_tta_views_and_scaled_input(model, image):
    cfg = PredictConfig(tta=True, tta_flips=("h", "v", "vh"), tta_scales=(1.0, 1.5), tile_size=None)
    assert [(v.flip, v.scale) for v in tta_views(cfg)] == [
        (f, s) for s in (1.0, 1.5) for f in ("", "h", "v", "hv")]
    assert len(tta_views(PredictConfig())) == 1
    with pytest.raises(ConfigError, match="tta_flips"):
        tta_views(PredictConfig(tta=True, tta_flips=("d",)))
    with scaled_input_size(model, 1.5):
        assert model.transform.min_size == (192,) and model.transform.max_size == 240
    assert model.transform.min_size == (128,) and model.transform.max_size == 160
    from types import SimpleNamespace

    from cellkit.models.transform import ResizeTransform

    fixed = SimpleNamespace(transform=ResizeTransform(800, 1333, (0.5,) * 3, (0.2,) * 3, "fixed_scale", 2.0))
    with scaled_input_size(fixed, 0.5):  # type: ignore[arg-type]
        assert fixed.transform.scale_factor(400, 300) == 1.0
    assert fixed.transform.scale == 2.0 and fixed.transform.scale_factor(400, 300) == 2.0
    h, w = image.shape[-2:]
    for merge, flips in (("wbf", ("h", "v")), ("nms", ("hv",))):
        cfg = PredictConfig(tta=True, tta_flips=flips, tta_merge=merge, tile_size=None)
        entries = predict_image(model, image, cfg, image_id=2)
        check_entries(entries, 2, h, w)
        assert entries


# --------------------------------------------------------------------------------------------
# sliding windows


def test_tile_grid_covers_the_image_with_overlap():
    assert tile_starts(100, 128, 32) == [0]
    with pytest.raises(ConfigError, match="tile_overlap"):
        tile_starts(1000, 128, 128)
    starts = tile_starts(1000, 256, 64)
    assert starts[0] == 0 and starts[-1] == 1000 - 256
    assert all(b - a <= 256 - 64 for a, b in zip(starts, starts[1:]))
    tiles = tile_grid(500, 700, 256, 64)
    cover = np.zeros((500, 700), int)
    core = np.zeros((500, 700), int)
    for t in tiles:
        cover[t.y0 : t.y1, t.x0 : t.x1] += 1
        cy0, cx0, cy1, cx1 = (math.ceil(v) for v in t.core)
        core[cy0:cy1, cx0:cx1] += 1
    assert cover.min() >= 1 and (core == 1).all()  # cores partition the image


def tiled_gt(owner: np.ndarray, classes: list[int], tile: int, overlap: int,
             jitter: float = 0.0) -> tuple[Detections, list]:
    """Each tile's detections taken from the instance map cropped to that tile, each box moved by
    up to ``jitter`` px along each axis (as a model boxes one cell differently in two tiles)."""
    parts, tiles = [], tile_grid(*owner.shape, tile, overlap)
    rng = np.random.default_rng(0)
    for k, t in enumerate(tiles):
        det = gt_detections(owner[t.y0 : t.y1, t.x0 : t.x1], classes, seed=k)
        shift = torch.from_numpy(rng.uniform(-jitter, jitter, (len(det), 2)).astype(np.float32)).repeat(1, 2)
        parts.append(place_tile(det.replace(boxes=det.boxes + shift), t, k))
    return Detections.cat(parts), tiles


def cells_cut(owner: np.ndarray, tiles: list) -> int:
    import scipy.ndimage as ndi

    n = 0
    for sl in ndi.find_objects(owner):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        n += any(y0 < t.y1 and y1 > t.y0 and x0 < t.x1 and x1 > t.x0 and not (
            y0 >= t.y0 and y1 <= t.y1 and x0 >= t.x0 and x1 <= t.x1) for t in tiles)
    return n


@pytest.mark.parametrize("overlap", [96, 20])
def test_tiled_detections_count_every_cell_once(overlap):
    size = 192 + 2 * (192 - overlap)  # 3 x 3 tiles of 192 px overlapping by exactly `overlap`
    _, owner, classes = synth_image(np.random.default_rng(11), size, size)
    h, w = owner.shape
    merged, tiles = tiled_gt(owner, classes, 192, overlap)
    assert len(tiles) == 9 and tiles[1].x0 == 192 - overlap and cells_cut(owner, tiles) > 20
    ids = instance_ids(owner)
    if overlap == 96:  # cells are smaller than the overlap: the core rule alone keeps each once, whole
        assert int((~merged.fringe).sum()) == len(ids)  # (the slack keeps some a second time, as second choices)
    else:  # some cells span the whole overlap: both tiles keep a part; the mask dedupe removes one
        assert len(merged) > len(ids)
    merged = merged.replace(image_id=1, image_size=(h, w))
    entries = finalize(merged, PredictConfig(tile_size=192, tile_overlap=overlap, tile_above=100))
    gt = [encode_mask(owner == i) for i in ids]
    ious = mask_utils.iou([e["segmentation"] for e in entries], gt, [0] * len(gt))
    match = ious > 0.5
    assert len(entries) == len(ids)
    assert (match.sum(axis=0) == 1).all() and (match.sum(axis=1) == 1).all()  # each cell exactly once
    found = match.argmax(axis=0)
    assert [entries[found[j]]["category_id"] for j in range(len(ids))] == [classes[i - 1] for i in ids]
    best = ious.max(axis=0)
    if overlap == 96:  # and whole: as good as the same detections found on the untiled image
        untiled = finalize(gt_detections(owner, classes), PredictConfig(tile_size=None))
        ref = mask_utils.iou([e["segmentation"] for e in untiled], gt, [0] * len(gt)).max(axis=0)
        assert (best >= ref - 0.01).all()
        # IoU > 0.9 except where a 28 x 28 mask cannot hold the cell (thin spindles, slivers at the image border)
        assert (best[ref > 0.9] > 0.9).all() and (ref > 0.9).mean() > 0.9 and best.min() > 0.8


def test_a_cell_on_a_seam_survives_when_each_tile_boxes_it_a_little_differently():
    """Two tiles box a cell that straddles their core boundary a pixel or two apart (each sees it
    with its own context): each box centre may fall on the other tile's side. Both are then kept
    and deduplicated, never both dropped (a real model lost a cell of score 0.85 that way)."""
    _, owner, classes = synth_image(np.random.default_rng(11), 288, 1056)
    merged, tiles = tiled_gt(owner, classes, 192, 96, jitter=2.0)
    seams = sorted({t.core[3] for t in tiles})[:-1]
    ids = instance_ids(owner)
    gt = [encode_mask(owner == i) for i in ids]
    x, _, w, _ = mask_utils.toBbox(gt).T
    on_seam = (np.abs((x + w / 2)[:, None] - np.array(seams)[None]) < 2).any(axis=1)
    entries = finalize(merged.replace(image_id=1, image_size=owner.shape),
                       PredictConfig(tile_size=192, tile_overlap=96, tile_above=100))
    # a 2 px shift takes a small cell's IoU with itself below 0.5, never to 0.3 or below
    match = mask_utils.iou([e["segmentation"] for e in entries], gt, [0] * len(gt)) > 0.3
    assert on_seam.sum() >= 5  # cells whose centre is within the jitter of a seam
    assert len(entries) == len(ids)
    assert (match.sum(axis=0) == 1).all() and (match.sum(axis=1) == 1).all()  # each cell exactly once


def test_dedupe_tiles_prefers_detections_away_from_borders():
    rng = np.random.default_rng(12)
    _, owner, classes = synth_image(rng, 300, 320)
    merged, _ = tiled_gt(owner, classes, 160, 16)
    merged = merged.replace(image_id=1, image_size=owner.shape)
    entries = finalize(merged, PredictConfig())
    from cellkit.inference.predict import encode_detections

    det, rles, _ = encode_detections(merged, 0.5)
    keep = dedupe_tiles(det, rles)
    dropped = sorted(set(range(len(det))) - set(keep.tolist()))
    assert dropped and len(entries) == len(keep)
    kept_rles = [rles[i] for i in keep.tolist()]
    for j in dropped:  # each dropped one lies mostly inside a kept one from another tile
        over = mask_utils.iou([rles[j]], kept_rles, [1] * len(kept_rles))[0]
        k = int(over.argmax())
        assert over[k] > 0.5 and int(det.tile[keep[k]]) != int(det.tile[j])
        assert int(det.fringe[keep[k]]) <= int(det.fringe[j])


@pytest.mark.slow
def test_tiled_prediction_end_to_end(model):
    rgba, _, _ = synth_image(np.random.default_rng(9), 300, 260)
    img = image_to_tensor(rgba[..., :3])
    cfg = PredictConfig(tile_size=160, tile_overlap=48, tile_above=200, batch_size=2)
    entries = predict_image(model, img, cfg, image_id=4)
    check_entries(entries, 4, 300, 260)
    assert 0 < len(entries) <= 4 * 15  # 4 tiles of at most 15 detections, cores only


@pytest.mark.slow
def test_fixed_scale_models_tile_what_max_size_would_shrink():
    # at scale 2 with max_size 256 an image longer than 128 px would be shrunk below the training
    # scale by the cap; it is tiled instead, in tiles that fit
    import cellkit
    from cellkit.inference.predict import detect, tiling_limits

    cfg = load_config(None, {"model.backbone": "resnet18", "model.num_classes": 4, "model.resize_mode": "fixed_scale", "model.scale": 2.0,
                             "model.max_size": 256, "model.box_detections_per_img": 10,
                             "model.rpn_pre_nms_top_n_test": 50, "model.rpn_post_nms_top_n_test": 20})
    torch.manual_seed(0)
    m = cellkit.build_model(cfg).eval()
    pc = PredictConfig(tile_size=1024, tile_overlap=32, tile_above=1400)
    assert tiling_limits(m, pc) == (128, 128)
    assert tiling_limits(m, PredictConfig(tile_size=None)) == (None, 1400)
    big, small = torch.rand(3, 200, 150), torch.rand(3, 120, 100)
    assert detect(m, [big], pc)[0].tile is not None
    assert detect(m, [small], pc)[0].tile is None
    assert m.transform.scale_factor(128, 100) == 2.0 and m.transform.scale_factor(200, 150) < 2.0


@pytest.mark.slow
def test_predict_images_over_test_dataset(model, synth_root):
    from cellkit.data.dataset import TestImageDataset as Images  # (a Test* name pytest would collect)
    index = read_test_index(synth_root)
    entries = predict_images(model, Images(index), PredictConfig(batch_size=2), progress=False)
    assert {e["image_id"] for e in entries} <= {t.image_id for t in index}
    assert [p for p in check_submission(entries, index) if p.severity == "error"] == []


# --------------------------------------------------------------------------------------------
# threshold tuning


def test_tune_thresholds_finds_the_nms_that_removes_duplicates(tmp_path):
    cached, images, anns = [], [], []
    for image_id in (1, 2):
        _, owner, classes = synth_image(np.random.default_rng(20 + image_id), 120, 140)
        det = gt_detections(owner, classes, seed=image_id, image_id=image_id)
        dup = det.replace(boxes=det.boxes.clone(), scores=det.scores + 0.01)
        cached.append(Detections.cat([det, dup]))
        images.append({"id": image_id, "height": 120, "width": 140, "file_name": f"{image_id}.tif"})
        for i in instance_ids(owner):
            rle = encode_mask(owner == i)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": classes[i - 1], "iscrowd": 0,
                         "segmentation": rle, "area": float(mask_utils.area(rle)),
                         "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    gt = {"images": images, "annotations": anns, "categories": categories(4)}
    result = tune_thresholds(cached, gt, PredictConfig(), score_grid=(0.0, 0.7), mask_grid=(0.5,),
                             nms_grid=(None, 0.5), progress=False)
    assert len(result.table) == 4
    no_nms = next(r for r in result.table if r["nms_thresh"] is None and r["score_thresh"] == 0.0)
    assert no_nms["ap50"] < 0.9  # every cell has a higher-scored duplicate: half the detections are FPs
    assert result.best["nms_thresh"] == 0.5 and result.best["ap50"] > 0.99
    assert result.current is no_nms
    path = write_thresholds(result, tmp_path, checkpoint="x")
    saved = json.loads(path.read_text())
    assert saved["nms_thresh"] == 0.5 and saved["value"] == result.best["ap50"] and len(saved["table"]) == 4
    assert find_thresholds(tmp_path / "checkpoints" / "best.pth") == path
    cfg = load_config(None, load_thresholds(path))
    assert (cfg.predict.score_thresh, cfg.predict.mask_thresh, cfg.predict.nms_thresh) == (
        result.best["score_thresh"], 0.5, 0.5)
    assert "*" in result.format()


# --------------------------------------------------------------------------------------------
# command line


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CELLKIT_PROGRESS="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "cellkit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synth_root) -> Path:
    import cellkit
    from cellkit.models.checkpoint import save_checkpoint

    cfg = load_config(None, {"model.backbone": "resnet18", "model.num_classes": 4, "model.min_size": 128, "model.max_size": 160,
                             "model.box_detections_per_img": 20, "data.root": str(synth_root),
                             "data.val_fraction": 0.25, **NARROW_HEADS})
    torch.manual_seed(0)
    model = cellkit.build_model(cfg)
    run = tmp_path_factory.mktemp("run")
    cfg.save(run / "config.yaml")
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0}, run / "checkpoints" / "best.pth")
    return run


@pytest.mark.slow
def test_cli_predict_missing_checkpoint(synth_root, tmp_path):
    """One line, told before torch loads (the 4 s of CPU time a mistyped path cost)."""
    argv = ["predict", "--checkpoint", "nope/best.pth", "--data", str(synth_root)]
    code = f"import sys; from cellkit.cli import main; c = main({argv!r}); print('torch' in sys.modules); sys.exit(c)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 2
    assert "nope/best.pth" in r.stderr and "checkpoint not found" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout.strip() == "False"


@pytest.mark.slow
def test_cli_tune_thresholds_then_predict_uses_them(run_dir, synth_root, tmp_path):
    """tune-thresholds writes RUN_DIR/thresholds.json; predict takes them, --set on top, and writes
    a valid submission (json and zip). tests/test_reliability.py predicts with --no-thresholds."""
    r = run_cli("tune-thresholds", "--run", str(run_dir), "--device", "cpu", "--score-grid", "0,0.5",
                "--mask-grid", "0.5", "--nms-grid", "none,0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    saved = json.loads((run_dir / "thresholds.json").read_text())
    assert len(saved["table"]) == 4 and {"score_thresh", "mask_thresh", "nms_thresh", "value"} <= set(saved)
    assert "best ap50" in r.stdout
    out = tmp_path / "sub" / "test-results.json"
    r = run_cli("predict", "--checkpoint", str(run_dir / "checkpoints" / "best.pth"), "--data", str(synth_root),
                "--out", str(out), "--device", "cpu", "--set", "predict.mask_thresh=0.6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"thresholds from {run_dir / 'thresholds.json'}" in r.stdout
    assert f"score_thresh={saved['score_thresh']}" in r.stdout and "mask_thresh=0.6" in r.stdout
    # a valid submission, and the zip holds the same json
    entries = json.loads(out.read_text())
    problems = check_submission(entries, read_test_index(synth_root))
    assert entries and [p for p in problems if p.severity == "error"] == []
    with zipfile.ZipFile(out.with_suffix(".zip")) as z:
        assert json.loads(z.read(z.namelist()[0])) == entries
    assert "check-submission: 0 error(s)" in r.stdout


@pytest.mark.slow
def test_a_score_threshold_drops_boxes_before_the_mask_head(tiny_run: Path, fixture_root: Path) -> None:
    """Speed issue: predict.score_thresh > 0 drops detections in the box stage (the mask head runs on
    fewer boxes), and the kept detections are exactly those of predicting everything and dropping
    afterwards: same boxes, scores and masks, on the real fixture."""
    from cellkit.data import image_to_tensor, read_image, scan_train
    from cellkit.inference.predict import predict_image, raw_detections, score_floor
    from cellkit.models.checkpoint import model_from_checkpoint

    model, cfg, _ = model_from_checkpoint(tiny_run / "checkpoints" / "best.pth")
    image = image_to_tensor(read_image(scan_train(fixture_root)[0].image_path))
    everything = predict_image(model, image, dataclasses.replace(cfg.predict, score_thresh=0.0))
    scores = sorted(e["score"] for e in everything)
    thresh = scores[len(scores) // 2]  # half of them kept
    kept = predict_image(model, image, dataclasses.replace(cfg.predict, score_thresh=thresh))
    assert 0 < len(kept) < len(everything)
    assert kept == [e for e in everything if e["score"] >= thresh]
    with torch.inference_mode():
        raw_all = raw_detections(model, [image])[0]
        with score_floor(model, thresh):
            raw_kept = raw_detections(model, [image])[0]
    # masks computed for the kept boxes only. Counted against the same path's scores: predict_image
    # runs the weights channels_last, whose scores differ in the 7th digit, and the threshold is a
    # detection's own score, so that detection may fall on either side of it here
    assert len(raw_kept["masks"]) == int((raw_all["scores"] >= thresh).sum()) < len(raw_all["masks"])
    assert abs(len(raw_kept["masks"]) - len(kept)) <= 1
    assert model.roi_heads.score_thresh == cfg.model.box_score_thresh  # restored


# --------------------------------------------------------------------------------------------
# speed: tiles from the cell size, batched tiles, the weights' layout


def test_aligned_tiles_cover_the_axis_with_the_fewest_pixels():
    """Speed issue: tiles of a fixed-scale model start on the network's stride, overlap by at
    least the overlap, partition the axis by their cores, and cost no more pixels (padded to the
    stride) than any other aligned layout of at most `tile` px."""
    from cellkit.inference.tiling import axis_spans

    def cost(spans, align):
        return sum(math.ceil((b - a) / align) * align for a, b in spans)

    for size in (300, 513, 800, 1000, 2048, 3001, 5000):
        for tile, overlap, align in ((512, 35, 32), (480, 160, 32), (256, 48, 16), (512, 128, 32)):
            spans = axis_spans(size, tile, overlap, align)
            assert spans[0][0] == 0 and spans[-1][1] == size
            assert all(a % align == 0 and b - a <= tile for a, b in spans)
            assert all(prev[1] - nxt[0] >= overlap for prev, nxt in zip(spans, spans[1:]))
            brute = min((cost([(k * step, min(k * step + length, size)) for k in range(math.ceil((size - length) / step) + 1)], align)
                         for length in range(align, tile + 1, align) for step in range(align, length - overlap + 1, align)
                         if length < size), default=size)
            assert size <= tile or cost(spans, align) == brute
    assert axis_spans(2048, 512, 35, 32) == [(0, 512), (448, 960), (896, 1408), (1344, 1856), (1792, 2048)]
    # 1.27 x the pixels the network sees, where evenly spaced 512 px tiles overlapping by 128 px were 1.56 x
    assert cost(axis_spans(2048, 512, 35, 32), 32) ** 2 / 2048**2 < 1.27 < 1.5625 == (5 * 512) ** 2 / 2048**2
    # no alignment (a min_size model): tiles of exactly `tile` px, evenly spaced, as before
    assert axis_spans(1000, 256, 64) == [(s, s + 256) for s in tile_starts(1000, 256, 64)]


def test_tile_overlap_auto_is_the_largest_cell_at_the_input_scale():
    import cellkit
    from cellkit.inference.predict import FALLBACK_OVERLAP, image_tiles, tile_overlap

    def build(**over):
        cfg = load_config(None, {"model.backbone": "resnet18", "model.num_classes": 4, **over})
        return cellkit.build_model(cfg).eval()

    fixed = build(**{"model.resize_mode": "fixed_scale", "model.scale": 2.0, "model.max_size": 1024,
                     "model.max_cell_diameter": 49.5})
    pc = PredictConfig(tile_size=1024, tile_above=600)
    assert pc.tile_overlap == "auto" and tile_overlap(fixed, pc) == 25  # 49.5 input px at scale 2
    tiles = image_tiles(fixed, pc, 700, 1300)  # at most 1024 / 2 = 512 px, starts on 32 / 2 = 16 px
    assert all(t.y0 % 16 == 0 and t.x0 % 16 == 0 and t.height <= 512 and t.width <= 512 for t in tiles)
    assert image_tiles(fixed, PredictConfig(tile_size=1024, tile_overlap=100, tile_above=600), 700, 1300) is not None
    assert tile_overlap(fixed, PredictConfig(tile_overlap=60)) == 60
    plain = tiny_model()  # a torchvision model does not know its largest cell
    assert tile_overlap(plain, pc) == FALLBACK_OVERLAP
    assert tile_overlap([fixed, plain], pc) == FALLBACK_OVERLAP  # an ensemble: the largest
    resize = build(**{"model.max_cell_diameter": 40.0})  # min_size: tiles keep tile_size, evenly spaced
    assert {(t.height, t.width) for t in image_tiles(resize, PredictConfig(tile_size=600, tile_above=700), 900, 1500)} \
        == {(600, 600)}
    big = build(**{"model.resize_mode": "fixed_scale", "model.max_size": 256, "model.max_cell_diameter": 300.0})
    with pytest.raises(ConfigError, match="predict.tile_overlap") as e:
        image_tiles(big, pc, 700, 700)
    assert "\n" not in str(e.value) and "model.max_cell_diameter" in str(e.value)


def test_aligned_tiles_keep_every_cell_once():
    """The core rule and the duplicate removal on the aligned tiles (shorter last row and column):
    every ground-truth cell comes out exactly once, whole, as on the untiled image."""
    from cellkit.inference.tiling import tile_grid

    _, owner, classes = synth_image(np.random.default_rng(13), 610, 700)
    tiles = tile_grid(*owner.shape, 256, 48, align=32)  # cells of at most 41 px: smaller than the overlap
    assert len({(t.height, t.width) for t in tiles}) > 1 and cells_cut(owner, tiles) > 20
    parts = [place_tile(gt_detections(owner[t.y0 : t.y1, t.x0 : t.x1], classes, seed=k), t, k) for k, t in enumerate(tiles)]
    merged = Detections.cat(parts).replace(image_id=1, image_size=owner.shape)
    ids = instance_ids(owner)
    assert int((~merged.fringe).sum()) == len(ids)  # the core rule alone keeps each once (the slack some twice)
    entries = finalize(merged, PredictConfig())
    gt = [encode_mask(owner == i) for i in ids]
    ious = mask_utils.iou([e["segmentation"] for e in entries], gt, [0] * len(gt))
    untiled = finalize(gt_detections(owner, classes), PredictConfig(tile_size=None))
    ref = mask_utils.iou([e["segmentation"] for e in untiled], gt, [0] * len(gt)).max(axis=0)
    assert len(entries) == len(ids) and ((ious > 0.5).sum(axis=0) == 1).all()
    assert (ious.max(axis=0) >= ref - 0.01).all()


@pytest.mark.slow
def test_tile_batches_and_channels_last_give_the_same_cells(model):
    rgba, _, _ = synth_image(np.random.default_rng(9), 300, 260)
    img = image_to_tensor(rgba[..., :3])
    base = PredictConfig(tile_size=160, tile_overlap=48, tile_above=200, channels_last=False)
    ref = predict_image(model, img, base, image_id=4)
    assert ref
    for cfg in (dataclasses.replace(base, tile_batch=3), dataclasses.replace(base, channels_last=True)):
        got = predict_image(model, img, cfg, image_id=4)
        assert len(got) == len(ref)
        assert np.allclose([e["score"] for e in got], [e["score"] for e in ref], atol=1e-4)
        ious = mask_utils.iou([e["segmentation"] for e in got], [e["segmentation"] for e in ref], [0] * len(ref))
        assert np.diag(ious).min() > 0.97
    # the weights' layout is put back, and they can still train (not inference tensors)
    conv = model.backbone.body.conv1.weight
    assert conv.is_contiguous() and not conv.is_inference()
    model.train()
    loss = sum(model([img[:, :128, :128]], [{"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]),
                                             "labels": torch.tensor([1]),
                                             "masks": torch.zeros(1, 128, 128, dtype=torch.uint8)}]).values())
    loss.backward()
    model.eval()
    model.zero_grad()


def test_a_tile_batch_that_cannot_fit_is_a_config_error():
    import cellkit
    from cellkit.inference.predict import check_tile_batch

    cfg = load_config(None, {"model.backbone": "resnet18", "model.num_classes": 4, "model.resize_mode": "fixed_scale",
                             "model.scale": 4.0, "model.max_size": 8192, "model.max_cell_diameter": 120.0})
    m = cellkit.build_model(cfg).eval()
    pc = PredictConfig(tile_batch=256)
    with pytest.raises(ConfigError, match="predict.tile_batch") as e:
        predict_image(m, torch.zeros(3, 1500, 1500), pc)  # 256 tiles of 1024 px at scale 4: about a terabyte
    assert "\n" not in str(e.value) and "GB" in str(e.value) and "predict.tile_size" in str(e.value)
    check_tile_batch(m, PredictConfig(tile_batch=2), 512, 512, available=2**40)  # fits: nothing raised
    with pytest.raises(ConfigError, match="predict.tile_batch: 2 tile"):
        check_tile_batch(m, PredictConfig(tile_batch=2), 512, 512, available=2**20)


@pytest.mark.slow
def test_training_records_the_largest_cell_and_tiles_overlap_by_it(tiny_run: Path, synth_root: Path) -> None:
    """Speed issue: when training starts, the largest cell is measured on the training split
    (the 99.5th percentile of the cells' longer box side, at the input scale); the run's config
    and checkpoints keep it, the rebuilt model carries it, and predict.tile_overlap auto uses it."""
    from cellkit.analysis.scale import MAX_CELL_PERCENTILE, cell_sizes
    from cellkit.data import CellDataset, train_val_samples
    from cellkit.inference.predict import image_tiles, tile_overlap
    from cellkit.models.checkpoint import model_from_checkpoint

    cfg = load_config(tiny_run / "config.yaml")
    areas, extents, _ = cell_sizes(CellDataset(train_val_samples(cfg.data, cfg.model.num_classes, False)[0], cache=False))
    assert len(extents) > 100 and (extents**2 >= areas).all()
    expected = math.ceil(np.percentile(extents, MAX_CELL_PERCENTILE) * cfg.model.scale * 10) / 10
    assert cfg.model.max_cell_diameter == expected and 20 < expected < 60
    model, ckpt_cfg, _ = model_from_checkpoint(tiny_run / "checkpoints" / "best.pth")
    assert ckpt_cfg.model.max_cell_diameter == expected == model.max_cell_diameter
    pc = dataclasses.replace(ckpt_cfg.predict, tile_size=256, tile_above=300)
    assert pc.tile_overlap == "auto" and tile_overlap(model, pc) == math.ceil(expected / cfg.model.scale)
    tiles = image_tiles(model, pc, 600, 900)
    rows = sorted({(t.y0, t.y1) for t in tiles})
    assert all(a[1] - b[0] >= math.ceil(expected) for a, b in zip(rows, rows[1:]))
