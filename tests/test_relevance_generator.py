"""The optimal perturbation generator (Rajapaksa & Khalvati 2022): perturbation, supervoxel pooling, loss,
the U-Net, a real learning run against a frozen classifier, save / resume / restore, and the explain method.

References are NumPy / SciPy recomputations written here; the learning test checks that the generator
finds the only region a frozen "classifier" looks at, far better than an untrained or uniform mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from lclsc_jax import explain, models
from lclsc_jax.method import relevance as rel
from lclsc_jax.models.unet3d import UNet3D
from lclsc_jax.train import relevance as rt

SIDE, CUBE = 16, 5
GEN = {"base_width": 4, "depth": 2, "blocks_per_level": 1}  # one generator shape everywhere: compiled once


def _softmax(v):
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- perturbation and pooling


def test_perturb_with_constant_mean_and_blur_baselines_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 5, 6, 7, 2)).astype(np.float32)
    m = rng.uniform(0, 1, (2, 5, 6, 7)).astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    blur = np.stack([np.stack([ndi.gaussian_filter(x[b, ..., c], 1.0, mode="nearest", truncate=3.0)
                               for c in range(2)], -1) for b in range(2)])
    for baseline, b in ((0.0, 0.0), (0.3, 0.3), ("mean", mean), ("blur", blur)):
        base = rel.baseline_values(jnp.asarray(x), baseline, blur_sigma=1.0)
        got = np.asarray(rel.perturb(jnp.asarray(x), jnp.asarray(m), base))
        want = x * (1 - m[..., None]) + m[..., None] * b
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(baseline))
    # a full mask gives the baseline, an empty one the input; (B, *S, 1) masks are accepted too
    np.testing.assert_allclose(np.asarray(rel.perturb(jnp.asarray(x), jnp.ones((2, 5, 6, 7, 1)), 0.25)), 0.25)
    np.testing.assert_allclose(np.asarray(rel.perturb(jnp.asarray(x), jnp.zeros((2, 5, 6, 7)), 0.25)), x)
    with pytest.raises(ValueError, match="baseline"):
        rel.baseline_values(jnp.asarray(x), "noise")


def test_pool_to_segments_is_the_per_segment_mean_and_its_gradient_spreads_evenly():
    rng = np.random.default_rng(1)
    m = rng.uniform(0, 1, (2, 4, 5, 6)).astype(np.float32)
    seg = rng.integers(0, 7, (2, 4, 5, 6)).astype(np.int32)
    seg[1][seg[1] == 3] = 4  # an absent label in the second volume
    want = np.empty_like(m)
    for b in range(2):
        for s in np.unique(seg[b]):
            want[b][seg[b] == s] = m[b][seg[b] == s].mean()
    got = np.asarray(rel.pool_to_segments(jnp.asarray(m), jnp.asarray(seg), 8))  # 8: an upper bound is fine
    np.testing.assert_allclose(got, want, atol=1e-6)
    w = rng.normal(size=m.shape).astype(np.float32)
    g = np.asarray(jax.grad(lambda v: jnp.sum(jnp.asarray(w) * rel.pool_to_segments(v, jnp.asarray(seg), 8)))(
        jnp.asarray(m)))
    want_g = np.empty_like(m)  # d/dm_i sum_j w_j mean_{seg(j)} m = sum_{j in seg(i)} w_j / |seg(i)|
    for b in range(2):
        for s in np.unique(seg[b]):
            sel = seg[b] == s
            want_g[b][sel] = w[b][sel].sum() / sel.sum()
    np.testing.assert_allclose(g, want_g, atol=1e-5)


# ----------------------------------------------------------------------------- the loss


def test_perturbation_loss_matches_a_hand_computation():
    clean = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], np.float32)
    pert = np.array([[0.1, 0.4, 0.2], [0.5, 1.5, 0.0]], np.float32)
    t = np.array([0, 2])
    rng = np.random.default_rng(2)
    m = rng.uniform(0, 1, (2, 3, 4, 5)).astype(np.float32)
    tv = np.mean(sum(np.abs(np.diff(m, axis=ax)).mean(axis=(1, 2, 3)) for ax in (1, 2, 3)))
    p, q = _softmax(clean.astype(np.float64)), _softmax(pert.astype(np.float64))
    drops = {"prob": p[[0, 1], t] - q[[0, 1], t],
             "log_prob": np.log(p[[0, 1], t]) - np.log(q[[0, 1], t]),
             "logit": clean[[0, 1], t] - pert[[0, 1], t],
             "prob_l1": 0.5 * np.abs(p - q).sum(-1)}
    for score, d in drops.items():
        loss, terms = rel.perturbation_loss(jnp.asarray(clean), jnp.asarray(pert), jnp.asarray(t), jnp.asarray(m),
                                            area_weight=0.7, tv_weight=0.3, score=score)
        want = -d.mean() + 0.7 * m.mean() + 0.3 * tv
        np.testing.assert_allclose(float(loss), want, rtol=1e-5, err_msg=score)
        np.testing.assert_allclose(float(terms["drop"]), d.mean(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(float(terms["area"]), m.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(terms["tv"]), tv, rtol=1e-5)
    # every term switchable: no area, no TV -> minus the drop alone
    loss, terms = rel.perturbation_loss(jnp.asarray(clean), jnp.asarray(pert), jnp.asarray(t), jnp.asarray(m), 0.0)
    np.testing.assert_allclose(float(loss), -drops["prob"].mean(), rtol=1e-5)
    assert float(terms["tv"]) == 0.0
    with pytest.raises(ValueError, match="score"):
        rel.prediction_drop(jnp.asarray(clean), jnp.asarray(pert), jnp.asarray(t), "kl")


# ----------------------------------------------------------------------------- the U-Net


def test_unet_mask_shape_range_skip_connections_and_gradients():
    net = UNet3D(**GEN)
    x = jax.random.uniform(jax.random.key(0), (2, 5, 9, 10, 1))  # odd sizes: edge-padded, then cropped
    v = net.init(jax.random.key(1), x)  # eager: the random kernels compile once per shape for the whole file
    m = np.asarray(jax.jit(net.apply)(v, x))
    assert m.shape == (2, 5, 9, 10, 1) and m.dtype == np.float32
    assert (m > 0).all() and (m < 1).all() and m.std() > 0
    p = v["params"]
    # the decoder block of each level reads the upsampled features concatenated with the skip (2x its width)
    assert p["down1"]["conv0"]["kernel"].shape == (3, 3, 3, 4, 8)
    assert p["upsample0"]["kernel"].shape == (2, 2, 2, 8, 4)
    assert p["up0"]["conv0"]["kernel"].shape == (3, 3, 3, 8, 4)
    assert p["head"]["kernel"].shape == (1, 1, 1, 4, 1)
    # a voxel's mask depends on that voxel's input through the full-resolution skip path
    g = np.asarray(jax.jit(jax.grad(lambda xx: net.apply(v, xx)[0, 3, 4, 5, 0]))(x))
    assert np.abs(g[0, 3, 4, 5]).sum() > 0 and np.abs(g[1]).sum() == 0  # and not on another volume
    # the same module serves images (B, H, W, C)
    assert jax.eval_shape(lambda xx: net.apply(net.init(jax.random.key(1), xx), xx), x[:, 0]).shape == (2, 9, 10, 1)


# ----------------------------------------------------------------------------- learning


def _cube_volumes(n, seed):
    """Background U(0, 0.4); one bright cube (side 5, U(0.7, 1)) at a random place per volume."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.4, (n, SIDE, SIDE, SIDE, 1)).astype(np.float32)
    region = np.zeros((n, SIDE, SIDE, SIDE), bool)
    for i in range(n):
        a, b, c = rng.integers(0, SIDE - CUBE + 1, 3)
        region[i, a:a + CUBE, b:b + CUBE, c:c + CUBE] = True
    x[region, 0] = rng.uniform(0.7, 1.0, region.sum())
    return x, region


