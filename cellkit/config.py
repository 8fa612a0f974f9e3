"""One configuration object for every cellkit job.

A :class:`Config` is a tree of typed dataclasses (``data``, ``model``, ``train``, ``eval``,
``predict``). It is built from the defaults below, then a YAML file (which may name a ``_base_``
file it extends), then overrides given as dotted keys: ``--set train.lr=0.001`` on the command
line, ``{"train.lr": 1e-3}`` from Python, or ``train__lr=0.001`` as a papermill parameter.

Every key and value is checked against the dataclass type hints. An unknown or misspelled key is
an error that suggests the nearest valid key; it is never silently ignored. Numbers carry their
valid range in the type (``epochs: AtLeast1``, ``mask_thresh: Unit``: :class:`Range` through
``Annotated``), every float must be finite, and a section may add checks between its fields
(``_validate``); all of it runs when the config is built, so ``train.batch_size=0`` fails at once,
naming the key, instead of an epoch later. :meth:`Config.validate` checks a config changed by hand.

Why our own coercion and not pydantic v2 or OmegaConf structured configs: both would give typed
fields, but neither is a dependency today and this module (a few hundred lines over the standard
library's dataclasses and ``typing.Annotated``) already does what they would, plus what they do
not: the error is one :class:`~cellkit.errors.ConfigError` line naming the dotted key and its
valid range (``train.batch_size: must be at least 1, got 0``) instead of a multi-line validation
report, an unknown key suggests the nearest valid one (``difflib``), ``_base_`` files chain, and
papermill's ``a__b`` parameters map onto dotted keys. Every numeric key already carries its
range in its type, so switching would buy no checks we lack.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

import yaml

from .documents import NotParsable, cut, loads_yaml, read_yaml, short
from .errors import ConfigError, DataError
from .resources import RECIPES

# --------------------------------------------------------------------------------------------
# valid ranges


@dataclass(frozen=True)
class Range:
    """The valid interval of a numeric config field, attached to its type with ``Annotated``.

    ``epochs: Annotated[int, Range(1)]`` accepts 1 and more; ``Range(0, 1, hi_open=True)`` is
    [0, 1). Checked when the config is built (every float must also be finite), so a bad value
    fails at once with its key named instead of an epoch later.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        if self.hi is None:
            assert self.lo is not None
            return f"greater than {self.lo:g}" if self.lo_open else f"at least {self.lo:g}"
        if self.lo is None:
            return f"less than {self.hi:g}" if self.hi_open else f"at most {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


AtLeast1 = Annotated[int, Range(1)]
"""An integer >= 1 (counts, sizes, batch sizes)."""
AtLeast0 = Annotated[int, Range(0)]
"""An integer >= 0 (workers, seeds, warm-up lengths)."""
Positive = Annotated[float, Range(0.0, lo_open=True)]
"""A finite number > 0."""
NonNegative = Annotated[float, Range(0.0)]
"""A finite number >= 0."""
Unit = Annotated[float, Range(0.0, 1.0)]
"""A finite number in [0, 1] (probabilities, score and mask thresholds)."""
UnitOpen0 = Annotated[float, Range(0.0, 1.0, lo_open=True)]
"""A number in (0, 1] (IoU thresholds, fractions of the epochs)."""

# Upper bounds where a number sets how much memory a step takes: a typo (crop_size 100000 with
# preset lsj pads every crop to 100000 x 100000, 120 GB) fails when the config is built.
ImageSide = Annotated[int, Range(1, 8192)]
"""Pixels of an image side the model or a tile works at (at most 8192: one such float image is 0.8 GB)."""
CropSide = Annotated[int, Range(1, 4096)]
"""Pixels of a training crop side (at most 4096; LSJ pads every crop to this size)."""
ScaleFactor = Annotated[float, Range(0.0, 4.0, lo_open=True)]
"""A resize factor of augmentation or TTA in (0, 4]."""
Count = Annotated[int, Range(1, 100_000)]
"""A number of proposals, samples or detections (at most 100000)."""
Width = Annotated[int, Range(1, 4096)]
"""Channels of a network layer (at most 4096)."""


# --------------------------------------------------------------------------------------------
# sections


