"""RoI heads whose mask loss follows ``model.mask_geometry`` (and optionally adds a Dice term).

:class:`MaskRoIHeads` is torchvision's ``RoIHeads`` with the mask loss parametrised:

* ``mask_geometry="exact"``: ``loss_mask`` is the per-pixel BCE of the ground-truth class's mask
  logits against :func:`~cellkit.structures.mask_geometry.exact_mask_targets` (``roi_align`` with
  ``aligned=True``), the targets the exact paste inverts.
* ``mask_geometry="torchvision"``: torchvision's own ``loss_mask`` (``aligned=False`` targets).
* ``dice_weight`` not None: ``loss_mask_dice`` = ``dice_weight`` x soft Dice against the same
  targets as ``loss_mask``.

With ``torchvision`` geometry and no Dice term the forward pass is ``RoIHeads``' own, bit for
bit. Otherwise it still runs ``RoIHeads.forward`` (sampling, box losses, inference untouched)
and records the sampled proposals from ``select_training_samples`` and the mask logits from a
forward hook on ``mask_predictor``, both public extension points, rather than copying
``RoIHeads.forward``; the exact ``loss_mask`` then replaces torchvision's in the loss dict (the
torchvision value is computed and dropped: one extra ``roi_align`` of the ground truth per step).
Inference is always ``RoIHeads``' (box-relative ``M x M`` masks); ``mask_geometry`` is stored on
the module so that prediction pastes them with the geometry they were trained in
(:func:`~cellkit.structures.mask_geometry.mask_geometry_of`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads

from ..structures.mask_geometry import MaskGeometry, check_geometry, mask_targets


def soft_dice(probs: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """Mean soft Dice loss ``1 - (2 |p t| + eps) / (|p| + |t| + eps)`` over the first dimension.

    Args:
        probs: ``(R, M, M)`` float probabilities.
        targets: ``(R, M, M)`` float targets in [0, 1].

    Returns:
        scalar float tensor (``probs.sum() * 0`` when R is 0, still connected to the graph).
    """
    if targets.numel() == 0:
        return probs.sum() * 0
    inter = (probs * targets).flatten(1).sum(1)
    total = probs.flatten(1).sum(1) + targets.flatten(1).sum(1)
    return (1 - (2 * inter + eps) / (total + eps)).mean()


class MaskRoIHeads(RoIHeads):
    """``RoIHeads`` whose mask loss follows ``mask_geometry`` (see the module docstring).

    Args:
        *args, **kwargs: ``RoIHeads``' arguments.
        mask_geometry: ``exact`` or ``torchvision``: the targets of ``loss_mask`` (and of the Dice term).
        dice_weight: factor of the ``loss_mask_dice`` term; None: no Dice term.
    """

    def __init__(self, *args: Any, mask_geometry: MaskGeometry = "exact", dice_weight: Optional[float] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_geometry: MaskGeometry = check_geometry(mask_geometry)
        self.dice_weight = None if dice_weight is None else float(dice_weight)
        self._sampled: Optional[tuple[list[Tensor], list[Tensor], list[Tensor]]] = None

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads, *args: Any, **kwargs: Any) -> Any:
        """The same heads (same modules, same knobs) as ``cls``; ``args``/``kwargs`` go to ``cls``."""
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
            *args,
            **kwargs,
        )
        new.train(heads.training)
        return new

    def _own_mask_loss(self) -> bool:
        return self.mask_geometry != "torchvision" or self.dice_weight is not None

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
        if not self.training or not self.has_mask() or not self._own_mask_loss():
            self._sampled = None
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
        own = self.mask_losses(logits[0], [p[i] for p, i in zip(props, positive)],
                               [m[i] for m, i in zip(matched_idxs, positive)], targets)
        if self.mask_geometry == "torchvision":
            own.pop("loss_mask")  # torchvision's own loss_mask stays, bit for bit
        losses.update(own)
        return result, losses

    def mask_losses(self, mask_logits: Tensor, boxes: list[Tensor], matched_idxs: list[Tensor],
                    targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``loss_mask`` (BCE) and, with ``dice_weight``, ``loss_mask_dice`` against targets in ``mask_geometry``.

        Args:
            mask_logits: ``(R, C, M, M)`` float mask logits of the R positive RoIs of the batch.
            boxes: per image ``(R_i, 4)`` float xyxy boxes of those RoIs (sum of R_i = R).
            matched_idxs: per image ``(R_i,)`` int64 index of each RoI's ground-truth instance.
            targets: per image the ground truth (``labels`` ``(N_i,)`` int64, ``masks`` ``(N_i, H, W)`` uint8).

        Returns:
            scalar float tensors (0 connected to the graph when there is no positive RoI).
        """
        size = mask_logits.shape[-1]
        gt_labels = torch.cat([t["labels"][m] for t, m in zip(targets, matched_idxs)])
        goal = torch.cat([
            mask_targets(t["masks"], b, m, size, self.mask_geometry) for t, b, m in zip(targets, boxes, matched_idxs)
        ])
        picked = mask_logits[torch.arange(gt_labels.shape[0], device=gt_labels.device), gt_labels]
        losses = {"loss_mask": (F.binary_cross_entropy_with_logits(picked, goal) if goal.numel()
                                else mask_logits.sum() * 0)}
        if self.dice_weight is not None:
            losses["loss_mask_dice"] = self.dice_weight * soft_dice(picked.sigmoid(), goal)
        return losses
