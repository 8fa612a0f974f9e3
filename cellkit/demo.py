"""``make demo`` / ``cellkit demo``: the main job end to end on the built-in synthetic dataset."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from .analysis.stats import dataset_stats, format_stats
from .config import load_config
from .data import convert, resolve_root

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_demo(out: str | Path, config: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> int:
    """Synthesise the dataset, convert it to COCO, (train, evaluate) and say where the results are."""
    t0 = time.time()
    out = Path(out)
    path = Path(config) if config else REPO_CONFIGS / "demo.yaml"
    cfg = load_config(path if path.is_file() or config else None, overrides)
    print(f"[1/3] synthetic dataset ({cfg.data.synth_train} train / {cfg.data.synth_test} test images)")
    root = resolve_root(cfg.data)
    print(f"      {root}")
    print("[2/3] statistics")
    print("      " + format_stats(dataset_stats(cfg.data, cfg.model.num_classes)).replace("\n", "\n      "))
    print("[3/3] COCO ground truth")
    train, val = convert(root, out / "coco", cfg.data.val_fraction, cfg.data.split_seed)
    for p in (train, val):
        d = json.loads(p.read_text())
        print(f"      {p}: {len(d['images'])} images, {len(d['annotations'])} instances")
    cfg.save(out / "config.yaml")
    print(f"done in {time.time() - t0:.0f} s; results in {out}")
    return 0
