"""FLOPs of a training step and of the whole training of a recipe (default: the CPU demo).

FLOPs do not depend on the machine, so the demo's budget is set in them: one training step
(forward + backward of a batch) <= 150 GFLOP and the whole training <= 20 TFLOP. Counted with
``torch.utils.flop_counter.FlopCounterMode`` over real batches of the recipe's own training loader
(synthetic images, its augmentation and crop), so the RoIs per image and the cells per crop are
the real ones. Convolutions, matmuls and their backward passes are counted; RoIAlign, NMS and
elementwise ops are not (a few percent).

It also times the same steps (plain forward + backward + optimiser step, after a warm-up step)
and measures this machine's 2048 x 2048 fp32 matmul, so a wall-clock figure can be scaled to
another machine: seconds there ~ seconds here x (matmul GFLOP/s here / there).

    python benchmarks/demo_flops.py                        # the demo recipe, 6 batches
    python benchmarks/demo_flops.py --set model.mask_head_channels=256   # a variant
    python benchmarks/demo_flops.py --config leaderboard --batches 2
    python benchmarks/demo_flops.py --batches 1 --no-time --json          # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import torch
from _machine import add_matmul_size, matmul_gflops  # benchmarks/_machine.py, beside this script
from torch.utils.flop_counter import FlopCounterMode

GROUPS = {  # modules reported separately (each figure includes the module's children)
    "backbone.body": "backbone body",
    "backbone.fpn": "FPN",
    "rpn": "RPN head",
    "roi_heads.box_head": "box head",
    "roi_heads.box_predictor": "box predictor",
    "roi_heads.mask_head": "mask head convs",
    "roi_heads.mask_predictor": "mask predictor",
}


def count_step(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict]) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward + backward of ``model(images, targets)`` and their split by module group."""
    counter = FlopCounterMode(display=False)
    with counter:
        losses = model(images, targets)
        sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    by_group: dict[str, int] = defaultdict(int)
    for name, ops in counter.get_flop_counts().items():
        label = GROUPS.get(name.partition(".")[2])  # names start with the model's class name
        if label is not None:
            by_group[label] += sum(ops.values())
    return counter.get_total_flops(), dict(by_group)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="demo", help="recipe name or YAML path (default: demo)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--batches", type=int, default=6, help="training batches to count (default 6)")
    ap.add_argument("--no-time", action="store_true", help="count only, do not time the steps")
    ap.add_argument("--json", action="store_true", help="also print one JSON line with the figures")
    add_matmul_size(ap)
    args = ap.parse_args()
    os.environ.setdefault("CELLKIT_PROGRESS", "0")

    import cellkit
    from cellkit.config import parse_set_args
    from cellkit.engine.defaults import DefaultTrainer

    cfg = cellkit.load_config(args.config, parse_set_args(args.set))
    cfg.train.device = "cpu"
    trainer = DefaultTrainer(cfg, None, progress=False)
    model = trainer.model.train()
    loader = trainer.train_loader()
    steps = cfg.train.epochs * (cfg.train.iters_per_epoch or len(loader))
    torch.manual_seed(cfg.train.seed)
    batches = []
    for images, targets in loader:
        batches.append((images, targets))
        if len(batches) == args.batches:
            break

    flops, groups = [], defaultdict(int)
    rois = []
    for images, targets in batches:
        total, by_group = count_step(model, images, targets)
        flops.append(total)
        rois.append(sum(len(t["labels"]) for t in targets) / len(targets))
        for k, v in by_group.items():
            groups[k] += v
    per_step = sum(flops) / len(flops)

    seconds = None
    if not args.no_time:
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)

        def step(images: list[torch.Tensor], targets: list[dict]) -> None:
            losses = model(images, targets)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()

        step(*batches[0])  # warm-up
        t = time.perf_counter()
        for b in batches:
            step(*b)
        seconds = (time.perf_counter() - t) / len(batches)
    gflops = matmul_gflops(n=args.matmul_size)

    print(f"recipe {cfg.name}: {cfg.model.backbone}, batch {cfg.train.batch_size}, crop {cfg.data.augment.crop_size}, "
          f"{steps} training steps ({cfg.train.epochs} epochs x {steps // cfg.train.epochs}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"cells per training image in the counted batches: {sum(rois) / len(rois):.0f}")
    print(f"training step (forward + backward): {per_step / 1e9:.1f} GFLOP "
          f"(min {min(flops) / 1e9:.1f}, max {max(flops) / 1e9:.1f} over {len(flops)} batches)")
    for label in [g for g in GROUPS.values() if g in groups]:
        print(f"    {label:<22} {groups[label] / len(flops) / 1e9:8.1f} GFLOP  {100 * groups[label] / sum(flops):5.1f} %")
    print(f"whole training: {per_step * steps / 1e12:.2f} TFLOP")
    print(f"this machine: {args.matmul_size} x {args.matmul_size} fp32 matmul {gflops:.0f} GFLOP/s")
    result = {"recipe": cfg.name, "gflop_per_step": per_step / 1e9, "gflop_by_module": {k: v / len(flops) / 1e9 for k, v in groups.items()}, "tflop_training": per_step * steps / 1e12,
              "steps": steps, "matmul_gflops": gflops, "torch": torch.__version__}
    if seconds is not None:
        print(f"training step: {seconds:.2f} s here; whole training about {seconds * steps / 60:.1f} min here, "
              f"about {seconds * steps * gflops / 67 / 60:.1f} min on a 67 GFLOP/s machine")
        result.update(seconds_per_step=seconds, minutes_training=seconds * steps / 60,
                      minutes_at_67_gflops=seconds * steps * gflops / 67 / 60)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
