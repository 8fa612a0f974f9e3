"""Decoding one annotated image into its :class:`~cellkit.structures.LabelMaps`."""
from __future__ import annotations

import numpy as np

from ..structures.label_maps import LabelMaps
from .io import read_image, read_label_map
from .layout import TrainSample


def load_sample(sample: TrainSample) -> tuple[np.ndarray, LabelMaps]:
    """Decode one training image and its label maps.

    Returns:
        image ``(H, W, 3)`` uint8/uint16 and its :class:`~cellkit.structures.LabelMaps`.

    Raises:
        DataError: any unreadable or inconsistent file (named in the message).
    """
    image = read_image(sample.image_path)
    shape = image.shape[:2]
    maps = {k: read_label_map(p, shape) for k, p in sample.class_paths.items()}
    return image, LabelMaps.from_class_maps(maps, shape)
