"""Test images -> the submission file: predict with one checkpoint or an ensemble, write
``test-results.json`` and its zip, and check them (``cellkit predict``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..config import parse_set_args
from ..data import TestImageDataset, read_test_index
from ..data.intensity import Intensity
from ..errors import DataError
from ..evaluation.submission import (
    TEST_INDEX,
    check_submission,
    check_submission_writable,
    submission_paths,
    summarize_problems,
    write_submission,
)
from ..models.checkpoint import model_from_checkpoint
from ..models.devices import resolve_device
from ..outputs import check_not_input
from ..runs import find_thresholds
from ..structures.coco_results import DropCounts
from .predict import predict_images
from .tune import load_thresholds


def prediction_overrides(checkpoint: str | os.PathLike[str], set_items: Sequence[str] = (), tta: bool = False,
                         use_thresholds: bool = True) -> tuple[dict[str, Any], Path | None]:
    """Config overrides for inference: the run's tuned thresholds, then ``tta``, then ``--set`` items.

    Returns:
        (overrides, the thresholds file used or None).
    """
    overrides: dict[str, Any] = {}
    found = find_thresholds(checkpoint) if use_thresholds else None
    if found is not None:
        overrides.update(load_thresholds(found))
    if tta:
        overrides["predict.tta"] = True
    overrides.update(parse_set_args(list(set_items)))
    return overrides, found


def predict_submission(
    checkpoints: Sequence[str | os.PathLike[str]], data: str | os.PathLike[str], out: str | os.PathLike[str],
    set_items: Sequence[str] = (), tta: bool = False, device: str = "auto", use_thresholds: bool = True,
    progress: bool = True,
) -> list[Any]:
    """Predict ``data``'s test images with one checkpoint or an ensemble, write the submission
    (json + zip at ``out``), check it and print what happened.

    Returns:
        the problems :func:`~cellkit.evaluation.submission.check_submission` found (empty: valid).

    Raises:
        DataError: the submission cannot be written at ``out``, or ``out`` is one of the inputs
            (a checkpoint, the test index, the thresholds) or another kind of file (all checked
            first); a checkpoint or the test index is missing or unreadable.
    """
    paths = [Path(p).expanduser() for p in checkpoints]
    overrides, found = prediction_overrides(paths[0], set_items, tta, use_thresholds)
    inputs: dict[str, Any] = {"the test index": Path(data).expanduser() / TEST_INDEX, "the thresholds file": found}
    inputs.update({f"the checkpoint {p.name}" if len(paths) > 1 else "the checkpoint": p for p in paths})
    check_not_input(submission_paths(out), inputs)
    check_submission_writable(out)  # before the long work, not after it
    for p in paths:
        if not p.is_file():
            raise DataError(p, "checkpoint not found")
    index = read_test_index(data)
    dev = resolve_device(device)
    if found is not None:
        print(f"thresholds from {found}")
    models, cfg = [], None
    for p in paths:
        model, c, _ = model_from_checkpoint(p, dev, overrides)
        models.append(model)
        cfg = cfg or c
    assert cfg is not None
    pc = cfg.predict
    print(f"predicting {len(index)} test images on {dev} with {len(models)} model(s): score_thresh={pc.score_thresh} "
          f"mask_thresh={pc.mask_thresh} nms_thresh={pc.nms_thresh} tta={pc.tta}")
    counts = DropCounts()
    entries = predict_images(models, TestImageDataset(index, Intensity.from_config(cfg.data)), pc, progress=progress, counts=counts)
    json_path, zip_path = write_submission(entries, out)
    n_images = len({e["image_id"] for e in entries})
    print(f"wrote {len(entries)} detections on {n_images}/{len(index)} images to {json_path} and {zip_path} ({counts})")
    problems = check_submission(entries, index, num_classes=cfg.model.num_classes)
    for prob in problems[:10]:
        print(f"  {prob}")
    print(f"check-submission: {summarize_problems(problems)}")
    return problems
