"""Checkpoints: one dict, written atomically, loaded with ``weights_only=True``.

A checkpoint holds ``model`` (state_dict), ``optimizer``, ``scheduler``, ``scaler`` (state
dicts or None), ``epoch`` (epochs completed), ``config`` (``Config.to_dict()``), ``history``
(list of per-epoch metric dicts), ``best`` (best validation AP50 so far), ``rng`` (torch, numpy
and python RNG states) and ``cellkit_version``. Only plain containers, numbers, strings and
tensors go in, so ``torch.load(..., weights_only=True)`` can read it back safely.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..config import Config
from ..errors import DataError

PathLike = str | os.PathLike[str]


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed to
    disk, then renamed over the target. A crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``.

    Raises:
        DataError: missing file, truncated or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise DataError(path, f"cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise DataError(path, "not a cellkit checkpoint (no 'model' entry)")
    return ckpt


def model_from_checkpoint(
    path: PathLike, device: str | torch.device = "cpu", overrides: Mapping[str, Any] | None = None
) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained with and load its weights (eval mode).

    Args:
        overrides: config keys to change for inference, e.g. ``{"model.box_score_thresh": 0.0}``.

    Returns:
        (model on ``device``, the checkpoint's config with overrides applied, the checkpoint dict).
    """
    from ..models import build_model

    ckpt = load_checkpoint(path)
    if "config" not in ckpt:
        raise DataError(path, "checkpoint has no config; cannot rebuild its model")
    stored = dict(ckpt["config"])
    if isinstance(stored.get("model"), Mapping) and "mask_geometry" not in stored["model"]:
        # saved before model.mask_geometry existed: trained on torchvision's targets, so paste like torchvision
        stored["model"] = {**stored["model"], "mask_geometry": "torchvision"}
    cfg = Config.from_dict(stored)
    if overrides:
        cfg = cfg.replace(overrides)
    cfg = cfg.replace({"model.weights": "none"})  # the checkpoint supplies every weight
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, ckpt


def rng_state() -> dict[str, Any]:
    """torch, numpy and python RNG states in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"].cpu() if isinstance(state["torch"], torch.Tensor) else state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
