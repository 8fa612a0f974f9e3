"""Helpers of the prediction tests: a small real Mask R-CNN and detections taken from ground truth."""
from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import torch
from torchvision.ops import roi_align

from cellkit.structures.detections import Detections


def tiny_model(detections: int = 40, seed: int = 0, num_classes: int = 5) -> torch.nn.Module:
    """A randomly initialised torchvision Mask R-CNN (ResNet-18 FPN, 128-160 px inputs), eval mode.

    With ``box_score_thresh=0`` it returns ``detections`` (garbage) detections per image: enough
    real model output to exercise every post-processing path.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    model = MaskRCNN(backbone, num_classes=num_classes, min_size=128, max_size=160, box_score_thresh=0.0,
                     box_detections_per_img=detections, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150)
    return model.eval()


def gt_detections(owner: np.ndarray, classes: list[int], mask_size: int = 28, seed: int = 0,
                  image_id: int = 1) -> Detections:
    """Detections that *are* the ground truth of an instance map (image ``image_id``, size of
    ``owner``): one per instance present, box
    in pixel-edge xyxy, mask probabilities from RoIAlign of its binary mask (the target Mask
    R-CNN's mask head learns), random scores in [0.5, 1).

    Args:
        owner: ``(H, W)`` int instance map (0 background, instance ``i`` has class ``classes[i - 1]``).
    """
    boxes, masks, labels = [], [], []
    for idx, sl in enumerate(ndi.find_objects(owner)):
        if sl is None:
            continue
        ys, xs = sl
        local = torch.from_numpy(owner[ys, xs] == idx + 1).float()[None, None]
        h, w = local.shape[-2:]
        box = torch.tensor([[0.0, 0.0, float(w), float(h)]])
        masks.append(roi_align(local, [box], (mask_size, mask_size), 1.0, aligned=True)[0])
        boxes.append([xs.start, ys.start, xs.stop, ys.stop])
        labels.append(classes[idx])
    n = len(boxes)
    if n == 0:
        return Detections.empty(mask_size, image_id, owner.shape)
    rng = np.random.default_rng(seed)
    scores = torch.from_numpy(rng.uniform(0.5, 1.0, n).astype(np.float32))
    return Detections(torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64), scores,
                      torch.stack(masks), image_id=image_id, image_size=(int(owner.shape[0]), int(owner.shape[1])))


def instance_ids(owner: np.ndarray) -> list[int]:
    return [i + 1 for i, sl in enumerate(ndi.find_objects(owner)) if sl is not None]
