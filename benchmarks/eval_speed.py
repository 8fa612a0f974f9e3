"""Evaluation time and memory: 100 images x 1000 detections, cellkit against plain pycocotools.

Ground truth: synthetic images of about 400 x 500 px with 150-300 crowded cells each
(``cellkit.data.synth.synth_image``). Predictions: every cell, perturbed (eroded, dilated or
shifted; some dropped, some with a wrong class, random scores), plus false-positive blobs, so that
each image has exactly 1000 detections (far beyond pycocotools' default cap of 100).

Each variant runs in its own process (fresh memory high-water mark) on the same two json files:

* ``pycocotools``: COCOeval by hand, the textbook way: ``COCO(gt)``, ``loadRes(pred)``,
  ``params.maxDets = [1, 10, 1000]``, ``evaluate()``, ``accumulate()``, AP50 read off
  ``eval["precision"]``.
* ``cellkit``: ``coco_evaluate(gt, pred, "segm", max_dets=1000)`` (validation, sanitising, the
  cap-100 figures from the same run, per-class table).
* ``cellkit-fast``: the same with ``backend="faster_coco_eval"`` (when installed).
* ``faster-coco-eval``: faster-coco-eval's COCOeval_faster by hand (when installed).
* ``cellkit-report``: ``evaluate_predictions`` as ``cellkit evaluate`` runs it (segm + bbox +
  cell metrics) with the fastest available backend.

    python benchmarks/eval_speed.py                 # 100 images x 1000 detections
    python benchmarks/eval_speed.py --images 10     # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 1024**2


def _status_kb(key: str) -> int:
    """A ``/proc/self/status`` field in kB (VmRSS: now, VmHWM: peak since exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _rss() -> int:
    return _status_kb("VmRSS") * 1024


def make_data(out: Path, n_images: int, dets_per_image: int, seed: int = 0) -> tuple[Path, Path, dict]:
    """Write ``gt.json`` and ``pred.json`` under ``out``; return their paths and a summary."""
    import scipy.ndimage as ndi
    from pycocotools import mask as mask_utils

    from cellkit.data.coco import categories
    from cellkit.data.synth import synth_image
    from cellkit.outputs import write_json
    from cellkit.structures.rle import encode_region

    rng = np.random.default_rng(seed)
    images, anns, preds = [], [], []
    for image_id in range(1, n_images + 1):
        h, w = int(rng.integers(370, 431)), int(rng.integers(460, 541))
        _, owner, classes = synth_image(rng, h, w, density=float(rng.uniform(1.8, 4.0)) / 1000)
        images.append({"id": image_id, "file_name": f"{image_id}.tif", "height": h, "width": w})
        n_img_preds = 0
        for inst, sl in enumerate(ndi.find_objects(owner), start=1):
            if sl is None:
                continue
            local = owner[sl] == inst
            rle = encode_region(local, sl[0].start, sl[1].start, h, w)
            k = classes[inst - 1]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": k, "segmentation": rle,
                         "area": float(local.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
            if rng.random() < 0.1 or n_img_preds >= dets_per_image:
                continue
            pad = np.pad(local, 3)
            op = rng.integers(4)
            if op == 1:
                pad = ndi.binary_erosion(pad)
            elif op == 2:
                pad = ndi.binary_dilation(pad, iterations=int(rng.integers(1, 3)))
            dy, dx = (int(v) for v in rng.integers(-3, 4, 2)) if op == 3 else (0, 0)
            prle = encode_region(pad, sl[0].start - 3 + dy, sl[1].start - 3 + dx, h, w)
            if mask_utils.area(prle) == 0:
                continue
            cat = k if rng.random() > 0.1 else int(rng.integers(1, 5))
            preds.append(_entry(image_id, cat, float(rng.random()), prle))
            n_img_preds += 1
        yy, xx = np.mgrid[-14:15, -14:15]
        while n_img_preds < dets_per_image:  # false positives: ellipses anywhere
            a, b, th = rng.uniform(3, 13), rng.uniform(3, 13), rng.uniform(0, np.pi)
            blob = ((xx * np.cos(th) + yy * np.sin(th)) / a) ** 2 + ((-xx * np.sin(th) + yy * np.cos(th)) / b) ** 2 <= 1
            prle = encode_region(blob, int(rng.integers(-10, h - 10)), int(rng.integers(-10, w - 10)), h, w)
            if mask_utils.area(prle) == 0:
                continue
            preds.append(_entry(image_id, int(rng.integers(1, 5)), float(rng.random() * 0.7), prle))
            n_img_preds += 1
    gt = {"images": images, "annotations": anns, "categories": categories(4)}
    gt_path, pred_path = write_json(gt, out / "gt.json"), write_json(preds, out / "pred.json")
    per_image = np.bincount([a["image_id"] for a in anns])[1:]
    summary = {"images": n_images, "gt_instances": len(anns), "gt_per_image_min": int(per_image.min()),
               "gt_per_image_max": int(per_image.max()), "predictions": len(preds)}
    return gt_path, pred_path, summary


def _entry(image_id: int, cat: int, score: float, rle: dict) -> dict:
    from pycocotools import mask as mask_utils

    return {"image_id": image_id, "category_id": cat, "score": score,
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "segmentation": rle}


def run_one(variant: str, gt: str, pred: str, max_dets: int) -> dict:
    """Time one variant in this process; returns seconds, AP50 and memory figures."""
    import contextlib
    import io

    if variant in ("pycocotools", "faster-coco-eval"):
        if variant == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval as Eval
        else:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as Eval
        base = _rss()
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(gt)
            coco_dt = coco_gt.loadRes(pred)
            E = Eval(coco_gt, coco_dt, "segm")
            E.params.maxDets = [1, 10, max_dets]
            E.evaluate()
            E.accumulate()
        p = np.asarray(E.eval["precision"])[0, :, :, 0, 2]
        ap50 = float(np.mean(p[p > -1]))
    else:
        from cellkit.evaluation.coco import coco_evaluate, evaluate_predictions, faster_coco_eval_available

        backend = "faster_coco_eval" if variant == "cellkit-fast" or (
            variant == "cellkit-report" and faster_coco_eval_available()) else "pycocotools"
        base = _rss()
        t = time.perf_counter()
        if variant == "cellkit-report":
            ap50 = evaluate_predictions(gt, pred, max_dets=max_dets, backend=backend).headline  # type: ignore[arg-type]
        else:
            ap50 = coco_evaluate(gt, pred, "segm", max_dets, backend).ap50  # type: ignore[arg-type]
    seconds = time.perf_counter() - t
    peak = _status_kb("VmHWM") * 1024  # not ru_maxrss: Linux carries it over from the parent across exec
    return {"variant": variant, "seconds": seconds, "ap50": ap50, "peak_rss_mb": peak / MB,
            "peak_over_start_mb": (peak - base) / MB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--dets", type=int, default=1000, help="detections per image")
    ap.add_argument("--max-dets", type=int, default=1000)
    ap.add_argument("--variants", default="pycocotools,cellkit,cellkit-fast,faster-coco-eval,cellkit-report")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--gt", help=argparse.SUPPRESS)
    ap.add_argument("--pred", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.gt, args.pred, args.max_dets)))
        return
    os.environ.setdefault("CELLKIT_PROGRESS", "0")
    from cellkit.evaluation.coco import faster_coco_eval_available

    variants = [v for v in args.variants.split(",") if v]
    if not faster_coco_eval_available():
        variants = [v for v in variants if v not in ("cellkit-fast", "faster-coco-eval")]
        print("faster-coco-eval is not installed: its variants are skipped")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        gt, pred, summary = make_data(Path(tmp), args.images, args.dets)
        print(f"data: {summary} ({time.perf_counter() - t:.1f} s to make; "
              f"gt.json {gt.stat().st_size / MB:.1f} MB, pred.json {pred.stat().st_size / MB:.1f} MB)")
        print(f"{'variant':<18} {'seconds':>8} {'AP50':>8} {'peak RSS MB':>12} {'peak - start MB':>16}")
        for v in variants:
            r = subprocess.run([sys.executable, __file__, "--one", v, "--gt", str(gt), "--pred", str(pred),
                                "--max-dets", str(args.max_dets)], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{v:<18} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{v:<18} {res['seconds']:>8.2f} {res['ap50']:>8.4f} {res['peak_rss_mb']:>12.0f} "
                  f"{res['peak_over_start_mb']:>16.0f}")


if __name__ == "__main__":
    main()
