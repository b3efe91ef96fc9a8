"""CAM benchmark: (method, stage) plan, image selection, table rows/columns, failures recorded, numbers."""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np
import pytest

from lclsc_jax import data, explain, models
from lclsc_jax.protocols import cam_benchmark as cb
from lclsc_jax.evaluate import shortcuts
from lclsc_jax.train import config as C
from lclsc_jax.protocols import runs
from lclsc_jax.train import loop


def test_plan_stage_methods_times_stages_sc_last_input_once():
    model = models.create("tiny", 3, head="gei", embed_dim=8, in_channels=1)
    plan = cb.benchmark_plan(model, ["sc", "gradcam", "fullgrad", "eigencam"], ["stage3", "last"])
    assert plan == [("sc", "stage4"), ("gradcam", "stage3"), ("gradcam", "stage4"), ("fullgrad", "input"),
                    ("eigencam", "stage3"), ("eigencam", "stage4")]
    assert len(cb.benchmark_plan(model, ["gradcam"], None)) == len(model.stage_names)
    with pytest.raises(ValueError, match="unknown stage"):
        cb.benchmark_plan(model, ["gradcam"], ["stage9"])
    with pytest.raises(ValueError, match="unknown saliency method"):
        cb.benchmark_plan(model, ["gradcm"], ["stage4"])


def test_select_images_is_an_evenly_spread_ordered_subset():
    idx = np.arange(100, 160)
    sel = cb.select_images(idx, 7)
    assert len(sel) == 7 and sel[0] == 100 and sel[-1] == 159
    assert np.all(np.diff(sel) > 0) and set(sel) <= set(idx)
    np.testing.assert_array_equal(cb.select_images(idx[:5], 7), idx[:5])


def test_columns_name_every_threshold_and_otsu():
    cols = cb.benchmark_columns((0.3, 0.5), faithfulness=True)
    for key in ("0.3", "0.5", "otsu"):
        assert all(f"{m}@{key}" in cols for m in ("dice", "iou", "precision", "recall", "bbox_iou"))
    assert cols[:2] == ["method", "stage"] and cols[-1] == "error"
    assert len(cols) == len(set(cols))
    # The threshold-free headline columns come first; ROAD is the default faithfulness measure.
    assert cols[4:10] == ["pr_auc", "dice@area", "pointing_game", "specificity_corr", "specificity_gap", "road_gap"]
    assert "road_gap_margin" in cols and "deletion_auc" not in cols
    assert "road_gap" not in cb.benchmark_columns((0.5,))
    both = cb.benchmark_columns((0.5,), True, faithfulness_metrics=("deletion", "insertion"), specificity=False)
    assert "deletion_auc" in both and "insertion_auc" in both and "road_gap" not in both
    assert "specificity_corr" not in both
    assert "dice@area" in cols and "bbox_iou@area" in cols and "pr_auc" in cols
    with pytest.raises(ValueError, match="faithfulness_metrics"):
        cb.benchmark_columns((0.5,), True, faithfulness_metrics=("rise",))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cam")
    cfg = C.load("tiny", {"data.cache_dir": str(root / "cache"), "train.steps": 8, "train.eval_every": 8,
                          "train.checkpoint_every": 8})
    loop.train(cfg, str(root / "run"), progress=False)
    return str(root / "run")


def _dice_np(pred: np.ndarray, gt: np.ndarray) -> float:
    den = pred.sum() + gt.sum()
    return 1.0 if den == 0 else 2.0 * np.logical_and(pred, gt).sum() / den