def _cube_classifier(classifier, x):
    """Frozen 2-class "classifier": class 0's logit depends only on the bright-cube voxels (x > 0.5)."""
    s = jnp.sum(jax.nn.relu(x - 0.5), axis=tuple(range(1, x.ndim))) / CUBE ** 3
    return jnp.stack([classifier["w"] * s - 3.0, jnp.zeros_like(s)], axis=-1)


def _dice(pred, region):
    return 2 * (pred & region).sum((1, 2, 3)) / (pred.sum((1, 2, 3)) + region.sum((1, 2, 3)))


def _dice_at_area(mask, region):
    """Dice of each mask's top-|region| voxels (area-matched, threshold-free)."""
    k = region[0].sum()
    top = np.stack([m >= np.sort(m.ravel())[-k] for m in mask])
    return _dice(top, region)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    x, _ = _cube_volumes(32, 0)
    cfg = rt.GeneratorConfig(**GEN, area_weight=1.0, lr=1e-2, batch_size=2)
    out = str(tmp_path_factory.mktemp("relevance") / "relevance")
    logs = []
    gen, state, hist = rt.train_generator(x, _cube_classifier, {"w": jnp.float32(20.0)}, out, 120, cfg,
                                          log_every=40, extra={"note": "test"}, log=logs.append)
    return {"cfg": cfg, "out": out, "gen": gen, "state": state, "hist": hist, "logs": logs, "x": x}


