"""Evaluation time and memory: 100 images x 1000 detections, cellkit against plain pycocotools.

Ground truth: synthetic images of about 400 x 500 px with 150-300 crowded cells each
(``cellkit.data.synth.synth_image``). Predictions: every cell, perturbed (eroded, dilated or
shifted; some dropped, some with a wrong class, random scores), plus false-positive blobs, so that
each image has exactly 1000 detections (far beyond pycocotools' default cap of 100).

Each variant runs in its own process (fresh memory high-water mark) on the same two json files,
with the libraries imported before the clock starts (``--repeats N``: N rounds over the variants,
best of each, and the ratio of cellkit to faster-coco-eval by hand):

* ``pycocotools``: COCOeval by hand, the textbook way: ``COCO(gt)``, ``loadRes(pred)``,
  ``params.maxDets = [1, 10, 1000]``, ``evaluate()``, ``accumulate()``, AP50 read off
  ``eval["precision"]``.
* ``cellkit``: ``coco_evaluate(gt, pred, "segm", max_dets=1000)`` (validation, sanitising, the
  cap-100 figures from the same run, per-class table).
* ``cellkit-fast``: the same with ``backend="faster_coco_eval"`` (when installed).
* ``faster-coco-eval``: faster-coco-eval's COCOeval_faster by hand (when installed).
* ``faster-coco-eval-both``: the same by hand for bbox and segm (what ``cellkit-report`` evaluates).
* ``cellkit-report``: ``evaluate_predictions`` as ``cellkit evaluate`` runs it (segm + bbox +
  cell metrics) with the fastest available backend, without the 95 % intervals (timed apart,
  ``--bootstrap``).

With ``--bootstrap N`` a second table, reported separately, times the 95 % intervals
(:mod:`cellkit.evaluation.bootstrap`) per backend, each in its own process: the evaluation without
intervals, the same with ``bootstrap=N``, and within it the N draws alone (re-accumulating
COCOeval's per-image matching; nothing is matched again). The goal: the draws add at most the time
of the evaluation itself.

    python benchmarks/eval_speed.py                 # 100 images x 1000 detections
    python benchmarks/eval_speed.py --images 10     # a quick look
    python benchmarks/eval_speed.py --variants "" --bootstrap 1000   # the intervals' cost alone
    python benchmarks/eval_speed.py --variants cellkit-fast,faster-coco-eval,cellkit-report,faster-coco-eval-both --repeats 5
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

    if variant in ("pycocotools", "faster-coco-eval", "faster-coco-eval-both"):
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
            for iou_type in ("bbox", "segm") if variant == "faster-coco-eval-both" else ("segm",):
                E = Eval(coco_gt, coco_dt, iou_type)
                E.params.maxDets = [1, 10, max_dets]
                E.evaluate()
                E.accumulate()
        p = np.asarray(E.eval["precision"])[0, :, :, 0, 2]
        ap50 = float(np.mean(p[p > -1]))
    else:
        from cellkit.evaluation.coco import coco_evaluate, evaluate_predictions, faster_coco_eval_available

        backend = "faster_coco_eval" if variant == "cellkit-fast" or (
            variant == "cellkit-report" and faster_coco_eval_available()) else "pycocotools"
        faster_coco_eval_available()  # imports the backend before the clock starts, as the by-hand variants do
        base = _rss()
        t = time.perf_counter()
        if variant == "cellkit-report":
            ap50 = evaluate_predictions(gt, pred, max_dets=max_dets, backend=backend,  # type: ignore[arg-type]
                                        bootstrap=0).headline  # the intervals: the --bootstrap table
        else:
            ap50 = coco_evaluate(gt, pred, "segm", max_dets, backend).ap50  # type: ignore[arg-type]
    seconds = time.perf_counter() - t
    peak = _status_kb("VmHWM") * 1024  # not ru_maxrss: Linux carries it over from the parent across exec
    return {"variant": variant, "seconds": seconds, "ap50": ap50, "peak_rss_mb": peak / MB,
            "peak_over_start_mb": (peak - base) / MB}


def run_bootstrap(backend: str, gt: str, pred: str, max_dets: int, n_draws: int) -> dict:
    """Time ``coco_evaluate`` without intervals, then with ``bootstrap=n_draws`` (and the draws alone
    within it, timed again on its matching) in this process; returns seconds and the interval."""
    from cellkit.evaluation.bootstrap import bootstrap_scores
    from cellkit.evaluation.coco import coco_evaluate

    t = time.perf_counter()
    plain = coco_evaluate(gt, pred, "segm", max_dets, backend)  # type: ignore[arg-type]
    t_plain = time.perf_counter() - t
    t = time.perf_counter()
    res = coco_evaluate(gt, pred, "segm", max_dets, backend, bootstrap=n_draws)  # type: ignore[arg-type]
    t_with = time.perf_counter() - t
    assert res.ap50 == plain.ap50 and res.matches is not None  # the point estimate does not move
    t = time.perf_counter()
    bootstrap_scores(res.matches, n_draws)
    t_draws = time.perf_counter() - t
    return {"backend": backend, "evaluation_s": t_plain, "with_bootstrap_s": t_with, "draws_s": t_draws,
            "ap50": res.ap50, "ci": list(res.interval("ap50") or [])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--dets", type=int, default=1000, help="detections per image")
    ap.add_argument("--max-dets", type=int, default=1000)
    ap.add_argument("--variants",
                    default="pycocotools,cellkit,cellkit-fast,faster-coco-eval,cellkit-report,faster-coco-eval-both")
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds over the variants, best of (default 1)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--gt", help=argparse.SUPPRESS)
    ap.add_argument("--pred", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", type=int, default=0, metavar="N",
                    help="also time the 95 %% intervals with N bootstrap draws, per backend (a separate table)")
    ap.add_argument("--bootstrap-backend", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bootstrap_backend:
        print(json.dumps(run_bootstrap(args.bootstrap_backend, args.gt, args.pred, args.max_dets, args.bootstrap)))
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.gt, args.pred, args.max_dets)))
        return
    os.environ.setdefault("CELLKIT_PROGRESS", "0")
    from cellkit.evaluation.coco import faster_coco_eval_available

    variants = [v for v in args.variants.split(",") if v]
    if not faster_coco_eval_available():
        variants = [v for v in variants if v not in ("cellkit-fast", "faster-coco-eval", "faster-coco-eval-both")]
        print("faster-coco-eval is not installed: its variants are skipped")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        gt, pred, summary = make_data(Path(tmp), args.images, args.dets)
        print(f"data: {summary} ({time.perf_counter() - t:.1f} s to make; "
              f"gt.json {gt.stat().st_size / MB:.1f} MB, pred.json {pred.stat().st_size / MB:.1f} MB)")
        best: dict[str, dict] = {}
        failed: dict[str, str] = {}
        for _ in range(args.repeats):  # rounds over the variants: a shared machine's load falls on all of them
            for v in variants:
                if v in failed:
                    continue
                r = subprocess.run([sys.executable, __file__, "--one", v, "--gt", str(gt), "--pred", str(pred),
                                    "--max-dets", str(args.max_dets)], capture_output=True, text=True)
                if r.returncode != 0:
                    failed[v] = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else str(r.returncode)
                    continue
                res = json.loads(r.stdout.strip().splitlines()[-1])
                res["all_seconds"] = best.get(v, {}).get("all_seconds", []) + [res["seconds"]]
                if v not in best or res["seconds"] < best[v]["seconds"]:
                    best[v] = res
                else:
                    best[v]["all_seconds"] = res["all_seconds"]
        print(f"{'variant':<21} {'seconds':>8} {'AP50':>8} {'peak RSS MB':>12} {'peak - start MB':>16}"
              + (f"   (best of {args.repeats} alternating runs)" if args.repeats > 1 else ""))
        for v in variants:
            if v in failed:
                print(f"{v:<21} failed: {failed[v]}")
                continue
            res = best[v]
            print(f"{v:<21} {res['seconds']:>8.2f} {res['ap50']:>8.4f} {res['peak_rss_mb']:>12.0f} "
                  f"{res['peak_over_start_mb']:>16.0f}")
        for v, hand in (("cellkit-fast", "faster-coco-eval"), ("cellkit-report", "faster-coco-eval-both")):
            if hand in best and v in best:
                print(f"{v} / {hand} by hand: {best[v]['seconds'] / best[hand]['seconds']:.2f}")
        print(json.dumps({"variants": best, "errors": failed}))
        if args.bootstrap > 0:
            backends = ["pycocotools"] + (["faster_coco_eval"] if faster_coco_eval_available() else [])
            print(f"\n95 % intervals: {args.bootstrap} bootstrap draws of the {args.images} images (AP50, AP, AP75, "
                  "per class); seconds, each backend in its own process")
            print(f"{'backend':<18} {'evaluation':>10} {'+ intervals':>12} {'draws alone':>12} {'draws / eval':>13} "
                  f"{'AP50 [95 % interval]':>24}")
            for b in backends:
                r = subprocess.run([sys.executable, __file__, "--bootstrap-backend", b, "--gt", str(gt), "--pred",
                                    str(pred), "--max-dets", str(args.max_dets), "--bootstrap", str(args.bootstrap)],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    print(f"{b:<18} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
                    continue
                res = json.loads(r.stdout.strip().splitlines()[-1])
                lo, hi = res["ci"]
                print(f"{b:<18} {res['evaluation_s']:>10.3f} {res['with_bootstrap_s']:>12.3f} {res['draws_s']:>12.3f} "
                      f"{res['draws_s'] / res['evaluation_s']:>13.2f} {res['ap50']:>10.4f} [{lo:.3f}, {hi:.3f}]")


if __name__ == "__main__":
    main()