@dataclass
class AugmentConfig:
    """Joint image/mask augmentation applied to training images (see ``cellkit.data.transforms``)."""

    hflip: Unit = 0.5
    """Probability of a horizontal flip."""
    vflip: Unit = 0.5
    """Probability of a vertical flip."""
    rot90: bool = True
    """Rotate by a random multiple of 90 degrees."""
    scale_range: tuple[ScaleFactor, ScaleFactor] | None = (0.8, 1.25)
    """Relative rescale factor drawn uniformly from this range (None: no scale jitter)."""
    crop_size: CropSide | None = 512
    """Random crop of at most this many pixels per side, taken after rescaling (None: no crop)."""
    brightness: NonNegative = 0.1
    contrast: NonNegative = 0.1
    saturation: NonNegative = 0.1
    hue: Annotated[float, Range(0.0, 0.5)] = 0.02
    """Colour jitter strengths (hue at most 0.5, as torchvision's ColorJitter)."""
    preset: Literal["default", "lsj"] = "default"
    """Geometric preset. default: rescale by ``scale_range``, then a random crop of at most ``crop_size``; lsj: large-scale jitter (torchvision references' lsj, Detectron2's new baselines): rescale by ``lsj_scale_range``, then a crop padded to exactly ``crop_size`` x ``crop_size``."""
    lsj_scale_range: tuple[ScaleFactor, ScaleFactor] = (0.1, 2.0)
    """Rescale factors of ``preset: lsj``, relative to each image (cells keep their size distribution centred on their true size)."""
    copy_paste: Unit = 0.0
    """Probability that a training crop gets cells pasted from other training images (0: off)."""
    copy_paste_max: Annotated[int, Range(1, 1000)] = 8
    """Cells pasted into one crop: drawn uniformly from 1 to this."""
    copy_paste_class_weights: tuple[NonNegative, ...] | None = None
    """Weight of each class's cells (one per class): a cell is drawn with probability proportional to its class weight. None: 1 / cells of the class, so every class is pasted equally often (rare classes most per cell); [1, 1, 1, 1]: every cell alike (classes in their natural shares)."""
    copy_paste_max_covered: Annotated[float, Range(0.0, 1.0, hi_open=True)] = 0.5
    """A cell covered by pasted cells beyond this fraction of its own area is dropped from the target (the rest of a covered cell is trimmed); a cell is never pasted where a later one would hide it that much."""
    copy_paste_blur: NonNegative = 1.0
    """Soft edge of pasted cells: sigma in px of the Gaussian blur of their alpha mask (0: hard edge). Their target masks stay exact."""

    def _validate(self, prefix: str) -> None:
        if self.scale_range is not None and self.scale_range[0] > self.scale_range[1]:
            raise ConfigError(f"{prefix}scale_range: the lower bound must not exceed the upper one, got {list(self.scale_range)}")
        if self.lsj_scale_range[0] > self.lsj_scale_range[1]:
            raise ConfigError(f"{prefix}lsj_scale_range: the lower bound must not exceed the upper one, "
                              f"got {list(self.lsj_scale_range)}")
        if self.preset == "lsj" and self.crop_size is None:
            raise ConfigError(f"{prefix}crop_size: preset lsj crops to a fixed size; set crop_size (e.g. 512)")
        w = self.copy_paste_class_weights
        if w is not None and (len(w) == 0 or sum(w) <= 0):
            raise ConfigError(f"{prefix}copy_paste_class_weights: needs one weight per class, not all zero, got {list(w)}")


