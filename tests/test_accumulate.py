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

    loss, grads, state, metrics = jax.jit(
        lambda p, b: accumulate.cached_grads(encode, loss_on, p, jnp.int32(0), b, n, jax.random.PRNGKey(0)))(params, batch)
    ref_loss, ref_grads = jax.value_and_grad(lambda p: loss_on(encode(p, 0, batch, None)[0])[0])(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for k in params:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7)
    assert int(state) == n and float(metrics["n"]) == 16  # the state went through every micro-batch; loss saw all
    if n > 1:  # and the naive average of micro-batch gradients is NOT the large batch's
        naive = jax.grad(lambda p: jnp.mean(jnp.stack([loss_on(encode(p, 0, mb, None)[0])[0] for mb in (
            jax.tree_util.tree_map(lambda x, i=i: accumulate.split_micro(x, n)[i], batch) for i in range(n))])))(params)
        assert not np.allclose(naive["w1"], ref_grads["w1"], rtol=1e-3)
