"""Repeat-factor sampling (LVIS; Detectron2's RepeatFactorTrainingSampler) for rare classes.

Classes 3 and 4 are about 2 % of the instances each. With threshold ``t``, a class present in a
fraction ``f_c`` of the images gets ``r_c = max(1, sqrt(t / f_c))``; an image is repeated
``r_i = max_c r_c`` times per epoch over the classes it contains, with stochastic rounding of the
fractional part (a new draw every epoch).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def repeat_factors(presence: np.ndarray, threshold: float) -> np.ndarray:
    """Per-image repeat factors.

    Args:
        presence: ``(n_images, n_classes)`` bool, which classes each image contains.
        threshold: the frequency ``t`` below which a class is oversampled.

    Returns:
        ``(n_images,)`` float64 factors >= 1 (1 for images without instances).
    """
    presence = np.asarray(presence, dtype=bool)
    freq = presence.mean(axis=0) if len(presence) else np.zeros(presence.shape[1])
    with np.errstate(divide="ignore"):
        per_class = np.where(freq > 0, np.maximum(1.0, np.sqrt(threshold / np.where(freq > 0, freq, 1))), 1.0)
    return np.where(presence.any(axis=1), (presence * per_class).max(axis=1, initial=1.0), 1.0)


class RepeatFactorSampler(Sampler[int]):
    """Yields each image ``floor(r_i)`` or ``ceil(r_i)`` times per epoch, shuffled.

    Works with several processes like ``DistributedSampler``: the epoch's index list is padded to
    a multiple of ``num_replicas`` and each rank takes every ``num_replicas``-th entry. Call
    :meth:`set_epoch` before each epoch for a new draw.
    """

    def __init__(self, factors: np.ndarray, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        self.factors = torch.as_tensor(np.asarray(factors, dtype=np.float64))
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._indices = self._draw()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._indices = self._draw()

    def _draw(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        whole = torch.floor(self.factors)
        reps = (whole + (torch.rand(len(self.factors), generator=g, dtype=torch.float64) < self.factors - whole)).long()
        idx = torch.repeat_interleave(torch.arange(len(self.factors)), reps)
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        total = math.ceil(len(idx) / self.num_replicas) * self.num_replicas
        idx += idx[: total - len(idx)]
        return idx[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)
