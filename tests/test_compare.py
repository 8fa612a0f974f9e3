"""Two runs compared cell by cell: counts against a construction where every cell's fate is known,
the AP50 difference the differing cells explain, run folders, the figure and the browser."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from perturb import perturb_predictions, prediction
from pycocotools import mask as mask_utils

from cellkit.analysis.compare import compare_runs
from cellkit.cli import main
from cellkit.config import load_config
from cellkit.errors import DataError
from cellkit.evaluation.coco import coco_evaluate
from cellkit.evaluation.compare import CATEGORIES, compare_predictions

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def construct(gt: dict, seed: int) -> tuple[list[dict], list[dict], list[str]]:
    """Two runs' predictions with a known category for every cell: A predicts the exact mask of the
    cells it finds, B likewise; each also makes false positives (an exact cell mask with another
    class, which can find nothing) and A duplicates some of its cells at a lower score."""
    rng = np.random.default_rng(seed)
    roles = [str(r) for r in rng.choice(CATEGORIES, size=len(gt["annotations"]), p=[0.5, 0.2, 0.15, 0.15])]
    a, b = [], []
    for ann, role in zip(gt["annotations"], roles):
        m = mask_utils.decode(ann["segmentation"]).astype(bool)
        own = ann["category_id"]
        if role in ("both", "a_only"):
            s = float(rng.uniform(0.2, 1.0))
            a.append(prediction(ann["image_id"], own, s, m))
            if rng.random() < 0.1:
                a.append(prediction(ann["image_id"], own, s / 2, m))  # a duplicate: still one cell found
        if role in ("both", "b_only"):
            b.append(prediction(ann["image_id"], own, float(rng.uniform(0.2, 1.0)), m))
        for run in (a, b):
            if rng.random() < 0.1:
                other = int(rng.choice([c for c in (1, 2, 3, 4) if c != own]))
                run.append(prediction(ann["image_id"], other, float(rng.uniform(0.0, 1.0)), m))
    return a, b, roles


@pytest.fixture(scope="module")
def constructed(synth_gt: dict) -> tuple[dict, list, list, list]:
    """8 synthetic images (classes 1-3)."""
    a, b, roles = construct(synth_gt, 7)
    return synth_gt, a, b, roles


@pytest.fixture(scope="module")
def constructed_real(real_gt: dict) -> tuple[dict, list, list, list]:
    """The real sample image (161 cells of classes 1 and 2)."""
    a, b, roles = construct(real_gt, 8)
    return real_gt, a, b, roles


@pytest.mark.parametrize("which", ["constructed", "constructed_real"])
def test_counts_are_the_construction(which: str, request: pytest.FixtureRequest) -> None:
    gt, a, b, roles = request.getfixturevalue(which)
    cmp = compare_predictions(gt, a, b, names=("A", "B"), max_dets=1000)
    assert list(cmp.category) == roles
    assert cmp.counts() == {c: roles.count(c) for c in CATEGORIES}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    expected_by_class = {names[k]: {c: 0 for c in CATEGORIES} for k in sorted(names)}
    for ann, role in zip(gt["annotations"], roles):
        expected_by_class[names[ann["category_id"]]][role] += 1
    assert cmp.counts_by_class() == expected_by_class
    # per image, and per image and class
    per_image = Counter((ann["image_id"], role) for ann, role in zip(gt["annotations"], roles))
    for d in cmp.by_image():
        assert (d.both, d.a_only, d.b_only, d.neither) == tuple(per_image[(d.image_id, c)] for c in CATEGORIES)
    diffs = [d.n_diff for d in cmp.by_image()]
    assert diffs == sorted(diffs, reverse=True)  # most differing first
    per_cell = Counter((ann["image_id"], names[ann["category_id"]], role) for ann, role in zip(gt["annotations"], roles))
    rows = cmp.table()
    assert sum(r["n_gt"] for r in rows) == len(gt["annotations"])
    for r in rows:
        assert [r[c] for c in CATEGORIES] == [per_cell[(r["image_id"], r["class"], c)] for c in CATEGORIES]
    # the evaluations are the plain COCO ones
    assert cmp.ap50_a == pytest.approx(coco_evaluate(gt, a, max_dets=1000).ap50, abs=1e-12)
    assert cmp.ap50_b == pytest.approx(coco_evaluate(gt, b, max_dets=1000).ap50, abs=1e-12)
    assert cmp.explained + cmp.rest == pytest.approx(cmp.ap50_diff, abs=1e-12)
    # swapping the runs swaps the categories and the sign of every difference
    rev = compare_predictions(gt, b, a, names=("B", "A"), max_dets=1000)
    swap = {"both": "both", "a_only": "b_only", "b_only": "a_only", "neither": "neither"}
    assert list(rev.category) == [swap[r] for r in roles]
    assert rev.ap50_diff == pytest.approx(-cmp.ap50_diff, abs=1e-12)
    assert rev.explained == pytest.approx(-cmp.explained, abs=1e-12)
    assert "A only" in cmp.format() and "explain" in cmp.format()
    assert json.loads(json.dumps(cmp.to_dict()))["counts"] == cmp.counts()


@pytest.mark.parametrize("which", ["constructed", "constructed_real"])
def test_dropping_known_cells_explains_the_whole_difference(which: str, request: pytest.FixtureRequest) -> None:
    # B = A without its predictions of 12 cells A finds (matches and duplicates): exactly those are
    # "A only", and they account for the whole AP50 difference (what is left of the two runs is the same)
    gt, a, _, roles = request.getfixturevalue(which)
    rng = np.random.default_rng(3)
    found = [k for k, r in enumerate(roles) if r in ("both", "a_only")]
    dropped = set(rng.choice(found, size=12, replace=False).tolist())
    masks_gt = {k: mask_utils.decode(gt["annotations"][k]["segmentation"]) for k in dropped}
    b = []
    for p in a:
        m = mask_utils.decode(p["segmentation"])
        if any(p["image_id"] == gt["annotations"][k]["image_id"] and p["category_id"] == gt["annotations"][k]["category_id"]
               and np.array_equal(m, masks_gt[k]) for k in dropped):
            continue
        b.append(p)
    assert len(b) < len(a)
    cmp = compare_predictions(gt, a, b, max_dets=1000)
    cat = cmp.category
    assert {k for k in range(len(cat)) if cat[k] == "a_only"} == dropped
    assert cmp.counts()["b_only"] == 0
    assert cmp.ap50_diff < 0
    assert cmp.explained == pytest.approx(cmp.ap50_diff, abs=1e-12) and cmp.rest == pytest.approx(0.0, abs=1e-12)
    for row in cmp.per_class().values():
        if np.isfinite(row["diff"]):
            assert row["explained"] == pytest.approx(row["diff"], abs=1e-12)


def _fake_run(folder: Path, gt: dict, preds: list) -> Path:
    folder.mkdir(parents=True)
    load_config("demo").save(folder / "config.yaml")
    (folder / "val_gt.json").write_text(json.dumps(gt))
    (folder / "val_predictions.json").write_text(json.dumps(preds))
    return folder


def test_compare_runs_reads_two_run_folders(constructed: tuple, real_gt: dict, tmp_path: Path) -> None:
    gt, a, b, roles = constructed
    ra = _fake_run(tmp_path / "grid" / "resnet18" / "run", gt, a)
    rb = _fake_run(tmp_path / "grid" / "mobilenet" / "run", gt, b)
    cmp = compare_runs(ra.parent, rb)  # a grid cell's folder or its run directory
    assert cmp.names == ("resnet18", "mobilenet") and list(cmp.category) == roles
    other = _fake_run(tmp_path / "other" / "run", real_gt, [])
    with pytest.raises(DataError, match="not the validation split of"):
        compare_runs(ra, other)
    with pytest.raises(DataError, match="not found: point run_dir at a finished training run"):
        compare_runs(ra, tmp_path / "nothing")


def test_figure_and_browser(constructed: tuple, synth_root: Path) -> None:
    from cellkit.data import CellDataset, scan_train
    from cellkit.viz.browser import comparison_browser
    from cellkit.viz.compare_plots import plot_run_comparison
    from cellkit.viz.overlay import COMPARE_COLORS, render

    gt, a, b, roles = constructed
    cmp = compare_predictions(gt, a, b, names=("r18", "mnv3"), max_dets=1000)
    fig = plot_run_comparison(cmp)
    assert len(fig.axes) >= 3 and all(ax.has_data() for ax in fig.axes[:3])
    plt.close(fig)

    ds = CellDataset(scan_train(synth_root))
    browser = comparison_browser(ds, cmp)
    first = cmp.by_image()[0]
    assert browser.items[0].note.startswith(f"r18 only {first.a_only}, mnv3 only {first.b_only}")
    cells = browser.items[0].gt()
    assert Counter(c.status for c in cells) == Counter(
        r for ann, r in zip(gt["annotations"], roles) if ann["image_id"] == first.image_id)
    # a cell found by A only is drawn in A's colour (its outline, alone on the image)
    one = next(c for c in cells if c.status == "a_only")
    image = browser.items[0].image()
    drawn = render(image, [one], mode="outline", color_by="status", palette=COMPARE_COLORS)
    changed = np.any(drawn != image, axis=-1)
    assert changed.any() and np.all(drawn[changed] == COMPARE_COLORS["a_only"])
    # the category toggles filter the view
    title = browser.panels()[0][0]
    assert f"r18 only {first.a_only}" in title
    browser.state["statuses"] = {"a_only"}
    assert browser.panels()[0][0].startswith(f"ground truth: {first.a_only} cells")
    w = browser.widget()  # ipywidgets view: builds with its category toggles
    assert "cellkit-mask-browser" in w._dom_classes
    fig = browser.figure(0)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# is the difference real? (paired bootstrap over the same images, `cellkit compare`)


def test_a_run_compared_with_itself_is_not_distinguishable(constructed: tuple, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    gt, a, _, _ = constructed
    run = _fake_run(tmp_path / "a" / "run", gt, a)
    cmp = compare_runs(run, run, bootstrap=400)
    assert cmp.difference.interval == (0.0, 0.0) and cmp.difference.estimate == 0.0
    assert cmp.verdict() == "not distinguishable" and cmp.difference.p_value == 1.0
    lo, hi = cmp.result_a.interval("ap50")
    assert lo < cmp.ap50_a < hi
    assert main(["compare", str(run), str(run), "--bootstrap", "400"]) == 0
    out = capsys.readouterr().out
    assert f"AP50 {cmp.ap50_a:.4f} [{lo:.2f}, {hi:.2f}]" in out
    assert "B - A = +0.0000 [+0.00, +0.00]: not distinguishable (paired bootstrap over the same 8 images" in out


@pytest.mark.parametrize("how", ["half dropped", "scores shuffled"])
def test_a_clearly_worse_run_is_worse(how: str, synth_gt: dict, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    if how == "half dropped":
        good = perturb_predictions(synth_gt, seed=1, fp_per_image=5)
        bad = [p for p in good if rng.random() < 0.5]
    else:  # the same masks ranked at random: the false positives, ranked last before, mixed in with the cells
        cells = perturb_predictions(synth_gt, seed=1, fp_per_image=0, p_wrong_class=0.0)
        blobs = perturb_predictions(synth_gt, seed=2, p_drop=1.0, fp_per_image=20)
        good = [{**p, "score": 0.5 + 0.5 * float(rng.random())} for p in cells] + \
               [{**p, "score": 0.5 * float(rng.random())} for p in blobs]
        scores = rng.permutation([p["score"] for p in good])
        bad = [{**p, "score": float(s)} for p, s in zip(good, scores)]
    ra = _fake_run(tmp_path / "grid" / "good" / "run", synth_gt, good)
    rb = _fake_run(tmp_path / "grid" / "bad" / "run", synth_gt, bad)
    cmp = compare_runs(ra, rb, bootstrap=1000)
    assert cmp.ap50_b < cmp.ap50_a and cmp.difference.interval[1] < 0
    assert cmp.verdict() == "good better"
    assert compare_runs(rb, ra, bootstrap=1000).verdict() == "good better"  # whichever is A
    assert main(["compare", str(ra.parent), str(rb.parent), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["verdict"] == "good better" and d["ap50_diff_ci"][1] < 0 and d["p_value"] < 0.05
    assert d["n_images"] == 8 and d["runs"] == [str(ra.parent), str(rb.parent)]


def test_runs_on_different_images_are_refused_with_one_line(constructed: tuple, real_gt: dict, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    gt, a, _, _ = constructed
    ra = _fake_run(tmp_path / "a" / "run", gt, a)
    other = _fake_run(tmp_path / "other" / "run", real_gt, [])
    assert main(["compare", str(ra), str(other)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cellkit compare: error: ") and "not the validation split of" in err[0]
    assert "different images" in err[0] and captured.out == ""
    assert main(["compare", str(ra), str(ra), "--split", "holdout"]) == 2
    assert "no hold-out split" in capsys.readouterr().err


def test_hold_out_predictions_compare_the_same_way(constructed: tuple, tmp_path: Path) -> None:
    gt, a, b, _ = constructed
    runs = []
    for name, preds in (("a", a), ("b", b)):
        run = _fake_run(tmp_path / name / "run", gt, preds)
        (run / "holdout_gt.json").write_text(json.dumps(gt))
        (run / "holdout_predictions.json").write_text(json.dumps(b if name == "a" else a))  # swapped
        runs.append(run)
    val = compare_runs(*runs, bootstrap=300)
    hold = compare_runs(*runs, bootstrap=300, split="holdout")
    assert hold.ap50_a == pytest.approx(val.ap50_b) and hold.ap50_b == pytest.approx(val.ap50_a)
    assert hold.difference.estimate == pytest.approx(-val.difference.estimate)


@pytest.mark.slow
def test_cellkit_compare_does_not_load_torch(constructed: tuple, tmp_path: Path) -> None:
    import subprocess
    import sys

    gt, a, b, _ = constructed
    ra, rb = _fake_run(tmp_path / "a" / "run", gt, a), _fake_run(tmp_path / "b" / "run", gt, b)
    code = ("import sys; from cellkit.cli import main; rc = main(['compare', sys.argv[1], sys.argv[2], "
            "'--bootstrap', '100']); print('TORCH', 'torch' in sys.modules, rc)")
    r = subprocess.run([sys.executable, "-c", code, str(ra), str(rb)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "B - A = " in r.stdout and r.stdout.strip().endswith("TORCH False 0")
