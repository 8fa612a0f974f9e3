"""Mask geometry round trip: how much IoU a *perfect* mask head loses to the mask geometry alone.

Every ground-truth cell of the real sample (``tests/data/hw3-sample``: one 397 x 482 image, 2
class-1 and 159 class-2 cells, median box side 19 px) is sampled into its own ground-truth box as
the ``M x M`` training target, then pasted back at the same box, thresholded at 0.5 and compared
with the cell (mask IoU, pycocotools). Both steps are cellkit's own code, in each geometry
(:mod:`cellkit.structures.mask_geometry`):

* ``torchvision``: targets from ``roi_align(aligned=False)`` (torchvision's
  ``project_masks_on_boxes``), torchvision's paste (``paste_and_encode(geometry="torchvision")``,
  bit for bit ``paste_masks_in_image``).
* ``exact``: targets from ``roi_align(aligned=True)``, the exact inverse paste
  (``paste_and_encode(geometry="exact")``).

A model that predicted its targets perfectly would score these IoUs; anything below 1 is lost
before learning starts.

    python benchmarks/mask_roundtrip.py                 # M = 28 and 56, every cell of the fixture
    python benchmarks/mask_roundtrip.py --quick         # smoke run: the first 24 cells, M = 28
    python benchmarks/mask_roundtrip.py --scale 3       # the same cells 3 times larger
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "hw3-sample"
GEOMETRIES = ("torchvision", "exact")


def load_cells(root: Path, limit: int | None = None, scale: int = 1):
    """``(masks (N, H, W) uint8, boxes (N, 4) float32 xyxy, labels (N,) int64)`` of the first
    sample of ``root``; ``scale`` > 1 enlarges every cell by that integer factor (each pixel
    becomes a ``scale x scale`` block, boxes scaled alike: the same shapes, larger cells)."""
    import torch

    from cellkit.data import CellDataset, scan_train

    _, target = CellDataset(scan_train(root)[:1], cache=False)[0]
    masks, boxes, labels = target["masks"], target["boxes"], target["labels"]
    if limit is not None:
        masks, boxes, labels = masks[:limit], boxes[:limit], labels[:limit]
    if scale > 1:
        masks = masks.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        boxes = boxes * torch.tensor(float(scale))
    return masks, boxes, labels


def roundtrip_ious(masks, boxes, size: int, geometry: str, mask_thresh: float = 0.5):
    """``(N,)`` float64 IoU of each cell with itself sampled at ``size x size`` and pasted back, in ``geometry``."""
    import numpy as np
    import torch
    from pycocotools import mask as mask_utils

    from cellkit.structures.coco_results import paste_and_encode
    from cellkit.structures.mask_geometry import mask_targets
    from cellkit.structures.rle import encode_mask

    n, height, width = masks.shape
    targets = mask_targets(masks, boxes, torch.arange(n), size, geometry)  # type: ignore[arg-type]
    pasted = paste_and_encode(boxes, targets[:, None], height, width, mask_thresh, geometry=geometry)  # type: ignore[arg-type]
    gt = [encode_mask(m.numpy().astype(bool)) for m in masks]
    return np.array([mask_utils.iou([p], [g], [0])[0][0] for p, g in zip(pasted, gt)], dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=FIXTURE, help="dataset root (the first training sample is used)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 56], help="mask sides M")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N cells")
    parser.add_argument("--scale", type=int, default=1, help="enlarge the cells by this integer factor (larger cells)")
    parser.add_argument("--quick", action="store_true", help="smoke run: first 24 cells, M = 28")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.limit = [28], args.limit or 24

    import numpy as np
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    masks, boxes, labels = load_cells(args.data, args.limit, args.scale)
    sides = (boxes[:, 2:] - boxes[:, :2]).flatten()  # widths and heights together
    classes, counts = np.unique(labels.numpy(), return_counts=True)
    print(f"{len(masks)} cells of {args.data} ({masks.shape[-2]} x {masks.shape[-1]}), median box side "
          f"{float(sides.median()):.0f} px (largest {float(sides.max()):.0f}); cells per class "
          + ", ".join(f"{int(c)}: {int(k)}" for c, k in zip(classes, counts)))
    groups = {"all": np.ones(len(labels), bool)}
    for c in sorted(set(labels.tolist())):
        groups[f"class {c}"] = (labels == c).numpy()
    print()
    print("| M | geometry | " + " | ".join(f"mean IoU {g} ({int(sel.sum())})" for g, sel in groups.items())
          + " | min IoU |")
    print("|---|---|" + "---:|" * (len(groups) + 1))
    for size in args.sizes:
        for geometry in GEOMETRIES:
            ious = roundtrip_ious(masks, boxes, size, geometry)
            cells = " | ".join(f"{ious[sel].mean():.4f}" for sel in groups.values())
            print(f"| {size} | {geometry} | {cells} | {ious.min():.4f} |")
    print()
    command = shlex.join(["python", "benchmarks/mask_roundtrip.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"{time.perf_counter() - t0:.1f} s; command: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
