"""Saliency sanity checks (Adebayo et al. 2018): similarity measures, randomised trees, thresholds, CLI.

Similarities are checked against scipy/scikit-image computed here and closed forms; the cascade
against the parameter trees leaf by leaf; the protocol's numbers against a recomputation with
scipy; the verdict both ways (real maps pass, a model-independent edge map fails).
"""

from __future__ import annotations

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import pearsonr, spearmanr
from skimage.feature import hog
from skimage.metrics import structural_similarity

from lclsc_jax import cli, data, explain, models
from lclsc_jax.evaluate import similarity as sim
from lclsc_jax.protocols import runs
from lclsc_jax.protocols import sanity as sn
from lclsc_jax.train import config as C
from lclsc_jax.train import loop

#: Mean Spearman(abs) of the maps after the full cascade must fall below this (the protocol's verdict).
THRESHOLD = 0.5


def _maps(n: int = 4, s: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random maps in [0, 1] with plateaus (ties), like upsampled CAMs."""
    rs = np.random.RandomState(seed)
    m = ndimage.gaussian_filter(rs.rand(n, s, s), (0, 3, 3))
    m = (m - m.min(axis=(1, 2), keepdims=True)) / np.ptp(m, axis=(1, 2), keepdims=True)
    return np.round(m * 20) / 20  # ties


# ---- similarity measures ----

def test_spearman_matches_scipy_with_ties_signed_and_absolute():
    a = _maps(seed=0) - 0.4
    b = _maps(seed=1) - 0.4 + 0.5 * a
    got = sim.spearman(a, b)
    want = [spearmanr(a[i].ravel(), b[i].ravel())[0] for i in range(len(a))]
    np.testing.assert_allclose(got, want, atol=1e-12)
    got_abs = sim.spearman(a, b, absolute=True)
    want_abs = [spearmanr(np.abs(a[i]).ravel(), np.abs(b[i]).ravel())[0] for i in range(len(a))]
    np.testing.assert_allclose(got_abs, want_abs, atol=1e-12)
    assert np.max(np.abs(got - got_abs)) > 0.05  # the two variants differ on signed maps


def test_closed_forms_identical_negated_constant():
    a = _maps(seed=2) - 0.5
    np.testing.assert_allclose(sim.spearman(a, a), 1.0)
    np.testing.assert_allclose(sim.spearman(a, -a), -1.0)
    np.testing.assert_allclose(sim.spearman(a, -a, absolute=True), 1.0)
    np.testing.assert_allclose(sim.ssim(a + 0.5, a + 0.5), 1.0)
    np.testing.assert_allclose(sim.hog_similarity(a, a), 1.0)
    # HOG with L2-Hys blocks ignores contrast: a map and twice it have the same descriptor.
    np.testing.assert_allclose(sim.hog_similarity(a + 0.5, 2 * (a + 0.5)), 1.0, atol=1e-6)
    flat = np.zeros_like(a)
    np.testing.assert_array_equal(sim.spearman(flat, a), 0.0)  # a flat map shares no ranking
    np.testing.assert_array_equal(sim.spearman(flat, flat + 1), 1.0)
    np.testing.assert_array_equal(sim.hog_similarity(flat, a), 0.0)
    np.testing.assert_allclose(sim.pearson_rows(a.reshape(4, -1), 3 * a.reshape(4, -1) + 1), 1.0)


def test_ssim_matches_skimage():
    a = _maps(seed=3)
    b = np.clip(0.6 * a + 0.4 * _maps(seed=4), 0, 1)
    want = [structural_similarity(a[i], b[i], data_range=1.0) for i in range(len(a))]
    np.testing.assert_allclose(sim.ssim(a, b), want, atol=1e-10)
    want5 = [structural_similarity(a[i], b[i], data_range=2.0, win_size=5) for i in range(len(a))]
    np.testing.assert_allclose(sim.ssim(a, b, data_range=2.0, win_size=5), want5, atol=1e-10)
    assert max(want) < 0.99


def test_hog_similarity_is_pearson_of_skimage_descriptors_and_can_fail():
    a = _maps(seed=5)
    b = np.clip(a + 0.2 * _maps(seed=6), 0, 1)
    want = [pearsonr(hog(a[i], orientations=9, pixels_per_cell=(4, 4), cells_per_block=(2, 2), block_norm="L2-Hys"),
                     hog(b[i], orientations=9, pixels_per_cell=(4, 4), cells_per_block=(2, 2), block_norm="L2-Hys"))[0]
            for i in range(len(a))]
    np.testing.assert_allclose(sim.hog_similarity(a, b), want, atol=1e-10)  # 32 px: cells of 32 // 8 = 4
    transposed = np.transpose(a, (0, 2, 1))
    assert sim.hog_similarity(a, transposed).mean() < 0.8  # structure moved: no longer similar


def test_summarize_and_map_similarities():
    v = np.array([0.1, 0.5, 0.3])
    s = sim.summarize(v)
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.3) and s["sd"] == pytest.approx(0.2)
    assert sim.summarize([0.7]) == {"mean": 0.7, "sd": 0.0, "n": 1}
    a, b = _maps(seed=7), _maps(seed=8)
    out = sim.map_similarities(a, b, raw_a=a - 0.5, raw_b=b - 0.5)
    assert list(out) == list(sim.SIMILARITIES)
    np.testing.assert_allclose(out["spearman_signed"], sim.spearman(a, b))  # ranks ignore the shift
    np.testing.assert_allclose(out["spearman_abs"], sim.spearman(a - 0.5, b - 0.5, absolute=True))
    with pytest.raises(ValueError, match="same shape"):
        sim.spearman(a, b[:, :16])


# ---- parameter blocks and the cascade ----

def test_blocks_of_tiny_and_resnet18():
    tiny = models.create("tiny", 3, head="linear", embed_dim=8, in_channels=1)
    v = jax.eval_shape(lambda: tiny.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False))
    assert sn.parameter_blocks(tiny, v) == [("head", ("fc", "head")), ("stage4", ("stage4_bn", "stage4_conv")),
                                            ("stage3", ("stage3_bn", "stage3_conv")),
                                            ("stage2", ("stage2_bn", "stage2_conv")),
                                            ("stage1", ("stage1_bn", "stage1_conv")),
                                            ("stem", ("stem_bn", "stem_conv"))]
    r18 = models.create("resnet18", 3, head="gei", embed_dim=8, in_channels=1)
    v = jax.eval_shape(lambda: r18.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False))
    assert sn.parameter_blocks(r18, v) == [("head", ("head",)), ("stage4", ("layer4_0", "layer4_1")),
                                           ("stage3", ("layer3_0", "layer3_1")), ("stage2", ("layer2_0", "layer2_1")),
                                           ("stage1", ("layer1_0", "layer1_1")), ("stem", ("bn1", "conv1"))]


def _leaves(tree) -> dict[tuple[str, ...], np.ndarray]:
    """``{(collection, module, ...): leaf}`` of a variables tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(str(getattr(k, "key", k)) for k in path): np.asarray(x) for path, x in flat}


