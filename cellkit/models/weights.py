"""Pretrained weights: downloads that fail clearly offline, and loading from a local file.

``model.weights`` is ``none``, ``imagenet`` (the backbone's ImageNet weights, through torchvision's
weight enums or timm's ``pretrained=True``), ``coco`` (torchvision's COCO Mask R-CNN weights, where
the architecture matches) or a path to a file (``.pth``/``.pt``/``.bin`` read with
``torch.load(weights_only=True)``, or ``.safetensors``).

A download is attempted only when the file is not in the local cache (torch hub or the Hugging
Face cache) and the host (or the configured proxy) answers within a few seconds; otherwise, or
when the download itself fails, a :class:`WeightsError` says so and names the local-file option,
instead of a traceback or minutes of retries.

Loading a file (or the COCO weights) keeps every tensor whose name and shape match the model and
reports the rest: class-specific predictors (91 COCO classes versus 4 + 1 here), attention layers
the file does not have, anchors of another count. The keys of a whole Mask R-CNN
(``backbone.body.layer1...``), of a bare backbone (``layer1...``, an ImageNet file) and of a
cellkit checkpoint (``{"model": state_dict, ...}``) are all recognised.
"""
from __future__ import annotations

import difflib
import logging
import os
import socket
import urllib.request
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

import safetensors.torch
import timm.models
import torch
from huggingface_hub import constants, try_to_load_from_cache
from torch import nn
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights
from torchvision.models.detection._utils import overwrite_eps

from ..errors import CellkitError, ConfigError, DataError

log = logging.getLogger(__name__)

LOCAL_FILE_HINT = (
    "download the file on a machine with internet access and pass it with "
    "--set model.weights=/path/to/file.pth (or model.weights: /path/to/file.pth in the YAML)"
)
PROBE_TIMEOUT_S = 3.0
WEIGHT_CHOICES = ("none", "imagenet", "coco")


class WeightsError(CellkitError):
    """Pretrained weights cannot be had: no network, no cached copy, or a file that does not fit."""


# --------------------------------------------------------------------------------------------
# the weights option


def weights_path(weights: str) -> Path | None:
    """The file ``model.weights`` names, or None for ``none``/``imagenet``/``coco``.

    Raises:
        ConfigError: neither one of the keywords nor an existing file (suggests the keyword meant).
    """
    if weights in WEIGHT_CHOICES:
        return None
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    close = difflib.get_close_matches(weights.lower(), WEIGHT_CHOICES, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"model.weights: {weights!r} is not none, imagenet, coco or an existing file{hint}")


def is_pretrained(weights: str) -> bool:
    """Whether ``model.weights`` loads anything (ImageNet, COCO or a file)."""
    return weights != "none"


# --------------------------------------------------------------------------------------------
# downloads


def torchvision_weights(enum: Any, what: str) -> Any:
    """``enum`` (a torchvision ``WeightsEnum`` member) once it is known to be loadable.

    Raises:
        WeightsError: not cached and the download host cannot be reached.
    """
    url = enum.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if not cached.is_file():
        require_reachable(url, f"{what} ({url})")
    return enum


