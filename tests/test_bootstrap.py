"""The 95 % interval of a COCO score: the bootstrap re-accumulation against COCOeval run again on
datasets that hold each drawn image as often as it was drawn (copies with new ids), on the real
sample and on synthetic images; both COCOeval backends; the report, its JSON and the CLI."""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from perturb import perturb_predictions, write
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cellkit.cli import main
from cellkit.evaluation.bootstrap import ImageMatches, bootstrap_scores, counts_of, draw_resamples
from cellkit.evaluation.coco import coco_evaluate, evaluate_predictions, faster_coco_eval_available

MAX_DETS = (1, 10, 100, 1000)


def cocoeval(gt: dict, preds: list, max_dets: tuple[int, ...] = MAX_DETS, backend: str = "pycocotools"):
    """COCOeval by hand (evaluate + accumulate) on deep copies; faster-coco-eval with its per-image results kept."""
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "pycocotools":
            g = COCO()
            g.dataset = copy.deepcopy(gt)
            g.createIndex()
            E = COCOeval(g, g.loadRes(copy.deepcopy(preds)), "segm")
        else:
            import faster_coco_eval
            from faster_coco_eval import COCOeval_faster

            g = faster_coco_eval.COCO(copy.deepcopy(gt))
            E = COCOeval_faster(g, g.loadRes(copy.deepcopy(preds)), "segm", separate_eval=True,
                                print_function=lambda *a, **k: None)
        E.params.maxDets = list(max_dets)
        E.evaluate()
        E.accumulate()
    return E


def class_ap_of(E, m: int = -1) -> np.ndarray:
    """``(K, T)`` per-class AP at each IoU threshold from COCOeval's precision (NaN: no ground truth)."""
    p = np.asarray(E.eval["precision"])[:, :, :, 0, m]  # (T, R, K)
    out = np.full((p.shape[2], p.shape[0]), np.nan)
    for k in range(p.shape[2]):
        for t in range(p.shape[0]):
            if (p[t, :, k] > -1).all():
                out[k, t] = p[t, :, k].mean()
    return out


