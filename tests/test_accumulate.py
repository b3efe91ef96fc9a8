"""Gradient accumulation equals one large batch: plain for per-example losses, cached for batch-coupled ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax import method
from lclsc_jax.train import accumulate


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(6, 8)) * 0.3, jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(8, 4)) * 0.3, jnp.float32)}
    batch = {"x": jnp.asarray(rng.normal(size=(16, 6)), jnp.float32), "y": jnp.asarray(rng.integers(0, 3, 16))}
    return params, batch


def _mlp(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def test_split_and_merge_are_inverse_and_strided():
    x = jnp.arange(12)
    m = accumulate.split_micro(x, 3)
    np.testing.assert_array_equal(m, [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
    np.testing.assert_array_equal(accumulate.merge_micro(m), x)
    with pytest.raises(ValueError):
        accumulate.split_micro(x, 5)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_accumulated_cross_entropy_equals_the_whole_batch(problem, n):
    params, batch = problem

    def loss_fn(p, b):
        return method.cross_entropy_loss(_mlp(p, b["x"]), b["y"]), {}

    loss, grads, _ = jax.jit(lambda p, b: accumulate.accumulated_grads(loss_fn, p, b, n))(params, batch)
    ref_loss, ref_grads = jax.value_and_grad(lambda p: loss_fn(p, batch)[0])(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k in params:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_cached_gradients_of_a_coupled_loss_equal_the_whole_batch(problem, n):
    """NT-Xent pairs every example with every other: micro-batch averaging would be wrong, caching is exact."""
    params, batch = problem
    rng = np.random.default_rng(1)
    batch = {"a": batch["x"], "b": batch["x"] + jnp.asarray(rng.normal(size=(16, 6)) * 0.1, jnp.float32)}

    def encode(p, state, mb, r):
        return {"z": jnp.stack([_mlp(p, mb["a"]), _mlp(p, mb["b"])], 1)}, state + 1

    def loss_on(out):
        return method.nt_xent_loss(out["z"][:, 0], out["z"][:, 1], tau=0.3), {"n": jnp.float32(out["z"].shape[0])}

    loss, grads, state, metrics = jax.jit(lambda p, b: accumulate.cached_grads(
        encode, loss_on, p, jnp.int32(0), b, n, jax.random.PRNGKey(0)))(params, batch)
    ref_loss, ref_grads = jax.value_and_grad(lambda p: loss_on(encode(p, 0, batch, None)[0])[0])(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k in params:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7)
    assert int(state) == n and float(metrics["n"]) == 16  # the state went through every micro-batch; loss saw all
    if n > 1:  # and the naive average of micro-batch gradients is NOT the large batch's
        naive = jax.grad(lambda p: jnp.mean(jnp.stack([loss_on(encode(p, 0, mb, None)[0])[0] for mb in (
            jax.tree_util.tree_map(lambda x, i=i: accumulate.split_micro(x, n)[i], batch) for i in range(n))])))(params)
        assert not np.allclose(naive["w1"], ref_grads["w1"], rtol=1e-3)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_cached_gradients_of_supcon_equal_the_whole_batch(problem, n):
    """SupCon's positives and negatives span the batch; the reference is jax.grad of the composed function."""
    params, batch = problem
    labels = batch["y"]

    def encode(p, state, mb, r):
        return {"z": _mlp(p, mb["x"])}, state

    def loss_on(out):  # outputs come back in the batch's row order: the labels are the whole batch's
        return method.supervised_contrastive_loss(out["z"], labels, 0.2), {}

    loss, grads, _, _ = jax.jit(lambda p, b: accumulate.cached_grads(
        encode, loss_on, p, {}, b, n, jax.random.PRNGKey(0)))(params, {"x": batch["x"]})
    ref_loss, ref_grads = jax.value_and_grad(
        lambda p: method.supervised_contrastive_loss(_mlp(p, batch["x"]), labels, 0.2))(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k in params:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7)


