"""Error analysis: TIDE error types on predictions with constructed errors, the oracles against AP
computed from the construction, PR curves against AP50, confusion matrix, recall by size, per-image
scores, and the figures."""
from __future__ import annotations

import contextlib
import copy
import io
import math
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import scipy.ndimage as ndi
import tidecv
from perturb import perturb_predictions, prediction
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cellkit.errors import CellkitError
from cellkit.evaluation import ErrorAnalysis
from cellkit.evaluation.cellmetrics import cell_metrics
from cellkit.evaluation.coco import coco_evaluate
from cellkit.evaluation.curves import ap50_vs_score_threshold, pr_curves, score_distributions
from cellkit.evaluation.operating import confusion_matrix, per_image, recall_by_size, status_entries
from cellkit.evaluation.tide import ERROR_TYPES, SPECIAL_TYPES, match_predictions, tide_decomposition

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIXTURE = Path(__file__).parent / "data" / "hw3-sample"
TOL = 1e-9  # faster-coco-eval ("auto") against pycocotools (test_evaluate holds them to this)


# --------------------------------------------------------------------------------------------
# predictions with constructed errors


def construct(gt: dict, seed: int, n: dict[str, int]) -> tuple[list[dict], dict[str, Any]]:
    """Predictions from ground truth where every error is put there on purpose.

    Each instance gets one role: ``tp`` (its exact mask, own class), ``cls`` (exact mask, another
    class), ``loc`` (its mask eroded to IoU in [0.15, 0.45], own class), ``both`` (eroded, another
    class) or ``miss`` (no prediction); ``n["dupe"]`` of the ``tp`` cells get a second, lower-scoring
    copy, and ``n["bkg"]`` disks are put at least 3 px from every cell. The ground-truth masks of a
    label map are disjoint, so an exact or eroded mask overlaps no other instance.
    All scores are >= 0.5.
    """
    rng = np.random.default_rng(seed)
    anns = gt["annotations"]
    order = rng.permutation(len(anns))
    roles: dict[int, str] = {}
    pos = 0
    for role in ("cls", "loc", "both", "miss"):
        for k in order[pos: pos + n[role]]:
            roles[int(k)] = role
        pos += n[role]
    for k in order[pos:]:
        roles[int(k)] = "tp"
    tp_idx = [k for k in order[pos:]]
    dupes = {int(k) for k in tp_idx[: n["dupe"]]}
    preds: list[dict] = []
    exp: dict[str, Any] = {"pred_role": [], "pred_ann": [], "relabel": [], "roles": roles}
    for k, a in enumerate(anns):
        role = roles[k]
        m = mask_utils.decode(a["segmentation"]).astype(bool)
        own = a["category_id"]
        other = int(rng.choice([c for c in (1, 2, 3, 4) if c != own]))
        if role in ("loc", "both"):
            er = m
            for _ in range(10):
                er = ndi.binary_erosion(er)
                if er.sum() <= 0.45 * m.sum():
                    break
            assert 0.15 <= er.sum() / m.sum() <= 0.45, "erosion did not land in [0.15, 0.45]"
            m = er
        if role == "miss":
            continue
        cat = other if role in ("cls", "both") else own
        s = float(rng.uniform(0.6, 1.0))
        preds.append(prediction(a["image_id"], cat, s, m))
        exp["pred_role"].append(role)
        exp["pred_ann"].append(k)
        if role == "cls":
            exp["relabel"].append((own, other))
        if k in dupes:
            preds.append(prediction(a["image_id"], own, s - 0.05, m))
            exp["pred_role"].append("dupe")
            exp["pred_ann"].append(k)
    placed = 0
    ims = gt["images"]
    for t in range(200):
        if placed == n["bkg"]:
            break
        im = ims[t % len(ims)]
        h, w = im["height"], im["width"]
        cells = np.zeros((h, w), bool)
        for a in anns:
            if a["image_id"] == im["id"]:
                cells |= mask_utils.decode(a["segmentation"]).astype(bool)
        free = ndi.distance_transform_edt(~cells) > 4 + 3
        free[:5, :] = free[-5:, :] = False
        free[:, :5] = free[:, -5:] = False
        ys, xs = np.nonzero(free)
        if not len(ys):
            continue
        j = int(rng.integers(len(ys)))
        yy, xx = np.mgrid[:h, :w]
        disk = (yy - ys[j]) ** 2 + (xx - xs[j]) ** 2 <= 16
        preds.append(prediction(im["id"], int(rng.integers(1, 5)), float(rng.uniform(0.5, 1.0)), disk))
        exp["pred_role"].append("bkg")
        exp["pred_ann"].append(-1)
        placed += 1
    assert placed == n["bkg"]
    exp["counts"] = Counter(exp["pred_role"])
    for r in ("tp", "cls", "loc", "both", "dupe", "bkg"):
        exp["counts"].setdefault(r, 0)
    # TIDE: an instance hit only by a "both" error is still missed
    exp["counts"]["miss"] = n["miss"] + n["both"]
    return preds, exp


