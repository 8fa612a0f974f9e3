"""The backbone table of ``cellkit models``: registered backbones, trainable-parameter counts, weights.

Names, tags, weights and the cache check come from the registry's metadata
(:func:`~cellkit.models.registry.backbone_info`); only the parameter counts need a model, built on
the meta device.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import timm.models
import torch
from huggingface_hub import try_to_load_from_cache

from ..config import Config, load_config
from ..errors import ConfigError
from .maskrcnn import assemble, count_parameters, count_trainable_parameters, validate_model_config
from .registry import BackboneInfo, Pretrained, backbone_info, create_backbone, list_backbones

PARAM_LIMIT = 200_000_000
"""The task's rule: under 200M trainable parameters."""


def backbone_table(cfg: Config | None = None, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per registered backbone (or per name of ``names``): parameter counts of the model
    ``cfg`` builds with it.

    Models are built on the meta device (no memory, no weights loaded: ``model.weights`` is
    taken as ``none``, so ``trainable_layers: null`` counts every stage as trainable, the upper
    bound the 200M rule concerns).

    Returns:
        dicts with ``name``, ``trainable_params``, ``params`` (ints), ``head``, ``imagenet`` and
        ``coco`` (the weights each option loads, None if none), ``cached`` (which of those are in
        the local cache, loadable offline), ``tags`` and ``description``; or ``name``, ``error``,
        ``tags`` and ``description`` where the config does not fit that backbone.
    """
    cfg = cfg if cfg is not None else load_config()
    # the class-specific predictors hold a few thousand parameters per class; unset (read from the
    # data when training starts), they are counted for one class
    classes = cfg.model.num_classes if cfg.model.num_classes is not None else 1
    rows: list[dict[str, Any]] = []
    for name in list_backbones() if names is None else names:
        info = backbone_info(name)
        m = cfg.replace({"model.backbone": name, "model.weights": "none", "model.num_classes": classes}).model
        try:
            validate_model_config(m)
            with torch.device("meta"):
                model = assemble(create_backbone(m), m)
        except ConfigError as e:  # e.g. --set model.norm=gn, which some backbones do not support
            rows.append({"name": name, "error": str(e), "tags": info.tags, "description": info.description})
            continue
        rows.append({
            "name": name,
            "trainable_params": count_trainable_parameters(model),
            "params": count_parameters(model),
            "num_classes": classes,
            "head": info.head,
            "imagenet": str(info.imagenet) if info.imagenet else None,
            "coco": info.coco.name if info.coco else None,
            "cached": cached_weights(info),
            "tags": info.tags,
            "description": info.description,
        })
    return rows


def cached_weights(info: BackboneInfo) -> list[str]:
    """Which of the backbone's pretrained sources (``imagenet``, ``coco``) are in the local cache
    (torch hub for torchvision weights, the Hugging Face cache for timm's), so load offline."""
    return [source for source in info.pretrained if _in_cache(getattr(info, source))]


def _in_cache(weights: Pretrained) -> bool:
    if weights.library == "torchvision":
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        return (hub / os.path.basename(urlparse(weights.weights.url).path)).is_file()
    pcfg = timm.models.get_pretrained_cfg(weights.weights)
    return bool(pcfg is not None and pcfg.hf_hub_id and any(
        isinstance(try_to_load_from_cache(pcfg.hf_hub_id, f), str) for f in ("model.safetensors", "pytorch_model.bin")
    ))


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (parameters in millions)."""
    header = ("backbone", "trainable (M)", "total (M)", "head", "imagenet", "coco", "cached")
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append((r["name"], "-", "-", "-", f"error: {r['error']}", "", ""))
            continue
        lines.append((
            r["name"],
            f"{r['trainable_params'] / 1e6:.1f}" + ("" if r["trainable_params"] < PARAM_LIMIT else " (>200M!)"),
            f"{r['params'] / 1e6:.1f}",
            r["head"],
            r["imagenet"] or "-",
            r["coco"] or "-",
            ",".join(r["cached"]) or "-",
        ))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.append("")
    counted = next((r["num_classes"] for r in rows if "num_classes" in r), None)
    if counted is not None:
        text.append(f"parameters with predictors for {counted} class(es) (--set model.num_classes=K for yours)")
    text.append("weights: --set model.weights=none|imagenet|coco|/path/to/file.pth (coco: the resnet50 rows; "
                "attention layers and the class predictors start fresh)")
    return "\n".join(text)
