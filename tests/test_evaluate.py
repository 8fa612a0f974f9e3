"""COCO evaluation: equal to pycocotools run by hand, the detection cap, sanitising, bad input, CLI."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from perturb import perturb_predictions, prediction, same, textbook_cocoeval, write

from cellkit.errors import CellkitError, DataError
from cellkit.evaluation.coco import (
    DROP_REASONS,
    coco_evaluate,
    evaluate_predictions,
    faster_coco_eval_available,
    sanitize_predictions,
)

FIXTURE = Path(__file__).parent / "data" / "hw3-sample"
AP_KEYS = ("ap50", "ap", "ap75", "ap_small", "ap_medium", "ap_large", "ar")


@pytest.fixture(scope="module")
def datasets(real_gt: dict, synth_gt: dict) -> dict[str, tuple[dict, list]]:
    return {
        "real": (real_gt, perturb_predictions(real_gt, seed=1)),
        "synth": (synth_gt, perturb_predictions(synth_gt, seed=2, fp_per_image=8)),
    }


def test_real_sample_has_a_crowded_class(real_gt: dict, datasets: dict) -> None:
    # the cap tests below rely on more than 100 detections of one class in one image
    preds = datasets["real"][1]
    assert sum(a["category_id"] == 2 for a in real_gt["annotations"]) == 159
    assert sum(p["category_id"] == 2 for p in preds) > 100


@pytest.mark.parametrize("name", ["real", "synth"])
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_equals_pycocotools_by_hand(datasets: dict, name: str, iou_type: str, tmp_path: Path) -> None:
    gt, preds = datasets[name]
    gt_path, pred_path = write(gt, tmp_path / "gt.json"), write(preds, tmp_path / "pred.json")
    ours = coco_evaluate(gt_path, pred_path, iou_type, max_dets=1000)
    hand = textbook_cocoeval(gt_path, pred_path, iou_type, 1000)
    for key in AP_KEYS:
        assert same(getattr(ours, key), hand[key]), (key, getattr(ours, key), hand[key])
    assert 0 < ours.ap50 < 1  # a real test: neither trivially perfect nor empty
    for k_idx, cat in enumerate(hand["cat_ids"]):
        row = ours.per_class[f"class{cat}"]
        assert same(row["ap50"], hand["class_ap50"][k_idx]) and same(row["ap"], hand["class_ap"][k_idx])
        assert row["n_gt"] == sum(a["category_id"] == cat for a in gt["annotations"])
        assert row["n_pred"] == sum(p["category_id"] == cat for p in preds)
    # the standard cap: pycocotools with default parameters and summarize()
    std = textbook_cocoeval(gt_path, pred_path, iou_type, None)["stats"]
    assert same(ours.ap_at_100, std[0]) and same(ours.ap50_at_100, std[1])
    assert ours.n_predictions == len(preds) and sum(ours.n_dropped.values()) == 0


def test_max_dets_100_equals_summarize(datasets: dict, tmp_path: Path) -> None:
    gt, preds = datasets["real"]
    gt_path, pred_path = write(gt, tmp_path / "gt.json"), write(preds, tmp_path / "pred.json")
    ours = coco_evaluate(gt_path, pred_path, "segm", max_dets=100)
    std = textbook_cocoeval(gt_path, pred_path, "segm", None)["stats"]
    pairs = [("ap", 0), ("ap50", 1), ("ap75", 2), ("ap_small", 3), ("ap_medium", 4), ("ap_large", 5), ("ar", 8)]
    for key, i in pairs:
        assert same(getattr(ours, key), std[i]), (key, getattr(ours, key), std[i])


def test_cap_of_100_lowers_ap_and_1000_does_not(datasets: dict) -> None:
    gt, preds = datasets["real"]
    r1000 = coco_evaluate(gt, preds, "segm", max_dets=1000)
    r100 = coco_evaluate(gt, preds, "segm", max_dets=100)
    r5000 = coco_evaluate(gt, preds, "segm", max_dets=5000)
    assert r1000.ap50 > r100.ap50 + 0.05  # 159 class-2 cells cannot all be found with 100 detections
    assert r1000.per_class["class2"]["ap50"] > r100.per_class["class2"]["ap50"]
    assert r1000.ap50_at_100 == r100.ap50  # the same run reports what the standard cap gives
    assert r5000.ap50 == r1000.ap50  # nothing beyond 1000: a larger cap changes nothing
    assert r1000.n_beyond_cap == 0 and r1000.n_beyond_100 == sum(p["category_id"] == 2 for p in preds) - 100
    assert "standard cap of 100" in r1000.format()


def test_nan_and_bad_entries_dropped_before_loadres(datasets: dict, real_gt: dict) -> None:
    gt, preds = datasets["real"]
    clean = coco_evaluate(gt, preds, "segm")
    h, w = real_gt["images"][0]["height"], real_gt["images"][0]["width"]
    good = preds[0]
    empty = dict(prediction(1, 2, 0.99, np.zeros((h, w), bool)), bbox=[10.0, 10.0, 2.0, 2.0])  # box, empty mask
    bad = [
        dict(good, bbox=[float("nan"), 1.0, 2.0, 3.0]),  # nonfinite_box
        dict(good, bbox=[1.0, 2.0, float("inf"), 3.0]),  # nonfinite_box
        dict(good, bbox=[1.0, 2.0, 0.0, 3.0]),  # degenerate_box
        dict(good, score=float("nan")),  # nonfinite_score
        empty,  # empty_mask
        dict(good, image_id=999),  # unknown_image
        dict(good, category_id=7),  # unknown_category
        dict(good, segmentation={"size": [h + 1, w], "counts": good["segmentation"]["counts"]}),  # wrong_size
        dict(good, segmentation={"size": [h, w], "counts": good["segmentation"]["counts"][:-2]}),  # bad_mask (cut short)
        {"image_id": 1, "score": 0.5},  # malformed
    ]
    mixed = bad[:3] + preds[:50] + bad[3:] + preds[50:]
    snapshot = copy.deepcopy(mixed)
    r = coco_evaluate(gt, mixed, "segm")
    assert r.n_dropped == {"malformed": 1, "unknown_image": 1, "unknown_category": 1, "nonfinite_score": 1,
                           "nonfinite_box": 2, "degenerate_box": 1, "wrong_size": 1, "bad_mask": 1,
                           "empty_mask": 1}
    assert set(r.n_dropped) == set(DROP_REASONS)
    for key in AP_KEYS:
        x, y = getattr(r, key), getattr(clean, key)
        assert x == y or (math.isnan(x) and math.isnan(y)), key
    assert r.to_dict()["per_class"] == clean.to_dict()["per_class"] and r.n_predictions == len(preds)
    assert mixed == snapshot or _nan_equal(mixed, snapshot)  # the caller's entries are untouched


def _nan_equal(a: list, b: list) -> bool:
    return json.dumps(a) == json.dumps(b)


def test_sanitize_counts_every_reason(real_gt: dict, datasets: dict) -> None:
    preds = datasets["real"][1][:5]
    kept, dropped = sanitize_predictions(preds + [dict(preds[0], bbox=[0, 0, float("nan"), 1])], real_gt["images"], 4)
    assert len(kept) == 5 and dropped["nonfinite_box"] == 1 and sum(dropped.values()) == 1
    # bbox evaluation needs no mask: an entry with a box only is kept
    kept, dropped = sanitize_predictions([{k: v for k, v in preds[0].items() if k != "segmentation"}],
                                         real_gt["images"], 4, iou_type="bbox")
    assert len(kept) == 1 and sum(dropped.values()) == 0


def test_empty_prediction_list_gives_zero(real_gt: dict) -> None:
    r = coco_evaluate(real_gt, [], "segm")
    assert r.ap50 == 0.0 and r.ap == 0.0 and r.ap75 == 0.0 and r.ap50_at_100 == 0.0
    assert r.per_class["class2"]["ap50"] == 0.0
    assert math.isnan(r.per_class["class3"]["ap50"])  # no class-3 cells to find: undefined, not 0
    assert math.isnan(r.ap_large)  # the sample has no large cells
    # a list whose every entry is dropped is the same as an empty list
    bad = [{"image_id": 1, "category_id": 2, "score": 0.9, "bbox": [float("nan")] * 4,
            "segmentation": real_gt["annotations"][5]["segmentation"]}]
    r2 = coco_evaluate(real_gt, bad, "segm")
    assert r2.ap50 == 0.0 and r2.n_dropped["nonfinite_box"] == 1
    json.dumps(r.to_dict(), allow_nan=False)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_empty_prediction_list_is_scored_by_cocoeval_itself(real_gt: dict, backend: str) -> None:
    # no hand-built arrays: COCOeval runs on an empty result index and gives precision 0 where a
    # class has ground truth in an area range and -1 (nothing to find) elsewhere
    if backend == "faster_coco_eval" and not faster_coco_eval_available():
        pytest.skip("faster-coco-eval is not installed")
    r = coco_evaluate(real_gt, [], "segm", backend=backend)
    assert r.precision is not None and r.precision.shape == (10, 101, 4, 4)
    k = {name: i for i, name in enumerate(r.per_class)}
    assert (r.precision[:, :, k["class2"], 0] == 0).all() and (r.precision[:, :, k["class3"], 0] == -1).all()
    assert (r.precision[..., 3] == -1).all()  # no large cells in the sample
    assert r.ar == 0.0 and r.per_class["class1"]["n_gt"] == 2 and r.n_predictions == 0


def test_evaluate_predictions_segm_bbox_and_cells(datasets: dict) -> None:
    gt, preds = datasets["synth"]
    rep = evaluate_predictions(gt, preds, max_dets=1000)
    assert rep.headline == rep.results["segm"].ap50 == coco_evaluate(gt, preds, "segm").ap50
    assert rep.results["bbox"].ap == coco_evaluate(gt, preds, "bbox").ap
    assert rep.cells is not None and rep.cells.overall.tp > 0
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["ap50"] == rep.headline and d["segm"]["per_class"]["class1"]["n_gt"] > 0
    text = rep.format()
    assert "AP50" in text and "COCO bbox AP" in text and "TP/(TP+FP+FN)" in text


def test_ground_truth_from_elsewhere(real_gt: dict, datasets: dict, tmp_path: Path) -> None:
    preds = datasets["real"][1]
    stripped = copy.deepcopy(real_gt)
    for a in stripped["annotations"]:
        del a["iscrowd"], a["area"]
    r = coco_evaluate(stripped, preds, "segm")
    full = coco_evaluate(real_gt, preds, "segm")
    assert r.ap50 == full.ap50 and r.ap_small == full.ap_small  # area recomputed from the masks
    assert any("iscrowd" in n for n in r.notes) and any("area" in n for n in r.notes)
    no_cats = {k: v for k, v in real_gt.items() if k != "categories"}
    path = write(no_cats, tmp_path / "nocats.json")
    with pytest.raises(DataError, match="nocats.json.*categories"):
        coco_evaluate(path, preds)
    with pytest.raises(DataError, match="ground-truth file not found"):
        coco_evaluate(tmp_path / "missing.json", preds)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        coco_evaluate(real_gt, tmp_path / "broken.json")
    with pytest.raises(CellkitError, match="max_dets"):
        coco_evaluate(real_gt, preds, max_dets=0)


@pytest.mark.skipif(not faster_coco_eval_available(), reason="faster-coco-eval is not installed (pip install faster-coco-eval)")
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_faster_coco_eval_agrees(datasets: dict, iou_type: str) -> None:
    for gt, preds in datasets.values():
        a = coco_evaluate(gt, preds, iou_type, backend="pycocotools")
        b = coco_evaluate(gt, preds, iou_type, backend="faster_coco_eval")
        for key in AP_KEYS + ("ap50_at_100", "ap_at_100"):
            x, y = getattr(a, key), getattr(b, key)
            assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-9, (key, x, y)
        for name, row in a.per_class.items():
            for key in ("ap50", "ap", "ap75"):
                x, y = row[key], b.per_class[name][key]
                assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-9
    assert coco_evaluate(gt, [], backend="faster_coco_eval").ap50 == 0.0


# --------------------------------------------------------------------------------------------
# command line


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cellkit", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_evaluate(datasets: dict, tmp_path: Path) -> None:
    gt, preds = datasets["real"]
    preds = preds + [dict(preds[0], bbox=[float("nan"), 0, 1, 1])]
    gt_path = write(gt, tmp_path / "gt.json")
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(preds))  # NaN written as the bare token NaN, as json.dumps does
    r = run_cli("evaluate", "--gt", gt_path, "--pred", str(pred_path), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)  # nothing but JSON on stdout
    expected = coco_evaluate(gt, preds, "segm")
    assert abs(d["ap50"] - expected.ap50) < 1e-12 and d["segm"]["max_dets"] == 1000
    assert d["n_dropped"]["nonfinite_box"] == 1 and d["bbox"]["ap"] is not None and d["cells"]["overall"]["tp"] > 0
    r = run_cli("evaluate", "--gt", gt_path, "--pred", str(pred_path), "--max-dets", "100", "--iou-type", "segm")
    assert r.returncode == 0, r.stderr
    assert "AP50" in r.stdout and "nonfinite_box 1" in r.stdout and "class2" in r.stdout
    assert "COCO bbox" not in r.stdout


def test_cli_evaluate_missing_file_no_traceback(real_gt: dict, tmp_path: Path) -> None:
    r = run_cli("evaluate", "--gt", str(tmp_path / "nope.json"), "--pred", write([], tmp_path / "pred.json"))
    assert r.returncode == 2 and "nope.json: ground-truth file not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("case", ["invalid", "nocats", "both_sources", "run_without_checkpoint"])
def test_cli_evaluate_bad_input(real_gt: dict, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cellkit.cli import main

    gt_path = write(real_gt, tmp_path / "gt.json")
    pred_path = write([], tmp_path / "pred.json")
    if case == "invalid":
        (tmp_path / "bad.json").write_text("{not json")
        args, msg = ["--gt", gt_path, "--pred", str(tmp_path / "bad.json")], "bad.json: not valid JSON"
    elif case == "nocats":
        path = write({k: v for k, v in real_gt.items() if k != "categories"}, tmp_path / "nocats.json")
        args, msg = ["--gt", path, "--pred", pred_path], "nocats.json: not COCO ground truth: no 'categories'"
    elif case == "both_sources":
        args, msg = ["--gt", gt_path, "--pred", pred_path, "--run", str(tmp_path)], "either --run or"
    else:
        args, msg = ["--run", str(tmp_path)], "checkpoint not found"
    assert main(["evaluate", *args]) == 2
    assert msg in capsys.readouterr().err


def test_evaluate_and_check_submission_never_import_torch(datasets: dict, tmp_path: Path) -> None:
    # the evaluation package and both commands run without torch (they start in a fraction of a second)
    gt, preds = datasets["real"]
    gt_path, pred_path = write(gt, tmp_path / "gt.json"), write(preds, tmp_path / "pred.json")
    ids = write([{"id": im["id"], "file_name": f"{im['id']}.tif", "height": im["height"], "width": im["width"]}
                 for im in gt["images"]], tmp_path / "ids.json")
    code = (
        "import sys\n"
        "from cellkit.cli import main\n"
        f"assert main(['evaluate', '--gt', {gt_path!r}, '--pred', {pred_path!r}, '--json']) == 0\n"
        f"assert main(['check-submission', {pred_path!r}, '--ids', {ids!r}]) in (0, 1)\n"
        "import cellkit.evaluation\n"
        "print('torch loaded:', sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("torch loaded: []")
    assert '"ap50"' in r.stdout and "valid" in r.stdout


def test_evaluator_processes_pieces_like_one_list(datasets: dict) -> None:
    from cellkit.evaluation import COCOEvaluator, EvaluationError

    gt, preds = datasets["synth"]
    ev = COCOEvaluator(gt, ("segm", "bbox"), max_dets=1000, backend="pycocotools")
    for start in range(0, len(preds), 7):  # batch by batch, as prediction produces them
        ev.process(preds[start : start + 7])
    report = ev.evaluate()
    whole = evaluate_predictions(gt, preds, max_dets=1000, backend="pycocotools", cell_metrics=False)
    assert report.results["segm"].ap50 == whole.results["segm"].ap50
    assert report.results["bbox"].ap == whole.results["bbox"].ap and len(ev.predictions) == len(preds)
    ev.reset()
    assert ev.evaluate().results["segm"].n_predictions == 0  # reset forgets what was processed
    ev.fail("CUDA out of memory")
    with pytest.raises(EvaluationError, match="rank 0: CUDA out of memory"):
        ev.evaluate()


def test_one_number_formatter_for_every_report() -> None:
    import numpy as np

    from cellkit.evaluation.formatting import fmt, nan_to_none

    assert fmt(0.12345) == "0.1235" and fmt(0.5, "+.2f") == "+0.50" and fmt(3) == "3.0000"
    assert fmt(None) == fmt(float("nan")) == fmt(np.float32("nan")) == "n/a"
    assert nan_to_none(np.float64(0.25)) == 0.25 and type(nan_to_none(np.float64(0.25))) is float
    assert nan_to_none(None) is None and nan_to_none(np.nan) is None


def test_rle_strings_checked_at_once_as_one_by_one() -> None:
    """Speed issue: the vectorised check of many RLE strings says what the walk over each string
    says (lexically an RLE, runs >= 0 summing to the image) and gives pycocotools' area, for valid
    masks and for strings cut short, with bad characters, a flipped sign bit, an extra run, run
    lengths of many groups, non-ASCII text, and a wrong pixel count."""
    from pycocotools import mask as mask_utils

    from cellkit.structures.rle import check_rle_strings, encode_mask, rle_runs_fit, rle_string_ok

    rng = np.random.default_rng(0)
    strings, pixels = [], []
    for i in range(1500):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        text = encode_mask(rng.random((h, w)) < rng.random())["counts"]
        kind = i % 8
        if kind == 1 and text:
            text = text[: int(rng.integers(0, len(text)))]
        elif kind == 2:
            text = "".join(chr(int(c)) for c in rng.integers(40, 120, int(rng.integers(0, 12))))
        elif kind == 3 and text:
            text = text[:-1] + chr(ord(text[-1]) ^ 0x10)
        elif kind == 4:
            text += "1"
        elif kind == 5:
            text = "P" * int(rng.integers(10, 20)) + text  # zero-valued groups: one run of many groups
        elif kind == 6:
            text = text.replace("1", "\u00e9", 1)
        strings.append(text)
        pixels.append(h * w + (int(rng.integers(-2, 3)) if kind == 7 else 0))
    ok, area = check_rle_strings(strings, pixels)
    expected = [rle_string_ok(t) and rle_runs_fit(t, 1, p) for t, p in zip(strings, pixels)]
    assert ok.tolist() == expected and 300 < sum(expected) < 1400
    assert area.tolist() == [int(mask_utils.area({"size": [1, p], "counts": t})) if e else 0
                             for t, p, e in zip(strings, pixels, expected)]
    empty = check_rle_strings([], [])
    assert empty[0].shape == empty[1].shape == (0,)


def test_sanitize_column_by_column_drops_what_one_by_one_drops(datasets: dict, real_gt: dict) -> None:
    """Speed issue: plain json-like predictions are checked column by column; with bad values of
    every kind among them, the kept entries and the drop counts are those of checking each entry
    by itself, and the caller's entries are untouched."""
    from cellkit.evaluation.inputs import _check_prediction, _plain_columns

    gt, preds = datasets["real"]
    h, w = real_gt["images"][0]["height"], real_gt["images"][0]["width"]
    good = preds[0]
    counts = good["segmentation"]["counts"]
    bad = [
        dict(good, score=float("nan")), dict(good, score=float("inf")), dict(good, bbox=[1.0, 2.0, float("nan"), 3.0]),
        dict(good, bbox=[1.0, 2.0, 0.0, 3.0]), dict(good, image_id=999), dict(good, category_id=7),
        dict(good, segmentation={"size": [h, w + 1], "counts": counts}),
        dict(good, segmentation={"size": [h, w], "counts": counts[:-2]}),
        dict(good, segmentation={"size": [h, w], "counts": counts + "1"}),
        dict(good, segmentation={"size": [h, w], "counts": str(h * w)}),  # digits: runs that do not fit
        dict(prediction(1, 2, 0.9, np.zeros((h, w), bool)), bbox=[1.0, 1.0, 2.0, 2.0]),  # empty mask
        dict(good, score=1, bbox=[1, 2, 3, 4]),  # integers are numbers too: kept, as floats
    ]
    mixed = preds[:20] + bad + preds[20:]
    snapshot = copy.deepcopy(mixed)
    kept, dropped = sanitize_predictions(mixed, real_gt["images"], 4)
    sizes = {im["id"]: (im["height"], im["width"]) for im in real_gt["images"]}
    assert _plain_columns(mixed, sizes, {1, 2, 3, 4}) is not None  # the column path was taken
    one_by_one = [_check_prediction(p, sizes, {1, 2, 3, 4}, "segm") for p in mixed]
    assert kept == [entry for reason, entry in one_by_one if reason is None]
    assert dropped == {r: sum(reason == r for reason, _ in one_by_one) for r in DROP_REASONS}
    assert sum(dropped.values()) == len(bad) - 1 and dropped["bad_mask"] == 3 and dropped["empty_mask"] == 1
    assert kept[20] == {"image_id": 1, "category_id": good["category_id"], "score": 1.0, "bbox": [1.0, 2.0, 3.0, 4.0],
                        "segmentation": good["segmentation"]} and type(kept[20]["score"]) is float
    assert mixed == snapshot or _nan_equal(mixed, snapshot)
    assert all(k is not m for k, m in zip(kept, mixed))  # fresh dicts: loadRes writes into them
    # a list nobody else holds (read from a file): the entries in the kept form are kept themselves
    own = json.loads(json.dumps([e for e in kept if type(e["score"]) is float and e is not kept[20]]))
    kept_own, dropped_own = sanitize_predictions(own, real_gt["images"], 4, copy=False)
    assert kept_own == own and all(a is b for a, b in zip(kept_own, own)) and sum(dropped_own.values()) == 0
