"""``cellkit segment``: own images (TIFF/PNG, 8/16 bit, grey/RGB) -> training-layout label maps,
overlay, measurements, ImageJ ROIs and QuPath GeoJSON; exports that rasterise back to the masks;
nothing half-written; tiles that give the untiled cells."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np
import pandas as pd
import pytest
import roifile
import scipy.ndimage as ndi
import shapely
import tifffile
import tqdm.auto
from conftest import TINY
from matplotlib.path import Path as MplPath

from cellkit.cli import main
from cellkit.config import load_config
from cellkit.data import CellDataset, load_sample, read_image, scan_train
from cellkit.data.intensity import Intensity
from cellkit.data.synth import synth_image, write_synthetic
from cellkit.engine.defaults import train
from cellkit.errors import ConfigError, DataError
from cellkit.inference import segment as segment_mod
from cellkit.inference.cells import claim_pixels
from cellkit.inference.imagej import write_imagej_rois
from cellkit.inference.measure import COLUMNS
from cellkit.inference.polygons import mask_geometry
from cellkit.inference.qupath import cell_features
from cellkit.inference.segment import expand_inputs, load_segmenter, predict_cells, segment_array, write_segmentation
from cellkit.inference.tiling import tile_grid
from cellkit.structures import MaskRegion
from cellkit.structures.rle import decode_region, encode_region, mask_iou

pytestmark = pytest.mark.usefixtures("torch_threads")


# --------------------------------------------------------------------------------------------
# reading: 16 bit, grey, PNG; intensity mapping


def test_png_and_tiff_keep_16_bits_and_grey(tmp_path: Path) -> None:
    rgb16 = (np.arange(50 * 40 * 3).reshape(50, 40, 3) * 41 % 4096).astype(np.uint16)  # 12-bit values
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(rgb16))
    grey16 = rgb16[..., 0]
    tifffile.imwrite(tmp_path / "grey16.tif", grey16)
    (tmp_path / "grey8.png").write_bytes(imagecodecs.png_encode((grey16 // 16).astype(np.uint8)))
    a = read_image(tmp_path / "rgb16.png")
    assert a.dtype == np.uint16 and (a == rgb16).all()  # Pillow would give uint8 here
    b = read_image(tmp_path / "grey16.tif")
    assert b.shape == (50, 40, 3) and b.dtype == np.uint16 and (b[..., 2] == grey16).all()
    c = read_image(tmp_path / "grey8.png")
    assert c.dtype == np.uint8 and c.shape == (50, 40, 3)
    (tmp_path / "cut.png").write_bytes(imagecodecs.png_encode(rgb16)[:200])
    with pytest.raises(DataError, match=r"cut\.png: cannot read PNG"):
        read_image(tmp_path / "cut.png")


def test_intensity_modes_map_to_unit_range() -> None:
    img = np.zeros((100, 100, 3), np.uint16)
    img[..., :] = np.linspace(100, 4095, 100)[None, :, None].astype(np.uint16)  # a dim 12-bit image
    dtype = Intensity.from_config(load_config(None).data)
    assert dtype.apply(img) is img  # the default is what every earlier run did: /65535
    pct = Intensity.from_config(load_config(None, {"data.intensity": "percentile"}).data)
    out = pct.apply(img)
    assert out.dtype == np.uint16 and out.min() == 0 and out.max() == 65535
    lo, hi = np.percentile(img, [1, 99.8])
    mid = img[0, 50, 0]
    assert out[0, 50, 0] == pytest.approx((mid - lo) / (hi - lo) * 65535, abs=1)
    fixed = Intensity.from_config(load_config(None, {"data.intensity": "fixed",
                                                     "data.intensity_range": [0, 4095]}).data)
    assert fixed.apply(img)[0, -1, 0] == 65535 and fixed.apply(img)[0, 0, 0] == round(100 / 4095 * 65535)
    assert Intensity("percentile").apply(np.full((4, 4, 3), 7, np.uint8)).max() == 0  # constant: no division by 0
    with pytest.raises(ConfigError, match="data.intensity_range"):
        load_config(None, {"data.intensity": "fixed"})
    with pytest.raises(ConfigError, match="intensity_percentiles"):
        load_config(None, {"data.intensity_percentiles": [99, 1]})


def test_training_dataset_reads_with_the_configured_intensity(synth_root: Path, tmp_path: Path) -> None:
    """A 12-bit camera's image in a uint16 file: /65535 leaves it in the darkest 1/16 of [0, 1];
    data.intensity percentile (stored in the checkpoint, so segment reads alike) stretches it."""
    src = scan_train(synth_root)[0]
    dst = tmp_path / "train" / src.name
    shutil.copytree(src.image_path.parent, dst)
    tifffile.imwrite(dst / "image.tif", read_image(src.image_path).astype(np.uint16) * 16)
    samples = scan_train(tmp_path)
    cfg = load_config(None, {"data.intensity": "percentile"})
    raw = CellDataset(samples, cache=False)[0][0]
    mapped = CellDataset(samples, cache=False, intensity=Intensity.from_config(cfg.data))[0][0]
    assert raw.max() <= 4095 / 65535 + 1e-6
    assert mapped.max() == pytest.approx(1.0) and mapped.min() == 0.0


# --------------------------------------------------------------------------------------------
# cells, label maps, polygons


def test_decode_region_inverts_encode_region() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        region = rng.random((rng.integers(1, 20), rng.integers(1, 20))) < 0.4
        top, left = int(rng.integers(-5, 30)), int(rng.integers(-5, 30))
        rle = encode_region(region, top, left, 40, 45)
        full = np.zeros((40, 45), bool)
        back, t, le = decode_region(rle)
        full[t : t + back.shape[0], le : le + back.shape[1]] = back
        expected = np.zeros((40, 45), bool)
        ys, xs = np.nonzero(region)
        ok = (ys + top >= 0) & (ys + top < 40) & (xs + left >= 0) & (xs + left < 45)
        expected[ys[ok] + top, xs[ok] + left] = True
        assert (full == expected).all()


def test_claim_pixels_gives_contested_pixels_to_the_higher_score() -> None:
    a = MaskRegion(np.ones((10, 10), bool), 0, 0, 1, 0.9)
    b = MaskRegion(np.ones((10, 10), bool), 5, 5, 2, 0.8)  # loses 25 of 100 pixels: kept
    dup = MaskRegion(np.ones((9, 9), bool), 1, 1, 2, 0.7)  # inside a: a duplicate, dropped
    cells, owner = claim_pixels([dup, b, a], (20, 20), min_kept=0.5)
    assert [(c.label, c.instance_id, c.area) for c in cells] == [(1, 1, 100), (2, 2, 75)]
    assert (owner[:10, :10] == 1).all() and (owner == 2).sum() == 75


def tricky_cells() -> list[MaskRegion]:
    """Masks that break centre-traced contours: one-pixel lines, diagonal-only contact, holes, specks."""
    ring = np.ones((7, 7), bool)
    ring[2:5, 2:5] = False
    diag = np.eye(5, dtype=bool)
    two = np.zeros((6, 9), bool)
    two[:3, :3] = two[3:, 5:] = True
    line = np.ones((1, 12), bool)
    return [MaskRegion(m, 3 + 11 * i, 4 + 7 * i, 1 + i % 2, 0.9, instance_id=i + 1)
            for i, m in enumerate([ring, diag, two, line, np.ones((1, 1), bool)])]


def rasterise_rings(rings: list[np.ndarray], top: int, left: int, h: int, w: int) -> np.ndarray:
    """Pixels of ``(h, w)`` at (top, left) whose centres lie inside the rings (even-odd, as ImageJ fills)."""
    yy, xx = np.mgrid[top : top + h, left : left + w]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    inside = np.zeros(len(centres), bool)
    for ring in rings:
        inside ^= MplPath(ring).contains_points(centres)
    return inside.reshape(h, w)


def iou_with(cell: MaskRegion, rings: list[np.ndarray]) -> float:
    pad = 2
    h, w = cell.mask.shape
    got = rasterise_rings(rings, cell.top - pad, cell.left - pad, h + 2 * pad, w + 2 * pad)
    want = np.zeros_like(got)
    want[pad : pad + h, pad : pad + w] = cell.mask
    return float((got & want).sum() / (got | want).sum())


def test_roi_and_geojson_rasterise_back_to_every_mask(fixture_root: Path, tmp_path: Path) -> None:
    """The one-pixel trap (Cellpose 757): polygons along pixel edges fill back to the very pixels,
    for the real sample's 161 cells and for masks with holes, lines and diagonal contact."""
    _, maps = load_sample(scan_train(fixture_root)[0])
    cells = [MaskRegion(r.mask, r.top, r.left, r.label, 1.0, instance_id=i + 1) for i, r in enumerate(maps.regions())]
    cells += [MaskRegion(c.mask, c.top, c.left, c.label, c.score, instance_id=len(cells) + k + 1)
              for k, c in enumerate(tricky_cells())]
    names = [f"class{k}" for k in range(1, 5)]
    zip_path = write_imagej_rois(cells, tmp_path / "rois.zip", names)
    rois = roifile.roiread(zip_path)
    assert len(rois) == len(cells) == 166
    by_name = {r.name: r for r in rois}
    for c in cells:
        roi = by_name[f"{c.instance_id:05d}-{names[c.label - 1]}"]
        assert roi.group == c.label
        assert iou_with(c, roi.coordinates(multi=True)) >= 0.98, c.instance_id
    features = cell_features(cells, names, [], "x")["features"]
    assert len(features) == len(cells)
    for c, f in zip(cells, features):
        geom = shapely.geometry.shape(f["geometry"])
        assert geom.is_valid and geom.area == c.area
        assert f["properties"]["classification"]["name"] == names[c.label - 1]
        assert len(f["properties"]["classification"]["color"]) == 3
        rings = [np.asarray(r.coords) for p in getattr(geom, "geoms", [geom]) for r in (p.exterior, *p.interiors)]
        assert iou_with(c, rings) >= 0.98
    # what a centre-traced contour gives instead: the real cells lose their boundary half-pixels
    c = cells[0]
    shrunk = shapely.buffer(mask_geometry(c.mask, c.top, c.left), -0.5, join_style="mitre")
    assert shrunk.area < 0.9 * c.area


