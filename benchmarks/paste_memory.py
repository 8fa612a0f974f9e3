"""Prediction post-processing: torchvision's full-size paste against cellkit's lean paste + encode.

A 2000 x 2000 image with N detections: boxes of cell sizes (10-40 px) spread over the image and
random 28 x 28 mask probabilities. Every variant turns them into RLEs (str counts) of the masks
thresholded at 0.5, and runs in its own fresh process so that its peak RSS (``ru_maxrss``; torch
allocations are invisible to tracemalloc) is its own; the figure reported is the peak minus the
RSS just before the variant starts (imports and inputs excluded).

* ``torchvision``: ``paste_masks_in_image`` for all N masks (N full-size float32 images, stacked:
  twice N x H x W x 4 bytes), ``> 0.5``, ``encode_mask`` per mask.
* ``torchvision-chunked``: the same, 50 masks at a time (what a careful caller does by hand).
* ``lean``: :func:`cellkit.structures.coco_results.paste_and_encode` (box-region paste, one reused buffer).
* ``lean-exact``: the same in the exact mask geometry (``geometry="exact"``, cellkit's default
  for its models; :mod:`cellkit.structures.mask_geometry`).
* ``predict``: :func:`cellkit.inference.predict.predict_image` with a random-weight ResNet-18 FPN
  Mask R-CNN at full resolution (2000 px input, no tiling) returning N detections: model time,
  post-processing time and peak memory of the whole prediction.

torchvision's full paste of 1000 masks at 2000 x 2000 needs 32 GB; it is measured at ``--n-full``
detections (default 100) and its per-detection cost extrapolated.

    python benchmarks/paste_memory.py                       # all variants, markdown table
    python benchmarks/paste_memory.py --variant lean --n 1000   # one variant (JSON line)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MB = 1024.0


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / MB
    return float("nan")


def make_inputs(n: int, size: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    wh = 10 + 30 * torch.rand(n, 2, generator=g)
    xy = torch.rand(n, 2, generator=g) * (size - wh)
    boxes = torch.cat([xy, xy + wh], dim=1)
    probs = torch.rand(n, 1, 28, 28, generator=g)
    return boxes, probs


def run_variant(variant: str, n: int, size: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from cellkit.structures.coco_results import paste_and_encode
    from cellkit.structures.rle import encode_mask

    if variant == "predict":
        return run_predict(n, size)
    boxes, probs = make_inputs(n, size)
    paste_and_encode(boxes[:2], probs[:2], size, size)  # warm-up (lazy inits) outside the measurement
    base = _rss_mb()
    t = time.perf_counter()
    if variant == "torchvision":
        pasted = paste_masks_in_image(probs, boxes, (size, size), padding=1)
        rles = [encode_mask((m[0] > 0.5).numpy()) for m in pasted]
    elif variant == "torchvision-chunked":
        rles = []
        for i in range(0, n, 50):
            pasted = paste_masks_in_image(probs[i : i + 50], boxes[i : i + 50], (size, size), padding=1)
            rles.extend(encode_mask((m[0] > 0.5).numpy()) for m in pasted)
            del pasted
    elif variant == "lean":
        rles = paste_and_encode(boxes, probs, size, size, 0.5)
    elif variant == "lean-exact":
        rles = paste_and_encode(boxes, probs, size, size, 0.5, geometry="exact")
    else:
        raise SystemExit(f"unknown variant {variant}")
    elapsed = time.perf_counter() - t
    return {"variant": variant, "n": n, "size": size, "time_s": elapsed, "peak_mb": _maxrss_mb() - base,
            "n_rles": len(rles)}


def run_predict(n: int, size: int) -> dict:
    import numpy as np
    import torch

    import cellkit
    from cellkit.config import PredictConfig
    from cellkit.data import image_to_tensor
    from cellkit.data.synth import synth_image
    from cellkit.inference import predict as P
    from cellkit.structures.mask_geometry import mask_geometry_of

    cfg = cellkit.load_config(None, {
        "model.backbone": "resnet18", "model.min_size": size, "model.max_size": size,
        "model.box_detections_per_img": n, "model.box_score_thresh": 0.0,
    })
    torch.manual_seed(0)
    model = cellkit.build_model(cfg).eval()
    rgba, _, _ = synth_image(np.random.default_rng(0), size, size, density=1.4e-4)
    image = image_to_tensor(rgba[..., :3])
    del rgba
    pc = PredictConfig(tile_size=None)
    base = _rss_mb()
    t0 = time.perf_counter()
    with torch.inference_mode():
        det = P.detect(model, [image], pc)[0]
        t1 = time.perf_counter()
        entries = P.finalize(det, size, size, 1, pc, geometry=mask_geometry_of(model))
    t2 = time.perf_counter()
    return {"variant": "predict", "n": len(det), "size": size, "time_s": t2 - t0, "model_s": t1 - t0,
            "post_s": t2 - t1, "peak_mb": _maxrss_mb() - base, "n_rles": len(entries)}


def child(variant: str, n: int, size: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--n", str(n), "--size", str(size), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, CELLKIT_PROGRESS="0"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=("torchvision", "torchvision-chunked", "lean", "lean-exact", "predict"))
    ap.add_argument("--n", type=int, default=1000, help="detections (default 1000)")
    ap.add_argument("--n-full", type=int, default=100, help="detections for torchvision's full paste (default 100)")
    ap.add_argument("--size", type=int, default=2000, help="image side in px (default 2000)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-predict", action="store_true", help="skip the model run")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.n, args.size, args.threads)))
        return
    # lean at both counts: beside the full paste's and at --n; once when the two counts are equal
    runs = list(dict.fromkeys([("torchvision", args.n_full), ("lean", args.n_full), ("torchvision-chunked", args.n),
                               ("lean", args.n), ("lean-exact", args.n)]))
    if not args.no_predict:
        runs.append(("predict", args.n))
    rows = [child(v, n, args.size, args.threads) for v, n in runs]
    print(f"{args.size} x {args.size} image, 28 x 28 masks, {args.threads} threads\n")
    print("| variant | detections | time (s) | per detection (ms) | peak memory (MB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        extra = f" (model {r['model_s']:.1f} s + post-processing {r['post_s']:.2f} s)" if r["variant"] == "predict" else ""
        print(f"| {r['variant']}{extra} | {r['n']} | {r['time_s']:.2f} | {1e3 * r['time_s'] / max(r['n'], 1):.2f} "
              f"| {r['peak_mb']:.0f} |")
    full = rows[0]
    per_det_mb = full["peak_mb"] / full["n"]
    print(f"\ntorchvision full paste, extrapolated to {args.n} detections: {per_det_mb * args.n / 1024:.1f} GB, "
          f"{full['time_s'] / full['n'] * args.n:.1f} s")


if __name__ == "__main__":
    main()
