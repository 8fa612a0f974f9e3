"""Shared fixtures: the real sample image and small synthetic datasets."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
FIXTURE = TESTS / "data" / "hw3-sample"
REPO = TESTS.parent


def pytest_configure(config: pytest.Config) -> None:
    # generated datasets go to a throw-away cache, bars stay quiet, torch uses the 2 cores CI has
    cache = Path(os.environ.get("PYTEST_CELLKIT_CACHE", "/tmp/cellkit-test-cache"))
    os.environ.setdefault("CELLKIT_CACHE", str(cache))
    os.environ.setdefault("CELLKIT_PROGRESS", "0")
    os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def fixture_root() -> Path:
    """The real hw3 sample (one image, classes 1 and 2), read-only."""
    return FIXTURE


@pytest.fixture
def fixture_copy(tmp_path: Path) -> Path:
    """A writable copy of the real sample, to break on purpose."""
    dst = tmp_path / "hw3"
    shutil.copytree(FIXTURE, dst)
    return dst


@pytest.fixture(scope="session")
def real_gt() -> dict:
    """COCO ground truth of the real sample: one 397 x 482 image, 2 class-1 and 159 class-2 cells."""
    from cellkit.data import build_coco, scan_train

    return build_coco(scan_train(FIXTURE), progress=False)


@pytest.fixture(scope="session")
def synth_gt(synth_root: Path) -> dict:
    """COCO ground truth of the 8 synthetic training images of ``synth_root``."""
    from cellkit.data import build_coco, scan_train

    return build_coco(scan_train(synth_root), progress=False)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset: 8 training and 3 test images of at most 192 px."""
    from cellkit.data.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth"), n_train=8, n_test=3, seed=3, max_size=192, progress=False)


@pytest.fixture(scope="module")
def two_threads():
    """torch on 2 threads (CI's cores) for a module of model tests, whatever the machine has;
    a module opts in with ``pytestmark = pytest.mark.usefixtures("two_threads")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
