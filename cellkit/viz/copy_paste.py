"""Pictures of copy-paste: the same augmented crops before and after cells were pasted onto them."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from ..data.dataset import CellDataset, Target
from ..structures.label_maps import MaskRegion
from .overlay import render


def target_regions(target: Target, first_id: int = 0) -> list[MaskRegion]:
    """The instances of a training target (``masks`` ``(N, H, W)``) with id >= ``first_id``, as box regions."""
    out = []
    for mask, label, inst in zip(target["masks"].numpy().astype(bool), target["labels"].tolist(),
                                 target["instance_ids"].tolist()):
        if inst < first_id:
            continue
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        t, le = int(rows[0]), int(cols[0])
        out.append(MaskRegion(mask[t : rows[-1] + 1, le : cols[-1] + 1], t, le, int(label), instance_id=inst))
    return out


def _uint8(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)


def plot_copy_paste(ds: CellDataset, indices: Sequence[int], seed: int = 0) -> Figure:
    """One column per index: the augmented crop without copy-paste (top) and with it (bottom, the
    pasted cells filled in their class colour, the cells kept outlined; cells dropped as covered
    are gone from the outlines).

    ``ds`` must have ``copy_paste`` set; both rows draw the same crop (same seed per column).
    """
    cp = ds.copy_paste
    assert cp is not None, "the dataset has no copy_paste"
    fig, axes = plt.subplots(2, len(indices), figsize=(3.2 * len(indices), 6.6), squeeze=False)
    for col, i in enumerate(indices):
        n0 = len(ds.load(i)[1].labels)
        torch.manual_seed(seed + col)
        ds.copy_paste = None
        plain, plain_t = ds[i]
        ds.copy_paste = cp
        torch.manual_seed(seed + col)
        pasted, target = ds[i]
        img = _uint8(pasted)
        drawn = render(render(img, target_regions(target, n0), mode="fill", alpha=0.35),
                       [r for r in target_regions(target) if r.instance_id < n0], mode="outline")
        axes[0, col].imshow(render(_uint8(plain), target_regions(plain_t), mode="outline"))
        axes[0, col].set_title(f"crop: {len(plain_t['labels'])} cells", fontsize=9)
        new = target_regions(target, n0)
        by_class = ", ".join(f"c{k} {sum(r.label == k for r in new)}" for k in sorted({r.label for r in new}))
        axes[1, col].imshow(drawn)
        axes[1, col].set_title(f"+{len(new)} pasted ({by_class})\n{len(target['labels']) - len(new)} kept", fontsize=9)
        for ax in axes[:, col]:
            ax.axis("off")
    fig.tight_layout()
    return fig