def _bn_mlp(p, stats, x, momentum=0.9):
    """Dense, BatchNorm in training mode (batch statistics; running mean/var updated), tanh, dense."""
    h = x @ p["w1"]
    mean, var = h.mean(0), h.var(0)
    out = jnp.tanh((h - mean) / jnp.sqrt(var + 1e-5)) @ p["w2"]
    return out, {"mean": momentum * stats["mean"] + (1 - momentum) * mean,
                 "var": momentum * stats["var"] + (1 - momentum) * var}


@pytest.mark.parametrize("n", [2, 4])
def test_cached_gradients_with_batchnorm_thread_the_statistics(problem, n):
    """Per-micro-batch BN: the backward pass recomputes the forward values of phase 1 (checked against a loop)."""
    params, batch = problem
    stats0 = {"mean": jnp.zeros(8), "var": jnp.ones(8)}

    def encode(p, stats, mb, r):
        out, new = _bn_mlp(p, stats, mb["x"])
        # The output also depends on the state and the rng (not additively: the Jacobian changes with them), so
        # a phase 3 that recomputed with other values would give other gradients.
        noise = 1.0 + 0.3 * jax.random.normal(r, out.shape)
        return {"z": jnp.tanh(out + 2.0 * stats["mean"][:4]) * noise}, new

    def loss_on(out):
        return method.nt_xent_loss(out["z"][0::2], out["z"][1::2], tau=0.5), {}

    rng = jax.random.PRNGKey(3)
    loss, grads, stats, _ = jax.jit(lambda p, b: accumulate.cached_grads(encode, loss_on, p, stats0, b, n, rng))(
        params, {"x": batch["x"]})

    # Reference: an explicit Python loop over the same (strided) micro-batches, statistics threaded in order.
    x = np.asarray(batch["x"])
    micro = [x[i::n] for i in range(n)]
    seen, s = [], stats0
    for mb in micro:
        seen.append(s)
        _, s = _bn_mlp(params, s, jnp.asarray(mb))

    def whole(p):
        outs = [encode(p, seen[i], {"x": jnp.asarray(micro[i])}, jax.random.fold_in(rng, i))[0]["z"] for i in range(n)]
        z = jnp.stack(outs, 1).reshape(16, 4)  # rows back in the original order (micro-batch i holds rows i, i+n, ..)
        return loss_on({"z": z})[0]

    ref_loss, ref_grads = jax.value_and_grad(whole)(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k in params:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6)  # |g| ~ 0.01-1
    for k in ("mean", "var"):  # the final statistics: NumPy, one micro-batch after the other
        want = np.asarray(stats0[k], np.float64)
        for mb in micro:
            h = mb.astype(np.float64) @ np.asarray(params["w1"], np.float64)
            want = 0.9 * want + 0.1 * (h.mean(0) if k == "mean" else h.var(0))
        np.testing.assert_allclose(stats[k], want, rtol=1e-5, atol=1e-6)


def test_accumulation_refuses_a_batch_that_does_not_split_and_keeps_the_loss_dtype(problem):
    params, batch = problem

    def loss_fn(p, b):  # bf16 compute, float32 master weights
        logits = _mlp(jax.tree_util.tree_map(lambda w: w.astype(jnp.bfloat16), p), b["x"].astype(jnp.bfloat16))
        return method.cross_entropy_loss(logits, b["y"]).astype(jnp.bfloat16), {}

    with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
        accumulate.accumulated_grads(loss_fn, params, batch, 3)
    loss, grads, _ = accumulate.accumulated_grads(loss_fn, params, batch, 4)
    assert loss.dtype == jnp.bfloat16 and all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    ref = jax.grad(lambda p: loss_fn(p, batch)[0].astype(jnp.float32))(params)
    for k in params:  # bf16 rounding differs per micro-batch: a loose tolerance
        np.testing.assert_allclose(grads[k], ref[k], rtol=0.05, atol=2e-3)