N_REAL = {"cls": 10, "loc": 8, "both": 6, "miss": 12, "dupe": 9, "bkg": 7}
N_SYNTH = {"cls": 12, "loc": 10, "both": 5, "miss": 14, "dupe": 8, "bkg": 10}


@pytest.fixture(scope="module")
def constructed(real_gt: dict, synth_gt: dict) -> dict[str, tuple[dict, list, dict]]:
    out = {}
    for name, gt, seed, n in (("real", real_gt, 11, N_REAL), ("synth", synth_gt, 12, N_SYNTH)):
        preds, exp = construct(gt, seed, n)
        out[name] = (gt, preds, exp)
    return out


@pytest.mark.parametrize("name", ["real", "synth"])
def test_constructed_errors_are_counted(constructed: dict, name: str) -> None:
    gt, preds, exp = constructed[name]
    m = match_predictions(gt, preds)
    counts = m.counts()
    for t in ("tp", *ERROR_TYPES):
        assert counts[t] == exp["counts"][t], (t, counts[t], exp["counts"][t])
    assert counts["ignored"] == counts["beyond_cap"] == 0
    # each prediction is the kind it was built as (duplicates: one of the two copies)
    for i, role in enumerate(exp["pred_role"]):
        if role not in ("tp", "dupe"):
            assert m.kind[i] == role, (i, role, m.kind[i])
    # targets: a cls/loc error points at the instance it came from and recovers it
    anns = gt["annotations"]
    for i, (role, k) in enumerate(zip(exp["pred_role"], exp["pred_ann"])):
        if role in ("cls", "loc", "both"):
            assert m.gt_annotations[m.gt_index[i]] is not None
            assert m.gt_annotations[m.gt_index[i]]["id"] == anns[k]["id"]
            assert m.recovers[i] == (role != "both")
            assert 0.15 - 1e-9 <= m.iou[i] <= 0.45 + 1e-9 or role == "cls"
        if role == "bkg":
            assert m.best_iou[i] == 0.0 and m.gt_index[i] == -1
    gt_roles = Counter(exp["roles"].values())
    assert int(np.sum(m.gt_kind == "cls")) == gt_roles["cls"]
    assert int(np.sum(m.gt_kind == "loc")) == gt_roles["loc"]
    assert int(np.sum(m.gt_kind == "tp")) == gt_roles["tp"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["real", "synth"])