def timm_pretrained(tag: str, what: str) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model`` that load the pretrained weights ``tag``.

    A copy in the Hugging Face cache is loaded from its file (no network at all); otherwise timm
    downloads it, after a quick check that the hub can be reached.

    Raises:
        WeightsError: not cached and the hub cannot be reached (or ``HF_HUB_OFFLINE`` is set).
    """
    pcfg = timm.models.get_pretrained_cfg(tag)
    if pcfg is None:  # pragma: no cover - a typo in a backbone function
        raise ValueError(f"timm has no pretrained config {tag!r}")
    repo = pcfg.hf_hub_id
    if repo:
        for filename in ([pcfg.hf_hub_filename] if pcfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]):
            hit = try_to_load_from_cache(repo, filename)
            if isinstance(hit, str):
                return {"pretrained": True, "pretrained_cfg_overlay": {"file": hit}}
        if constants.HF_HUB_OFFLINE:
            raise WeightsError(f"cannot download {what}: HF_HUB_OFFLINE is set and {repo} is not cached; {LOCAL_FILE_HINT}")
        require_reachable(constants.ENDPOINT, f"{what} (Hugging Face hub, {repo})")
    elif pcfg.url:
        require_reachable(pcfg.url, f"{what} ({pcfg.url})")
    return {"pretrained": True}


@contextmanager
def downloading(what: str) -> Iterator[None]:
    """Turn a failed download (any ``OSError``: DNS, refused, reset, HTTP error) into a :class:`WeightsError`."""
    try:
        yield
    except WeightsError:
        raise
    except OSError as e:
        raise WeightsError(f"could not download {what} ({type(e).__name__}: {e}); {LOCAL_FILE_HINT}") from e


def require_reachable(url: str, what: str) -> None:
    """Raise :class:`WeightsError` unless ``url``'s host (or its proxy) accepts a TCP connection quickly."""
    if not reachable(url):
        raise WeightsError(f"cannot download {what}: no network connection; {LOCAL_FILE_HINT}")


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the host of ``url`` (or the proxy the environment sets for it) opens.

    A quick probe before a download: without it an offline machine waits for DNS or connection
    timeouts, and the Hugging Face client retries for most of a minute.
    """
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or "", p.port or 8080
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# loading state dicts


@dataclass
class LoadReport:
    """What a partial load did.

    Attributes:
        source: where the tensors came from (a path, or the weight enum's name).
        loaded: model keys that received a tensor.
        missing: model keys the source had nothing for (they keep their fresh initialisation).
        mismatched: keys present in both with different shapes (skipped; e.g. 91-class predictors).
        unexpected: source keys the model does not have (ignored).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: counts, and the first few names of each kind that did not load."""
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f", ... ({len(keys)})" if len(keys) > 4 else "")

        parts = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        if self.mismatched:
            parts.append(f"skipped {len(self.mismatched)} of another shape [{few(self.mismatched)}]")
        if self.missing:
            parts.append(f"{len(self.missing)} model tensors start fresh [{few(self.missing)}]")
        if self.unexpected:
            parts.append(f"ignored {len(self.unexpected)} unknown [{few(self.unexpected)}]")
        return "; ".join(parts)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a state_dict, a cellkit checkpoint (``model``), or ``{"state_dict": ...}``.

    Raises:
        DataError: unreadable file, or no tensors in it.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            obj: Any = safetensors.torch.load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch / safetensors raise several types for foreign or truncated files
        raise DataError(path, f"cannot read weights ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(path, "no state_dict of tensors in this file")
    return obj  # type: ignore[return-value]


def load_matching(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> LoadReport:
    """Copy every tensor of ``state`` whose (re-prefixed) name and shape match ``model``.

    The key prefix is chosen to match most names: none (a whole Mask R-CNN), ``backbone.body.``
    (a bare backbone such as an ImageNet file) or ``backbone.``. Names that differ only in
    ``.`` versus ``_`` (timm's feature wrappers flatten ``stages.0`` to ``stages_0``) are matched too.

    Raises:
        WeightsError: not a single tensor matches (a file of another architecture).
    """
    own = model.state_dict()
    prefix = max(("", "backbone.body.", "backbone."), key=lambda p: sum((p + k) in own for k in state))
    by_norm: dict[str, str | None] = {}
    for k in own:
        n = k.replace("_", ".")
        by_norm[n] = None if n in by_norm else k  # ambiguous normalised names are not used
    aligned: dict[str, torch.Tensor] = OrderedDict()
    for k, v in state.items():
        key = prefix + k
        if key not in own:
            key = by_norm.get(key.replace("_", ".")) or key
        aligned[key] = v
    metadata = getattr(state, "_metadata", None)
    if metadata is not None and prefix == "":
        aligned._metadata = metadata  # type: ignore[attr-defined]  # lets modules upgrade old key names
    mismatched = [k for k, v in aligned.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    for k in mismatched:
        del aligned[k]
    result = model.load_state_dict(aligned, strict=False)
    missing = [k for k in result.missing_keys if k not in mismatched]
    report = LoadReport(
        source=source,
        loaded=[k for k in own if k not in result.missing_keys and k not in mismatched],
        missing=missing,
        mismatched=mismatched,
        unexpected=list(result.unexpected_keys),
    )
    if not report.loaded:
        raise WeightsError(f"{source}: none of its {len(state)} tensors fit this model (another architecture?)")
    log.info(report.summary())
    if len(report.loaded) < 0.5 * len(state):
        log.warning("%s: most of the file did not fit the model; %s", source, report.summary())
    return report


def load_file(model: nn.Module, path: Path) -> LoadReport:
    """Load the matching tensors of the weights file at ``path`` into ``model`` (see :func:`load_matching`)."""
    return load_matching(model, read_state_dict(path), str(path))


def load_coco(model: nn.Module, enum: Any) -> LoadReport:
    """Download (or take from the torch hub cache) torchvision's COCO weights ``enum`` and load what matches.

    torchvision's v1 COCO weights were trained with a BatchNorm eps of 0 (Detectron); like
    torchvision's own builder, the frozen BatchNorm layers get eps 0 after loading them.
    """
    what = f"COCO Mask R-CNN weights {type(enum).__name__}.{enum.name}"
    torchvision_weights(enum, what)
    with downloading(what):
        state = enum.get_state_dict(progress=True, check_hash=True)
    report = load_matching(model, state, what)
    if enum == MaskRCNN_ResNet50_FPN_Weights.COCO_V1:
        overwrite_eps(model, 0.0)
    return report
