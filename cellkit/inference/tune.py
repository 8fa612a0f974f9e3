"""Choose the score, mask and NMS thresholds that maximise validation AP50 (as StarDist tunes its
probability and NMS thresholds).

The model runs once over the validation images; the grid search works on those cached merged
detections (``M x M`` masks, no full-size images): per mask threshold every detection is pasted
and RLE-encoded once, per (NMS, score) point only a selection and the COCO evaluation run.
The result is stored as ``RUN_DIR/thresholds.json``, which ``cellkit predict`` picks up for a
checkpoint inside that run.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import PredictConfig, validate_section
from ..errors import ConfigError, DataError
from ..evaluation.coco import coco_evaluate
from ..evaluation.inputs import load_ground_truth
from ..models.checkpoint import model_from_checkpoint
from ..models.devices import resolve_device
from ..outputs import check_writable_file, write_json
from ..progress import bar
from ..runs import RunDir, checkpoint_path
from ..structures.detections import Detections
from ..structures.rle import RLE
from .predict import encode_detections, suppress
from .split import predict_split

# COCO AP never rises when the lowest-scored detections are dropped (the order of the rest stays,
# and interpolated precision is a maximum over higher recall), so for AP metrics only 0 is tried
# by default; --score-grid searches more (it can matter with tiling, whose duplicate removal ranks
# border detections last)
DEFAULT_SCORE_GRID: tuple[float, ...] = (0.0,)
DEFAULT_MASK_GRID: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT_NMS_GRID: tuple[float | None, ...] = (None, 0.3, 0.5, 0.7)
TUNED_KEYS = ("score_thresh", "mask_thresh", "nms_thresh")



@dataclass
class TuneResult:
    """The grid, its scores and the chosen point.

    Attributes:
        table: one row per grid point: ``score_thresh, mask_thresh, nms_thresh, <metric>, n_predictions``.
        best: the row with the highest metric (first one in grid order on ties).
        current: the row of the thresholds the config had before tuning, if it is on the grid.
    """

    metric: str
    table: list[dict[str, Any]]
    best: dict[str, Any]
    current: dict[str, Any] | None = None
    n_images: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def overrides(self) -> dict[str, Any]:
        """``{"predict.score_thresh": ..., ...}`` for :meth:`cellkit.config.Config.replace`."""
        return {f"predict.{k}": self.best[k] for k in TUNED_KEYS}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update({k: self.best[k] for k in TUNED_KEYS})
        d["value"] = self.best[self.metric]
        return d

    def format(self) -> str:
        """The table as text, best row marked with ``*``."""
        m = self.metric
        lines = [f"{'score':>7} {'mask':>6} {'nms':>6} {m:>8} {'dets':>8}"]
        for row in self.table:
            mark = " *" if row is self.best or row == self.best else ""
            nms = "off" if row["nms_thresh"] is None else f"{row['nms_thresh']:.2f}"
            lines.append(f"{row['score_thresh']:7.3f} {row['mask_thresh']:6.2f} {nms:>6} {row[m]:8.4f} "
                         f"{row['n_predictions']:8d}{mark}")
        best = self.best
        lines.append(f"best {m} {best[m]:.4f}: score_thresh={best['score_thresh']} mask_thresh={best['mask_thresh']} "
                     f"nms_thresh={best['nms_thresh']}"
                     + (f" (current thresholds: {self.current[m]:.4f})" if self.current else ""))
        return "\n".join(lines)


def encode_cached(cached: Sequence[Detections], mask_thresh: float, min_score: float) -> list[tuple[Detections, list[RLE]]]:
    """Paste and encode every finite detection with ``score >= min_score`` once, at ``mask_thresh``.

    Returns:
        ``(detections kept, their RLEs)`` per image.
    """
    out = []
    for det in cached:
        det = det[det.finite()]
        det, rles, _ = encode_detections(det[det.scores >= min_score], mask_thresh)
        out.append((det, rles))
    return out


def entries_at(
    encoded: Sequence[tuple[Detections, list[RLE]]], score_thresh: float, nms_thresh: float | None
) -> list[dict[str, Any]]:
    """COCO result entries of encoded detections at one score and NMS threshold (score first,
    then NMS, as :func:`cellkit.inference.predict.finalize` does)."""
    entries: list[dict[str, Any]] = []
    for det, rles in encoded:
        keep = torch.nonzero(det.scores >= score_thresh).flatten()
        d, r = suppress(det[keep], [rles[i] for i in keep.tolist()], nms_thresh)
        entries.extend(d.to_coco(rles=r))
    return entries


def _check_grids(score_grid: Sequence[float], mask_grid: Sequence[float], nms_grid: Sequence[float | None]) -> None:
    """Every grid value must be valid for its ``predict.*`` key (checked as the config checks it)."""
    base = PredictConfig()
    for key, values in (("score_thresh", score_grid), ("mask_thresh", mask_grid), ("nms_thresh", nms_grid)):
        if not len(values):
            raise ConfigError(f"predict.{key}: the grid is empty")
        for v in values:
            validate_section(replace(base, **{key: v}), "predict")


def tune_thresholds(
    cached: Sequence[Detections],
    gt: Any,
    current: PredictConfig | None = None,
    score_grid: Sequence[float] = DEFAULT_SCORE_GRID,
    mask_grid: Sequence[float] = DEFAULT_MASK_GRID,
    nms_grid: Sequence[float | None] = DEFAULT_NMS_GRID,
    metric: str = "ap50",
    max_dets: int = 1000,
    num_classes: int | None = None,
    backend: str = "pycocotools",
    progress: bool = True,
    evaluate: Callable[..., Any] | None = None,
) -> TuneResult:
    """Grid-search score, mask and NMS thresholds on cached detections.

    Args:
        cached: merged detections of the validation images (with their ids and sizes).
        gt: COCO ground truth of those images (dict, path or COCO), for ``coco_evaluate``.
        current: the thresholds in use before tuning (reported beside the best).
        metric: an :class:`~cellkit.evaluation.coco.EvalResult` attribute (``ap50``, ``ap``, ``ap75``).
        evaluate: ``coco_evaluate``-compatible callable (default: cellkit's).

    Raises:
        ConfigError: a grid value outside its key's range (``predict.mask_thresh`` in [0, 1] ...).
    """
    _check_grids(score_grid, mask_grid, nms_grid)
    if evaluate is None:
        evaluate = coco_evaluate
        gt = load_ground_truth(gt, num_classes)  # validated and indexed once for the whole grid
    table: list[dict[str, Any]] = []
    points = len(mask_grid) * len(nms_grid) * len(score_grid)
    with bar(total=points, desc="threshold grid", enabled=progress) as pbar:
        for mt in mask_grid:
            encoded = encode_cached(cached, mt, min(score_grid))
            for nt in nms_grid:
                for st in score_grid:
                    entries = entries_at(encoded, st, nt)
                    res = evaluate(gt, entries, iou_type="segm", max_dets=max_dets, backend=backend,
                                   num_classes=num_classes)
                    value = float(getattr(res, metric))
                    table.append({"score_thresh": st, "mask_thresh": mt, "nms_thresh": nt, metric: value,
                                  "n_predictions": len(entries)})
                    pbar.update(1)
    best = max(table, key=lambda r: (r[metric] if r[metric] == r[metric] else float("-inf")))
    cur = None
    if current is not None:
        cur = next((r for r in table if all(r[k] == getattr(current, k) for k in TUNED_KEYS)), None)
    return TuneResult(metric, table, best, cur, len(cached))


# --------------------------------------------------------------------------------------------
# the thresholds file


def write_thresholds(result: TuneResult, run_dir: str | os.PathLike[str], **extra: Any) -> Path:
    """Write ``run_dir/thresholds.json`` (chosen values, metric, the whole table, ``extra``)."""
    d = result.to_dict()
    d["extra"].update(extra)
    return write_json(d, RunDir(run_dir).thresholds)


def load_thresholds(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"predict.score_thresh": ..., "predict.mask_thresh": ..., "predict.nms_thresh": ...}``
    from a thresholds file.

    Raises:
        DataError: unreadable file or missing keys.
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read thresholds ({e})") from None
    if not isinstance(d, dict) or not all(k in d for k in TUNED_KEYS):
        raise DataError(path, f"expected keys {', '.join(TUNED_KEYS)}")
    return {f"predict.{k}": d[k] for k in TUNED_KEYS}


def tune_run(
    run_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    score_grid: Sequence[float] | None = None,
    mask_grid: Sequence[float] | None = None,
    nms_grid: Sequence[float | None] | None = None,
    metric: str = "ap50",
    device: str = "auto",
    progress: bool = True,
) -> tuple[TuneResult, Path]:
    """Predict a run's validation split once with its best checkpoint (or ``checkpoint``), grid-search
    the thresholds and write ``run_dir/thresholds.json``.

    Returns:
        (the result, the thresholds file).

    Raises:
        DataError: no such run or checkpoint, no validation split, ``thresholds.json`` not writable.
        ConfigError: a grid value outside its key's range.
    """
    ckpt = checkpoint_path(run_dir, str(checkpoint) if checkpoint is not None else "best")
    score_grid, mask_grid = score_grid or DEFAULT_SCORE_GRID, mask_grid or DEFAULT_MASK_GRID
    nms_grid = nms_grid or DEFAULT_NMS_GRID
    _check_grids(score_grid, mask_grid, nms_grid)  # before predicting, not after
    check_writable_file(RunDir(run_dir).thresholds, "thresholds file")  # before predicting, not after
    model, cfg, _ = model_from_checkpoint(ckpt, resolve_device(device), overrides)
    # predicted down to the lowest score of the grid (the box stage drops what scores below predict.score_thresh)
    low = cfg.replace({"predict.score_thresh": min(min(score_grid), cfg.predict.score_thresh)})
    sp = predict_split(model, low, "val", run_dir=run_dir, with_gt=True, progress=progress)
    result = tune_thresholds(
        sp.detections, sp.gt, cfg.predict, score_grid, mask_grid, nms_grid, metric, cfg.eval.max_dets,
        cfg.model.num_classes, cfg.eval.backend, progress,
    )
    result.extra.update(checkpoint=str(ckpt), tta=cfg.predict.tta)
    return result, write_thresholds(result, run_dir)
