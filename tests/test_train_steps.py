"""Train/eval steps: device-count independence, EMA, non-finite guard, losses vs NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax.train import config as C
from lclsc_jax.train import loop
from lclsc_jax.train import sharding as shd
from lclsc_jax.train import steps as S
from lclsc_jax.train.state import make_optimizer

B, HW, NC = 16, 32, 3


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(B, HW, HW, 1)).astype(np.float32),
             "label": rng.integers(0, NC, B).astype(np.int32)} for _ in range(n)]


@functools.cache
def _compiled(cfg, num_devices):
    """Model, mesh and jitted step per (config, device count), shared by all tests of the module."""
    mesh = shd.make_mesh(num_devices)
    model = loop.build_model(cfg, NC)
    step = S.jit_train_step(S.make_train_step(model, make_optimizer(cfg), cfg), mesh, donate=False)
    state0 = loop.init_state(cfg, model, NC, mesh)
    return mesh, model, step, state0


def _run(cfg, num_devices, batches):
    mesh, model, step, state = _compiled(cfg, num_devices)
    metrics = []
    for b in batches:
        state, m = step(state, shd.to_global(b, mesh, S.TRAIN_KEYS))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics, model


@pytest.mark.parametrize("loss", ["lcl_sc", "ce"])
def test_one_vs_eight_devices_same_numbers(loss):
    assert jax.device_count() >= 8, (
        f"{jax.device_count()} devices: tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8 "
        "before JAX starts; an XLA_FLAGS already in the environment overrides it"
    )
    cfg = C.load("tiny", [f"loss.name={loss}"])
    batches = _batches(3)
    s1, m1, _ = _run(cfg, 1, batches)
    s8, m8, _ = _run(cfg, 8, batches)
    for a, b in zip(m1, m8):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s8.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(s1.global_emb, s8.global_emb, atol=1e-5)
    assert int(s8.step) == 3


def test_first_step_ema_is_normalised_class_means():
    cfg = C.load("tiny", ["loss.name=lcl"])  # no second view: the EMA sees exactly the batch
    batch = _batches(1, seed=3)[0]
    _, model, _, state0 = _compiled(cfg, 1)
    state0 = jax.device_get(state0)
    # Embeddings of the forward pass the step runs (train mode, parameters before the update).
    out, _ = model.apply(state0.variables, jnp.asarray(batch["image"]), train=True, mutable=["batch_stats"])
    z = np.asarray(out["embedding"], np.float64)
    s1, _, _ = _run(cfg, 1, [batch])
    for c in range(NC):
        rows = [z[i] / np.linalg.norm(z[i]) for i in range(B) if batch["label"][i] == c]
        if not rows:
            assert not s1.seen[c]
            continue
        mean = np.sum(rows, axis=0) / len(rows)
        np.testing.assert_allclose(s1.global_emb[c], mean / np.linalg.norm(mean), atol=2e-4)
        assert s1.seen[c]


def test_ce_loss_matches_numpy():
    cfg = C.load("tiny", ["loss.name=ce"])
    batch = _batches(1, seed=4)[0]
    _, model, _, state0 = _compiled(cfg, 1)
    state0 = jax.device_get(state0)
    out, _ = model.apply(state0.variables, jnp.asarray(batch["image"]), train=True, mutable=["batch_stats"])
    logits = np.asarray(out["logits"], np.float64)
    ref = np.mean([np.log(np.sum(np.exp(l - l.max()))) + l.max() - l[y] for l, y in zip(logits, batch["label"])])
    _, m, _ = _run(cfg, 1, [batch])
    np.testing.assert_allclose(m[0]["loss"], ref, rtol=1e-5)


def test_nonfinite_step_keeps_state():
    cfg = C.load("tiny", ["loss.name=lcl_sc"])
    good, bad = _batches(2, seed=5)
    bad["image"][0, 0, 0, 0] = np.nan
    s_good, _, _ = _run(cfg, 1, [good])
    s_both, m, _ = _run(cfg, 1, [good, bad])
    assert m[1]["nonfinite"] == 1.0 and m[0]["nonfinite"] == 0.0
    for a, b in zip(jax.tree_util.tree_leaves(s_good.params), jax.tree_util.tree_leaves(s_both.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(s_good.global_emb, s_both.global_emb)
    assert int(s_both.step) == 2


def test_divergence_stops_with_message():
    with pytest.raises(loop.TrainingDiverged, match="NaN/Inf"):
        loop._check_and_average([{"loss": np.float32(1.0), "nonfinite": np.float32(0)},
                                 {"loss": np.float32(np.nan), "nonfinite": np.float32(1)}], 2)


def test_bf16_compute_trains():
    cfg = C.load("tiny", ["loss.name=lcl_sc", "model.dtype=bfloat16"])
    s, m, _ = _run(cfg, 2, _batches(2, seed=6))
    assert all(np.isfinite(x["loss"]) and x["nonfinite"] == 0 for x in m)
    assert all(l.dtype == np.float32 for l in jax.tree_util.tree_leaves(s.params))


def test_decision_tied_sc_variants_train_and_their_maps_decompose_the_decision():
    cfg = C.load("tiny", ["loss.sc_maps=decomposed", "model.projection_layers=1", "loss.w_consistency=1.0"])
    s, m, model = _run(cfg, 1, _batches(3, seed=8))
    assert all(np.isfinite(x["loss"]) and x["nonfinite"] == 0 for x in m)
    assert all(x["loss_consistency"] >= 0 for x in m) and m[-1]["loss_consistency"] > 0
    # The linear head commutes with pooling: the maps' spatial mean is the GEI cosine (NumPy).
    x = _batches(1, seed=9)[0]["image"]
    out = jax.device_get(model.apply(s.variables, jnp.asarray(x), train=False))
    maps = np.asarray(S.sc_maps(cfg, out, s.global_emb))
    z, g = np.asarray(out["embedding"], np.float64), np.asarray(s.global_emb, np.float64)
    cos = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), cos, rtol=1e-4, atol=1e-5)
    # The paper's MLP head does not commute with pooling, which is why the variant needs a linear one.
    with pytest.raises(C.ConfigError, match="projection_layers=1"):
        C.load("tiny", ["loss.sc_maps=decomposed"])
