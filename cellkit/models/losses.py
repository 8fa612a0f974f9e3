"""Optional Dice term for the mask head (``model.mask_loss: bce+dice``).

:class:`DiceRoIHeads` is torchvision's ``RoIHeads`` plus one loss: it adds ``loss_mask_dice``
(``dice_weight`` x soft Dice of the ground-truth class's mask logits against the same targets
the BCE ``loss_mask`` uses, in ``model.mask_geometry``) to the loss dict. Inference is exactly
``RoIHeads``'. It is a :class:`~cellkit.models.roi_heads.MaskRoIHeads` (which keeps
torchvision's code path: it records the sampled proposals from ``select_training_samples`` and
the mask logits from a forward hook on ``mask_predictor``, rather than copying
``RoIHeads.forward``) with the Dice term switched on.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads

from ..structures.mask_geometry import MaskGeometry, mask_targets
from .roi_heads import MaskRoIHeads, soft_dice


def dice_loss(
    mask_logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    mask_matched_idxs: list[Tensor],
    eps: float = 1.0,
    geometry: MaskGeometry = "torchvision",
) -> Tensor:
    """Mean soft Dice loss over positive RoIs (the same targets as ``loss_mask`` in ``geometry``).

    Args:
        mask_logits: ``(R, C, M, M)`` float, R positive RoIs over the batch, C classes + background.
        proposals: per image ``(R_i, 4)`` float xyxy boxes of the positive RoIs.
        gt_masks: per image ``(N_i, H, W)`` uint8 ground-truth masks.
        gt_labels: per image ``(N_i,)`` int64 classes.
        mask_matched_idxs: per image ``(R_i,)`` int64 index of each RoI's ground-truth instance.
        eps: smoothing added to numerator and denominator.
        geometry: the targets' geometry; ``torchvision``: those of torchvision's ``maskrcnn_loss``.

    Returns:
        scalar float tensor in [0, 1) (0 for a batch without positive RoIs, still connected to the graph).
    """
    size = mask_logits.shape[-1]
    labels = torch.cat([gl[idx] for gl, idx in zip(gt_labels, mask_matched_idxs)], dim=0)
    targets = torch.cat(
        [mask_targets(m, p, i, size, geometry) for m, p, i in zip(gt_masks, proposals, mask_matched_idxs)], dim=0
    )
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    probs = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels].sigmoid()
    return soft_dice(probs, targets, eps)


class DiceRoIHeads(MaskRoIHeads):
    """``RoIHeads`` that also returns ``loss_mask_dice`` in training (see the module docstring).

    A :class:`~cellkit.models.roi_heads.MaskRoIHeads` with the Dice term on; its targets (and
    ``loss_mask``'s) follow ``mask_geometry``.

    Args:
        *args, **kwargs: ``RoIHeads``' arguments.
        dice_weight: factor of the Dice term.
        mask_geometry: ``exact`` or ``torchvision`` (see :mod:`cellkit.structures.mask_geometry`).
    """

    def __init__(self, *args: Any, dice_weight: float = 1.0, mask_geometry: MaskGeometry = "exact",
                 **kwargs: Any) -> None:
        super().__init__(*args, mask_geometry=mask_geometry, dice_weight=dice_weight, **kwargs)

    @classmethod
    def from_roi_heads(  # type: ignore[override]
        cls, heads: RoIHeads, dice_weight: float, mask_geometry: MaskGeometry = "exact"
    ) -> "DiceRoIHeads":
        """The same heads (same modules, same knobs) with the Dice term added."""
        return super().from_roi_heads(heads, dice_weight=dice_weight, mask_geometry=mask_geometry)