@pytest.mark.slow
def test_benchmark_two_methods_two_stages(tiny_run, tmp_path, monkeypatch):
    real = explain.saliency

    def flaky(method, *a, stage="last", **kw):  # hirescam "breaks" at stage3
        if method == "hirescam" and stage == "stage3":
            raise RuntimeError("boom at stage3")
        return real(method, *a, stage=stage, **kw)

    monkeypatch.setattr(explain.api, "saliency", flaky)  # what saliency_batched calls
    out = str(tmp_path / "bench")
    rows = cb.benchmark_cams(tiny_run, methods=["gradcam", "hirescam"], stages=["stage3", "stage4"], max_images=6,
                             thresholds=(0.5,), out_dir=out, faithfulness=True, deletion_steps=4, figure_images=3,
                             faithfulness_metrics=("road", "deletion", "insertion"), road_percentages=(30, 70),
                             progress=False)
    blind = [(f"blind:{b}", "-") for b in shortcuts.BLIND_MAPS]
    assert [(r["method"], r["stage"]) for r in rows] == [("gradcam", "stage3"), ("gradcam", "stage4"),
                                                         ("hirescam", "stage3"), ("hirescam", "stage4"), *blind]
    bad = rows[2]
    assert bad["error"].startswith("RuntimeError: boom") and bad.get("dice@0.5") is None
    for r in (rows[0], rows[1], rows[3], *rows[4:]):
        assert r["error"] is None and r["n_images"] == 6
        for k in ("dice@0.5", "dice@otsu", "iou@otsu", "bbox_iou@0.5", "dice@area", "pr_auc", "pointing_game",
                  "energy_pointing_game", "deletion_auc", "insertion_auc", "road_morf", "road_lerf"):
            assert 0.0 <= r[k] <= 1.0, k  # deletion/insertion/ROAD curves track the target's rank here
        assert -1.0 <= r["road_gap"] <= 1.0 and -1.0 <= r["specificity_gap"] <= 1.0
        assert r["road_gap"] == pytest.approx(r["road_lerf"] - r["road_morf"])
    for r in rows[4:]:  # a class-blind map is the same map for every class
        assert r["specificity_gap"] == 0.0 and (r["specificity_corr"] is None or r["specificity_corr"] == pytest.approx(1))

    # Independent recomputation of gradcam@stage4 Dice at 0.5 inside the field of view.
    run = runs.load_run(tiny_run)
    ds = loop.load_dataset(run.cfg)
    with open(os.path.join(out, "cam_benchmark.json")) as f:
        meta = json.load(f)
    idx = np.asarray(meta["indices"])
    test_idx = np.asarray(json.load(open(os.path.join(tiny_run, "splits.json")))["indices"]["test"])
    assert len(idx) == 6 and set(idx) <= set(test_idx)
    recs = [ds.source[int(i)] for i in idx]
    x = data.normalize_images(np.stack([r["image"] for r in recs]))
    y = np.array([r["label"] for r in recs], np.int32)
    gt = np.stack([r["mask"] > 0 for r in recs])
    maps = np.asarray(real("gradcam", run.model, run.variables, x, y, stage="stage4", global_emb=run.global_emb,
                           tau=run.cfg.loss.tau))
    h = x.shape[1]
    c = (np.arange(h) + 0.5) / h - 0.5
    fov = (c[:, None] ** 2 + c[None, :] ** 2) <= 0.25
    keep = (gt & fov).any(axis=(1, 2))
    expect = np.mean([_dice_np((maps[i] >= 0.5) & fov, gt[i] & fov) for i in range(6) if keep[i]])
    assert rows[1]["dice@0.5"] == pytest.approx(expect, abs=1e-5)

    # Class specificity of gradcam@stage4, recomputed: the runner-up class from the run's own
    # predictions (softmax probabilities of runs.predict), its map, scipy's Pearson r inside the FOV.
    from scipy import stats

    probs = runs.predict(run, ds, idx)["probs"]
    wrong = np.array([max((c for c in range(probs.shape[1]) if c != y[i]), key=lambda c: (probs[i, c], -c))
                      for i in range(6)], np.int32)
    maps_w = np.asarray(real("gradcam", run.model, run.variables, x, wrong, stage="stage4", global_emb=run.global_emb,
                             tau=run.cfg.loss.tau))
    rs = [stats.pearsonr(maps[i][fov], maps_w[i][fov])[0] for i in range(6)
          if np.ptp(maps[i][fov]) > 0 and np.ptp(maps_w[i][fov]) > 0]
    assert rows[1]["specificity_corr"] == pytest.approx(np.mean(rs), abs=1e-4)

    # Per-frame scores: one column per (row, metric) over the same frames; their means are the rows'.
    fr = cb.load_frames(os.path.join(out, cb.FRAME_FILE))
    np.testing.assert_array_equal(fr["index"], idx)
    np.testing.assert_array_equal(fr["patient"], ds.patients[idx].astype(str))
    np.testing.assert_array_equal(fr["runner_up"], wrong)
    np.testing.assert_array_equal(fr["label"], y)
    assert ("gradcam", "stage4", "dice@0.5") not in fr["columns"]  # only the FRAME_METRICS are kept per frame
    pg = fr["columns"][("gradcam", "stage4", "pointing_game")]
    assert np.isnan(pg[~keep]).all() and np.nanmean(pg) == pytest.approx(rows[1]["pointing_game"])
    assert not any(m == "hirescam" and st == "stage3" for m, st, _ in fr["columns"])  # the failed row has none

    # The class-blind local-std row: computed inside the measured field of view, scored inside the same
    # FOV as the other rows; Dice at the mask's area recomputed with scipy's generic_filter (window std
    # over the map's valid pixels), min-max scaling and a stable top-k.
    from scipy import ndimage

    u8 = np.stack([r["image"] for r in recs])
    map_fov = shortcuts.estimate_fov(u8)["valid"]
    assert not (map_fov & ~fov).any()
    images = u8[..., 0] / 255.0
    area = []
    for i in range(6):
        if not keep[i]:
            continue
        img = np.where(map_fov, images[i], np.nan)
        std = ndimage.generic_filter(img, lambda w: np.nanstd(w) if np.isfinite(w).any() else 0.0, size=7,
                                     mode="reflect")
        std = np.where(map_fov, (std - std[map_fov].min()) / (std[map_fov].max() - std[map_fov].min()), 0.0)
        g = gt[i] & fov
        vals = np.where(fov, std, -np.inf).ravel()
        top = np.argsort(-vals, kind="stable")[: int(g.sum())]
        pred = np.zeros(vals.size, bool)
        pred[top] = True
        area.append(_dice_np(pred.reshape(g.shape), g))
    local = next(r for r in rows if r["method"] == "blind:local_std")
    assert local["dice@area"] == pytest.approx(np.mean(area), abs=1e-6)

    # Files: CSV/Markdown with every column, one line per row; a figure per stage.
    cols = cb.benchmark_columns((0.5,), faithfulness=True, faithfulness_metrics=("road", "deletion", "insertion"))
    with open(os.path.join(out, "cam_benchmark.csv")) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == cols and len(table) == 4 + len(blind)
    assert table[2]["error"].startswith("RuntimeError") and table[2]["dice@0.5"] == ""
    assert [r["method"] for r in table[4:]] == [m for m, _ in blind]
    md = open(os.path.join(out, "cam_benchmark.md")).read().strip().splitlines()
    assert len(md) == 2 + 4 + len(blind) and "dice@otsu" in md[0] and "dice@area" in md[0]
    assert json.load(open(os.path.join(out, "cam_benchmark.json")))["blind"] == list(shortcuts.BLIND_MAPS)
    for stage in ("stage3", "stage4"):
        assert os.path.getsize(os.path.join(out, f"grid_{stage}.png")) > 1000


