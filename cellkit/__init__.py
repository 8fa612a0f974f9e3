"""cellkit: a workbench for instance segmentation of stained cell microscopy images with Mask R-CNN."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .config import Config, load_config
from .errors import CellkitError, ConfigError, DataError

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    import torch


def build_model(config: Config) -> "torch.nn.Module":
    """Mask R-CNN for ``config.model`` (see :func:`cellkit.models.build_model`)."""
    from .models import build_model as _build  # here: the package face stays torch-free (cellkit evaluate)

    return _build(config)


__all__ = ["Config", "load_config", "build_model", "CellkitError", "ConfigError", "DataError", "__version__"]