def test_oracles_equal_ap_of_the_fixed_construction(constructed: dict, name: str) -> None:
    gt, preds, exp = constructed[name]
    rep = tide_decomposition(gt, preds)
    roles, anns = exp["pred_role"], gt["annotations"]

    def ap(g: dict, p: list) -> float:
        return coco_evaluate(g, p, "segm", max_dets=1000, backend="pycocotools").ap50

    base = ap(gt, preds)
    assert abs(rep.base_ap - base) <= TOL and 0.2 < base < 0.95
    drop = {t: [p for p, r in zip(preds, roles) if r != t] for t in ("both", "dupe", "bkg")}
    relabelled = [dict(p, category_id=anns[k]["category_id"]) if r == "cls" else p
                  for p, r, k in zip(preds, roles, exp["pred_ann"])]
    relocated = [prediction(p["image_id"], p["category_id"], p["score"], mask_utils.decode(anns[k]["segmentation"]))
                 if r == "loc" else p for p, r, k in zip(preds, roles, exp["pred_ann"])]
    found = {k for k, r in exp["roles"].items() if r not in ("miss", "both")}
    no_missed = dict(gt, annotations=[a for k, a in enumerate(anns) if k in found])
    expected = {"cls": ap(gt, relabelled), "loc": ap(gt, relocated), "both": ap(gt, drop["both"]),
                "dupe": ap(gt, drop["dupe"]), "bkg": ap(gt, drop["bkg"]), "miss": ap(no_missed, preds)}
    for t in ERROR_TYPES:
        assert abs(rep.fixed_ap[t] - expected[t]) <= TOL, (t, rep.fixed_ap[t], expected[t])
        assert rep.delta[t] >= 0, t
        # every constructed type costs AP; "both" errors may not: a false positive of a class
        # without ground truth in the image set (classes 3 and 4 of the real sample) costs nothing
        assert rep.delta[t] > 0 or t == "both", t
    tps = [p for p, r in zip(preds, roles) if r == "tp"]
    only_tp_gt = dict(gt, annotations=[a for k, a in enumerate(anns) if exp["roles"][k] == "tp"])
    assert abs(rep.fixed_ap["false_pos"] - ap(gt, tps)) <= TOL
    assert abs(rep.fixed_ap["false_neg"] - ap(only_tp_gt, preds)) <= TOL
    assert rep.fixed_ap["all"] == pytest.approx(1.0, abs=1e-12)
    d = rep.to_dict()
    assert d["counts"]["cls"] == exp["counts"]["cls"] and d["delta"]["bkg"] == pytest.approx(rep.delta["bkg"])
    assert "classification" in rep.format() and "missed" in rep.format()


@pytest.mark.parametrize("name,seed", [("real", 1), ("synth", 2), ("synth", 3)])
def test_random_errors_fixing_never_lowers_ap(real_gt: dict, synth_gt: dict, name: str, seed: int) -> None:
    gt = real_gt if name == "real" else synth_gt
    preds = perturb_predictions(gt, seed=seed, fp_per_image=20 if name == "real" else 8)
    rep = tide_decomposition(gt, preds)
    assert 0 < rep.base_ap < 1
    for t in (*ERROR_TYPES, *SPECIAL_TYPES):
        assert rep.delta[t] >= -1e-12, (t, rep.delta[t])
        for c, v in rep.per_class_delta()[t].items():
            assert math.isnan(v) or v >= -1e-12, (t, c, v)
    assert rep.fixed_ap["all"] == pytest.approx(1.0, abs=1e-12)
    m = rep.matching
    # a partition: every prediction one kind, every instance tp / accounted for / missed
    counts = m.counts()
    assert sum(counts[k] for k in ("tp", "cls", "loc", "both", "dupe", "bkg", "ignored", "beyond_cap")) == len(preds)
    assert counts["tp"] + int(m.recovers.sum()) + counts["miss"] == len(gt["annotations"])
    assert np.all(m.kind[m.recovers] != "tp") and set(m.kind[m.recovers]) <= {"cls", "loc"}
    by_class = m.counts_by_class()
    for t in ("tp", *ERROR_TYPES):
        assert sum(row[t] for row in by_class.values()) == counts[t]


def _box(y0: int, y1: int, x0: int, x1: int, size: int = 40) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def _tiny_gt(masks: list[tuple[int, np.ndarray]]) -> dict:
    """One 40 x 40 image with the given (class, mask) instances."""
    anns = []
    for k, (c, m) in enumerate(masks, start=1):
        rle = prediction(1, c, 1.0, m)
        anns.append({"id": k, "image_id": 1, "category_id": c, "segmentation": rle["segmentation"],
                     "bbox": rle["bbox"], "area": float(m.sum()), "iscrowd": 0})
    return {"images": [{"id": 1, "height": 40, "width": 40, "file_name": "tiny"}], "annotations": anns,
            "categories": [{"id": k, "name": f"class{k}"} for k in range(1, 5)]}