@pytest.mark.slow
def test_benchmark_rejects_data_without_masks(tiny_run, monkeypatch):
    real_load = loop.load_dataset

    def no_masks(cfg, source=None):
        return dataclasses.replace(real_load(cfg, source), has_masks=False)

    monkeypatch.setattr(loop, "load_dataset", no_masks)
    with pytest.raises(ValueError, match="no ground-truth masks"):
        cb.benchmark_cams(tiny_run, methods=["gradcam"], progress=False)


def test_cli_no_fov_scores_the_whole_frame(tmp_path, monkeypatch):
    from lclsc_jax import cli

    seen = {}

    def fake(workdir, *a, fov=True, **kw):
        seen["fov"] = fov
        os.makedirs(a[5], exist_ok=True)
        with open(os.path.join(a[5], "cam_benchmark.md"), "w") as f:
            f.write("table\n")
        return [{"error": None}]

    monkeypatch.setattr(cb, "benchmark_cams", fake)
    out = str(tmp_path / "b")
    assert cli.main(["benchmark-cams", "--workdir", str(tmp_path), "--out", out]) == 0 and seen["fov"] is True
    assert cli.main(["benchmark-cams", "--workdir", str(tmp_path), "--out", out, "--no-fov"]) == 0
    assert seen["fov"] is False


def test_pointing_ties_any_counts_every_maximum(tiny_run, tmp_path):
    kw = dict(methods=["gradcam"], stages=["last"], max_images=4, blind=(), specificity=False, figure_images=0,
              progress=False)
    first = cb.benchmark_cams(tiny_run, out_dir=str(tmp_path / "f"), **kw)[0]
    anyr = cb.benchmark_cams(tiny_run, out_dir=str(tmp_path / "a"), pointing_ties="any", **kw)[0]
    meta = json.load(open(tmp_path / "a" / "cam_benchmark.json"))
    assert meta["pointing_ties"] == "any"
    # Independent: every maximal pixel of each map inside the field of view, a hit if one is on the mask.
    run = runs.load_run(tiny_run)
    ds = loop.load_dataset(run.cfg)
    recs = [ds.source[int(i)] for i in meta["indices"]]
    x = data.normalize_images(np.stack([r["image"] for r in recs]))
    y = np.array([r["label"] for r in recs], np.int32)
    maps = np.asarray(explain.saliency("gradcam", run.model, run.variables, x, y, stage="last",
                                       global_emb=run.global_emb, tau=run.cfg.loss.tau))
    h = x.shape[1]
    c = (np.arange(h) + 0.5) / h - 0.5
    fov = (c[:, None] ** 2 + c[None, :] ** 2) <= 0.25
    hits = []
    for m, r in zip(maps, recs):
        gt = (r["mask"] > 0) & fov
        if gt.any():
            peak = fov & (m == m[fov].max())
            hits.append(bool((peak & gt).any()))
    assert anyr["pointing_game"] == pytest.approx(np.mean(hits))
    assert anyr["pointing_game"] >= first["pointing_game"]
    with pytest.raises(ValueError, match="pointing_ties must be one of"):
        cb.benchmark_cams(tiny_run, pointing_ties="all", **kw)
