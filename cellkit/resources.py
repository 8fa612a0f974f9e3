"""What ships inside the package: the recipes (YAML configs, ablation grids) and the notebooks.

They are read through :mod:`importlib.resources`, so a checkout, an editable install and a wheel
(``pip install .``) find them the same way. In the repository, ``configs/`` and ``notebooks/`` are
links to ``cellkit/recipes/`` and ``cellkit/notebooks/``.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def package_path(*parts: str) -> Path:
    """A file or folder inside the installed ``cellkit`` package."""
    return Path(str(files("cellkit").joinpath(*parts)))


RECIPES = package_path("recipes")
"""The recipes (``demo.yaml``, ``leaderboard.yaml``, ``ablation/*.yaml`` ...), addressable by name."""
GRIDS = RECIPES / "grids"
"""The ablation grids (``cellkit ablate tiny`` finds ``grids/tiny.yaml``)."""
NOTEBOOKS = package_path("notebooks")
"""The four notebooks (``01_data_inspection.ipynb`` ... ``04_error_analysis.ipynb``)."""
TRAINING_NOTEBOOK = NOTEBOOKS / "02_training.ipynb"
"""The notebook every ablation run executes."""