def test_cascade_and_independent_change_exactly_the_intended_leaves():
    model = models.create("tiny", 3, head="gei", embed_dim=8, in_channels=1)
    trained = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False))
    # "trained" statistics that differ from the initial ones, so a reset is visible
    trained["batch_stats"] = jax.tree_util.tree_map(lambda s: s + 0.25, trained["batch_stats"])
    fresh = sn.fresh_variables(model, (32, 32, 1), seed=1)
    emb = sn.random_class_embeddings(3, 8, seed=9)
    fresh_emb = sn.random_class_embeddings(3, 8, seed=1)
    np.testing.assert_allclose(np.linalg.norm(fresh_emb, axis=1), 1.0, rtol=1e-6)
    variants = sn.model_variants(model, trained, emb, fresh, fresh_emb)
    order = ["head", "stage4", "stage3", "stage2", "stage1", "stem"]
    assert [(v.test, v.block, v.step) for v in variants] == (
        [("original", "-", 0)] + [("cascade", b, i + 1) for i, b in enumerate(order)]
        + [("independent", b, i + 1) for i, b in enumerate(order)])
    blocks = dict(sn.parameter_blocks(model, trained))
    lt, lf = _leaves(trained), _leaves(fresh)
    for v in variants:
        if v.test == "cascade":
            assert v.randomized == tuple(order[:v.step])
        random_modules = {m for b in v.randomized for m in blocks[b]}
        lv = _leaves(v.variables)
        assert lv.keys() == lt.keys()
        n_changed = 0
        for key, leaf in lv.items():
            if key[1] in random_modules:
                np.testing.assert_array_equal(leaf, lf[key])  # re-drawn (BN statistics reset with the block)
                n_changed += int(not np.array_equal(leaf, lt[key]))
            else:
                np.testing.assert_array_equal(leaf, lt[key])  # untouched
        assert n_changed == sum(not np.array_equal(lf[k], lt[k]) for k in lt if k[1] in random_modules)
        if random_modules:
            assert n_changed > 0
        want_emb = fresh_emb if "head" in v.randomized else emb
        np.testing.assert_array_equal(v.global_emb, want_emb)


