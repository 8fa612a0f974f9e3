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
from ..errors import ConfigError, DataError
from ..outputs import remove_dead_temporaries, write_error
from .maskrcnn import build_model

PathLike = str | os.PathLike[str]


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed to
    disk, then renamed over the target. A crash, kill or full disk mid-write leaves the previous
    file intact (and temporary files of killed writers are removed).

    Raises:
        DataError: the file cannot be written (a full disk: ``no space left on device``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    sink = _RecordingFile()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(path.parent, path.name)
        with open(tmp, "wb") as f:
            sink.file = f
            torch.save(dict(state), sink)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    except RuntimeError:
        # torch's zip writer reports a failed write as "[enforce fail at inline_container.cc]":
        # the OSError it swallowed says why
        if sink.error is not None:
            raise write_error(path, sink.error) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


class _RecordingFile:
    """A file object for ``torch.save`` that keeps the ``OSError`` of a failed write (torch turns
    it into a RuntimeError without its errno)."""

    def __init__(self) -> None:
        self.file: Any = None
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as e:
            self.error = e
            raise


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
    ckpt = load_checkpoint(path)
    if "config" not in ckpt:
        raise DataError(path, "checkpoint has no config; cannot rebuild its model")
    stored = stored_config(ckpt, path)
    if isinstance(stored.get("model"), Mapping) and "mask_geometry" not in stored["model"]:
        # saved before model.mask_geometry existed: trained on torchvision's targets, so paste like torchvision
        stored["model"] = {**stored["model"], "mask_geometry": "torchvision"}
    try:
        cfg = Config.from_dict(stored)
    except ConfigError as e:
        raise DataError(path, f"the config stored in the checkpoint is invalid ({e})") from None
    if overrides:
        cfg = cfg.replace(overrides)
    cfg = cfg.replace({"model.weights": "none"})  # the checkpoint supplies every weight
    model = build_model(cfg)
    load_model_weights(model, ckpt["model"], path, stored, cfg)
    return model.to(device).eval(), cfg, ckpt


def stored_config(ckpt: Mapping[str, Any], path: PathLike) -> dict[str, Any]:
    """The config dict a checkpoint carries (``{}`` when it has none).

    Raises:
        DataError: the stored config is not a mapping of sections (a damaged or foreign checkpoint).
    """
    stored = ckpt.get("config", {})
    if not isinstance(stored, Mapping):
        raise DataError(path, f"the config stored in the checkpoint is not a mapping of sections "
                              f"(got {type(stored).__name__}); a damaged or foreign checkpoint")
    return dict(stored)


def load_model_weights(model: torch.nn.Module, state: Any, path: PathLike, stored: Mapping[str, Any] | None,
                       cfg: Config) -> None:
    """``model.load_state_dict(state)`` with an error a user can act on when they do not fit.

    Args:
        state: the checkpoint's ``model`` state_dict.
        stored: the config the checkpoint was saved with (names its backbone in the message).
        cfg: the config ``model`` was built from.

    Raises:
        DataError: naming the checkpoint, the backbone it was trained with and the config's, and
            the first tensors that differ.
    """
    if not isinstance(state, Mapping):
        raise DataError(path, f"the checkpoint's 'model' entry is not a state_dict (got {type(state).__name__})")
    own = model.state_dict()
    shape_of = lambda t: tuple(t.shape) if hasattr(t, "shape") else None  # noqa: E731
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    differ = [k for k in own if k in state and shape_of(state[k]) != tuple(own[k].shape)]
    if not (missing or unexpected or differ):
        try:
            model.load_state_dict(state)
            return
        except RuntimeError as e:  # anything torch refuses that the comparison above did not catch
            raise DataError(path, f"cannot load its weights ({str(e).splitlines()[0]})") from None
    model_cfg = stored.get("model") if isinstance(stored, Mapping) else None
    trained = model_cfg.get("backbone") if isinstance(model_cfg, Mapping) else None
    want = cfg.model.backbone
    if trained is not None and trained != want:
        what = f"it was trained with backbone {trained}, the config asks for {want}"
    else:
        what = f"they do not fit the {want} model the config describes (backbone and head settings must match training)"
    details = []
    if differ:
        k = differ[0]
        details.append(f"{len(differ)} tensor(s) differ in shape, e.g. {k}: checkpoint {list(shape_of(state[k]) or [])}, "
                       f"model {list(own[k].shape)}")
    if missing:
        details.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    raise DataError(path, f"the checkpoint's weights cannot be loaded: {what} ({'; '.join(details)})")


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
