"""``make demo`` / ``cellkit demo``: the main job end to end on the built-in synthetic dataset.

1. the synthetic dataset (generated once into the cache) and its statistics
2. COCO ground truth (``cellkit convert``)
3. training with the CPU demo recipe (``configs/demo.yaml``)
4. the full evaluation of the best epoch on the validation split
5. predictions for the test images, written and checked as a submission, scored against the
   synthetic test ground truth (which the real dataset does not have)

Every AP50 comes with its 95 % interval over images. The validation split chose the epoch, so
its AP50 is labelled so; the synthetic test split, never seen in training nor in that choice,
is the hold-out split: scored once.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from .analysis.stats import dataset_stats, format_stats
from .config import load_config
from .data import convert, resolve_num_classes, resolve_root
from .engine.defaults import train
from .evaluation.coco import evaluate_predictions
from .inference.submit import predict_submission
from .outputs import check_writable_dir, write_json
from .runs import RunDir


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/5] {text}", flush=True)


def run_demo(out: str | Path, config: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> int:
    """Run the demo into ``out``; returns 0 on success. Running it again into the same ``out``
    replaces the previous demo's run (``out/run``), submission and COCO files."""
    t0 = time.time()
    cfg = load_config(config or "demo", overrides)
    out = check_writable_dir(out, "demo folder")
    _step(1, f"synthetic dataset: {cfg.data.synth_train} training / {cfg.data.synth_test} test images")
    root = resolve_root(cfg.data)
    cfg = resolve_num_classes(cfg)  # model.num_classes from the data unless the config sets it
    print("      " + format_stats(dataset_stats(cfg.data, cfg.model.num_classes)).replace("\n", "\n      "))

    _step(2, "COCO ground truth (cellkit convert)")
    for p in convert(root, out / "coco", cfg.data.val_fraction, cfg.data.split_seed, cfg.model.num_classes):
        d = json.loads(p.read_text())
        print(f"      {p}: {len(d['images'])} images, {len(d['annotations'])} instances")

    _step(3, f"training a {cfg.model.backbone} Mask R-CNN for {cfg.train.epochs} epochs (cellkit train)")
    run = RunDir(out / "run")
    summary = train(cfg, run.path, overwrite=True)  # a demo run again replaces the previous demo's run

    _step(4, f"evaluation of the best epoch ({summary['best_epoch']}) on the validation split")
    report = evaluate_predictions(run.val_gt, run.predictions(), max_dets=cfg.eval.max_dets,
                                  backend=cfg.eval.backend, num_classes=cfg.model.num_classes,
                                  bootstrap=cfg.eval.bootstrap, bootstrap_seed=cfg.eval.bootstrap_seed)
    print(report.format())
    write_json(report.to_dict(), run.eval_file, indent=1)

    _step(5, "test images -> submission (cellkit predict), scored against the synthetic test ground truth")
    submission = out / "test-results.json"
    predict_submission([run.checkpoint("best")], root, submission)
    test = evaluate_predictions(root / "test_gt.json", submission, iou_types=("segm",), max_dets=cfg.eval.max_dets,
                                backend=cfg.eval.backend, num_classes=cfg.model.num_classes, cell_metrics=False,
                                bootstrap=cfg.eval.bootstrap, bootstrap_seed=cfg.eval.bootstrap_seed)

    val, held = report.results["segm"], test.results["segm"]
    print(f"\ndone in {(time.time() - t0) / 60:.1f} min; segm AP50 with its 95 % interval over images:")
    print(f"  val AP50 (chose the epoch)    {val.with_interval('ap50')}  "
          f"({val.n_images} validation images, epoch {summary['best_epoch']})")
    print(f"  hold-out AP50 (scored once)   {held.with_interval('ap50')}  "
          f"({held.n_images} synthetic test images with their ground truth)")
    print("  other seeds and machines give other numbers; whether two runs differ, a paired comparison says "
          "(cellkit compare RUN_A RUN_B)")
    print(f"  run directory     {run.path}/  (config.yaml, metrics.jsonl, checkpoints/, plots/curves.png, eval.json)")
    print(f"  training curves   {run.curves}")
    print(f"  submission        {submission} and {submission.with_suffix('.zip')}")
    print("  next: open notebooks/02_training.ipynb or notebooks/04_error_analysis.ipynb in JupyterLab")
    return 0
