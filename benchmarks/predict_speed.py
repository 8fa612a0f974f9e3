"""Prediction on large images: the whole ``cellkit predict`` path against the bare forward pass.

For each size (default 2048 and 5000 px) one synthetic H&E-like image
(:func:`cellkit.data.synth.synth_image`, 1 cell placement per 700 px^2: about one cell per
1000 px^2, as crowded as the hw3 images) is written as a TIFF, and each measurement runs in its
own process (its own peak memory):

* ``whole``: what ``cellkit predict`` does with one image, without writing the json:
  ``read_image`` -> ``data.intensity`` -> ``image_to_tensor`` ->
  :func:`cellkit.inference.predict.predict_image` (the tiles of ``image_tiles``, the box stage at
  ``predict.score_thresh``, paste + RLE, cross-tile duplicates) at ``--score`` (default 0.5);
* ``bare``: the model's own forward (transform, backbone, RPN, RoI heads with the box stage at
  the same score, masks left at M x M: no paste) over the non-overlapping tiles of
  ``max_size / scale`` px that cover the image, one tile per forward, from the decoded image,
  with the same weights' layout (``predict.channels_last``): the ratio is what the command adds.

The two alternate (whole, bare, whole, bare ...; ``--repeats``, best of each) so that the load of
a shared machine falls on both; FLOPs per megapixel are counted once more per path with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls, forward only), in the
process of each path's last run, after its timed run. Peak memory
is the process's high-water mark minus its size before the image is read, next to the image's
own arrays (the decoded image and its float32 copy, 15 bytes per pixel). The machine's 2048 x
2048 fp32 matmul GFLOP/s is measured before and after, on the same threads: seconds on another
machine ~ seconds here x GFLOP/s here / GFLOP/s there.

    python benchmarks/predict_speed.py --checkpoint runs/demo/run/checkpoints/best.pth
    python benchmarks/predict_speed.py --checkpoint runs/demo/run/checkpoints/best.pth --choices   # CPU choices, 2048 px
    python benchmarks/predict_speed.py --sizes 200 --set model.max_size=128 --set model.max_cell_diameter=40 \
        --repeats 1   # smoke (random weights)

``--choices`` measures CPU inference choices side by side on one size (the first of ``--sizes``),
whole path, each in its own process, alternating: the default (``predict.channels_last``), the
weights in the contiguous layout, bf16 autocast (where the CPU has bf16 instructions) of the
backbone, FPN and RPN head (``bf16-features``) or of the whole model (``bf16-all``),
``torch.compile`` of the backbone (compile time included), one thread instead of two,
``predict.tile_batch 2``; and the ONNX Runtime export (``cellkit export``) on the bare tiles,
against the same predictor in torch. Each variant's cells are compared with the default's (mask
IoU) and with the synthetic ground truth (segm AP50).

A checkpoint trained before ``model.max_cell_diameter`` existed gets it measured here on its
training split, as training now records it (said in the output). Without ``--checkpoint`` a
random-weight model of ``--config`` (default the demo recipe) is used: the same network and cost
per pixel, but noise for detections; use a trained checkpoint for the figures.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import scipy.ndimage as ndi
import tifffile
import torch
from _machine import (  # benchmarks/_machine.py, beside this script
    add_matmul_size,
    matmul_gflops,
    peak_mb,
    random_checkpoint,
    rss_mb,
)
from torch.utils.flop_counter import FlopCounterMode

from cellkit.analysis.scale import resolve_cell_statistics
from cellkit.data import CellDataset, image_to_tensor, read_image, train_val_samples
from cellkit.data.coco import categories
from cellkit.data.intensity import Intensity
from cellkit.data.synth import synth_image
from cellkit.evaluation.coco import coco_evaluate
from cellkit.inference.export_model import Predictor, export_model
from cellkit.inference.predict import (
    image_tiles,
    memory_format,
    predict_image,
    raw_detections,
    score_floor,
    tiling_limits,
)
from cellkit.inference.segment import load_segmenter
from cellkit.structures.rle import encode_region, mask_iou

MB = 2.0**20
DENSITY = 1 / 700
CHOICES = ("default", "contiguous", "bf16-features", "bf16-all", "compile", "1-thread", "tile-batch-2")


def write_image(size: int, folder: Path) -> tuple[Path, Path]:
    """The ``size x size`` synthetic image as a TIFF and its ground truth as COCO json."""
    rgba, owner, classes = synth_image(np.random.default_rng(size), size, size, density=DENSITY)
    tiff = folder / f"synth{size}.tif"
    tifffile.imwrite(tiff, rgba[..., :3], photometric="rgb")
    anns = []
    for inst, sl in enumerate(ndi.find_objects(owner), start=1):
        if sl is not None:
            rle = encode_region(owner[sl] == inst, sl[0].start, sl[1].start, size, size)
            anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": int(classes[inst - 1]), "iscrowd": 0,
                         "segmentation": rle, "area": float((owner[sl] == inst).sum()),
                         "bbox": [float(sl[1].start), float(sl[0].start), float(sl[1].stop - sl[1].start),
                                  float(sl[0].stop - sl[0].start)]})
    gt = {"images": [{"id": 1, "file_name": tiff.name, "height": size, "width": size}], "annotations": anns,
          "categories": categories(max(4, max(classes, default=1)))}
    gt_path = folder / f"gt{size}.json"
    gt_path.write_text(json.dumps(gt))
    return tiff, gt_path


def bare_tiles(model: torch.nn.Module, cfg: Any, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """``(y0, x0, y1, x1)`` of the non-overlapping tiles of the model's largest input that cover the image."""
    side = tiling_limits(model, cfg.predict)[0] or max(height, width)
    return [(y, x, min(y + side, height), min(x + side, width))
            for y in range(0, height, side) for x in range(0, width, side)]


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this process (see the module docstring); returns its JSON row. With
    ``spec["flops"]`` the same path runs once more after the timed run, under
    ``FlopCounterMode`` (which slows it: neither its time nor its memory is in the row)."""
    torch.set_num_threads(spec["threads"])
    model, cfg = load_segmenter(spec["checkpoint"], spec.get("device", "cpu"), spec["sets"], use_thresholds=False)
    variant = spec.get("variant", "default")
    if variant == "compile":
        model.backbone = torch.compile(model.backbone, dynamic=False)
    if variant == "bf16-features":
        model.backbone, model.rpn.head = InBf16(model.backbone), InBf16(model.rpn.head)
    base = rss_mb()
    row: dict[str, Any] = {"size": spec["size"], "what": spec["what"], "variant": variant}
    row.update(run_path(model, cfg, spec, variant))
    row["peak_mb"] = row.pop("peak_mb_after") - base
    if spec["flops"]:
        counter = FlopCounterMode(display=False)
        with counter:
            run_path(model, cfg, spec, variant)
        row["gflop"] = counter.get_total_flops() / 1e9
    return row


def run_path(model: torch.nn.Module, cfg: Any, spec: dict[str, Any], variant: str) -> dict[str, Any]:
    """The ``whole`` or ``bare`` path once over ``spec["tiff"]``: seconds, cells, tiles."""
    row: dict[str, Any] = {}
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if variant == "bf16-all":
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        image = read_image(spec["tiff"])
        h, w = int(image.shape[0]), int(image.shape[1])
        tensor = image_to_tensor(Intensity.from_config(cfg.data).apply(image))
        if spec["what"] == "whole":
            entries = predict_image(model, tensor, cfg.predict, image_id=1)
            row["cells"] = len(entries)
        else:
            start = time.perf_counter()  # the network alone: the image is decoded before the clock starts
            boxes = 0
            # the same weights' layout as the whole path (predict.channels_last): the ratio is the command's own cost
            with torch.inference_mode(), score_floor(model, cfg.predict.score_thresh), \
                    memory_format(model, cfg.predict.channels_last):
                for y0, x0, y1, x1 in bare_tiles(model, cfg, h, w):
                    boxes += len(raw_detections(model, [tensor[:, y0:y1, x0:x1]])[0]["boxes"])
            row.update(tiles=len(bare_tiles(model, cfg, h, w)), cells=boxes)
    row["seconds"] = time.perf_counter() - start
    row["peak_mb_after"] = peak_mb()  # before the writes below
    if spec["what"] == "whole":
        tiles = image_tiles(model, cfg.predict, h, w)
        row.update(tiles=1 if tiles is None else len(tiles),
                   tile_px=None if tiles is None else [tiles[0].height, tiles[0].width])
        if spec.get("out"):
            Path(spec["out"]).write_text(json.dumps(entries))
    row["image_mb"] = h * w * 15 / MB
    return row


class InBf16(torch.nn.Module):
    """A module run under bf16 autocast whose floating outputs come back as float32 (the
    ``bf16-features`` choice: backbone, FPN and RPN head in bf16, box and mask heads in float32,
    so boxes and masks keep float32 coordinates)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.out_channels = getattr(inner, "out_channels", None)

    def forward(self, x: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.inner(x)
        return _float32(out)


def _float32(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return type(x)((k, _float32(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x)(_float32(v) for v in x)
    return x


def run_onnx(spec: dict[str, Any]) -> dict[str, Any]:
    """The exported predictor in ONNX Runtime and the same :class:`Predictor` in torch over the
    bare tiles, alternating; seconds (best of ``repeats``) and how far their detections differ."""
    torch.set_num_threads(spec["threads"])
    model, cfg = load_segmenter(spec["checkpoint"], spec.get("device", "cpu"), spec["sets"], use_thresholds=False)
    predictor = Predictor(model, cfg.predict.score_thresh).eval()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = spec["threads"], 1
    session = ort.InferenceSession(spec["onnx"], opts, providers=["CPUExecutionProvider"])
    tensor = image_to_tensor(Intensity.from_config(cfg.data).apply(read_image(spec["tiff"])))
    crops = [tensor[:, y0:y1, x0:x1].contiguous() for y0, x0, y1, x1 in bare_tiles(model, cfg, *tensor.shape[-2:])]
    best = {"onnxruntime": float("inf"), "torch": float("inf")}
    outs: dict[str, list[Any]] = {}
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        outs["onnxruntime"] = [session.run(None, {"image": c.numpy()}) for c in crops]
        best["onnxruntime"] = min(best["onnxruntime"], time.perf_counter() - t)
        t = time.perf_counter()
        with torch.inference_mode(), score_floor(model, cfg.predict.score_thresh):
            outs["torch"] = [[o.numpy() for o in predictor(c)] for c in crops]
        best["torch"] = min(best["torch"], time.perf_counter() - t)
    n_ort = sum(len(o[2]) for o in outs["onnxruntime"])
    n_torch = sum(len(o[2]) for o in outs["torch"])
    same = n_ort == n_torch and all(len(a[2]) == len(b[2]) for a, b in zip(outs["onnxruntime"], outs["torch"]))
    score_diff = max((float(np.abs(a[2] - b[2]).max()) for a, b in zip(outs["onnxruntime"], outs["torch"]) if len(a[2])),
                     default=0.0) if same else None
    return {"tiles": len(crops), "onnxruntime_s": best["onnxruntime"], "torch_s": best["torch"],
            "detections_onnxruntime": n_ort, "detections_torch": n_torch, "max_score_diff": score_diff}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    env = dict(os.environ, CELLKIT_PROGRESS="0", OMP_NUM_THREADS=str(spec["threads"]))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{spec.get('what')} {spec.get('variant', '')} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cell_statistic(checkpoint: str, set_items: list[str]) -> list[str]:
    """``--set model.max_cell_diameter=...`` measured on the checkpoint's training split when the
    checkpoint predates the key (what training records now); nothing when it has it."""
    _, cfg = load_segmenter(checkpoint, "cpu", set_items, use_thresholds=False)
    if cfg.model.max_cell_diameter is not None:
        return []
    try:
        train = CellDataset(train_val_samples(cfg.data, cfg.model.num_classes, progress=False)[0], cache=False)
    except Exception as e:  # noqa: BLE001 - any reason the data is not here: the fallback overlap applies
        print(f"model.max_cell_diameter: not in the checkpoint and its training data cannot be read ({e}); "
              "predict.tile_overlap auto falls back to 128 px")
        return []
    value = resolve_cell_statistics(cfg, train, log=None).model.max_cell_diameter
    print(f"model.max_cell_diameter: not in the checkpoint (trained before the key); measured on its training "
          f"split as training now does: {value} px (and predict.tile_overlap auto instead of its stored 128)")
    return [f"model.max_cell_diameter={value}", "predict.tile_overlap=auto"]


def compare(entries: list[dict], reference: list[dict], gt: str) -> dict[str, Any]:
    """Cells of a variant against the default's (mask IoU, same class) and the ground truth (AP50)."""
    out: dict[str, Any] = {"cells": len(entries), "ap50": coco_evaluate(gt, entries, "segm", backend="auto").ap50}
    if entries and reference:
        iou = mask_iou([e["segmentation"] for e in reference], [e["segmentation"] for e in entries])
        same = np.equal.outer([e["category_id"] for e in reference], [e["category_id"] for e in entries])
        best = np.where(same, iou, 0).max(axis=1)
        out["matched"] = float((best >= 0.5).mean())
        out["iou_median"] = float(np.median(best[best >= 0.5])) if (best >= 0.5).any() else 0.0
        out["same_cells"] = float((best >= 0.95).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: random weights of --config)")
    ap.add_argument("--config", default="demo", help="recipe of the random-weight model (default demo)")
    ap.add_argument("--sizes", default="2048,5000", help="image sides in px (default 2048,5000)")
    ap.add_argument("--score", type=float, default=0.5, help="predict.score_thresh (default 0.5)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=2)
    add_matmul_size(ap)
    ap.add_argument("--device", default="cpu", help="where the model runs (default cpu; cuda on a GPU machine)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each path, best of (default 2)")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one pass per path less)")
    ap.add_argument("--choices", action="store_true", help="CPU inference choices side by side on the first size")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(run_onnx(spec) if spec["what"] == "onnx" else run_one(spec)))
        return
    gflops_before = matmul_gflops(args.threads, n=args.matmul_size)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or random_checkpoint(args.config, args.overrides, work / "random.pth")
        sets = [f"predict.score_thresh={args.score}", *args.overrides]
        if args.checkpoint:
            sets += cell_statistic(checkpoint, sets)
        base = {"checkpoint": checkpoint, "sets": sets, "threads": args.threads, "flops": False, "device": args.device}
        if args.choices:
            result = choices(args, base, work)
        else:
            result = speed(args, base, work)
    gflops_after = matmul_gflops(args.threads, n=args.matmul_size)
    result.update(matmul_gflops=[gflops_before, gflops_after], threads=args.threads,
                  checkpoint=args.checkpoint or f"random weights of {args.config}", settings=sets)
    print(f"\ncheckpoint: {result['checkpoint']}; {args.threads} threads; {' '.join(sets)}; "
          f"{args.matmul_size} x {args.matmul_size} fp32 matmul {gflops_before:.0f} GFLOP/s before, "
          f"{gflops_after:.0f} after")
    print(json.dumps(result))


def speed(args: argparse.Namespace, base: dict[str, Any], work: Path) -> dict[str, Any]:
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        tiff, _ = write_image(size, work)
        spec = {**base, "size": size, "tiff": str(tiff)}
        runs: dict[str, list[dict[str, Any]]] = {"whole": [], "bare": []}
        for r in range(args.repeats):
            for what in ("whole", "bare"):  # the last run of each path counts its FLOPs after its timed run
                count = r == args.repeats - 1 and not args.no_flops
                runs[what].append(child({**spec, "what": what, "flops": count}))
        whole = min(runs["whole"], key=lambda r: r["seconds"])
        bare = min(runs["bare"], key=lambda r: r["seconds"])
        row = {"size": size, "megapixels": size * size / 1e6, "whole": whole, "bare": bare,
               "ratio": whole["seconds"] / bare["seconds"], "all_whole_s": [r["seconds"] for r in runs["whole"]],
               "all_bare_s": [r["seconds"] for r in runs["bare"]]}
        if not args.no_flops:
            row["gflop_whole"], row["gflop_bare"] = runs["whole"][-1]["gflop"], runs["bare"][-1]["gflop"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| image | tiles (bare) | cells | whole (s) | bare forward (s) | whole / bare | s / MP whole (bare) "
          "| GFLOP / MP whole (bare) | peak memory (MB) | image arrays (MB) |")
    print("|---|---|---:|---:|---:|---:|---|---|---:|---:|")
    for r in rows:
        mp, w, b = r["megapixels"], r["whole"], r["bare"]
        flops = (f"{r['gflop_whole'] / mp:.0f} ({r['gflop_bare'] / mp:.0f})" if "gflop_whole" in r else "-")
        tile = "x".join(str(v) for v in w["tile_px"]) if w.get("tile_px") else "whole"
        print(f"| {r['size']} x {r['size']} | {w['tiles']} of {tile} px ({b['tiles']}) | {w['cells']} | {w['seconds']:.1f} "
              f"| {b['seconds']:.1f} | {r['ratio']:.2f} | {w['seconds'] / mp:.2f} ({b['seconds'] / mp:.2f}) | {flops} "
              f"| {w['peak_mb']:.0f} | {w['image_mb']:.0f} |")
    return {"rows": rows}


def choices(args: argparse.Namespace, base: dict[str, Any], work: Path) -> dict[str, Any]:
    size = int(args.sizes.split(",")[0])
    tiff, gt = write_image(size, work)
    spec = {**base, "size": size, "tiff": str(tiff), "what": "whole"}
    variants = list(CHOICES)
    if not torch.backends.mkldnn.is_available() or "bf16" not in _cpu_flags():
        variants = [v for v in variants if not v.startswith("bf16")]
        print("bf16: the CPU has no bf16 instructions (avx512_bf16 / amx_bf16); left out")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants:
            vspec = {**spec, "variant": v, "out": str(work / f"{v}.json")}
            if v == "1-thread":
                vspec["threads"] = 1
            if v == "tile-batch-2":
                vspec["sets"] = [*spec["sets"], "predict.tile_batch=2"]
            if v == "contiguous":
                vspec["sets"] = [*spec["sets"], "predict.channels_last=false"]
            runs[v].append(child(vspec))
    reference = json.loads((work / "default.json").read_text())
    rows = []
    for v in variants:
        best = min(runs[v], key=lambda r: r["seconds"])
        cmp = compare(json.loads((work / f"{v}.json").read_text()), reference, str(gt))
        rows.append({"variant": v, "seconds": best["seconds"], "all_s": [r["seconds"] for r in runs[v]],
                     "peak_mb": best["peak_mb"], **cmp})
        print(json.dumps(rows[-1]), flush=True)
    onnx = work / "model.onnx"
    export_model(base["checkpoint"], onnx, "onnx", set_items=base["sets"], use_thresholds=False)
    ort_row = child({**spec, "what": "onnx", "onnx": str(onnx), "repeats": args.repeats})
    print(json.dumps(ort_row), flush=True)
    ref = rows[0]["seconds"]
    print(f"\n{size} x {size} px, whole path, best of {args.repeats} alternating runs")
    print("| choice | seconds | vs default | cells | cells of the default found (IoU >= 0.5) | same (IoU >= 0.95) "
          "| AP50 vs ground truth |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']:.1f} | {r['seconds'] / ref:.2f} | {r['cells']} | {r.get('matched', 1):.4f} "
              f"| {r.get('same_cells', 1):.4f} | {r['ap50']:.4f} |")
    print(f"\nONNX Runtime on the {ort_row['tiles']} bare tiles: {ort_row['onnxruntime_s']:.1f} s against "
          f"{ort_row['torch_s']:.1f} s for the same predictor in torch ({ort_row['detections_onnxruntime']} / "
          f"{ort_row['detections_torch']} detections, largest score difference {ort_row['max_score_diff']})")
    return {"size": size, "rows": rows, "onnx": ort_row}


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


if __name__ == "__main__":
    main()
