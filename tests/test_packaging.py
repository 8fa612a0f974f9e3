"""The wheel: ``pip install .`` (not editable) into a fresh virtual environment ships the recipes,
the grids and the notebooks, and the console script works from another directory."""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_with_recipes_and_notebooks(tmp_path: Path) -> None:
    src = tmp_path / "src"  # build from a copy: the checkout stays free of build/ and egg-info
    shutil.copytree(REPO / "cellkit", src / "cellkit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next(wheels.glob("cellkit-*.whl"))

    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    py = env / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # dependencies come from this environment's site-packages (a plain path: its .pth files, such as
    # the editable install's, are not run, so the only cellkit there is the wheel's)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cellkit = str(env / "bin" / "cellkit")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([cellkit, *args], cwd=elsewhere, capture_output=True, text=True, timeout=300)

    where = subprocess.run([str(py), "-c", "import cellkit, cellkit.resources as r; print(cellkit.__file__); "
                            "print(r.RECIPES); print(r.TRAINING_NOTEBOOK.is_file())"],
                           cwd=elsewhere, capture_output=True, text=True, check=True).stdout.split()
    assert where[0].startswith(str(site)) and where[1].startswith(str(site)) and where[2] == "True"
    r = run("config", "--config", "demo")
    assert r.returncode == 0, r.stderr
    assert "name: demo" in r.stdout and "backbone: resnet18" in r.stdout
    r = run("models")
    assert r.returncode == 0, r.stderr
    assert "resnet18" in r.stdout and "trainable (M)" in r.stdout
    r = run("ablate", "tiny", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "(MISSING)" not in r.stdout and str(site) in r.stdout  # the grid's notebook is the wheel's
    assert (site / "cellkit" / "py.typed").is_file()
