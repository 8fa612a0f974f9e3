"""Regenerate the pictures of docs/ and the README tour from the synthetic dataset.

    python docs/make_figures.py                 # every figure (needs `make demo` first for the run)
    python docs/make_figures.py data train      # some of them: data, inspect, train, ablation, errors, browser, own_images

``train`` and ``errors`` draw the demo run (runs/demo/run, written by ``make demo``; ``--run DIR``
picks another); ``ablation`` runs a small grid of the demo recipe (about 6 minutes on 2 CPU
cores) into runs/grids/readme; ``browser`` takes a screenshot of the mask browser in JupyterLab
through the browser test (needs Debian's chromium).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cellkit.data import CellDataset, load_sample, scan_train, train_val_samples  # noqa: E402
from cellkit.data.synth import ensure_synthetic  # noqa: E402
from cellkit.viz.overlay import CLASS_COLORS, render  # noqa: E402

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
IMG = DOCS / "img"


def _save(fig: plt.Figure, name: str, dpi: int = 72) -> Path:
    IMG.mkdir(exist_ok=True)
    out = IMG / name
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    print(out)
    return out


def data(args: argparse.Namespace) -> None:
    """The real sample beside a synthetic image of similar size, raw and with class outlines."""
    real_img, real_maps = load_sample(scan_train(REPO / "tests/data/hw3-sample")[0])
    samples = scan_train(ensure_synthetic(40, 6, 0, 512, progress=False))
    target = real_img.shape[0] * real_img.shape[1]
    loaded = [load_sample(s) for s in samples]
    syn_img, syn_maps = min(loaded, key=lambda x: abs(np.prod(x[0].shape[:2]) - target)
                            - 10_000 * len(x[1].class_counts(4).nonzero()[0]))
    fig, axes = plt.subplots(2, 2, figsize=(12, 10.5))
    for row, (name, img, maps) in enumerate([("real (hw3 sample)", real_img, real_maps),
                                              ("synthetic (cellkit synth)", syn_img, syn_maps)]):
        axes[row, 0].imshow(img)
        axes[row, 0].set_title(f"{name}: {img.shape[0]} x {img.shape[1]} px")
        axes[row, 1].imshow(render(img, list(maps.regions()), mode="outline"))
        axes[row, 1].set_title("instances by class: " + ", ".join(f"c{k + 1} {n}" for k, n in enumerate(maps.class_counts(4))))
        for ax in axes[row]:
            ax.axis("off")
    handles = [plt.Line2D([], [], color=np.array(c) / 255, lw=3, label=f"class {k}") for k, c in CLASS_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _save(fig, "synthetic_vs_real.png")


def inspect(args: argparse.Namespace) -> None:
    """01_data_inspection: the distributions and the extreme images of the demo dataset."""
    from cellkit.analysis.stats import stats_of
    from cellkit.viz.stats_plots import extreme_images, plot_dataset_stats, plot_examples

    ds = CellDataset(scan_train(ensure_synthetic(40, 6, 0, 512, progress=False)))
    stats = stats_of(ds, progress=False)
    _save(plot_dataset_stats(stats), "tour_01_stats.png")
    _save(plot_examples(ds, extreme_images(stats)), "tour_01_examples.png")


def _demo_run(args: argparse.Namespace) -> Path:
    run = Path(args.run)
    if not (run / "val_predictions.json").is_file():
        sys.exit(f"{run} is not a finished run: run `make demo` first (or pass --run)")
    return run


def train(args: argparse.Namespace) -> None:
    """02_training: the demo's curves and a validation image with its predictions."""
    from cellkit.config import load_config
    from cellkit.viz.browser import MaskBrowser, items_from_dataset
    from cellkit.viz.curves import plot_history

    run = _demo_run(args)
    cfg = load_config(run / "config.yaml")
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    _save(plot_history(history, "demo: resnet18 Mask R-CNN from scratch, CPU"), "tour_02_curves.png")
    val = CellDataset(train_val_samples(cfg.data, cfg.model.num_classes, progress=False)[1])
    browser = MaskBrowser(items_from_dataset(val, json.loads((run / "val_predictions.json").read_text())),
                          num_classes=cfg.model.num_classes)
    _save(browser.figure(0), "tour_02_predictions.png")


def ablation(args: argparse.Namespace) -> None:
    """03_ablation: a small grid of the demo recipe (constant vs cosine lr, 2 backbones)."""
    from cellkit.grid import run_grid
    from cellkit.runs import read_history
    from cellkit.viz.ablation_plots import plot_ablation_bars, plot_ablation_curves

    grid = {"name": "readme", "config": "demo",
            "overrides": {"train.epochs": 4, "train.eval_every": 2, "train.iters_per_epoch": 6},
            "grid": {"model.backbone": ["resnet18", "mobilenet_v3_large"], "train.scheduler": ["constant", "cosine"]}}
    rows = run_grid(grid, REPO / "runs" / "grids" / "readme", cluster="local:1")
    fig = plot_ablation_bars(rows, "demo recipe, 4 short epochs")
    _save(fig, "tour_03_bars.png")
    _save(plot_ablation_curves({r["name"]: read_history(r["run_dir"]) for r in rows if r.get("run_dir")}),
          "tour_03_curves.png")