@dataclass
class DataConfig:
    """Where the images come from and how they are split and augmented."""

    root: str | None = None
    """Dataset folder in the hw3 layout (``train/``, ``test_release/``); None: the built-in synthetic dataset."""
    synth_train: AtLeast1 = 40
    """Synthetic dataset: number of training images (used when ``root`` is None)."""
    synth_test: AtLeast0 = 8
    """Synthetic dataset: number of test images."""
    synth_seed: AtLeast0 = 0
    """Synthetic dataset: random seed."""
    synth_max_size: Annotated[int, Range(16, 8192)] | None = None
    """Synthetic dataset: cap on the image side (None: realistic sizes up to about 1200 px)."""
    synth_classes: Annotated[int, Range(1, 12)] = 4
    """Synthetic dataset: classes of cells (4 imitates the hw3 data; the first two common, the rest rare)."""
    val_fraction: Annotated[float, Range(0.0, 1.0, hi_open=True)] = 0.1
    """Fraction of the training images held out for validation."""
    split_seed: AtLeast0 = 0
    """Seed of the train/validation split."""
    holdout_fraction: Annotated[float, Range(0.0, 1.0, hi_open=True)] = 0.0
    """Fraction of the training images held out as a second split, never trained on nor used to choose the epoch: scored once at the chosen (best) epoch, with its interval (holdout_gt.json, holdout_predictions.json, ``holdout_ap50`` in metrics.json). The validation split stays the same images; 0: none."""
    cache: bool = True
    """Keep decoded images and label maps in memory so an epoch does not decode the tifs again."""
    num_workers: AtLeast0 = 0
    """DataLoader worker processes."""
    intensity: Literal["dtype", "percentile", "fixed"] = "dtype"
    """How image values become the model's [0, 1] input, in training and prediction alike (the checkpoint keeps it, so ``cellkit segment`` reads images as training did): dtype: divided by the dtype's full range (uint8 / 255, uint16 / 65535; the hw3 data); percentile: each image's ``intensity_percentiles`` (over all its pixels and channels) map to 0 and 1, clipped (16-bit microscopy that fills only part of the range); fixed: ``intensity_range`` maps to 0 and 1 for every image, clipped."""
    intensity_percentiles: tuple[Annotated[float, Range(0.0, 100.0)], Annotated[float, Range(0.0, 100.0)]] = (1.0, 99.8)
    """``intensity: percentile``: the low and high percentile of each image that become 0 and 1."""
    intensity_range: tuple[NonNegative, NonNegative] | None = None
    """``intensity: fixed``: the raw values (e.g. ``[100, 4095]`` for a 12-bit camera) that become 0 and 1."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def _validate(self, prefix: str) -> None:
        if self.val_fraction + self.holdout_fraction >= 1:
            raise ConfigError(f"{prefix}holdout_fraction: with val_fraction {self.val_fraction:g} nothing is left to "
                              f"train on; val_fraction + holdout_fraction must be below 1, got {self.holdout_fraction:g}")
        lo, hi = self.intensity_percentiles
        if not lo < hi:
            raise ConfigError(f"{prefix}intensity_percentiles: the low percentile must be below the high one, got [{lo:g}, {hi:g}]")
        if self.intensity == "fixed":
            if self.intensity_range is None:
                raise ConfigError(f"{prefix}intensity_range: intensity fixed needs the raw values that become 0 and 1, "
                                  f"e.g. [0, 4095]")
            if not self.intensity_range[0] < self.intensity_range[1]:
                raise ConfigError(f"{prefix}intensity_range: the low value must be below the high one, "
                                  f"got {list(self.intensity_range)}")


@dataclass
class ModelConfig:
    """Mask R-CNN: backbone, weights and the detection knobs (all verified to reach the model)."""

    backbone: str = "resnet50"
    """Backbone name from the registry (``cellkit models`` lists them)."""
    weights: str = "none"
    """``none``, ``imagenet`` (backbone), ``coco`` (whole Mask R-CNN where available) or a path to a .pth file."""
    num_classes: AtLeast1 | None = None
    """Cell classes, without background (the predictors get num_classes + 1 outputs); None: from the data (the highest ``classK.tif`` in ``train/``), read when training starts and stored in the run's config.yaml and checkpoints."""
    trainable_layers: AtLeast0 | None = None
    """Backbone stages that train, counted from the output end as in torchvision (0-5; 0-6 for mobilenet); None: 3 with pretrained weights, all from scratch."""
    norm: Literal["auto", "frozen_bn", "bn", "gn"] = "auto"
    """Backbone normalisation; auto: frozen BatchNorm with pretrained weights (BatchNorm for the v2 design and from scratch)."""
    resize_mode: Literal["min_size", "fixed_scale"] = "min_size"
    """min_size: shorter side to ``min_size`` (torchvision); fixed_scale: every image scaled by ``scale``; both capped by ``max_size``."""
    scale: Annotated[float, Range(0.0, 16.0, lo_open=True)] | Literal["auto"] = 1.0
    """Resize factor of ``resize_mode: fixed_scale`` (1.0: native resolution, 2.0: cells twice as large); auto: ``target_cell_diameter`` / the median equivalent diameter of the training cells, measured when training starts (implies fixed_scale; the run's config.yaml and checkpoints store the number, so prediction and tiling use it)."""
    target_cell_diameter: Positive = 30.0
    """Median cell diameter in px that ``scale: auto`` scales the images to (Cellpose rescales to 30 px)."""
    max_cell_diameter: Annotated[float, Range(0.0, 8192.0, lo_open=True)] | None = None
    """The largest cell the model expects, in the model's input pixels (the training images' pixels times ``scale`` for fixed_scale; the training images' pixels for min_size): the 99.5th percentile of the training cells' longer box side. None: measured when training starts (``cellkit.analysis.scale``; the run's config.yaml and checkpoints store the number); ``predict.tile_overlap: auto`` overlaps tiles by it."""
    min_size: ImageSide = 800
    """Shorter image side after resizing in ``resize_mode: min_size`` (torchvision's GeneralizedRCNNTransform)."""
    max_size: ImageSide = 1333
    """Cap on the longer image side after resizing (both resize modes)."""
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean the model subtracts from [0, 1] RGB input (do not normalise again outside)."""
    image_std: tuple[Positive, Positive, Positive] = (0.229, 0.224, 0.225)
    """Per-channel standard deviation the model divides by."""
    anchor_sizes: tuple[ImageSide, ...] = (8, 16, 32, 64, 128)
    """One anchor size in input pixels per FPN level, finest first (5 levels for the FPN backbones); a single-level backbone (resnet101_dc5) puts every size on its one map."""
    aspect_ratios: tuple[Positive, ...] = (0.5, 1.0, 2.0)
    """Anchor height/width ratios, the same at every level (3 keeps the COCO RPN head loadable)."""
    rpn_pre_nms_top_n_train: Count = 2000
    """RPN proposals kept per FPN level before NMS, training."""
    rpn_pre_nms_top_n_test: Count = 1000
    """RPN proposals kept per FPN level before NMS, inference."""
    rpn_post_nms_top_n_train: Count = 2000
    """RPN proposals kept per image after NMS, training."""
    rpn_post_nms_top_n_test: Count = 1000
    """RPN proposals kept per image after NMS, inference (an upper bound on detections)."""
    rpn_nms_thresh: UnitOpen0 = 0.7
    """IoU threshold of the RPN's NMS."""
    rpn_batch_size_per_image: Count = 256
    """Anchors sampled per image for the RPN losses."""
    box_batch_size_per_image: Count = 512
    """RoIs sampled per image for the box and mask heads during training."""
    box_detections_per_img: Annotated[int, Range(1, 10_000)] = 1000
    """Detections returned per image (images hold up to about 660 cells)."""
    box_score_thresh: Unit = 0.0
    """Detections scoring below this are dropped by the model (0.0 for evaluation: AP needs the low scores)."""
    box_nms_thresh: UnitOpen0 = 0.5
    """IoU threshold of the class-wise box NMS on detections."""
    box_positive_fraction: UnitOpen0 = 0.25
    """Fraction of the sampled RoIs that are positives (the mask head trains on the positives only)."""
    fpn_channels: Width | None = None
    """Channels of the FPN outputs, and so of the RPN head and RoI features (None: the backbone's 256; fewer is cheaper, and COCO weights then fit only the backbone body)."""
    box_head_dim: Annotated[int, Range(1, 16384)] = 1024
    """Width of the box head's fully connected layers (torchvision: 1024)."""
    mask_head_layers: Annotated[int, Range(1, 64)] = 4
    """3x3 convolutions of the mask head before its upsampling (torchvision: 4)."""
    mask_head_channels: Width = 256
    """Channels of the mask head's convolutions and upsampling (torchvision: 256); the mask head is most of a training step's FLOPs on crowded images."""
    mask_roi_size: Literal[14, 28] = 14
    """RoIAlign output of the mask head: 14 gives 28x28 masks, 28 gives 56x56 masks."""
    mask_loss: Literal["bce", "bce+dice"] = "bce"
    """Mask loss: torchvision's per-pixel BCE, or BCE plus a soft Dice term (``loss_mask_dice``)."""
    dice_weight: NonNegative = 1.0
    """Weight of the Dice term when ``mask_loss`` is ``bce+dice``."""
    mask_geometry: Literal["exact", "torchvision"] = "exact"
    """Mask targets and paste: exact (RoIAlign aligned=True targets, paste at pixel centres, no extra pixel) or torchvision's (aligned=False targets, paste one pixel wider); training and prediction alike."""
    roi_head: Literal["standard", "cascade"] = "standard"
    """RoI box head: standard (one Fast R-CNN stage) or cascade (Cascade Mask R-CNN: ``cascade_iou_thresholds`` stages of class-agnostic box refinement, scores averaged over stages, masks on the last stage's boxes; ``cellkit.models.cascade``)."""
    cascade_iou_thresholds: tuple[UnitOpen0, ...] = (0.5, 0.6, 0.7)
    """Cascade: the foreground IoU threshold of each stage (one entry per stage, rising)."""
    cascade_stage_weights: tuple[NonNegative, ...] = (1.0, 0.5, 0.25)
    """Cascade: factor of each stage's box losses (``loss_classifier_stageK``, ``loss_box_reg_stageK``)."""
    cascade_box_coder_weights: tuple[tuple[Positive, Positive, Positive, Positive], ...] = (
        (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
    """Cascade: box-coder weights (wx, wy, ww, wh) of each stage (larger: finer regression targets for the later stages)."""


_HOOK_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
"""``package.module:ClassName``: what ``train.hooks`` entries look like."""


@dataclass
class TrainConfig:
    """Optimiser, schedule and the training loop."""

    epochs: AtLeast1 = 12
    batch_size: Annotated[int, Range(1, 1024)] = 2
    iters_per_epoch: AtLeast1 | None = None
    """Cap on optimiser steps per epoch (None: one pass over the training split)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """AdamW or SGD with momentum, with torch's fused step where the parameters are on the CPU or a
    CUDA device (:func:`cellkit.engine.schedule.build_optimizer`)."""
    lr: Positive = 1e-4
    momentum: Annotated[float, Range(0.0, 1.0, hi_open=True)] = 0.9
    weight_decay: NonNegative = 1e-4
    scheduler: Literal["constant", "multistep", "cosine", "plateau"] = "constant"
    milestones: tuple[UnitOpen0, ...] = (0.8, 0.9)
    """MultiStepLR milestones as fractions of the total epochs."""
    gamma: Positive = 0.1
    """MultiStepLR decay factor."""
    plateau_factor: Annotated[float, Range(0.0, 1.0, lo_open=True, hi_open=True)] = 0.2
    plateau_patience: AtLeast0 = 30
    """ReduceLROnPlateau on validation AP50: epochs without improvement before a decay."""
    min_lr: NonNegative = 0.0
    warmup_epochs: AtLeast0 = 0
    """Epochs at ``warmup_factor * lr`` before the schedule starts."""
    warmup_iters: AtLeast0 = 0
    """Iterations of linear warm-up from ``warmup_factor * lr`` (an alternative to warmup_epochs)."""
    warmup_factor: UnitOpen0 = 0.1
    early_stop_decays: AtLeast1 | None = None
    """Stop after this many learning-rate decays without a new best validation AP50."""
    early_stop_patience: AtLeast1 | None = None
    """Stop after this many epochs without a new best validation AP50."""
    amp: Literal["auto", "off", "fp16", "bf16"] = "auto"
    """Mixed precision on CUDA (auto: fp16 with GradScaler); always off on CPU."""
    channels_last: bool = False
    grad_clip: Positive | None = None
    """Clip the global gradient norm to this value."""
    accumulate: AtLeast1 = 1
    """Gradient accumulation: batches per optimiser step."""
    max_nonfinite: AtLeast1 = 5
    """Stop the run after this many non-finite losses in a row."""
    sampler: Literal["random", "repeat_factor"] = "random"
    repeat_threshold: UnitOpen0 = 0.3
    """Repeat-factor sampling (LVIS): images with a class seen in fewer than this fraction of images are repeated."""
    eval_every: AtLeast0 = 1
    """Validate every this many epochs and after the last one (0: never validate)."""
    checkpoint_every: AtLeast1 = 1
    """Write ``checkpoints/last.pth`` (what ``--resume`` continues from) every this many epochs,
    after the last one and when the run stops early; a run killed in between loses at most this
    many epochs."""
    hooks: tuple[str, ...] = ()
    """Extra trainer hooks as import paths ``module:Class`` (appended to the defaults; see ``cellkit.engine.hooks``)."""
    ema_decay: Annotated[float, Range(0.0, 1.0, hi_open=True)] | None = None
    """Exponential moving average of the weights (``cellkit.engine.ema``, timm's ModelEmaV3), updated after every optimiser step; validation and best.pth use the averaged weights (None: off; e.g. 0.999)."""
    ema_warmup: bool = True
    """Warm up the EMA decay: step t uses min(ema_decay, 1 - (1 + t) ** -ema_warmup_power), so early weights fade fast."""
    ema_warmup_power: Positive = 0.75
    """Exponent of the EMA decay warm-up (timm's; 3/4 for short runs, 2/3 for long ones)."""
    ema_buffers: Literal["copy", "average"] = "copy"
    """EMA of buffers (BatchNorm running statistics): copy the training model's (default) or average them like weights."""
    tensorboard: bool = True
    """Write TensorBoard event files into the run directory (``tensorboard --logdir RUN_OR_GRID_DIR``)."""
    tensorboard_images: AtLeast0 = 2
    """Validation images drawn with their predictions into TensorBoard at every evaluation (0: none)."""
    seed: AtLeast0 = 0
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` ..."""

    def _validate(self, prefix: str) -> None:
        for i, path in enumerate(self.hooks):
            if not _HOOK_PATH.match(path):
                raise ConfigError(f"{prefix}hooks[{i}]: {short(path)} is not an import path 'package.module:ClassName' "
                                  "(e.g. 'myhooks:PrintLR')")


@dataclass
class EvalConfig:
    """COCO evaluation of segmentation masks."""

    max_dets: Count = 1000
    """Detections kept per image by COCOeval (pycocotools' default of 100 lowers AP on crowded images)."""
    backend: Literal["auto", "pycocotools", "faster_coco_eval"] = "auto"
    """COCOeval implementation; auto: faster-coco-eval when installed (same numbers, ~15x faster), else pycocotools."""
    iou_threshold: UnitOpen0 = 0.5
    """IoU of the cell-tool metrics (precision, recall, F1, TP/(TP+FP+FN))."""
    bootstrap: Annotated[int, Range(0, 100_000)] = 1000
    """Bootstrap draws of the images for the 95 % intervals of AP50, AP and AP75 (reports, validation, comparisons; ``cellkit.evaluation.bootstrap``); 0: no intervals."""
    bootstrap_seed: AtLeast0 = 0
    """Seed of the bootstrap draws (the same seed, images and predictions give the same interval)."""


@dataclass
class PredictConfig:
    """Inference, post-processing and submission."""

    score_thresh: Unit = 0.0
    """Detections scoring below this are dropped."""
    mask_thresh: Unit = 0.5
    """Mask probability at or above which a pixel belongs to the cell."""
    nms_thresh: UnitOpen0 | None = None
    """Extra class-wise mask NMS after the model's own box NMS (None: off)."""
    tta: bool = False
    tta_flips: tuple[Literal["h", "v", "hv", "vh"], ...] = ("h", "v")
    tta_scales: tuple[ScaleFactor, ...] = (1.0,)
    tta_merge: Literal["nms", "wbf"] = "wbf"
    tta_iou: UnitOpen0 = 0.5
    tile_size: ImageSide | None = 1024
    """Images whose longer side exceeds ``tile_above`` are predicted in tiles of at most this size (None: never tile); a fixed_scale model takes at most ``model.max_size / model.scale`` px, and its tiles shrink evenly to the fewest that cover the image (``cellkit.inference.tiling``)."""
    tile_overlap: AtLeast0 | Literal["auto"] = "auto"
    """Overlap of neighbouring tiles in image pixels (less than the tiles); auto: the largest cell the model expects (``model.max_cell_diameter`` / ``model.scale``; 128 px for a checkpoint without it)."""
    tile_above: AtLeast1 = 1400
    tile_batch: Annotated[int, Range(1, 256)] = 1
    """Tiles of one image per forward pass (a batch that cannot fit in memory is refused before the work)."""
    batch_size: Annotated[int, Range(1, 256)] = 1
    """Untiled images per forward pass."""
    channels_last: bool = True
    """Hold the model's weights in the channels_last memory format while predicting (oneDNN's faster CPU convolutions, the same detections to float rounding; docs/benchmarks.md)."""
    min_kept: Unit = 0.5
    """``cellkit segment``: a pixel two cells claim goes to the higher score (label maps hold one cell per pixel); a cell left with less than this fraction of its own mask is dropped as a duplicate."""

    def _validate(self, prefix: str) -> None:
        if self.tile_size is not None and self.tile_overlap != "auto" and self.tile_overlap >= self.tile_size:
            raise ConfigError(f"{prefix}tile_overlap: must be less than {prefix}tile_size ({self.tile_size}), got {self.tile_overlap}")


@dataclass
class Config:
    """Everything a cellkit job needs; see the module docstring for how it is built."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    # -- conversions ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) that YAML and JSON can hold."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The resolved config as YAML text (every key, defaults included)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the resolved config as YAML (every key, defaults included). A run directory's
        ``config.yaml`` is written atomically by the trainer (``cellkit.outputs.write_atomic``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.0001, ...}``: every leaf under its dotted key."""
        out: dict[str, Any] = {}

        def walk(prefix: str, d: Mapping[str, Any]) -> None:
            for k, v in d.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict):
                    walk(key + ".", v)
                else:
                    out[key] = v

        walk("", self.to_dict())
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        """Rebuild from :meth:`to_dict` output (e.g. the config stored in a checkpoint), validated."""
        return _build(dict(data), [])

    def replace(self, overrides: Mapping[str, Any]) -> "Config":
        """A copy with dotted-key overrides applied (validated like every other source)."""
        return _build(self.to_dict(), [overrides])

    def validate(self) -> "Config":
        """Check every key again (types and ranges), e.g. after changing fields by hand; returns self.

        Raises:
            ConfigError: the first invalid key, named.
        """
        validate_section(self)
        return self


def validate_section(section: Any, prefix: str | None = None) -> None:
    """Check a config object or one of its sections (``cfg.model``, ``cfg.train`` ...) built by
    hand: every field against its type and valid range, as :func:`load_config` does.

    Args:
        prefix: the section's dotted key, e.g. ``"model"`` (default: found from its class).

    Raises:
        ConfigError: the first invalid value, naming its key (``model.num_classes: must be at least 1, got 0``).
    """
    if prefix is None:
        prefix = _SECTION_KEYS.get(type(section), "")
    _construct(type(section), _plain(dataclasses.asdict(section)), f"{prefix}." if prefix else "")


_SECTION_KEYS: dict[type, str] = {
    DataConfig: "data", AugmentConfig: "data.augment", ModelConfig: "model", TrainConfig: "train",
    EvalConfig: "eval", PredictConfig: "predict",
}


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# --------------------------------------------------------------------------------------------
# loading


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration: defaults, then the YAML file at ``path``, then ``overrides``.

    Args:
        path: a YAML file (may hold ``_base_: other.yaml``, relative to itself), a recipe name from
            the package's recipes (``cellkit/recipes``, linked as ``configs/`` in the repository:
            ``"demo"``, ``"ablation/resnet50_cbam"``), or
            None for the defaults.
        overrides: dotted keys to values, e.g. ``{"train.lr": 1e-3}``; ``train__lr`` works too
            (papermill parameter names). String values are parsed as YAML (``"1e-3"`` -> 0.001).

    Raises:
        ConfigError: unknown key (with a suggestion), wrong type, invalid choice, unreadable or
            hostile file (:mod:`cellkit.documents`); a bad value of the file names the file too.
    """
    source = resolve_config_path(path) if path is not None else None
    data = _read_yaml_tree(source) if source is not None else {}
    try:
        return _build(data, [overrides or {}])
    except ConfigError as e:
        if source is None or not _fails_alone(data, e):
            raise
        raise ConfigError(f"{source}: {e}") from None


def _fails_alone(tree: Mapping[str, Any], error: ConfigError) -> bool:
    """Whether the file's own keys give ``error`` (so the message should name the file), rather
    than an override."""
    try:
        _build(tree, [])
    except ConfigError as e:
        return str(e) == str(error)
    return False




def resolve_config_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it exists, else the recipe ``<path>.yaml`` of that name (:data:`RECIPES`).

    Raises:
        ConfigError: neither exists (with the nearest recipe name), or ``path`` is a folder.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    recipe = RECIPES / (str(path) if str(path).endswith((".yaml", ".yml")) else f"{path}.yaml")
    if recipe.is_file():
        return recipe
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder, not a config file; --config takes a YAML file or a recipe name")
    names = sorted(str(q.relative_to(RECIPES).with_suffix("")) for q in RECIPES.rglob("*.yaml")
                   if q.parent.name != "grids") if RECIPES.is_dir() else []
    close = difflib.get_close_matches(str(path), names, n=1)
    hint = f"; did you mean recipe '{close[0]}'?" if close else ""
    raise ConfigError(f"{p}: config file not found (nor a recipe of that name in {RECIPES}){hint}")


def parse_set_args(items: list[str] | None) -> dict[str, Any]:
    """Turn CLI ``--set a.b=c`` items into an overrides dict (values stay strings, parsed later)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {short(item)}: expected KEY=VALUE, e.g. --set train.lr=0.001")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def _read_yaml_tree(path: Path, seen: tuple[Path, ...] = (), referrer: Path | None = None) -> dict[str, Any]:
    """The YAML file at ``path`` merged over its ``_base_`` chain (``referrer``: the file whose
    ``_base_`` names ``path``, for the messages)."""
    path = path.expanduser()
    via = f" (the _base_ of {referrer})" if referrer is not None else ""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file{via}; _base_ and --config name a YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found{via}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: _base_ chain loops back to itself{via}")
    try:
        data = read_yaml(path, "config file") or {}
    except DataError as e:  # unreadable, not YAML, a duplicate key, a limit of cellkit.documents
        raise ConfigError(f"{e}{via}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: _base_ must name a YAML file (relative to this one), got {short(base)}")
    base_data = _read_yaml_tree((path.parent / base), seen + (path.resolve(),), path)
    return _deep_merge(base_data, data)


def _deep_merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _build(tree: Mapping[str, Any], override_sets: list[Mapping[str, Any]]) -> Config:
    tree = dict(tree)
    for overrides in override_sets:
        for raw_key, value in overrides.items():
            key = str(raw_key).replace("__", ".")
            if isinstance(value, str):
                value = _parse_scalar(value, key)
            tree = _deep_merge(tree, _nest(key.split("."), value))
    return _construct(Config, tree, "")


def _parse_scalar(text: str, key: str) -> Any:
    """A ``--set`` value as YAML (within :mod:`cellkit.documents`' limits); text that is not YAML
    stays a string (and is judged by the key's type)."""
    if not text.strip():
        return text
    try:
        return loads_yaml(text, f"--set {cut(key, 80)}")
    except NotParsable:
        return text
    except DataError as e:  # a limit (alias bomb, huge integer) or a duplicate key
        raise ConfigError(str(e)) from None


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    d: Any = value
    for p in reversed(parts):
        d = {p: d}
    return d


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key (leaves and sections) of a config class."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], key + "."))
    return keys


def _unknown_key_error(cls: type, prefix: str, name: str) -> ConfigError:
    here = [f.name for f in dataclasses.fields(cls)]
    name = cut(name, 80)  # a hostile key of a million characters: neither difflib nor the message needs it all
    full = prefix + name
    close = difflib.get_close_matches(name, here, n=1, cutoff=0.5)
    suggestion = prefix + close[0] if close else None
    if suggestion is None:
        # the key may belong to another section (e.g. "lr" given under model)
        candidates = all_keys()
        leaf = difflib.get_close_matches(name, [k.rsplit(".", 1)[-1] for k in candidates], n=1, cutoff=0.8)
        if leaf:
            suggestion = next(k for k in candidates if k.rsplit(".", 1)[-1] == leaf[0])
        else:
            close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.6)
            suggestion = close[0] if close else None
    hint = f"; did you mean '{suggestion}'?" if suggestion else f"; valid keys here: {', '.join(here)}"
    return ConfigError(f"unknown config key '{full}'{hint}")


def _construct(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping of keys, got {short(data)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise _unknown_key_error(cls, prefix, str(k))
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    obj = cls(**kwargs)
    check = getattr(obj, "_validate", None)
    if check is not None:  # checks between fields of one section
        check(prefix)
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _construct(tp, value, key + ".")
    if origin is Annotated:
        inner = _coerce(args[0], value, key)
        for rule in tp.__metadata__:
            if isinstance(rule, Range) and not rule.contains(inner):
                raise ConfigError(f"{key}: must be {rule.describe()}, got {short(inner)}")
        return inner
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {short(value)} does not fit {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(short(value, 200), [str(a) for a in args], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key}: {short(value)} is not one of {', '.join(map(str, args))}{hint}")
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {short(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({short(value)})")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {short(value)}")
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {short(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {short(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {short(value)}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this module


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
