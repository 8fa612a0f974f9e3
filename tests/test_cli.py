"""The command line: help, synth and convert on fresh folders, clear errors without tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cellkit.cli import main


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cellkit", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_help_lists_subcommands() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("synth", "convert", "stats", "config", "demo"):
        assert cmd in r.stdout


@pytest.mark.slow
def test_synth_then_convert(tmp_path: Path) -> None:
    r = run_cli("synth", "--out", str(tmp_path / "ds"), "--train", "4", "--test", "2", "--seed", "1", "--max-size", "128")
    assert r.returncode == 0, r.stderr
    r = run_cli("convert", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "coco"), "--val-fraction", "0.25")
    assert r.returncode == 0, r.stderr
    train = json.loads((tmp_path / "coco/train_gt.json").read_text())
    val = json.loads((tmp_path / "coco/val_gt.json").read_text())
    assert len(train["images"]) == 3 and len(val["images"]) == 1
    assert "instances" in r.stdout


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("truncate", "image.tif: TIFF has no image pages"),
        ("shape", "class2.tif: label map is 10 x 10"),
        ("no_image", "image folder has no image.tif"),
        ("empty", "no image folders found"),
    ],
)
@pytest.mark.slow
def test_bad_input_exits_non_zero_with_the_file_named(fixture_copy: Path, tmp_path: Path, breakage: str, message: str) -> None:
    import numpy as np
    import tifffile

    sample = fixture_copy / "train/sample-0001"
    if breakage == "truncate":
        data = (sample / "image.tif").read_bytes()
        (sample / "image.tif").write_bytes(data[: len(data) // 2])
    elif breakage == "shape":
        tifffile.imwrite(sample / "class2.tif", np.ones((10, 10)))
    elif breakage == "no_image":
        (sample / "image.tif").unlink()
    else:
        for p in sample.iterdir():
            p.unlink()
        sample.rmdir()
    r = run_cli("convert", "--data", str(fixture_copy), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "train_gt.json").exists()


def test_config_command_and_unknown_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "train.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    assert main(["config", "--set", "train.lrr=0.5"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err


def test_stats_json(fixture_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--data", str(fixture_root), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["instances"] == 161 and d["classes"]["class2"]["instances"] == 159