# ---- on a tiny trained run ----

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sanity")
    cfg = C.load("tiny", {"data.cache_dir": str(root / "cache"), "train.steps": 20, "train.eval_every": 20,
                          "train.checkpoint_every": 20})
    loop.train(cfg, str(root / "run"), progress=False)
    return str(root / "run")


@pytest.fixture(scope="module")
def summary(tiny_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sanity_out"))
    return sn.sanity_checks(tiny_run, methods=["sc", "gradcam"], max_images=16, out_dir=out, seed=0,
                            label_randomization=True, progress=False), out


@pytest.mark.slow
def test_shuffled_labels_reach_the_pipeline(tiny_run):
    run = runs.load_run(tiny_run)
    ds = loop.load_dataset(run.cfg)
    splits = runs.run_splits(tiny_run, run.cfg, ds)
    tr = np.asarray(splits["train"])
    sh = sn.shuffled_label_dataset(ds, tr, seed=0)
    y, ys = np.asarray(ds.labels), np.asarray(sh.labels)
    assert sorted(ys[tr]) == sorted(y[tr]) and np.mean(ys[tr] != y[tr]) > 0.3  # a permutation, not the identity
    rest = np.setdiff1d(np.arange(len(y)), tr)
    np.testing.assert_array_equal(ys[rest], y[rest])
    b = next(data.train_iterator(sh, tr, global_batch_size=8, seed=0))  # what training reads
    np.testing.assert_array_equal(b["label"], ys[b["index"]])
    e = next(data.eval_batches(sh, tr[:8], 8))
    np.testing.assert_array_equal(e["label"], ys[tr[:8]])
    np.testing.assert_array_equal(sh.source[int(tr[0])]["image"], ds.source[int(tr[0])]["image"])


@pytest.mark.slow
def test_gradcam_and_sc_fall_below_the_threshold_after_the_full_cascade(summary):
    s, _ = summary
    for m in ("sc", "gradcam"):
        rows = [r for r in s["rows"] if r["method"] == m]
        orig = next(r for r in rows if r["test"] == "original")
        assert orig["spearman_abs_mean"] == pytest.approx(1.0) and orig["ssim_mean"] == pytest.approx(1.0)
        full = max((r for r in rows if r["test"] == "cascade"), key=lambda r: r["step"])
        assert full["randomized"] == ["head", "stage4", "stage3", "stage2", "stage1", "stem"]
        assert full["spearman_abs_mean"] < THRESHOLD, (m, full["spearman_abs_mean"])
        assert s["verdicts"][m]["passed"] and s["verdicts"][m]["spearman_abs_full_cascade"] < THRESHOLD


@pytest.mark.slow
def test_full_cascade_number_recomputed_with_scipy(tiny_run, summary):
    s, _ = summary
    run = runs.load_run(tiny_run)
    ds = loop.load_dataset(run.cfg)
    recs = [ds.source[i] for i in s["indices"]]
    x = data.normalize_images(np.stack([r["image"] for r in recs]))
    y = np.asarray([r["label"] for r in recs], np.int32)
    variables = jax.device_get(run.variables)
    fresh = sn.fresh_variables(run.model, x.shape[1:], seed=0)
    emb = sn.random_class_embeddings(*run.global_emb.shape, seed=0)
    raw0 = np.asarray(explain.saliency("gradcam", run.model, variables, x, y, normalize=False,
                                       global_emb=run.global_emb, tau=run.cfg.loss.tau))
    raw1 = np.asarray(explain.saliency("gradcam", run.model, fresh, x, y, normalize=False, global_emb=emb,
                                       tau=run.cfg.loss.tau))
    want = np.mean([spearmanr(np.abs(a).ravel(), np.abs(b).ravel())[0] for a, b in zip(raw0, raw1)])
    full = max((r for r in s["rows"] if r["method"] == "gradcam" and r["test"] == "cascade"), key=lambda r: r["step"])
    assert full["spearman_abs_mean"] == pytest.approx(want, abs=1e-5)


@pytest.mark.slow
def test_label_randomization_run(tiny_run, summary):
    s, out = summary
    lr = s["label_randomization"]
    assert lr["fraction_relabelled"] > 0.3 and 0 <= lr["heldout_accuracy"] <= 1
    sub = os.path.join(out, "label_randomization")
    own = json.load(open(os.path.join(tiny_run, "splits.json")))["indices"]
    assert json.load(open(os.path.join(sub, "splits.json")))["indices"] == own  # the run's splits
    assert json.load(open(os.path.join(sub, "config.json"))) == json.load(open(os.path.join(tiny_run, "config.json")))
    rows = [r for r in s["rows"] if r["test"] == "label_randomization"]
    assert [r["method"] for r in rows] == ["sc", "gradcam"]
    assert all(-1 <= r["spearman_abs_mean"] < 1 for r in rows)
    md = open(os.path.join(out, "sanity.md")).read()
    assert "## Label randomisation" in md and "shuffled labels" in md


@pytest.mark.slow
def test_a_model_independent_map_fails(tiny_run, tmp_path, monkeypatch):
    def edges(method, model, variables, x, targets, **kw):  # an edge detector: ignores the model
        g = np.asarray(x)[..., 0]
        return jnp.asarray(np.hypot(ndimage.sobel(g, 1), ndimage.sobel(g, 2)), jnp.float32)

    monkeypatch.setattr(explain.api, "saliency", edges)  # what saliency_batched calls
    s = sn.sanity_checks(tiny_run, methods=["gradcam"], max_images=4, out_dir=str(tmp_path), progress=False)
    v = s["verdicts"]["gradcam"]
    assert not v["passed"] and v["spearman_abs_full_cascade"] == pytest.approx(1.0)
    assert "**FAIL**" in open(tmp_path / "sanity.md").read()


@pytest.mark.slow
def test_cli_writes_every_file(tiny_run, tmp_path, capsys):
    out = tmp_path / "s"
    code = cli.main(["sanity", "--workdir", tiny_run, "--methods", "gradcam", "layercam", "--max-images", "4",
                     "--out", str(out), "--no-progress", "--seed", "1"])
    assert code == 0
    assert "# Saliency sanity checks" in capsys.readouterr().out
    for f in ("sanity.json", "sanity.csv", "sanity.md", "cascade_gradcam.png", "cascade_layercam.png",
              "similarity.png"):
        assert (out / f).stat().st_size > 100, f
    rows = list(csv.DictReader(open(out / "sanity.csv")))
    assert len(rows) == 2 * 13 and rows[0].keys() == set(sn.COLUMNS)
    assert [r["test"] for r in rows[:13]] == ["original"] + ["cascade"] * 6 + ["independent"] * 6
    assert rows[6]["randomized"] == "head+stage4+stage3+stage2+stage1+stem"
    assert json.load(open(out / "sanity.json"))["seed"] == 1


def test_cli_bad_method_is_one_line_exit_2(tmp_path, capsys):
    code = cli.main(["sanity", "--workdir", str(tmp_path), "--methods", "gradcm"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown saliency method 'gradcm'" in err and err.count("\n") == 1


def test_cli_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sanity", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--workdir", "--methods", "--stage", "--max-images", "--split", "--label-randomization", "--out",
                "--seed", "--checkpoint"):
        assert opt in out


@pytest.mark.slow
def test_unknown_stage_is_a_clear_error(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'stage9'"):
        sn.sanity_checks(tiny_run, methods=["gradcam"], stage="stage9", out_dir=str(tmp_path), progress=False)
