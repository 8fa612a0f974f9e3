"""Shared fixtures: the real sample image, small synthetic datasets, one tiny config and one
trained tiny run (session-scoped: the tests that read a finished run share it)."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from cellkit.config import Config, load_config

TESTS = Path(__file__).parent
FIXTURE = TESTS / "data" / "hw3-sample"
REPO = TESTS.parent
TORCH_THREADS = int(os.environ.get("OMP_NUM_THREADS") or 2)
"""torch's threads in a test that trains: CI's 2 cores, or 1 under ``make test`` (OMP_NUM_THREADS=1:
two pytest workers share the 2 cores, and threads of one fighting over a core cost more than they give)."""


@contextlib.contextmanager
def threads_as(n: int) -> Iterator[None]:
    """torch on ``n`` threads inside the block, and on as many as before after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pytest_configure(config: pytest.Config) -> None:
    # generated datasets go to a throw-away cache, bars stay quiet, torch uses the 2 cores CI has
    cache = Path(os.environ.get("PYTEST_CELLKIT_CACHE", "/tmp/cellkit-test-cache"))
    os.environ.setdefault("CELLKIT_CACHE", str(cache))
    os.environ.setdefault("CELLKIT_PROGRESS", "0")
    os.environ.setdefault("MPLBACKEND", "Agg")


LONGEST_FIRST = ("test_trainer.py", "test_benchmarks.py", "test_ablation.py", "test_notebooks.py", "test_segment.py",
                 "test_reliability.py", "test_predict.py", "test_models.py", "test_browser.py")
"""The test files that take longest under ``make test``, longest first (docs/benchmarks.md, "The
test suite"): they run before all others."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # pytest-xdist (--dist loadfile --no-loadscope-reorder) hands whole files to whichever worker
    # is free, in this order: the long files first, so that the short ones fill in at the end
    # instead of one worker running a long file alone while the other has nothing left
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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

    return build_coco(scan_train(FIXTURE), 4, progress=False)


@pytest.fixture(scope="session")
def synth_gt(synth_root: Path) -> dict:
    """COCO ground truth of the 8 synthetic training images of ``synth_root``."""
    from cellkit.data import build_coco, scan_train

    return build_coco(scan_train(synth_root), 4, progress=False)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset: 8 training and 3 test images of at most 192 px."""
    from cellkit.data.synth import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synth"), n_train=8, n_test=3, seed=3, max_size=192, progress=False)


NARROW_HEADS: dict[str, Any] = {"model.fpn_channels": 64, "model.box_head_dim": 256, "model.mask_head_channels": 64}
"""Narrow FPN, box and mask heads: most of a tiny model's step and checkpoint are torchvision's
default heads (256 channels, 1024 wide), which tests of the loop, the grid or the files never need."""

TINY: dict[str, Any] = {
    # ResNet-18 from scratch with narrow heads and small RPN/RoI budgets on 96 px crops: a training
    # step of a few GFLOP (the mask head's cost grows with the RoIs it sees)
    "name": "tiny", "model.backbone": "resnet18", "model.weights": "none", "model.resize_mode": "fixed_scale",
    "model.rpn_pre_nms_top_n_train": 200, "model.rpn_post_nms_top_n_train": 100,
    "model.rpn_pre_nms_top_n_test": 100, "model.rpn_post_nms_top_n_test": 50,
    "model.box_batch_size_per_image": 32, "model.rpn_batch_size_per_image": 64, "model.box_detections_per_img": 100,
    **NARROW_HEADS,
    "data.val_fraction": 0.25, "data.augment.crop_size": 96,
    "train.epochs": 1, "train.batch_size": 2, "train.iters_per_epoch": 2, "train.lr": 5e-4,
    "train.tensorboard": False, "train.tensorboard_images": 0,
}
"""The tiny training config every test that trains starts from (``tiny_config(**overrides)``)."""


@pytest.fixture
def tiny_config(synth_root: Path) -> Callable[..., Config]:
    """``tiny_config(**overrides)``: :data:`TINY` on ``synth_root``, then ``overrides`` (dotted keys)."""

    def make(**overrides: Any) -> Config:
        return load_config(None, {**TINY, "data.root": str(synth_root), **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny run (2 epochs, default hooks) for the tests that read a run: config.yaml,
    metrics, checkpoints, val_gt.json and val_predictions.json. Read-only: copy it to change it."""
    from cellkit.engine.defaults import train

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    with threads_as(TORCH_THREADS):
        train(load_config(None, {**TINY, "data.root": str(synth_root), "train.epochs": 2}), run, progress=False)
    return run


@pytest.fixture
def tiny_run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A writable copy of :func:`tiny_run`."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def torch_threads():
    """torch on :data:`TORCH_THREADS` threads for a module of model tests, whatever the machine has;
    a module opts in with ``pytestmark = pytest.mark.usefixtures("torch_threads")``."""
    with threads_as(TORCH_THREADS):
        yield
