"""``cellkit export``: the whole predictor (to full-size masks) as ONNX / TorchScript; onnxruntime
reproduces cellkit's own prediction on the real sample, at any image size; the files record what
they need; the README's snippet runs it without cellkit."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from pycocotools import mask as mask_utils

from cellkit.cli import main
from cellkit.config import load_config
from cellkit.data import image_to_tensor, read_image, scan_train
from cellkit.inference.export_model import Predictor, export_model, read_export_metadata
from cellkit.inference.predict import predict_image
from cellkit.inference.segment import load_segmenter
from cellkit.models.checkpoint import save_checkpoint
from cellkit.models.maskrcnn import build_model

pytestmark = [pytest.mark.usefixtures("torch_threads"), pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")]
REPO = Path(__file__).resolve().parents[1]


def fixture_tensor(fixture_root: Path) -> torch.Tensor:
    return image_to_tensor(read_image(scan_train(fixture_root)[0].image_path))


def assert_same_detections(out: list[np.ndarray], entries: list[dict], mask_thresh: float) -> None:
    """onnxruntime's (boxes, labels, scores, masks) against cellkit's COCO entries of the same image."""
    boxes, labels, scores, masks = out
    binary = masks[:, 0] > mask_thresh
    nonempty = binary.reshape(len(binary), -1).any(1)  # cellkit drops empty masks (counted)
    assert int(nonempty.sum()) == len(entries) > 0
    for b, lab, s, m, e in zip(boxes[nonempty], labels[nonempty], scores[nonempty], binary[nonempty], entries):
        assert int(lab) == e["category_id"]
        assert float(s) == pytest.approx(e["score"], abs=1e-4)
        assert [b[0], b[1], b[2] - b[0], b[3] - b[1]] == pytest.approx(e["bbox"], abs=2e-2)
        ref = mask_utils.decode(e["segmentation"]).astype(bool)
        assert (m & ref).sum() / (m | ref).sum() >= 0.99


def test_onnx_reproduces_cellkit_on_the_real_sample(tiny_run: Path, fixture_root: Path, tmp_path: Path) -> None:
    ckpt = tiny_run / "checkpoints" / "best.pth"
    path = export_model(ckpt, tmp_path / "model.onnx")
    model, cfg = load_segmenter(ckpt, "cpu")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = fixture_tensor(fixture_root)
    for crop in (image, image[:, 40:290, 100:433]):  # the trace saw a 256 x 256 synthetic image
        out = session.run(None, {"image": crop.numpy()})
        assert out[3].shape[2:] == crop.shape[1:]
        assert_same_detections(out, predict_image(model, crop, cfg.predict), cfg.predict.mask_thresh)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == ["class1", "class2", "class3", "class4"]
    assert json.loads(meta["scale"]) == cfg.model.scale and json.loads(meta["mask_thresh"]) == 0.5
    assert json.loads(meta["score_thresh"]) == cfg.predict.score_thresh
    assert read_export_metadata(path)["intensity"].startswith("dtype")
    # no detection at all is an answer, not an error
    empty = session.run(None, {"image": np.zeros((3, 64, 80), np.float32)})
    assert empty[0].shape[1:] == (4,) and empty[3].shape[1:] == (1, 64, 80)


def test_resizing_model_and_torchscript(fixture_root: Path, tmp_path: Path) -> None:
    """A min_size model resizes every image by its own factor, computed inside the graph; a
    TorchScript export gives the same detections as the module it traced."""
    cfg = load_config(None, {"model.backbone": "resnet18", "model.num_classes": 3, "model.min_size": 320,
                             "model.max_size": 512, "model.fpn_channels": 32, "model.box_head_dim": 256,
                             "model.mask_head_channels": 32, "model.box_detections_per_img": 40,
                             "model.rpn_post_nms_top_n_test": 100, "model.mask_geometry": "torchvision",
                             "predict.score_thresh": 0.0})
    torch.manual_seed(0)
    ckpt = save_checkpoint({"model": build_model(cfg).state_dict(), "config": cfg.to_dict()}, tmp_path / "r.pth")
    model, cfg = load_segmenter(ckpt, "cpu")
    onnx_path = export_model(ckpt, tmp_path / "r.onnx")
    ts_path = export_model(ckpt, tmp_path / "r.pt", "torchscript")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(ts_path))
    predictor = Predictor(model, 0.0)
    image = fixture_tensor(fixture_root)
    for crop in (image, image[:, :200, :300]):  # factors 320/397 and 320/200
        out = session.run(None, {"image": crop.numpy()})
        assert_same_detections(out, predict_image(model, crop, cfg.predict), cfg.predict.mask_thresh)
        with torch.inference_mode():
            want, got = predictor(crop), scripted(crop)
        for w, g in zip(want, got):
            assert torch.allclose(w.float(), g.float(), atol=1e-5)
    meta = read_export_metadata(ts_path)
    assert meta["classes"] == ["class1", "class2", "class3"] and meta["resize_mode"] == "min_size"


def test_export_command_and_its_errors(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tiny_run / "checkpoints" / "best.pth"
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--set", "predict.score_thresh=0.2"]) == 0
    assert "score_thresh 0.2" in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", "--checkpoint", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_readme_snippet_runs_without_cellkit(tiny_run: Path, fixture_root: Path, tmp_path: Path) -> None:
    """The README's onnxruntime example, run as it is in a fresh interpreter: it never imports cellkit."""
    export_model(tiny_run / "checkpoints" / "best.pth", tmp_path / "model.onnx")
    (tmp_path / "image.tif").write_bytes(scan_train(fixture_root)[0].image_path.read_bytes())
    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"```python\n(# without cellkit.*?)```", readme, re.S)
    assert snippet, "README lost its onnxruntime snippet"
    code = snippet.group(1) + "\nimport sys\nassert not [m for m in sys.modules if m.startswith('cellkit')]\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"\d+ cells", r.stdout)