def errors(args: argparse.Namespace) -> None:
    """04_error_analysis: TIDE bars and the worst validation image of the demo run."""
    from cellkit.config import load_config
    from cellkit.evaluation import ErrorAnalysis
    from cellkit.viz import error_plots as P
    from cellkit.workbench import error_browser

    run = _demo_run(args)
    cfg = load_config(run / "config.yaml")
    ea = ErrorAnalysis(run / "val_gt.json", run / "val_predictions.json", max_dets=cfg.eval.max_dets)
    _save(P.plot_tide(ea.tide()), "tour_04_tide.png")
    _save(P.plot_confusion_matrix(ea.confusion_matrix()), "tour_04_confusion.png")
    worst = ea.per_image()[:1]
    val = CellDataset(train_val_samples(cfg.data, cfg.model.num_classes, progress=False)[1])
    notes = {s.image_id: f"F1 {s.f1:.2f}: TP {s.tp}, FP {s.fp}, FN {s.fn}" for s in worst}
    browser = error_browser(val, ea, [s.image_id for s in worst], notes=notes)
    _save(browser.figure(0), "tour_04_worst.png")


def own_images(args: argparse.Namespace) -> None:
    """README "Your own images": `cellkit segment` of a new synthetic image with the demo model."""
    import tempfile

    import tifffile
    from PIL import Image

    from cellkit.cli import main as cellkit
    from cellkit.data.synth import synth_image

    run = _demo_run(args)
    with tempfile.TemporaryDirectory() as tmp:
        image = synth_image(np.random.default_rng(20), 420, 560)[0]
        tifffile.imwrite(Path(tmp) / "scan.tif", image)
        cellkit(["segment", str(Path(tmp) / "scan.tif"), "--checkpoint", str(run / "checkpoints" / "best.pth"),
                 "--out", str(Path(tmp) / "out"), "--formats", "overlay,csv", "--set", "predict.score_thresh=0.5",
                 "--no-progress"])
        out = IMG / "own_images_overlay.png"
        Image.open(Path(tmp) / "out" / "scan" / "overlay.png").convert("RGB").quantize(128).save(out, optimize=True)
        print(out)


def browser(args: argparse.Namespace) -> None:
    """The mask browser widget in JupyterLab (through tests/test_browser.py)."""
    env = {**os.environ, "CELLKIT_SCREENSHOT_DIR": str(IMG)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", str(REPO / "tests" / "test_browser.py")], env=env, check=True)
    print(IMG / "tour_browser.png")


def copy_paste(args: argparse.Namespace) -> None:
    """docs/data.md: demo crops before and after class-aware copy-paste."""
    from cellkit.config import load_config
    from cellkit.data import build_copy_paste, build_train_transforms
    from cellkit.viz.copy_paste import plot_copy_paste

    cfg = load_config("demo", {"data.augment.copy_paste": 1.0, "data.augment.copy_paste_max": 8,
                               "data.augment.crop_size": 192})
    ds = CellDataset(train_val_samples(cfg.data, cfg.model.num_classes, progress=False)[0], build_train_transforms(cfg.data.augment),
                     copy_paste=build_copy_paste(cfg.data.augment, 4))
    busy = sorted(range(len(ds)), key=lambda i: -ds.load(i)[1].num_instances)
    out = _save(plot_copy_paste(ds, busy[:4], seed=1), "copy_paste.png", dpi=64)
    from PIL import Image

    Image.open(out).convert("RGB").quantize(128).save(out, optimize=True)  # keeps the file small (< 300 KB)


FIGURES = {"data": data, "copy_paste": copy_paste, "inspect": inspect, "train": train, "ablation": ablation, "errors": errors, "browser": browser,
           "own_images": own_images}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("figures", nargs="*", help=f"which of {', '.join(FIGURES)} (default: all)")
    ap.add_argument("--run", default=str(REPO / "runs" / "demo" / "run"), help="the demo run directory")
    args = ap.parse_args()
    unknown = set(args.figures) - set(FIGURES)
    if unknown:
        ap.error(f"unknown figure(s) {', '.join(sorted(unknown))}; choose from {', '.join(FIGURES)}")
    for name in args.figures or list(FIGURES):
        FIGURES[name](args)


if __name__ == "__main__":
    main()
