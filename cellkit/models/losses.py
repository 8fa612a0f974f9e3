"""Optional Dice term for the mask head (``model.mask_loss: bce+dice``).

:class:`DiceRoIHeads` is torchvision's ``RoIHeads`` plus one loss: it adds ``loss_mask_dice``
(``dice_weight`` x soft Dice of the ground-truth class's mask logits against the same targets
torchvision's BCE uses) to the loss dict. torchvision's BCE ``loss_mask`` is unchanged, and
inference is exactly ``RoIHeads``'. It keeps torchvision's code path: it records the sampled
proposals from ``select_training_samples`` and the mask logits from a forward hook on
``mask_predictor``, both public extension points, rather than copying ``RoIHeads.forward``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes


def dice_loss(
    mask_logits: Tensor,
    proposals: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    mask_matched_idxs: list[Tensor],
    eps: float = 1.0,
) -> Tensor:
    """Mean soft Dice loss over positive RoIs (the same targets as torchvision's ``maskrcnn_loss``).

    Args:
        mask_logits: ``(R, C, M, M)`` float, R positive RoIs over the batch, C classes + background.
        proposals: per image ``(R_i, 4)`` float xyxy boxes of the positive RoIs.
        gt_masks: per image ``(N_i, H, W)`` uint8 ground-truth masks.
        gt_labels: per image ``(N_i,)`` int64 classes.
        mask_matched_idxs: per image ``(R_i,)`` int64 index of each RoI's ground-truth instance.
        eps: smoothing added to numerator and denominator.

    Returns:
        scalar float tensor in [0, 1) (0 for a batch without positive RoIs, still connected to the graph).
    """
    size = mask_logits.shape[-1]
    labels = torch.cat([gl[idx] for gl, idx in zip(gt_labels, mask_matched_idxs)], dim=0)
    targets = torch.cat(
        [project_masks_on_boxes(m, p, i, size) for m, p, i in zip(gt_masks, proposals, mask_matched_idxs)], dim=0
    )
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    probs = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels].sigmoid()
    inter = (probs * targets).flatten(1).sum(1)
    total = probs.flatten(1).sum(1) + targets.flatten(1).sum(1)
    return (1 - (2 * inter + eps) / (total + eps)).mean()


class DiceRoIHeads(RoIHeads):
    """``RoIHeads`` that also returns ``loss_mask_dice`` in training (see the module docstring).

    Args:
        *args, **kwargs: ``RoIHeads``' arguments.
        dice_weight: factor of the Dice term.
    """

    def __init__(self, *args: Any, dice_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dice_weight = float(dice_weight)
        self._sampled: Optional[tuple[list[Tensor], list[Tensor], list[Tensor]]] = None

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads, dice_weight: float) -> "DiceRoIHeads":
        """The same heads (same modules, same knobs) with the Dice term added."""
        new = cls(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            heads.proposal_matcher.high_threshold,
            heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image,
            heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights,
            heads.score_thresh,
            heads.nms_thresh,
            heads.detections_per_img,
            heads.mask_roi_pool,
            heads.mask_head,
            heads.mask_predictor,
            dice_weight=dice_weight,
        )
        new.train(heads.training)
        return new

    def select_training_samples(self, proposals: list[Tensor], targets: Optional[list[dict[str, Tensor]]]) -> Any:
        out = super().select_training_samples(proposals, targets)
        self._sampled = (out[0], out[1], out[2])  # proposals, matched_idxs, labels
        return out

    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        logits: list[Tensor] = []
        hook = self.mask_predictor.register_forward_hook(lambda _m, _i, out: logits.append(out))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            hook.remove()
            sampled, self._sampled = self._sampled, None
        assert sampled is not None and targets is not None and len(logits) == 1
        props, matched_idxs, labels = sampled
        positive = [torch.where(lab > 0)[0] for lab in labels]
        losses["loss_mask_dice"] = self.dice_weight * dice_loss(
            logits[0],
            [p[i] for p, i in zip(props, positive)],
            [t["masks"] for t in targets],
            [t["labels"] for t in targets],
            [m[i] for m, i in zip(matched_idxs, positive)],
        )
        return result, losses
