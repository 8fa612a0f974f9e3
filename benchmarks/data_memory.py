"""What one large, crowded image costs in memory: cache, instance masks, a training crop.

Builds a 2500 x 2000 synthetic image with about 660 cells (the largest real case), writes it in
the real layout, then measures the decoded cache entry, the instance masks of the full image and
of a 512 px training crop, and the time to produce each.

    python benchmarks/data_memory.py
    python benchmarks/data_memory.py --height 300 --width 240 --crop 128 --crops 2   # smoke run
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from cellkit.config import AugmentConfig
from cellkit.data import CellDataset, build_train_transforms, scan_train
from cellkit.data.synth import _class_maps, synth_image

MB = 1024**2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--height", type=int, default=2500)
    ap.add_argument("--width", type=int, default=2000)
    ap.add_argument("--crop", type=int, default=512, help="training crop side (default 512)")
    ap.add_argument("--crops", type=int, default=20, help="crops to average (default 20)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    h, w = args.height, args.width
    rgba, owner, classes = synth_image(rng, h, w, density=1.4e-4)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train" / "big"
        folder.mkdir(parents=True)
        tifffile.imwrite(folder / "image.tif", rgba, photometric="rgb", compression="lzw", predictor=True)
        for k, m in _class_maps(rng, owner, classes).items():
            tifffile.imwrite(folder / f"class{k}.tif", m)
        disk = sum(p.stat().st_size for p in folder.iterdir())
        ds = CellDataset(scan_train(tmp), cache=True)
        t = time.perf_counter()
        image, maps = ds.load(0)
        t_decode = time.perf_counter() - t
        t = time.perf_counter()
        _, full = ds[0]
        t_full = time.perf_counter() - t
        n = len(full["labels"])
        full_bytes = full["masks"].numel() * full["masks"].element_size()
        del full
        ds.transforms = build_train_transforms(AugmentConfig(crop_size=args.crop))
        torch.manual_seed(0)
        t = time.perf_counter()
        crops = [ds[0][1] for _ in range(args.crops)]
        t_crop = (time.perf_counter() - t) / args.crops
        crop_n = np.mean([len(c["labels"]) for c in crops])
        crop_bytes = np.mean([c["masks"].numel() * c["masks"].element_size() for c in crops])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"image {h} x {w}, {n} instances ({len(classes)} painted), files on disk {disk / MB:.0f} MB")
    print(f"cache entry: image {image.nbytes / MB:.1f} MB + label maps {maps.nbytes / MB:.1f} MB "
          f"({maps.layers.shape[0]} layer, {maps.layers.dtype}); decode {t_decode:.2f} s")
    print(f"instance masks of the whole image: {full_bytes / MB:.0f} MB uint8 ({t_full:.2f} s); "
          f"torchvision's transform resizes them as float32: another {4 * full_bytes / MB:.0f} MB at scale 1")
    print(f"{args.crop} px training crop: {crop_n:.0f} instances, masks {crop_bytes / MB:.1f} MB, {t_crop * 1000:.0f} ms per item")
    print(f"process peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
