"""Choosing the torch device from a setting (``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...)."""
from __future__ import annotations

import torch

from ..errors import ConfigError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (this process's GPU under torchrun) when available, else CPU.

    Raises:
        ConfigError: not a device name, or CUDA asked for on a machine without it.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r}: not a device (use auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: CUDA is not available on this machine (use auto or cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device
