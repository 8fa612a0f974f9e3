"""How raw image values become the model's [0, 1] input (``data.intensity``), in training and
prediction alike.

* ``dtype`` (the default, and what every run before this key did): uint8 / 255, uint16 / 65535.
  Right for 8-bit stains and for 16-bit images that use the whole range; a 12-bit camera's
  image in a uint16 file then uses only the darkest 1/16 of [0, 1].
* ``percentile``: each image's ``intensity_percentiles`` (default 1 and 99.8, as Cellpose),
  taken over all its pixels and channels together (so an RGB stain keeps its hues), become 0
  and 1; values beyond are clipped. Exposure differences between images disappear.
* ``fixed``: ``intensity_range`` (raw values) becomes 0 and 1 for every image, clipped: one
  camera, one setting, brightness differences between images kept.

The mapped image is stored as uint16 (65536 levels, finer than any camera here), so everything
downstream (augmentation, copy-paste, ``image_to_tensor``) reads it as a 16-bit image in the
``dtype`` convention: the mapping happens once, where the image is decoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MODES = ("dtype", "percentile", "fixed")


@dataclass(frozen=True)
class Intensity:
    """One ``data.intensity`` setting (see the module docstring).

    Attributes:
        mode: ``dtype``, ``percentile`` or ``fixed``.
        percentiles: ``(low, high)`` in [0, 100] for ``percentile``.
        value_range: ``(low, high)`` raw values for ``fixed``.
    """

    mode: str = "dtype"
    percentiles: tuple[float, float] = (1.0, 99.8)
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"intensity mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "fixed" and (self.value_range is None or not self.value_range[0] < self.value_range[1]):
            raise ValueError(f"intensity fixed needs a range low < high, got {self.value_range}")

    @classmethod
    def from_config(cls, data_cfg: Any) -> "Intensity":
        """The setting of a :class:`~cellkit.config.DataConfig` (``data.intensity*`` keys)."""
        rng = data_cfg.intensity_range
        return cls(data_cfg.intensity, tuple(data_cfg.intensity_percentiles),  # type: ignore[arg-type]
                   None if rng is None else (float(rng[0]), float(rng[1])))

    def describe(self) -> str:
        """One line for logs and output metadata, e.g. ``percentile 1-99.8 per image -> [0, 1]``."""
        if self.mode == "percentile":
            return f"percentile {self.percentiles[0]:g}-{self.percentiles[1]:g} of each image -> [0, 1], clipped"
        if self.mode == "fixed":
            assert self.value_range is not None
            return f"fixed range {self.value_range[0]:g}-{self.value_range[1]:g} -> [0, 1], clipped"
        return "dtype range (uint8 / 255, uint16 / 65535) -> [0, 1]"

    def bounds(self, image: np.ndarray) -> tuple[float, float]:
        """The raw values of ``image`` that become 0 and 1."""
        if self.mode == "percentile":
            lo, hi = np.percentile(image, self.percentiles)
            return float(lo), float(hi)
        if self.mode == "fixed":
            assert self.value_range is not None
            return self.value_range
        return 0.0, float(np.iinfo(image.dtype).max)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The image as the model reads it.

        Args:
            image: ``(H, W, C)`` uint8 or uint16 (:func:`cellkit.data.io.read_image`).

        Returns:
            ``image`` itself for ``dtype``; else ``(H, W, C)`` uint16 where 65535 is 1.0. A
            constant image (its low and high bounds equal) maps to 0.
        """
        if self.mode == "dtype":
            return image
        lo, hi = self.bounds(image)
        scale = 65535.0 / (hi - lo) if hi > lo else 0.0
        out = (image.astype(np.float32) - np.float32(lo)) * np.float32(scale)
        return np.clip(np.rint(out), 0, 65535).astype(np.uint16)


DEFAULT = Intensity()
"""``data.intensity: dtype``."""
