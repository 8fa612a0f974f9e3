"""Cascade Mask R-CNN heads (``model.roi_head: cascade``).

:class:`CascadeRoIHeads` is a :class:`~cellkit.models.roi_heads.MaskRoIHeads` (so the mask head,
its loss and ``mask_geometry`` are the standard model's) whose single Fast R-CNN stage is replaced
by ``K`` stages (Cai & Vasconcelos, *Cascade R-CNN*), built from torchvision's pieces
(``Matcher``, ``BalancedPositiveNegativeSampler``, ``BoxCoder``, ``box_ops``, the shared
``MultiScaleRoIAlign`` box pooler):

* stage ``k`` has its own box head and a class-agnostic predictor (``C + 1`` class logits and
  one ``(dx, dy, dw, dh)`` box delta per RoI), its own foreground IoU threshold
  (``model.cascade_iou_thresholds``) and box-coder weights (``model.cascade_box_coder_weights``);
* training: stage 1 takes the RPN proposals, stage ``k + 1`` the boxes stage ``k`` regressed,
  detached and clipped to the image. Each stage adds the ground-truth boxes to its proposals,
  matches them at its own IoU threshold and samples ``box_batch_size_per_image`` RoIs with
  torchvision's sampler; its losses are ``loss_classifier_stage{k}`` and ``loss_box_reg_stage{k}``
  (torchvision's ``fastrcnn_loss`` made class-agnostic) times ``model.cascade_stage_weights[k]``.
  The mask head trains on the positive RoIs of the last stage (the boxes it sees at test time
  come from the last stage too), with ``loss_mask`` (and ``loss_mask_dice``) as the standard heads;
* inference: the RPN proposals go through every stage, each stage scoring the boxes it is given
  and regressing them; a detection's class scores are the mean of the stages' softmax scores,
  its box is the last stage's; then torchvision's post-processing (score threshold, small-box
  removal, class-wise NMS, ``detections_per_img``) and the mask head on the final boxes. The
  output is the standard heads' (``boxes``, ``labels``, ``scores``, ``masks`` ``(N, 1, M, M)``),
  so prediction, TTA, tiling, threshold tuning and the lean paste work unchanged.

Stage 1's modules keep the standard names (``roi_heads.box_head``, ``roi_heads.box_predictor``),
so ``weights: coco`` (or a standard model's file) loads the COCO box head into stage 1, and
:meth:`CascadeRoIHeads.init_stages_from_first` copies it into the later stages' box heads (same
shape); the class-agnostic predictors start fresh. Stages 2.. are
``roi_heads.cascade_stages.{0,1,..}.box_head`` / ``.box_predictor``.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.ops import boxes as box_ops

from ..config import ModelConfig
from ..errors import ConfigError
from .roi_heads import MaskRoIHeads

log = logging.getLogger(__name__)


class AgnosticBoxPredictor(nn.Module):
    """Class scores and one class-agnostic box delta per RoI.

    Attribute names follow torchvision's ``FastRCNNPredictor`` (``cls_score``, ``bbox_pred``).
    Initialised as Detectron2's (normal, std 0.01 for the scores, 0.001 for the deltas; zero bias).

    forward: ``(R, in_channels)`` (or ``(R, in_channels, 1, 1)``) float -> ``(R, num_classes)``
    logits and ``(R, 4)`` deltas.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def agnostic_box_loss(
    class_logits: Tensor, deltas: Tensor, labels: Sequence[Tensor], regression_targets: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """torchvision's ``fastrcnn_loss`` for class-agnostic deltas.

    Args:
        class_logits: ``(R, C + 1)`` float logits of the sampled RoIs of the batch.
        deltas: ``(R, 4)`` float predicted box deltas.
        labels: per image ``(R_i,)`` int64 sampled labels (0: background).
        regression_targets: per image ``(R_i, 4)`` float encoded target deltas.

    Returns:
        (cross-entropy over all RoIs, smooth-L1 (beta 1/9) summed over the positives / R).
    """
    lab = torch.cat(list(labels))
    goal = torch.cat(list(regression_targets))
    cls_loss = F.cross_entropy(class_logits, lab)
    pos = torch.where(lab > 0)[0]
    box_loss = F.smooth_l1_loss(deltas[pos], goal[pos], beta=1 / 9, reduction="sum") / max(1, lab.numel())
    return cls_loss, box_loss


class CascadeRoIHeads(MaskRoIHeads):
    """Cascade box stages + the mask head (see the module docstring).

    Args:
        *args, **kwargs: :class:`~cellkit.models.roi_heads.MaskRoIHeads`' arguments; its
            ``box_head``/``box_predictor`` are stage 1 (the predictor must be class-agnostic:
            an :class:`AgnosticBoxPredictor`).
        stages: ``(box_head, box_predictor)`` of stages 2..K.
        iou_thresholds: K foreground IoU thresholds.
        stage_weights: K loss factors.
        coder_weights: K box-coder weight 4-tuples.
    """

    def __init__(
        self,
        *args: Any,
        stages: Sequence[tuple[nn.Module, nn.Module]] = (),
        iou_thresholds: Sequence[float] = (0.5,),
        stage_weights: Sequence[float] = (1.0,),
        coder_weights: Sequence[Sequence[float]] = ((10.0, 10.0, 5.0, 5.0),),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        n = len(stages) + 1
        if not (len(iou_thresholds) == len(stage_weights) == len(coder_weights) == n):
            raise ValueError(f"{n} stages need {n} IoU thresholds, loss weights and coder weights")
        self.cascade_stages = nn.ModuleList(
            nn.ModuleDict({"box_head": head, "box_predictor": pred}) for head, pred in stages
        )
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self.stage_weights = tuple(float(w) for w in stage_weights)
        self.stage_matchers = [Matcher(t, t, allow_low_quality_matches=False) for t in self.iou_thresholds]
        self.stage_coders = [BoxCoder(tuple(float(v) for v in w)) for w in coder_weights]

    @property
    def num_stages(self) -> int:
        return len(self.cascade_stages) + 1

    def stage_modules(self, k: int) -> tuple[nn.Module, nn.Module]:
        """``(box_head, box_predictor)`` of stage ``k`` (0-based)."""
        if k == 0:
            return self.box_head, self.box_predictor
        stage = self.cascade_stages[k - 1]
        return stage["box_head"], stage["box_predictor"]

    def init_stages_from_first(self, loaded: Sequence[str], missing: Sequence[str], prefix: str = "roi_heads.") -> list[int]:
        """After a partial weight load: copy stage 1's box head into every later stage whose box
        head the file did not have (``missing``), if stage 1's came from it (``loaded``). The box
        heads have the same shape; the class-agnostic predictors stay fresh.

        Returns:
            the 0-based stages initialised this way (logged).
        """
        loaded_set, missing_set = set(loaded), set(missing)
        first = [f"{prefix}box_head.{k}" for k in self.box_head.state_dict()]
        if not first or not all(k in loaded_set for k in first):
            return []
        done = []
        for k, stage in enumerate(self.cascade_stages, start=1):
            keys = [f"{prefix}cascade_stages.{k - 1}.box_head.{n}" for n in stage["box_head"].state_dict()]
            if keys and all(n in missing_set for n in keys):
                stage["box_head"].load_state_dict(self.box_head.state_dict())
                done.append(k)
        if done:
            log.info("cascade: box heads of stages %s initialised from the loaded stage-1 box head",
                     ", ".join(str(k + 1) for k in done))
        return done

    # ---------------------------------------------------------------------------------------
    # one stage

    def run_stage(
        self, k: int, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Stage ``k`` on ``boxes`` (per image ``(R_i, 4)`` float xyxy in the network input's pixels).

        Returns:
            ``(sum R_i, C + 1)`` class logits and ``(sum R_i, 4)`` box deltas (stage ``k``'s coder).
        """
        head, predictor = self.stage_modules(k)
        x = head(self.box_roi_pool(features, boxes, image_shapes))
        return predictor(x)

    def refine(self, k: int, deltas: Tensor, boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """Stage ``k``'s regressed boxes: ``deltas`` (detached) applied to ``boxes``, clipped to each image."""
        decoded = self.stage_coders[k].decode(deltas.detach(), boxes).reshape(-1, 4)
        return [box_ops.clip_boxes_to_image(b, s)
                for b, s in zip(decoded.split([len(b) for b in boxes]), image_shapes)]

    def sample(
        self, k: int, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Stage ``k``'s training RoIs: ground truth added, matched at its IoU threshold, sampled.

        Returns:
            per image: sampled boxes ``(S_i, 4)``, matched ground-truth index ``(S_i,)`` int64,
            labels ``(S_i,)`` int64 (0: background) and regression targets ``(S_i, 4)`` in stage
            ``k``'s coder.
        """
        matcher, coder = self.stage_matchers[k], self.stage_coders[k]
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        proposals = self.add_gt_proposals([p.detach() for p in proposals], gt_boxes)
        matched, labels = [], []
        for props, gt, t in zip(proposals, gt_boxes, targets):
            if gt.numel() == 0:
                idx = torch.zeros(len(props), dtype=torch.int64, device=device)
                lab = torch.zeros(len(props), dtype=torch.int64, device=device)
            else:
                m = matcher(box_ops.box_iou(gt, props))
                idx = m.clamp(min=0)
                lab = t["labels"][idx].to(torch.int64)
                lab[m == Matcher.BELOW_LOW_THRESHOLD] = 0
                lab[m == Matcher.BETWEEN_THRESHOLDS] = -1
            matched.append(idx)
            labels.append(lab)
        pos, neg = self.fg_bg_sampler(labels)
        out_boxes, out_idx, out_lab, out_goal = [], [], [], []
        for i, (p, n) in enumerate(zip(pos, neg)):
            keep = torch.where(p | n)[0]
            b, idx, lab = proposals[i][keep], matched[i][keep], labels[i][keep]
            gt = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype, device=device)
            out_boxes.append(b)
            out_idx.append(idx)
            out_lab.append(lab)
            out_goal.append(coder.encode_single(gt[idx], b))
        return out_boxes, out_idx, out_lab, out_goal

    # ---------------------------------------------------------------------------------------
    # forward

    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            self.check_targets(targets)
            assert targets is not None
            return [], self._train_forward(features, proposals, image_shapes, targets)
        return self._inference(features, proposals, image_shapes), {}

    def _train_forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                       image_shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        boxes = proposals
        sampled: Any = None
        for k in range(self.num_stages):
            boxes, matched, labels, goals = sampled = self.sample(k, boxes, targets)
            logits, deltas = self.run_stage(k, features, boxes, image_shapes)
            cls_loss, box_loss = agnostic_box_loss(logits, deltas, labels, goals)
            w = self.stage_weights[k]
            losses[f"loss_classifier_stage{k + 1}"] = w * cls_loss
            losses[f"loss_box_reg_stage{k + 1}"] = w * box_loss
            if k + 1 < self.num_stages:
                boxes = self.refine(k, deltas, boxes, image_shapes)
        if self.has_mask():
            boxes, matched, labels, _ = sampled
            positive = [torch.where(lab > 0)[0] for lab in labels]
            pos_boxes = [b[i] for b, i in zip(boxes, positive)]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, pos_boxes, image_shapes)))
            losses.update(self.mask_losses(mask_logits, pos_boxes, [m[i] for m, i in zip(matched, positive)], targets))
        return losses

    def stage_scores(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Every stage's class probabilities for the proposals, and the last stage's boxes.

        Returns:
            ``(scores, boxes)``: ``scores[k]`` is ``(sum R_i, C + 1)`` float, stage ``k``'s softmax
            for the boxes it was given (stage 1: ``proposals``; stage ``k + 1``: stage ``k``'s
            regressed boxes); ``boxes`` per image ``(R_i, 4)``, the last stage's regressed boxes.
        """
        boxes = proposals
        scores = []
        for k in range(self.num_stages):
            logits, deltas = self.run_stage(k, features, boxes, image_shapes)
            scores.append(F.softmax(logits, -1))
            boxes = self.refine(k, deltas, boxes, image_shapes)
        return scores, boxes

    def _inference(self, features: dict[str, Tensor], proposals: list[Tensor],
                   image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        scores, boxes = self.stage_scores(features, proposals, image_shapes)
        mean = torch.stack(scores).mean(0)
        result = []
        for b, s in zip(boxes, mean.split([len(b) for b in boxes])):
            det_boxes, det_scores, det_labels = self.detections(b, s)
            result.append({"boxes": det_boxes, "labels": det_labels, "scores": det_scores})
        if self.has_mask():
            det_boxes = [r["boxes"] for r in result]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, det_boxes, image_shapes)))
            for r, probs in zip(result, maskrcnn_inference(mask_logits, [r["labels"] for r in result])):
                r["masks"] = probs
        return result

    def detections(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """torchvision's ``postprocess_detections`` for one image with one box per RoI.

        Args:
            boxes: ``(R, 4)`` float final boxes (already clipped).
            scores: ``(R, C + 1)`` float class probabilities (column 0: background).

        Returns:
            ``boxes`` ``(N, 4)``, ``scores`` ``(N,)``, ``labels`` ``(N,)`` int64 in 1..C: every
            (RoI, class) pair scoring above ``score_thresh``, non-empty, after class-wise NMS at
            ``nms_thresh``, the best ``detections_per_img``.
        """
        n_cls = scores.shape[1]
        labels = torch.arange(1, n_cls, device=scores.device).view(1, -1).expand(len(boxes), -1).reshape(-1)
        boxes = boxes[:, None, :].expand(-1, n_cls - 1, -1).reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return boxes[keep], scores[keep], labels[keep]


# --------------------------------------------------------------------------------------------
# building


def validate_cascade(m: ModelConfig) -> None:
    """The cascade keys agree: one IoU threshold, loss weight and coder-weight tuple per stage.

    Raises:
        ConfigError: naming the keys whose lengths differ.
    """
    n = len(m.cascade_iou_thresholds)
    if n == 0:
        raise ConfigError("model.cascade_iou_thresholds: a cascade needs at least one stage")
    for key in ("cascade_stage_weights", "cascade_box_coder_weights"):
        if len(getattr(m, key)) != n:
            raise ConfigError(
                f"model.{key}: {len(getattr(m, key))} entries, but model.cascade_iou_thresholds has {n} stages "
                f"({list(m.cascade_iou_thresholds)}); give one per stage"
            )


def make_cascade(heads: RoIHeads, m: ModelConfig, new_box_head: Any, representation: int,
                 dice_weight: float | None) -> CascadeRoIHeads:
    """Turn the standard ``heads`` into cascade heads for ``m``.

    Args:
        heads: the assembled standard heads (stage 1 keeps their box head and pooler).
        new_box_head: ``() -> nn.Module``, a fresh box head of the same design for stages 2..K.
        representation: the box heads' output features.
        dice_weight: the Dice term's factor (None: none).
    """
    validate_cascade(m)
    n_out = m.num_classes + 1
    heads.box_predictor = AgnosticBoxPredictor(representation, n_out)
    stages = [(new_box_head(), AgnosticBoxPredictor(representation, n_out)) for _ in m.cascade_iou_thresholds[1:]]
    return CascadeRoIHeads.from_roi_heads(
        heads, stages=stages, iou_thresholds=m.cascade_iou_thresholds, stage_weights=m.cascade_stage_weights,
        coder_weights=m.cascade_box_coder_weights, mask_geometry=m.mask_geometry, dice_weight=dice_weight,
    )