# --------------------------------------------------------------------------------------------
# the command


def own_images(folder: Path) -> Path:
    """An 8-bit RGBA TIFF, a 12-bit grey PNG, a 16-bit RGB PNG, an unreadable TIFF, a text file."""
    folder.mkdir()
    rng = np.random.default_rng(2)
    rgba = synth_image(rng, 180, 150)[0]
    tifffile.imwrite(folder / "stain.tif", rgba)
    grey12 = (synth_image(rng, 120, 140)[0][..., 1].astype(np.uint16) * 16)
    (folder / "grey12.png").write_bytes(imagecodecs.png_encode(grey12))
    rgb16 = synth_image(rng, 100, 90)[0][..., :3].astype(np.uint16) * 257
    (folder / "rgb16.png").write_bytes(imagecodecs.png_encode(rgb16))
    (folder / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.slow
def test_segment_writes_the_training_layout_and_exports(tiny_run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    images = own_images(tmp_path / "imgs")
    ckpt = tiny_run / "checkpoints" / "best.pth"
    out = tmp_path / "out"
    rc = main(["segment", str(images), "--checkpoint", str(ckpt), "--out", str(out), "--no-progress",
               "--set", "predict.score_thresh=0.05"])
    text = capsys.readouterr().out
    assert rc == 1  # one file skipped
    assert f"skipped {images / 'broken.tif'}: " in text and "notes.txt" not in text
    assert sorted(p.name for p in out.iterdir()) == ["grey12", "rgb16", "stain"]
    model, cfg = load_segmenter(ckpt, "cpu", ["predict.score_thresh=0.05"])
    # the label maps go straight back into training: scan_train reads them, and they are the cells
    samples = scan_train(out, num_classes=cfg.model.num_classes)
    assert [s.name for s in samples] == ["grey12", "rgb16", "stain"]
    for s in samples:
        image, maps = load_sample(s)
        raw = read_image(images / f"{s.name}{'.tif' if s.name == 'stain' else '.png'}")
        assert (image == raw).all() and image.dtype == raw.dtype  # the image as read, 16 bit kept
        seg = segment_array(model, raw, cfg, s.name, progress=False)
        assert len(seg.cells) > 0
        got = sorted((r.label, r.top, r.left, r.mask.tobytes()) for r in maps.regions())
        want = sorted((c.label, c.top, c.left, c.mask.tobytes()) for c in seg.cells)
        assert got == want
        for k, p in s.class_paths.items():
            assert tifffile.imread(p).dtype == np.float64
        folder = out / s.name
        table = pd.read_csv(folder / "cells.csv")
        assert tuple(table.columns) == COLUMNS and len(table) == len(seg.cells)
        assert (table["area_px"].to_numpy() == [c.area for c in seg.cells]).all()
        assert table["class_name"].str.startswith("class").all() and table["image"].eq(s.name).all()
        assert len(roifile.roiread(folder / "rois.zip")) == len(seg.cells)
        gj = json.loads((folder / "cells.geojson").read_text())
        assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(seg.cells)
        assert all(shapely.geometry.shape(f["geometry"]).is_valid for f in gj["features"])
        meta = json.loads((folder / "segment.json").read_text())
        assert meta["cells"] == len(seg.cells) and meta["score_thresh"] == 0.05
        assert meta["intensity"].startswith("dtype") and meta["scale"] == cfg.model.scale
        overlay = imagecodecs.png_decode((folder / "overlay.png").read_bytes())
        assert overlay.shape == (*raw.shape[:2], 3) and overlay.dtype == np.uint8
    # never written over without --overwrite: refused before any work, nothing changed
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    rc = main(["segment", str(images / "stain.tif"), "--checkpoint", str(ckpt), "--out", str(out), "--no-progress"])
    assert rc == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # --overwrite replaces the folder whole; --formats picks the outputs
    rc = main(["segment", str(images / "stain.tif"), "--checkpoint", str(ckpt), "--out", str(out), "--overwrite",
               "--formats", "csv,geojson", "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in (out / "stain").iterdir()) == ["cells.csv", "cells.geojson", "segment.json"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_progress_bar_counts_the_tiles(tiny_run: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """With the bar shown (as in a terminal or notebook) a tiled image still segments, and the bar
    ends at tiles x views (a forward hook counts them; its return value must not replace the features)."""
    monkeypatch.setenv("CELLKIT_PROGRESS", "1")
    monkeypatch.setattr("cellkit.progress.in_notebook", lambda: True)  # tqdm then draws on stderr
    # every update drawn, the last one too: tqdm reads TQDM_MININTERVAL when it is imported, not
    # per bar, so only the arguments hold when the machine is busy (the 0.1 s default drops it)
    monkeypatch.setattr("cellkit.progress.tqdm", functools.partial(tqdm.auto.tqdm, mininterval=0, miniters=1))
    model, cfg = load_segmenter(tiny_run / "checkpoints" / "best.pth", "cpu",
                                ["predict.tile_size=128", "predict.tile_overlap=32", "predict.tile_above=150",
                                 "predict.tta=true", "predict.tta_flips=[h]"])
    image = synth_image(np.random.default_rng(1), 200, 230)[0][..., :3]
    seg = segment_array(model, image, cfg, "img", progress=True)
    assert seg.tiles == 6
    assert re.search(r"tiles: 100%.*\b12/12\b", capsys.readouterr().err.replace("\r", "\n"))  # 6 tiles x 2 views


def test_inputs_files_folders_globs_and_their_errors(tmp_path: Path) -> None:
    images = own_images(tmp_path / "imgs")
    both = expand_inputs([images / "stain.tif", str(images / "*.png"), images])
    assert [p.name for p in both] == ["stain.tif", "grey12.png", "rgb16.png", "broken.tif"]
    with pytest.raises(DataError, match="file not found"):
        expand_inputs([images / "nope.tif"])
    with pytest.raises(DataError, match="not a TIFF or PNG"):
        expand_inputs([images / "notes.txt"])
    with pytest.raises(DataError, match="matches no TIFF or PNG"):
        expand_inputs([str(images / "*.jpg")])
    (tmp_path / "other").mkdir()
    shutil.copy(images / "stain.tif", tmp_path / "other" / "stain.png")
    with pytest.raises(DataError, match="same name"):
        segment_mod.image_names(expand_inputs([images / "stain.tif", tmp_path / "other" / "stain.png"]))
    assert main(["segment", str(images / "nope.tif"), "--checkpoint", "x.pth", "--out", str(tmp_path / "o")]) == 2


def test_a_failed_write_leaves_the_old_folder_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = synth_image(np.random.default_rng(0), 40, 50)[0][..., :3]
    cells = [MaskRegion(np.ones((5, 5), bool), 3, 4, 1, 0.9, instance_id=1)]
    owner = np.zeros((40, 50), np.int32)
    owner[3:8, 4:9] = 1
    seg = segment_mod.Segmentation("img", image, cells, owner, ["class1"], Intensity())
    target = write_segmentation(seg, tmp_path / "img")
    first = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segment_mod, "write_imagej_rois", disk_full)
    with pytest.raises(DataError, match=r"img: cannot write: no space left on device"):  # one line, the folder named
        write_segmentation(seg, tmp_path / "img", overwrite=True)
    with pytest.raises(DataError, match=r"new: cannot write: no space left on device"):
        write_segmentation(seg, tmp_path / "new")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == first  # the old folder, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]  # no half folder, no temporary one


@pytest.mark.slow
def test_kill_9_mid_write_leaves_whole_folders_only(tiny_run: Path, tmp_path: Path) -> None:
    """``kill -9`` while an image's folder is being written: every folder in OUT is complete, the
    half-written one is a hidden temporary folder that the next run removes."""
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(7)
    for i in range(6):
        tifffile.imwrite(images / f"img{i}.tif", synth_image(rng, 160, 200)[0])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cellkit", "segment", str(images), "--checkpoint",
           str(tiny_run / "checkpoints" / "best.pth"), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and any(p.name.startswith(".img") for p in out.iterdir()):
                break  # a folder is being written right now
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    visible = [p for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
    files = {"image.tif", "overlay.png", "cells.csv", "rois.zip", "cells.geojson", "segment.json"}
    for folder in visible:
        assert files <= {p.name for p in folder.iterdir()}, folder
        assert json.loads((folder / "segment.json").read_text())["image"] == folder.name
    assert subprocess.run([*cmd, "--overwrite"], capture_output=True).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == [f"img{i}" for i in range(6)]  # no temporary folder left


# --------------------------------------------------------------------------------------------
# tiles


SEAM_EPOCHS = 50


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ResNet-18 trained for 150 steps (50 epochs of the 3 batches of 6 training images of
    one class, 96 px crops: no score is split between classes): validation AP50 0.5-0.8 depending
    on the draw (the thread count, the CPU), enough cells on every seam. The seam test compares it
    with itself (tiled against untiled) and with the ground truth, so it asks nothing of that draw."""
    data = write_synthetic(tmp_path_factory.mktemp("synth-one-class"), n_train=8, n_test=3, seed=3, max_size=192,
                           progress=False, n_classes=1)
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(None, {**TINY, "data.root": str(data), "train.epochs": SEAM_EPOCHS, "train.iters_per_epoch": 10,
                             "train.lr": 2e-3, "train.eval_every": SEAM_EPOCHS,
                             "train.checkpoint_every": SEAM_EPOCHS}), run, progress=False)
    return run


SEAM_H, SEAM_W, TILE, OVERLAP = 800, 2080, 480, 160  # tile starts every 320 px: a multiple of the stride 32


@pytest.mark.slow
def test_tiles_give_the_untiled_cells_on_every_seam(trained_run: Path) -> None:
    """A 2080 px image in 12 tiles (5 vertical seams, 1 horizontal), predicted tiled and untiled:

    - the tiles lie on the network's grid: most confident cells (score >= 0.5) of the untiled
      prediction come out of the tiles the same (median mask IoU >= 0.95; at least half with IoU
      >= 0.95, 80-92 % over eight draws of the model, and 40 % of those on a seam, 68-92 %; 470 px
      tiles, off the grid, gave median 0.88, 13 % and 7 % for a four-class model);
    - against the ground truth (mask IoU >= 0.5) the tiles find as many cells as the whole image,
      on the seams too, and lose at most 3 % of the cells it finds (0.2-0.7 % over the draws:
      the context a tile border takes away). A seam cell found only cut in two would be lost.
    """
    image, owner, _ = synth_image(np.random.default_rng(5), SEAM_H, SEAM_W, density=1 / 500, n_classes=1)
    image = image[..., :3]
    ckpt = trained_run / "checkpoints" / "best.pth"
    # budgets that do not cap either run: 4000 proposals on the whole image, 1000 per 480 px tile
    whole_budget = ["model.box_detections_per_img=2000", "model.rpn_pre_nms_top_n_test=4000",
                    "model.rpn_post_nms_top_n_test=4000"]
    tile_budget = ["model.box_detections_per_img=500", "model.rpn_pre_nms_top_n_test=1000",
                   "model.rpn_post_nms_top_n_test=1000"]
    common = ["model.max_size=4096", "predict.score_thresh=0.3"]
    m1, whole = load_segmenter(ckpt, "cpu", [*common, *whole_budget, "predict.tile_size=null"])
    m2, tiled = load_segmenter(ckpt, "cpu", [*common, *tile_budget, f"predict.tile_size={TILE}",
                                             f"predict.tile_overlap={OVERLAP}", "predict.tile_above=500"])
    a, n_a = predict_cells(m1, image, whole, progress=False)
    b, n_b = predict_cells(m2, image, tiled, progress=False)
    assert (n_a, n_b) == (1, 12) and len(a) < 2000
    tiles = tile_grid(SEAM_H, SEAM_W, TILE, OVERLAP)
    seams_x = sorted({t.core[3] for t in tiles})[:-1]
    seams_y = sorted({t.core[2] for t in tiles})[:-1]
    assert (len(seams_x), len(seams_y)) == (5, 1)

    def seams(box: tuple[float, float, float, float]) -> list[float]:
        x0, y0, x1, y1 = box
        return [s for s in seams_x if x0 < s < x1] + [-s for s in seams_y if y0 < s < y1]

    rle = lambda cs: [encode_region(c.mask, c.top, c.left, SEAM_H, SEAM_W) for c in cs]  # noqa: E731
    confident = [c for c in a if c.score >= 0.5]
    best = mask_iou(rle(confident), rle(b)).max(1)
    crossing = [i for i, c in enumerate(confident) if seams(c.box)]
    covered = {s for i in crossing for s in seams(confident[i].box)}
    assert len(covered) == 6 and len(crossing) >= 20  # cells on every seam
    assert np.median(best) >= 0.95 and (best >= 0.95).mean() >= 0.5 and (best[crossing] >= 0.95).mean() >= 0.4

    cells = [MaskRegion(owner[sl] == i + 1, sl[0].start, sl[1].start, 1)
             for i, sl in enumerate(ndi.find_objects(owner)) if sl]
    truth = rle(cells)
    on_seam = np.array([bool(seams(c.box)) for c in cells])
    found = {name: mask_iou(truth, rle(cs)).max(1) >= 0.5 for name, cs in (("whole", a), ("tiled", b))}
    assert on_seam.sum() >= 50 and found["whole"][on_seam].sum() >= 20
    assert found["tiled"].mean() >= found["whole"].mean()
    assert found["tiled"][on_seam].mean() >= found["whole"][on_seam].mean()
    assert (found["whole"] & ~found["tiled"]).sum() <= 0.03 * found["whole"].sum()