def test_generator_learns_the_region_the_classifier_uses(trained):
    xt, region = _cube_volumes(8, 1)  # held-out volumes, cubes elsewhere
    gen, state, cfg = trained["gen"], trained["state"], trained["cfg"]
    mask = np.asarray(gen.apply({"params": state.params}, jnp.asarray(xt)))[..., 0]
    untrained = np.asarray(gen.apply({"params": rt.init_state(cfg, gen, xt.shape[1:]).params}, jnp.asarray(xt)))[..., 0]
    dice = _dice(mask > 0.5, region).mean()
    dice_area = _dice_at_area(mask, region).mean()
    uniform = _dice(np.ones_like(region), region).mean()  # 2 * 125 / (4096 + 125) = 0.059
    before = _dice_at_area(untrained, region).mean()
    # Measured (CPU, 120 steps, ~30 s): Dice@0.5 ~ 0.8, Dice@area ~ 0.98; uniform 0.059, untrained ~ 0.1
    assert dice > 0.5 and dice > 5 * uniform, (dice, uniform)
    assert dice_area > 0.8 and dice_area > before + 0.5, (dice_area, before)
    assert mask[region].mean() > 10 * mask[~region].mean()
    hist = trained["hist"]
    assert [h["step"] for h in hist] == [40, 80, 120]
    assert hist[-1]["area"] < hist[0]["area"] and hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["drop"] > 0.5  # the masked cube is deleted: p(class 0) falls from ~0.98 towards ~0.05
    assert any("relevance step 120/120" in line for line in trained["logs"])


