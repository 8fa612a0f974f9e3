"""The whole predictor as one file that runs without cellkit: ONNX (onnxruntime) or TorchScript.

:class:`Predictor` wraps a checkpoint's Mask R-CNN from the [0, 1] image to full-size masks:
normalisation and the model's resize (``model.scale`` / ``min_size``, computed from the input's
shape inside the graph, so any image size works), backbone, RPN, RoI heads, boxes mapped back to
the image, ``predict.score_thresh`` (exported in the box stage, before the mask head), and the
masks pasted into the image in the geometry the model was trained in (``model.mask_geometry``).
The file records what a user needs to feed it and read it (ONNX ``metadata_props``, TorchScript
``extra_files['cellkit.json']``): classes, scale and resize mode, thresholds, the intensity
mapping of the input, the mask geometry.

Exported with the TorchScript-based ONNX exporter (``dynamo=False``, opset 17), which follows
torchvision's detection models' tracing paths. Tracing records one path through Python
branches, so two places are made branch-free here: the box rescale uses shape tensors (not
``torch.tensor`` of sizes, which tracing freezes) and the paste always sees at least one mask (a
zero dummy, dropped after), else an example without detections would freeze "no masks" into
the graph.

Limits: one image per call; masks are ``(N, 1, H, W)`` float32 (N x H x W floats: thousands of
cells on a large image need tiles, which ``cellkit segment`` does and the exported file does not);
no test-time augmentation.
"""
from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import Tensor, nn
from torch.onnx import operators
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image

from .. import __version__
from ..config import Config
from ..data.intensity import Intensity
from ..data.synth import synth_image
from ..errors import DataError
from ..outputs import check_writable_file, replacing
from ..structures.mask_geometry import mask_geometry_of, paste_masks
from .predict import score_floor
from .segment import load_segmenter

ExportFormat = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
OUTPUTS = ("boxes", "labels", "scores", "masks")
PathLike = str | os.PathLike[str]


class Predictor(nn.Module):
    """A Mask R-CNN from image to pasted masks, traceable for export.

    ``forward(image)``: ``image`` ``(3, H, W)`` float32 RGB in [0, 1] (mapped as
    ``data.intensity`` says). Returns ``boxes`` ``(N, 4)`` float32 xyxy in image pixels,
    ``labels`` ``(N,)`` int64 1..K, ``scores`` ``(N,)`` float32 (>= ``score_thresh``, descending
    per class as the model orders them) and ``masks`` ``(N, 1, H, W)`` float32 probabilities (a
    pixel belongs to the cell where ``> mask_thresh``).
    """

    def __init__(self, model: nn.Module, score_thresh: float) -> None:
        super().__init__()
        self.model = model.eval()
        self.score_thresh = float(score_thresh)
        self.geometry = mask_geometry_of(model)

    def resize_factor(self, hw: Tensor) -> Tensor:
        """The model transform's resize factor of an image of size ``hw`` (a float tensor [H, W])."""
        t = self.model.transform
        # tensor / tensor: ``float / tensor`` is computed as ``float * (1 / tensor)``, one rounding more
        cap = hw.new_tensor(float(t.max_size)) / hw.max()
        if getattr(t, "resize_mode", "min_size") == "fixed_scale":
            return torch.clamp(cap, max=float(t.scale))
        return torch.minimum(hw.new_tensor(float(t.min_size[-1])) / hw.min(), cap)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m = self.model
        height, width = image.shape[-2], image.shape[-1]
        hw = operators.shape_as_tensor(image)[-2:].to(torch.float32)
        x = m.transform.normalize(image)
        # float64 as the eager transform's Python floats: in float32, 397 * (320 / 397) floors to 319
        factor = self.resize_factor(hw.to(torch.float64))
        x = torch.nn.functional.interpolate(x[None], scale_factor=factor, mode="bilinear",  # type: ignore[arg-type]
                                            recompute_scale_factor=True, align_corners=False)[0]
        resized = operators.shape_as_tensor(x)[-2:]
        batch = ImageList(m.transform.batch_images([x], size_divisible=m.transform.size_divisible),
                          [(x.shape[-2], x.shape[-1])])
        features = m.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = m.rpn(batch, features)
        det = m.roi_heads(features, proposals, batch.image_sizes)[0][0]
        ratio = hw / resized.to(torch.float32)  # (original / resized) for y, x, as resize_boxes
        boxes = det["boxes"] * torch.stack([ratio[1], ratio[0], ratio[1], ratio[0]])
        keep = det["scores"] >= self.score_thresh
        boxes, labels, scores, masks = boxes[keep], det["labels"][keep], det["scores"][keep], det["masks"][keep]
        # a zero dummy keeps the paste on its N > 0 path whatever the example traced
        masks1 = torch.cat([masks, masks.new_zeros((1, *masks.shape[1:]))])
        boxes1 = torch.cat([boxes, boxes.new_zeros((1, 4))])
        if self.geometry == "exact":
            pasted = paste_masks(masks1, boxes1, height, width)  # type: ignore[arg-type]
        else:
            pasted = paste_masks_in_image(masks1, boxes1, (height, width))
        return boxes, labels, scores, pasted[:-1]


