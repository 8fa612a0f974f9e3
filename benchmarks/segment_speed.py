"""``cellkit segment`` on images of growing size: seconds per megapixel and peak memory.

Each size runs in its own process (so its peak RSS, ``ru_maxrss`` minus the RSS before the work,
is its own) and segments one synthetic H&E-like image of ``size x size`` px
(:func:`cellkit.data.synth.synth_image`) with all output formats, through
:func:`cellkit.inference.segment.segment_images`, the function behind the command. Images above
``predict.tile_above`` (1400 px) are predicted in ``predict.tile_size`` tiles (1024, overlap 128).
Reported: tiles, cells, seconds of prediction and post-processing (``segment.json``), of the
whole image with its writers, seconds per megapixel, and peak memory; with the machine's
2048 x 2048 fp32 matmul GFLOP/s on the same threads (seconds elsewhere ~ seconds here x GFLOP/s
here / GFLOP/s there).

    python benchmarks/segment_speed.py --checkpoint runs/demo/run/checkpoints/best.pth   # 1000, 2000, 4000 px
    python benchmarks/segment_speed.py --sizes 300,600 --set predict.tile_size=256 --set predict.tile_above=400  # smoke

Without ``--checkpoint`` a random-weight model of ``--config`` (default the demo recipe) is saved
to a temporary checkpoint first: the same network and cost per pixel, but its detections are noise
(``model.box_detections_per_img`` of them per tile), so use a trained checkpoint for the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from _machine import (  # benchmarks/_machine.py, beside this script
    add_matmul_size,
    matmul_gflops,
    random_checkpoint,
    rss_mb,
)

from cellkit.data.synth import synth_image
from cellkit.inference.segment import segment_images

MB = 1024.0


def one_size(size: int, checkpoint: str, set_items: list[str], threads: int, work: Path) -> dict:
    """Segment one ``size x size`` synthetic image; the JSON row of this size."""
    torch.set_num_threads(threads)
    image = synth_image(np.random.default_rng(size), size, size)[0][..., :3]
    folder = work / f"in{size}"
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / f"synth{size}.tif", image, photometric="rgb")
    del image
    base = rss_mb()
    t = time.perf_counter()
    report = segment_images([folder], checkpoint, work / f"out{size}", set_items=set_items, device="cpu",
                            overwrite=True, progress=False, log=lambda *_: None)
    total = time.perf_counter() - t
    meta = json.loads((report.written[0] / "segment.json").read_text())
    mp = size * size / 1e6
    return {"size": size, "megapixels": mp, "tiles": meta["tiles"], "cells": meta["cells"],
            "predict_s": meta["seconds"], "total_s": total, "s_per_mp": total / mp,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: random weights of --config)")
    ap.add_argument("--config", default="demo", help="recipe of the random-weight model (default demo)")
    ap.add_argument("--sizes", default="1000,2000,4000", help="image sides in px (default 1000,2000,4000)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=2)
    add_matmul_size(ap)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.checkpoint, args.overrides, args.threads, Path(args.work))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or random_checkpoint(args.config, args.overrides, work / "random.pth")
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            cmd = [sys.executable, __file__, "--one", str(size), "--checkpoint", checkpoint, "--threads",
                   str(args.threads), "--work", tmp, *[f"--set={o}" for o in args.overrides]]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, CELLKIT_PROGRESS="0"))
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    gflops = matmul_gflops(args.threads, n=args.matmul_size)
    print(f"checkpoint: {args.checkpoint or f'random weights of {args.config}'}; {args.threads} threads; "
          f"{args.matmul_size} x {args.matmul_size} fp32 matmul {gflops:.0f} GFLOP/s\n")
    print("| image | megapixels | tiles | cells | predict (s) | total with writers (s) | s / megapixel | peak memory (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} x {r['size']} | {r['megapixels']:.1f} | {r['tiles']} | {r['cells']} | {r['predict_s']:.1f} "
              f"| {r['total_s']:.1f} | {r['s_per_mp']:.1f} | {r['peak_mb']:.0f} |")
    print(json.dumps({"rows": rows, "matmul_gflops": gflops}))


if __name__ == "__main__":
    main()
