"""Test helper: a run's TensorBoard event files read back with TensorBoard's own reader.

Not a test module (no ``test_`` prefix); imported by test_trainer.py and test_ablation.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def assert_tensorboard_equals_history(run_dir: Path, lines: list[dict[str, Any]]) -> None:
    """Every number of every metrics.jsonl line is a scalar at its epoch, each epoch exactly once
    (float32, as event files store them), and nothing else is."""
    from cellkit.engine.tensorboard import read_scalars, scalars_of

    expected: dict[str, list[tuple[int, float]]] = {}
    for m in lines:
        for tag, value in scalars_of(m).items():
            expected.setdefault(tag, []).append((m["epoch"], value))
    got = read_scalars(run_dir)
    assert sorted(got) == sorted(expected) and "loss/total" in got and "train/lr" in got
    for tag, pairs in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in pairs], tag
        assert np.array_equal(np.float32([v for _, v in got[tag]]), np.float32([v for _, v in pairs])), tag


def event_images(run_dir: Path) -> dict[str, list[tuple[int, int, int]]]:
    """Image tag -> ``[(step, width, height), ...]``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    return {t: [(e.step, e.width, e.height) for e in acc.Images(t)] for t in acc.Tags()["images"]}


def event_text(run_dir: Path, tag: str = "config") -> str:
    """The text summary ``tag`` (its first value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()
