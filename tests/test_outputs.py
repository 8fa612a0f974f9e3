"""cellkit.outputs: the one atomic writer every JSON file goes through."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import cellkit
from cellkit.errors import DataError
from cellkit.outputs import write_atomic, write_json


def test_write_json_round_trips_and_creates_folders(tmp_path: Path) -> None:
    path = write_json({"a": [1, 2.5], "b": None}, tmp_path / "x" / "y.json", indent=1)
    assert path == tmp_path / "x" / "y.json"
    assert json.loads(path.read_text()) == {"a": [1, 2.5], "b": None}
    assert path.read_text().startswith("{\n")  # indent reached json.dumps
    assert sorted(p.name for p in path.parent.iterdir()) == ["y.json"]


def test_a_value_json_cannot_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = write_json({"old": 1}, tmp_path / "r.json")
    with pytest.raises(TypeError):
        write_json({"new": object()}, path)
    with pytest.raises(ValueError):
        write_json({"new": math.nan}, path, allow_nan=False)
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    write_json({"new": object()}, path, default=lambda o: "obj")
    assert json.loads(path.read_text()) == {"new": "obj"}


def test_write_atomic_takes_text_and_bytes_and_cleans_up_on_error(tmp_path: Path) -> None:
    assert write_atomic(tmp_path / "t.txt", "héllo\n").read_text(encoding="utf-8") == "héllo\n"
    assert write_atomic(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="dir: cannot write"):  # a folder cannot be replaced by a file
        write_atomic(tmp_path / "dir", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "dir", "t.txt"]


def test_no_module_renames_files_into_place_by_hand() -> None:
    # every atomic file write goes through cellkit.outputs; only the checkpoint writer (streams
    # torch.save with an fsync) and the synthetic dataset (swaps whole folders) rename themselves
    allowed = {"outputs.py", "models/checkpoint.py", "data/synth.py"}
    root = Path(cellkit.__file__).parent
    offenders = [
        str(p.relative_to(root)) for p in root.rglob("*.py")
        if re.search(r"\bos\.(replace|rename)\(", p.read_text()) and str(p.relative_to(root)) not in allowed
    ]
    assert offenders == []