def test_definitions_on_rectangles() -> None:
    """TIDE's rules, thresholds included, on rectangles whose IoUs are known by hand."""
    a = _box(0, 10, 0, 10)  # class 1, 100 px
    b = _box(0, 10, 10, 30)  # class 2, 200 px, touching a
    c = _box(20, 30, 0, 10)  # class 1, 100 px
    gt = _tiny_gt([(1, a), (2, b), (1, c)])
    preds = [
        prediction(1, 2, 0.95, _box(0, 10, 10, 20)),  # IoU 100/200 = 0.5 with b: a true positive (>=)
        prediction(1, 2, 0.90, b),  # IoU 1 with b, taken: duplicate
        prediction(1, 1, 0.85, _box(0, 10, 5, 30)),  # IoU 0.8 with b (other class), 50/300 with a: loc first
        prediction(1, 3, 0.80, _box(20, 21, 0, 10)),  # IoU 10/100 = 0.1 with c, other class: both
        prediction(1, 1, 0.75, _box(20, 21, 0, 10)),  # IoU 0.1 with c, own class: loc (>= iou_bg)
        prediction(1, 4, 0.70, _box(20, 30, 0, 10)),  # IoU 1 with c, other class: classification
        prediction(1, 1, 0.65, _box(29, 39, 0, 10)),  # IoU 10/190 < 0.1 with c: background
        prediction(1, 3, 0.60, _box(32, 40, 30, 40)),  # touches nothing: background
    ]
    m = match_predictions(gt, preds)
    assert list(m.kind) == ["tp", "dupe", "loc", "both", "loc", "cls", "bkg", "bkg"]
    assert list(m.gt_index) == [1, 1, 0, 2, 2, 2, -1, -1]
    assert m.iou[0] == pytest.approx(0.5) and m.iou[2] == pytest.approx(50 / 300) and m.iou[3] == pytest.approx(0.1)
    assert m.best_iou[2] == pytest.approx(0.8) and m.best_gt_class[2] == 2
    # a: targeted by the loc error (its only hit) -> accounted for; c: by loc (0.75) and cls
    # (0.70), the higher-scoring one recovers it; nothing is missed
    assert list(m.recovers) == [False, False, True, False, True, False, False, False]
    assert list(m.gt_kind) == ["loc", "tp", "loc"] and m.counts()["miss"] == 0
    # without the loc/cls errors, a and c are missed (the "both" error does not account for c)
    m2 = match_predictions(gt, [preds[i] for i in (0, 1, 3, 6, 7)])
    assert list(m2.gt_kind) == ["miss", "tp", "miss"]
    # the thresholds are parameters
    m3 = match_predictions(gt, preds, iou_fg=0.55, iou_bg=0.05)
    assert m3.kind[0] == "loc" and m3.kind[1] == "tp" and m3.kind[6] == "loc"