def test_saved_generator_restores_resumes_and_refuses_another_config(trained):
    out, state, cfg, x = trained["out"], trained["state"], trained["cfg"], trained["x"]
    gen, variables, saved = rt.restore_generator(out)
    assert saved["step"] == 120 and saved["note"] == "test" and saved["input_shape"] == [SIDE, SIDE, SIDE, 1]
    assert saved["generator"]["area_weight"] == 1.0
    for a, b in zip(jax.tree_util.tree_leaves(variables["params"]), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the same command again resumes at the saved step (nothing left to train)
    logs = []
    _, again, hist = rt.train_generator(x, _cube_classifier, {"w": jnp.float32(20.0)}, out, 120, cfg,
                                        extra={"note": "test"}, log=logs.append)
    assert int(again.step) == 120 and hist == [] and any("resuming" in m for m in logs)
    with pytest.raises(ValueError, match=r"generator.area_weight: 1.0 -> 0.5.*refusing to overwrite"):
        rt.train_generator(x, _cube_classifier, {"w": jnp.float32(20.0)}, out, 10,
                           rt.GeneratorConfig(**{**rt.config_dict(cfg), "area_weight": 0.5}), extra={"note": "test"})


def test_training_with_supervoxels_gives_masks_constant_per_segment(tmp_path):
    x, _ = _cube_volumes(2, 3)
    x = x[:, :8, :8, :8]
    seg = np.broadcast_to((np.arange(8)[:, None, None] // 4) * 4 + (np.arange(8)[None, :, None] // 4) * 2
                          + np.arange(8)[None, None, :] // 4, (2, 8, 8, 8)).astype(np.int32)  # 8 blocks of 4^3
    cfg = rt.GeneratorConfig(**GEN, n_segments=8, batch_size=2)
    with pytest.raises(ValueError, match="segment_fn"):
        rt.train_generator(x, _cube_classifier, {"w": jnp.float32(20.0)}, str(tmp_path / "a"), 1, cfg)
    gen, state, _ = rt.train_generator(x, _cube_classifier, {"w": jnp.float32(20.0)}, str(tmp_path / "b"), 2, cfg,
                                       segment_fn=lambda v: seg[:len(v)], log=None)
    m = np.asarray(rt.masks(gen, state.params, jnp.asarray(x), jnp.asarray(seg), 8))
    for s in range(8):
        vals = m[0][seg[0] == s]
        np.testing.assert_allclose(vals, vals.mean(), atol=1e-6)
    assert int(state.step) == 2


# ----------------------------------------------------------------------------- explain method


def test_perturbation_generator_method_is_the_generators_mask_in_one_pass():
    model = models.create("tiny3d", 2, head="linear", in_channels=1)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 8, 1))
    # the classifier is not run by this method: zero variables of the right shapes are enough (and cheap)
    v = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                               jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(1)))
    gen = UNet3D(**GEN)
    gv = gen.init(jax.random.key(2), x)
    want = np.asarray(gen.apply(gv, x))[..., 0]
    raw = np.asarray(explain.saliency("perturbation_generator", model, v, x, None, normalize=False,
                                      generator=gen, generator_variables=gv))
    np.testing.assert_allclose(raw, want, atol=1e-6)
    # targets do not enter
    other = np.asarray(explain.saliency("perturbation_generator", model, v, x, [1, 1], normalize=False,
                                        generator=gen, generator_variables=gv))
    np.testing.assert_array_equal(other, raw)
    norm = np.asarray(explain.saliency("perturbation_generator", model, v, x, None, generator=gen,
                                       generator_variables=gv))
    lo, hi = want.min(axis=(1, 2, 3), keepdims=True), want.max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(norm, (want - lo) / (hi - lo), atol=1e-5)
    seg = np.broadcast_to(np.arange(8)[:, None, None] // 4, (2, 8, 8, 8)).astype(np.int32)  # two slabs
    pooled = np.asarray(explain.saliency("perturbation_generator", model, v, x, None, normalize=False,
                                         generator=gen, generator_variables=gv, segments=seg))
    np.testing.assert_allclose(pooled[:, :4], np.broadcast_to(want[:, :4].mean(axis=(1, 2, 3))[:, None, None, None],
                                                              (2, 4, 8, 8)), atol=1e-6)
    with pytest.raises(ValueError, match="generator="):
        explain.saliency("perturbation_generator", model, v, x)


# ----------------------------------------------------------------------------- protocol on a trained run


@pytest.mark.slow
def test_protocol_trains_loads_and_explains_with_a_runs_generator(tmp_path):
    from lclsc_jax.protocols import relevance as pr
    from lclsc_jax.protocols import runs
    from lclsc_jax.train import config as C
    from lclsc_jax.train import loop

    cfg = C.load("tiny", {"data.cache_dir": str(tmp_path / "cache"), "train.steps": 2, "train.eval_every": 2,
                          "train.checkpoint_every": 2, "loss.name": "ce"})
    work = str(tmp_path / "run")
    loop.train(cfg, work, progress=False)  # a 2D run: the generator and the protocol follow the inputs' rank
    logs = []
    summary = pr.train_generator(work, steps=2, batch_size=2, base_width=4, depth=2, max_volumes=4, log_every=1,
                                 n_segments=6, baseline="mean", log=logs.append)
    assert summary["steps"] == 2 and summary["n_volumes"] == 4 and summary["out_dir"] == pr.generator_dir(work)
    assert any("relevance step 2/2" in m for m in logs)
    run = runs.load_run(work)
    x, labels = pr.split_volumes(run, "test", 3)
    # the frozen classifier the generator trains against predicts what the run predicts (its eval path)
    logit_fn, classifier = pr.classifier_logits(run)
    probs = np.asarray(jax.nn.softmax(logit_fn(classifier, jnp.asarray(x)), axis=-1))
    np.testing.assert_allclose(probs, runs.predict(run, _u8(x))["probs"], atol=1e-4)
    gen, variables, config = pr.load_generator(work)
    assert config["step"] == 2 and config["classifier"]["step"] == run.step and config["generator"]["n_segments"] == 6
    assert config["generator"]["baseline"] == "mean" and pr.parse_baseline("0.5") == 0.5
    opts = pr.explain_options(work)
    assert opts["n_segments"] == 6
    m = np.asarray(explain.saliency("perturbation_generator", run.model, run.variables, x, normalize=False, **opts))
    raw = np.asarray(gen.apply(variables, jnp.asarray(x)))[..., 0]
    assert m.shape == raw.shape == x.shape[:-1]
    seg = explain.slic_segments(x, 6, 10.0, 1.0)
    for b in range(len(x)):  # the mask averaged over the SLIC segments of each image
        for s in np.unique(seg[b])[:3]:
            np.testing.assert_allclose(m[b][seg[b] == s], raw[b][seg[b] == s].mean(), atol=1e-5)


def _u8(x):
    """Normalised model inputs back to the uint8 images they came from (``(u8 / 255 - 0.5) / 0.25``)."""
    return np.round((x * 0.25 + 0.5) * 255).astype(np.uint8)