def resampled(gt: dict, preds: list, draw: np.ndarray) -> tuple[dict, list]:
    """The dataset of one draw: image ``draw[j]`` (an index into the sorted image ids) as image ``j + 1``,
    with copies of its cells (new annotation ids) and of its predictions."""
    ids = sorted(im["id"] for im in gt["images"])
    images = {im["id"]: im for im in gt["images"]}
    anns: dict[int, list] = {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    dets: dict[int, list] = {}
    for p in preds:
        dets.setdefault(p["image_id"], []).append(p)
    out_images, out_anns, out_preds = [], [], []
    for j, i in enumerate(draw):
        old, new = ids[int(i)], j + 1
        out_images.append({**images[old], "id": new})
        out_anns += [{**a, "id": len(out_anns) + 1 + n, "image_id": new} for n, a in enumerate(anns.get(old, []))]
        out_preds += [{**p, "image_id": new} for p in dets.get(old, [])]
    return {"images": out_images, "annotations": out_anns, "categories": gt["categories"]}, out_preds


def combined(real_gt: dict, synth_gt: dict) -> dict:
    """The real sample (one crowded image) and the 8 synthetic images in one ground truth (new ids),
    one synthetic cell marked as a crowd region (its matches are ignored, not counted)."""
    images, anns = [], []
    for offset, g in ((0, real_gt), (100, synth_gt)):
        images += [{**im, "id": im["id"] + offset} for im in g["images"]]
        anns += [{**a, "id": len(anns) + 1 + n, "image_id": a["image_id"] + offset} for n, a in enumerate(g["annotations"])]
    crowd = next(i for i, a in enumerate(anns) if a["image_id"] > 100)
    anns[crowd] = {**anns[crowd], "iscrowd": 1}
    return {"images": images, "annotations": anns, "categories": real_gt["categories"]}


@pytest.fixture(scope="module")
def real_and_synth(real_gt: dict, synth_gt: dict) -> tuple[dict, list]:
    gt = combined(real_gt, synth_gt)
    return gt, perturb_predictions(gt, seed=4, fp_per_image=8)


@pytest.fixture(scope="module")
def synth(synth_gt: dict) -> tuple[dict, list]:
    return synth_gt, perturb_predictions(synth_gt, seed=1, fp_per_image=5)


# --------------------------------------------------------------------------------------------
# the re-accumulation against COCOeval


@pytest.mark.parametrize("which", ["real", "synth", "real_and_synth"])
def test_all_images_once_give_cocoevals_own_numbers(which: str, request: pytest.FixtureRequest, real_gt: dict) -> None:
    gt, preds = (real_gt, perturb_predictions(real_gt, seed=2)) if which == "real" else request.getfixturevalue(which)
    for max_dets in (1000, 10):
        E = cocoeval(gt, preds)
        m = ImageMatches.from_cocoeval(E, max_dets)
        ours = m.class_ap(np.ones((1, m.n_images), dtype=np.int64))[0]
        theirs = class_ap_of(E, list(MAX_DETS).index(max_dets))
        assert np.array_equal(np.isnan(ours), np.isnan(theirs))
        assert np.nanmax(np.abs(ours - theirs)) <= 1e-12


@pytest.mark.parametrize("which, n_draws, max_dets", [("synth", 12, 1000), ("real_and_synth", 10, 1000),
                                                      ("real_and_synth", 6, 10)])
def test_every_draw_is_cocoeval_on_a_dataset_of_copies(which: str, n_draws: int, max_dets: int,
                                                       request: pytest.FixtureRequest) -> None:
    # the slow, independent computation: COCOeval again on each draw's dataset (duplicated images with
    # new ids), against the re-accumulation of one COCOeval's matching on the same draws
    gt, preds = request.getfixturevalue(which)
    m = ImageMatches.from_cocoeval(cocoeval(gt, preds), max_dets)
    draws = draw_resamples(m.n_images, n_draws, seed=5)
    assert any(len(set(d.tolist())) < len(d) for d in draws)  # images drawn twice or more
    ours = m.class_ap(counts_of(draws, m.n_images))
    boot = bootstrap_scores(m, n_draws, draws=draws)
    for b, draw in enumerate(draws):
        g, p = resampled(gt, preds, draw)
        theirs = class_ap_of(cocoeval(g, p, (1, 10, max_dets) if max_dets not in (1, 10) else MAX_DETS),
                             -1 if max_dets == 1000 else 1)
        assert np.array_equal(np.isnan(ours[b]), np.isnan(theirs)), (b, draw)
        assert np.nanmax(np.abs(ours[b] - theirs)) <= 1e-9, (b, draw)
        valid = theirs[~np.isnan(theirs[:, 0])]
        assert abs(boot.samples["ap50"][b] - valid[:, 0].mean()) <= 1e-9
        assert abs(boot.samples["ap"][b] - valid.mean()) <= 1e-9
        assert abs(boot.samples["ap75"][b] - valid[:, 5].mean()) <= 1e-9


@pytest.mark.skipif(not faster_coco_eval_available(), reason="faster-coco-eval is optional")
@pytest.mark.parametrize("which", ["synth", "real_and_synth"])
def test_faster_coco_eval_gives_the_same_matching(which: str, request: pytest.FixtureRequest) -> None:
    gt, preds = request.getfixturevalue(which)
    a = ImageMatches.from_cocoeval(cocoeval(gt, preds), 1000)
    E = cocoeval(gt, preds, backend="faster_coco_eval")
    b = ImageMatches.from_cocoeval(E, 1000)
    assert np.array_equal(a.image_ids, b.image_ids) and np.array_equal(a.n_gt, b.n_gt)
    for k in range(len(a.category_ids)):
        assert np.array_equal(a.image_index[k], b.image_index[k])
        assert np.array_equal(a.tp[k], b.tp[k]) and np.array_equal(a.ignored[k], b.ignored[k])
    # keeping its per-image results (separate_eval) changes none of its numbers
    import faster_coco_eval
    from faster_coco_eval import COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        g = faster_coco_eval.COCO(copy.deepcopy(gt))
        fused = COCOeval_faster(g, g.loadRes(copy.deepcopy(preds)), "segm", print_function=lambda *a, **k: None)
        fused.params.maxDets = list(MAX_DETS)
        fused.evaluate()
        fused.accumulate()
    assert np.array_equal(np.asarray(E.eval["precision"]), np.asarray(fused.eval["precision"]))
    assert coco_evaluate(gt, preds, backend="faster_coco_eval", bootstrap=100).intervals == \
        coco_evaluate(gt, preds, backend="pycocotools", bootstrap=100).intervals


# --------------------------------------------------------------------------------------------
# the report


def test_the_report_carries_the_interval_and_keeps_the_point_estimate(synth: tuple, tmp_path: Path) -> None:
    gt, preds = synth
    plain = coco_evaluate(gt, preds)
    r = coco_evaluate(gt, preds, bootstrap=300, bootstrap_seed=2)
    assert plain.intervals == {} and plain.bootstrap is None
    assert (r.ap50, r.ap, r.ap75, r.per_class["class1"]["ap50"]) == (plain.ap50, plain.ap, plain.ap75,
                                                                       plain.per_class["class1"]["ap50"])
    lo, hi = r.interval("ap50")
    assert lo < r.ap50 < hi and hi - lo > 0.02  # 8 images: a wide interval
    assert r.interval("ap")[0] < r.ap < r.interval("ap")[1]
    assert r.per_class["class1"]["ap50_ci"][0] <= r.per_class["class1"]["ap50"] <= r.per_class["class1"]["ap50_ci"][1]
    # the interval is the percentiles of the draws; the same seed gives the same draws and interval
    assert (lo, hi) == tuple(np.percentile(r.bootstrap.samples["ap50"], [2.5, 97.5]))
    again = coco_evaluate(gt, preds, bootstrap=300, bootstrap_seed=2)
    assert again.intervals == r.intervals
    assert coco_evaluate(gt, preds, bootstrap=300, bootstrap_seed=3).intervals != r.intervals
    # printed as "AP50 0.6491 [0.56, 0.78]", and in the JSON
    assert f"AP50   {r.ap50:.4f} [{lo:.2f}, {hi:.2f}]" in r.format()
    d = json.loads(json.dumps(r.to_dict()))
    assert d["ap50_ci"] == [lo, hi] and d["bootstrap"] == {"resamples": 300, "seed": 2, "level": 0.95}
    assert d["per_class"]["class1"]["ap50_ci"] == list(r.per_class["class1"]["ap50_ci"])
    # a class without ground truth has no interval
    assert "class4" not in {k for k, v in d["per_class"].items() if v["ap50_ci"][0] is not None}
    report = evaluate_predictions(gt, preds, bootstrap=300, bootstrap_seed=2)
    assert report.to_dict()["ap50_ci"] == [lo, hi] and report.headline_interval == (lo, hi)


def test_an_empty_prediction_list_scores_zero_in_every_draw(synth: tuple) -> None:
    gt, _ = synth
    r = coco_evaluate(gt, [], bootstrap=50)
    assert r.ap50 == 0.0 and r.interval("ap50") == (0.0, 0.0)


def test_cli_prints_and_writes_the_interval(synth: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt, preds = synth
    g, p = write(gt, tmp_path / "gt.json"), write(preds, tmp_path / "pred.json")
    assert main(["evaluate", "--gt", g, "--pred", p, "--bootstrap", "200", "--iou-type", "segm"]) == 0
    out = capsys.readouterr().out
    r = coco_evaluate(gt, preds, bootstrap=200)
    lo, hi = r.interval("ap50")
    assert f"AP50   {r.ap50:.4f} [{lo:.2f}, {hi:.2f}]" in out and "200 bootstrap draws of the 8 images" in out
    assert main(["evaluate", "--gt", g, "--pred", p, "--json", "--bootstrap", "200"]) == 0
    assert json.loads(capsys.readouterr().out)["ap50_ci"] == [lo, hi]
    assert main(["evaluate", "--gt", g, "--pred", p, "--bootstrap", "0"]) == 0
    assert "[" not in capsys.readouterr().out.splitlines()[1]  # AP50 alone