def _cocoeval_tp_indices(gt: dict, preds: list, max_dets: int) -> set[int]:
    """Indices into ``preds`` of COCOeval's true positives at IoU 0.5 (area all, cap max_dets)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(preds))
        E = COCOeval(coco_gt, coco_dt, "segm")
        E.params.maxDets = [1, 10, max_dets]
        E.evaluate()
    out = set()
    for e in E.evalImgs:
        if e is None or e["aRng"] != E.params.areaRng[0] or e["maxDet"] != max_dets:
            continue
        for dt_id, matched in zip(e["dtIds"], e["dtMatches"][0]):
            if matched > 0:
                out.add(int(dt_id) - 1)  # loadRes numbers results 1..N in list order
    return out


def test_best_iou_wins_like_cocoeval() -> None:
    # overlapping instances (not in label maps, possible in COCO files): a prediction takes the
    # unmatched instance it overlaps most, as COCOeval does
    gt = _tiny_gt([(1, _box(0, 10, 0, 10)), (1, _box(0, 10, 3, 13))])
    preds = [prediction(1, 1, 0.9, _box(0, 10, 2, 12)),  # IoU 80/120 with the first, 90/110 with the second
             prediction(1, 1, 0.8, _box(0, 10, 0, 9))]  # IoU 0.9 with the first, 60/130 with the second
    m = match_predictions(gt, preds)
    assert list(m.kind) == ["tp", "tp"] and list(m.gt_index) == [1, 0]
    assert _cocoeval_tp_indices(gt, preds, 1000) == {0, 1}


@pytest.mark.parametrize("max_dets", [1000, 50])
def test_true_positives_are_cocoevals(real_gt: dict, synth_gt: dict, max_dets: int) -> None:
    for gt, preds in ((real_gt, perturb_predictions(real_gt, seed=4)),
                      (synth_gt, perturb_predictions(synth_gt, seed=5, fp_per_image=8))):
        m = match_predictions(gt, preds, max_dets=max_dets)
        assert len(m.entries) == len(preds)
        assert set(np.flatnonzero(m.kind == "tp").tolist()) == _cocoeval_tp_indices(gt, preds, max_dets)
        per = Counter((p["image_id"], p["category_id"]) for p in preds)
        assert m.counts()["beyond_cap"] == sum(max(0, v - max_dets) for v in per.values())
    assert m.counts()["beyond_cap"] == 0 or max_dets == 50


def test_crowd_regions_and_bad_entries(synth_gt: dict) -> None:
    gt = copy.deepcopy(synth_gt)
    gt["annotations"][3]["iscrowd"] = 1
    crowd_id = gt["annotations"][3]["id"]
    preds = [prediction(a["image_id"], a["category_id"], 0.9, mask_utils.decode(a["segmentation"]))
             for a in gt["annotations"]]
    bad = dict(preds[0], bbox=[float("nan"), 0.0, 1.0, 1.0])
    m = match_predictions(gt, preds + [bad])
    assert m.n_dropped["nonfinite_box"] == 1 and len(m.entries) == len(preds)
    assert m.kind[3] == "ignored" and m.counts()["tp"] == len(preds) - 1
    assert crowd_id not in {a["id"] for a in m.gt_annotations}
    rep = tide_decomposition(gt, preds)
    assert rep.base_ap == pytest.approx(1.0) and all(v == pytest.approx(0.0) for v in rep.delta.values())
    with pytest.raises(CellkitError, match="iou_bg"):
        match_predictions(gt, preds, iou_fg=0.3, iou_bg=0.5)
    with pytest.raises(CellkitError, match="max_dets"):
        match_predictions(gt, preds, max_dets=0)
    with pytest.raises(CellkitError, match="IoU thresholds"):
        tide_decomposition(gt, preds, iou_fg=0.62)


def test_decomposition_at_iou_075_is_on_the_ap75_scale(real_gt: dict) -> None:
    preds = perturb_predictions(real_gt, seed=6)
    rep = tide_decomposition(real_gt, preds, iou_fg=0.75)
    assert abs(rep.base_ap - coco_evaluate(real_gt, preds, "segm").ap75) <= TOL
    assert rep.fixed_ap["all"] == pytest.approx(1.0, abs=1e-12)
    assert rep.counts["tp"] < tide_decomposition(real_gt, preds).counts["tp"]  # a stricter threshold


@pytest.mark.slow
def test_counts_equal_tidecv(synth_gt: dict) -> None:
    """Same error counts as the reference implementation (tidecv, in the dev extra and the lock).
    tidecv skips images without ground truth, whose predictions are all background here."""
    preds = perturb_predictions(synth_gt, seed=8, fp_per_image=8)
    g, p = tidecv.Data("gt", max_dets=10_000), tidecv.Data("pred", max_dets=10_000)
    for a in synth_gt["annotations"]:
        g.add_ground_truth(a["image_id"], a["category_id"], a["bbox"], a["segmentation"])
    for d in preds:
        p.add_detection(d["image_id"], d["category_id"], d["score"], d["bbox"], d["segmentation"])
    run = tidecv.TIDE(mode=tidecv.TIDE.MASK).evaluate(g, p, name="x")
    theirs = {e.short_name: len(v) for e, v in run.error_dict.items()}
    ours = match_predictions(synth_gt, preds).counts()
    with_gt = {a["image_id"] for a in synth_gt["annotations"]}
    on_empty = sum(d["image_id"] not in with_gt for d in preds)
    assert on_empty > 0
    names = {"cls": "Cls", "loc": "Loc", "both": "Both", "dupe": "Dupe", "bkg": "Bkg", "miss": "Miss"}
    for t, name in names.items():
        assert ours[t] == theirs[name] + (on_empty if t == "bkg" else 0), (t, ours[t], theirs[name])


# --------------------------------------------------------------------------------------------
# curves, matrix, sizes, images


@pytest.mark.parametrize("name", ["real", "synth"])
def test_pr_curve_mean_is_class_ap50(real_gt: dict, synth_gt: dict, name: str) -> None:
    gt = real_gt if name == "real" else synth_gt
    preds = perturb_predictions(gt, seed=9, fp_per_image=20 if name == "real" else 8)
    curves = pr_curves(gt, preds)
    res = coco_evaluate(gt, preds, "segm", max_dets=1000)
    assert set(curves) == set(res.per_class)
    for cname, (rec, prec) in curves.items():
        assert rec.shape == prec.shape == (101,)
        assert rec[0] == 0 and rec[-1] == 1
        ap = res.per_class[cname]["ap50"]
        if math.isnan(ap):
            assert np.all(np.isnan(prec))  # no ground truth in this class
        else:
            assert abs(float(np.mean(prec)) - ap) <= TOL
            assert np.all(np.diff(prec) <= 1e-12)  # COCO's interpolated precision never rises
    # empty predictions: a flat zero curve where there is ground truth
    empty = pr_curves(gt, [])
    assert np.all(empty["class1"][1] == 0) and np.all(np.isnan(empty["class4"][1]))


@pytest.mark.parametrize("name", ["real", "synth"])
def test_confusion_matrix_is_the_construction(constructed: dict, name: str) -> None:
    gt, preds, exp = constructed[name]
    C = 4
    expected = np.zeros((C + 1, C + 1), np.int64)
    anns = gt["annotations"]
    for p, role, k in zip(preds, exp["pred_role"], exp["pred_ann"]):
        pc = p["category_id"] - 1
        if role in ("tp", "cls"):
            expected[anns[k]["category_id"] - 1, pc] += 1  # matched (exact mask), whatever the class
        else:
            expected[C, pc] += 1  # dupe (its instance is taken), loc/both (IoU < 0.5), bkg
    for k, role in exp["roles"].items():
        if role in ("loc", "both", "miss"):
            expected[anns[k]["category_id"] - 1, C] += 1
    cm = confusion_matrix(gt, preds, iou=0.5, score_thresh=0.5)
    np.testing.assert_array_equal(cm, expected)
    assert sum(cm[o - 1, n - 1] for o, n in exp["relabel"]) >= len(exp["relabel"])
    n_gt = Counter(a["category_id"] for a in anns)
    n_pred = Counter(p["category_id"] for p in preds)
    for c in range(1, C + 1):
        assert cm[c - 1].sum() == n_gt[c] and cm[:, c - 1].sum() == n_pred[c]
    assert cm[C, C] == 0
    # a score threshold above every score: nothing predicted, everything missed
    cm1 = confusion_matrix(gt, preds, score_thresh=1.01)
    assert cm1[:C, C].sum() == len(anns) and cm1[:, :C].sum() == 0


def test_recall_by_size(constructed: dict) -> None:
    gt, preds, exp = constructed["synth"]
    bins = (0, 200, 300, 400, math.inf)
    table = recall_by_size(gt, preds, bins=bins, iou=0.5, score_thresh=0.5)
    areas = np.array([a["area"] for a in gt["annotations"]])
    found = np.array([exp["roles"][k] == "tp" for k in range(len(areas))])  # same class, IoU 1
    n_all, _ = np.histogram(areas, bins=[0, 200, 300, 400, 1e12])
    n_found, _ = np.histogram(areas[found], bins=[0, 200, 300, 400, 1e12])
    assert table.classes[0] == "all"
    np.testing.assert_array_equal(table.n_gt[0], n_all)
    np.testing.assert_array_equal(table.n_found[0], n_found)
    np.testing.assert_array_equal(table.n_gt[1:].sum(axis=0), table.n_gt[0])
    np.testing.assert_array_equal(table.n_found[1:].sum(axis=0), table.n_found[0])
    rec = table.recall
    assert np.all(np.isnan(rec[4]))  # no class-4 cells in the synthetic images
    assert np.allclose(rec[0][n_all > 0], (n_found / np.maximum(n_all, 1))[n_all > 0])
    assert len(table.rows()) == 5 * 4 and ">=400" in table.format()
    with pytest.raises(CellkitError, match="increasing"):
        recall_by_size(gt, preds, bins=(10, 5))


def test_per_image_and_status_entries(synth_gt: dict) -> None:
    preds = perturb_predictions(synth_gt, seed=10, fp_per_image=8, p_drop=0.1)
    worst_id = 5
    preds = [p for p in preds if p["image_id"] != worst_id]  # one image without any prediction
    scores = per_image(synth_gt, preds)
    assert len(scores) == len(synth_gt["images"])
    cm = cell_metrics(synth_gt, preds)  # the same matching: the counts add up to its totals
    assert sum(s.tp for s in scores) == cm.overall.tp
    assert sum(s.fp for s in scores) == cm.overall.fp and sum(s.fn for s in scores) == cm.overall.fn
    assert scores[0].image_id == worst_id and scores[0].f1 == 0 and scores[0].fn == scores[0].n_gt > 0
    f1 = [s.f1 for s in scores if not math.isnan(s.f1)]
    assert f1 == sorted(f1)
    for s in scores:
        assert s.n_gt == sum(a["image_id"] == s.image_id for a in synth_gt["annotations"])
    best = scores[-1]
    entries = status_entries(synth_gt, preds, best.image_id)
    st = Counter(e["status"] for e in entries)
    assert (st["tp"], st["fp"], st["fn"]) == (best.tp, best.fp, best.fn)
    assert all(e["score"] == 1.0 for e in entries if e["status"] == "fn")
    assert "F1" in best.title()
    with pytest.raises(CellkitError, match="not in the ground truth"):
        status_entries(synth_gt, preds, 999)


def test_scores_and_threshold_curve(real_gt: dict) -> None:
    preds = perturb_predictions(real_gt, seed=12)
    m = match_predictions(real_gt, preds)
    tp, fp = score_distributions(m)
    assert len(tp) == m.counts()["tp"] and len(tp) + len(fp) == len(preds)
    assert np.mean(tp) > np.mean(fp)  # perturb_predictions scores false positives lower on average
    thresholds = (0.0, 0.2, 0.5, 0.9)
    pts = ap50_vs_score_threshold(real_gt, preds, thresholds)
    assert [p.threshold for p in pts] == list(thresholds)
    assert pts[0].ap50 == pytest.approx(coco_evaluate(real_gt, preds).ap50, abs=TOL)
    assert [p.n_kept for p in pts] == [sum(q["score"] >= t for q in preds) for t in thresholds]
    aps = [p.ap50 for p in pts]
    assert all(a >= b - 1e-12 for a, b in zip(aps, aps[1:]))  # cutting low scores only loses recall
    assert aps[-1] < aps[0]


# --------------------------------------------------------------------------------------------
# one object for the whole analysis


@pytest.mark.slow
def test_error_analysis_answers_from_one_matching(constructed: dict) -> None:
    gt, preds, _ = constructed["synth"]
    ea = ErrorAnalysis(gt, preds, max_dets=1000, backend="pycocotools")
    rep = ea.tide()
    assert ea.tide() is rep and rep.matching is ea.matching  # matched once, reused
    ref = tide_decomposition(gt, preds, backend="pycocotools")
    assert rep.base_ap == pytest.approx(ref.base_ap, abs=1e-12) and rep.counts == ref.counts
    assert rep.fixed_ap == pytest.approx(ref.fixed_ap, abs=1e-12)
    assert ea.ap50 == pytest.approx(coco_evaluate(gt, preds).ap50, abs=TOL)
    for name, (rec, prec) in pr_curves(gt, preds, backend="pycocotools").items():
        np.testing.assert_allclose(ea.pr_curves()[name][1], prec, equal_nan=True)
    np.testing.assert_array_equal(ea.confusion_matrix(0.5), confusion_matrix(gt, preds, score_thresh=0.5))
    np.testing.assert_array_equal(ea.recall_by_size(0.5).n_found, recall_by_size(gt, preds, score_thresh=0.5).n_found)
    assert [(s.image_id, s.tp, s.fp, s.fn) for s in ea.per_image(0.5)] == \
        [(s.image_id, s.tp, s.fp, s.fn) for s in per_image(gt, preds, score_thresh=0.5)]
    om = ea.operating(0.5)
    assert ea.operating(0.5) is om  # one operating-point matching per setting
    image_id = ea.per_image(0.5)[0].image_id
    assert ea.status_entries(image_id, 0.5) == status_entries(gt, preds, image_id, score_thresh=0.5)
    pts = ea.ap50_vs_score_threshold((0.0, 0.5))
    assert [p.ap50 for p in pts] == pytest.approx([p.ap50 for p in ap50_vs_score_threshold(gt, preds, (0.0, 0.5))],
                                                  abs=TOL)
    tp, fp = ea.score_distributions()
    assert len(tp) == rep.counts["tp"]


# --------------------------------------------------------------------------------------------
# figures


def _has_data(fig: plt.Figure) -> bool:
    return any(ax.lines or ax.patches or ax.images or ax.collections for ax in fig.axes)


def test_figures(constructed: dict, synth_root: Path) -> None:
    from cellkit.viz import error_plots as ep

    gt, preds, _ = constructed["synth"]
    rep = tide_decomposition(gt, preds)
    figs = [
        ep.plot_tide(rep),
        ep.plot_pr_curves(pr_curves(gt, preds)),
        ep.plot_confusion_matrix(confusion_matrix(gt, preds), normalize=True),
        ep.plot_recall_by_size(recall_by_size(gt, preds)),
        ep.plot_score_histograms(*score_distributions(rep.matching)),
        ep.plot_ap_vs_threshold(ap50_vs_score_threshold(gt, preds, (0.0, 0.5, 0.8))),
    ]
    try:
        for fig in figs:
            assert isinstance(fig, plt.Figure) and fig.axes and _has_data(fig)
            assert any(ax.get_title() or ax.get_xlabel() for ax in fig.axes)
        tide_ax = figs[0].axes[0]
        assert len(tide_ax.patches) == len(ERROR_TYPES)
        widths = [p.get_width() for p in tide_ax.patches]
        assert widths == pytest.approx([max(rep.delta[t], 0) for t in ERROR_TYPES], abs=1e-12)
        # the gallery: the worst images, TP/FP/FN in their colours
        from cellkit.data.io import read_image
        from cellkit.viz.overlay import STATUS_COLORS, instances_from_coco

        worst = per_image(gt, preds)[:2]
        files = {im["id"]: im["file_name"] for im in gt["images"]}
        images = [read_image(synth_root / "train" / files[s.image_id]) for s in worst]
        insts = [instances_from_coco(status_entries(gt, preds, s.image_id)) for s in worst]
        fig = ep.worst_images_figure(images, insts, [s.title() for s in worst], ncols=2)
        figs.append(fig)
        assert len([ax for ax in fig.axes if ax.images]) == 2
        drawn = fig.axes[0].images[0].get_array()
        for status in ("tp", "fp", "fn"):
            if any(i.status == status for i in insts[0]):
                assert np.all(drawn == STATUS_COLORS[status], axis=-1).any(), status
    finally:
        for fig in figs:
            plt.close(fig)