def export_metadata(cfg: Config, checkpoint: PathLike, fmt: str) -> dict[str, Any]:
    """What the exported file records about its model and how to use it."""
    num_classes = int(cfg.model.num_classes or 0)
    return {
        "producer": f"cellkit {__version__}", "format": fmt, "checkpoint": Path(checkpoint).name,
        "classes": [f"class{k}" for k in range(1, num_classes + 1)],
        "input": "image: float32 (3, H, W) RGB in [0, 1]; grey images repeated to 3 channels",
        "intensity": Intensity.from_config(cfg.data).describe(), "intensity_mode": cfg.data.intensity,
        "outputs": "boxes (N, 4) float32 xyxy pixels, labels (N,) int64 1..K, scores (N,) float32, "
                   "masks (N, 1, H, W) float32 probabilities",
        "score_thresh": cfg.predict.score_thresh, "mask_thresh": cfg.predict.mask_thresh,
        "resize_mode": cfg.model.resize_mode, "scale": cfg.model.scale, "min_size": cfg.model.min_size,
        "max_size": cfg.model.max_size, "mask_geometry": cfg.model.mask_geometry,
        "detections_per_image": cfg.model.box_detections_per_img,
    }


def example_image(size: int = 256, seed: int = 0) -> Tensor:
    """A synthetic stained-cell image ``(3, size, size)`` in [0, 1] to trace with (cells to detect)."""
    rng = np.random.default_rng(seed)
    rgb = synth_image(rng, size, size)[0][..., :3]
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).to(torch.float32) / 255.0


def export_model(checkpoint: PathLike, out: PathLike, fmt: ExportFormat = "onnx", overwrite: bool = False,
                 set_items: tuple[str, ...] | list[str] = (), example: Tensor | None = None,
                 use_thresholds: bool = True, opset: int = 17) -> Path:
    """Export a checkpoint's whole predictor (:class:`Predictor`) to ``out``.

    Args:
        fmt: ``onnx`` or ``torchscript``.
        overwrite: replace an existing ``out`` (otherwise it is an error).
        set_items: ``KEY=VALUE`` overrides (``predict.score_thresh=0.3`` ...); the run's tuned
            thresholds apply first, as for ``cellkit predict``.
        example: the ``(3, H, W)`` image to trace with (default :func:`example_image`).

    Returns:
        ``out``, written atomically (a temporary file beside it, renamed when complete).

    Raises:
        DataError: ``out`` exists without ``overwrite`` or cannot be written; a bad checkpoint.
    """
    if fmt not in FORMATS:
        raise DataError(out, f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = check_writable_file(out, "export file")
    if out.exists() and not overwrite:
        raise DataError(out, "already exists; pass --overwrite to replace it")
    model, cfg = load_segmenter(checkpoint, "cpu", set_items, use_thresholds)
    predictor = Predictor(model, cfg.predict.score_thresh).eval()
    meta = export_metadata(cfg, checkpoint, fmt)
    example = example_image() if example is None else example
    with replacing(out) as tmp:
        # the box stage drops what scores below the threshold, so the traced mask head runs on the kept boxes only
        with warnings.catch_warnings(), score_floor(model, cfg.predict.score_thresh):
            warnings.simplefilter("ignore")  # tracing warns at every Python branch of torchvision's detection code
            if fmt == "onnx":
                _export_onnx(predictor, example, tmp, meta, opset)
            else:
                with torch.no_grad():
                    traced = torch.jit.trace(predictor, (example,), check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={"cellkit.json": json.dumps(meta)})
    return out


def _export_onnx(predictor: Predictor, example: Tensor, path: Path, meta: dict[str, Any], opset: int) -> None:
    n = {0: "detections"}
    torch.onnx.export(
        predictor, (example,), str(path), dynamo=False, opset_version=opset, input_names=["image"],
        output_names=list(OUTPUTS),
        dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": n, "labels": n, "scores": n,
                      "masks": {0: "detections", 2: "height", 3: "width"}},
    )
    proto = onnx.load(str(path))
    for key, value in {"cellkit": json.dumps(meta), **{k: json.dumps(v) for k, v in meta.items()}}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def read_export_metadata(path: PathLike) -> dict[str, Any]:
    """The metadata an exported ONNX or TorchScript file records (:func:`export_metadata`).

    Raises:
        DataError: not a file cellkit exported.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".onnx":
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            return json.loads(props["cellkit"])
        with zipfile.ZipFile(path) as zf:  # a TorchScript file is a zip; its extra files sit in <name>/extra/
            name = next(n for n in zf.namelist() if n.endswith("/extra/cellkit.json"))
            return json.loads(zf.read(name))
    except Exception as e:  # onnx/torch raise many types for foreign files
        raise DataError(path, f"not a model exported by cellkit ({type(e).__name__}: {e})") from None
