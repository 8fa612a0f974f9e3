"""Regenerate the pictures in docs/ and the README from the synthetic dataset (and the real sample).

    python docs/make_figures.py            # every figure
    python docs/make_figures.py data       # only the synthetic-vs-real comparison
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cellkit.data import load_sample, scan_train  # noqa: E402
from cellkit.data.synth import ensure_synthetic  # noqa: E402
from cellkit.viz.overlay import CLASS_COLORS, instances_from_label_maps, render  # noqa: E402

DOCS = Path(__file__).parent
REPO = DOCS.parent
IMG = DOCS / "img"


def synthetic_vs_real() -> Path:
    """The real sample beside a synthetic image of similar size, raw and with class outlines."""
    real_img, real_maps = load_sample(scan_train(REPO / "tests/data/hw3-sample")[0])
    root = ensure_synthetic(40, 6, 0, 512, progress=False)
    samples = scan_train(root)
    target = real_img.shape[0] * real_img.shape[1]
    best = min(samples, key=lambda s: abs(np.prod(load_sample(s)[0].shape[:2]) - target)
               - 10_000 * (len(load_sample(s)[1].class_counts().nonzero()[0])))
    syn_img, syn_maps = load_sample(best)
    fig, axes = plt.subplots(2, 2, figsize=(12, 10.5))
    for row, (name, img, maps) in enumerate([("real (hw3 sample)", real_img, real_maps),
                                              ("synthetic (cellkit synth)", syn_img, syn_maps)]):
        counts = maps.class_counts()
        axes[row, 0].imshow(img)
        axes[row, 0].set_title(f"{name}: {img.shape[0]} x {img.shape[1]} px")
        axes[row, 1].imshow(render(img, instances_from_label_maps(maps), mode="outline"))
        axes[row, 1].set_title("instances by class: " + ", ".join(f"c{k + 1} {n}" for k, n in enumerate(counts)))
        for ax in axes[row]:
            ax.axis("off")
    handles = [plt.Line2D([], [], color=np.array(c) / 255, lw=3, label=f"class {k}") for k, c in CLASS_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out = IMG / "synthetic_vs_real.png"
    IMG.mkdir(exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out


FIGURES = {"data": synthetic_vs_real}


def main(names: list[str]) -> None:
    for name in names or list(FIGURES):
        print(FIGURES[name]())


if __name__ == "__main__":
    main(sys.argv[1:])
