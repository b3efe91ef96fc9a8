"""Cross-entropy, SupCon, prototype and LCL losses — against NumPy loops, plus gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import lclsc_jax.method as M

EPS = 1e-6

ce_jit = jax.jit(M.cross_entropy_loss, static_argnames="label_smoothing")
supcon_jit = jax.jit(M.supervised_contrastive_loss, static_argnames="tau")
proto_jit = jax.jit(M.prototype_contrastive_loss, static_argnames="tau")
lcl_jit = jax.jit(M.label_contrastive_loss, static_argnames=("tau", "w_ss"))
supcon_vg = jax.jit(jax.value_and_grad(M.supervised_contrastive_loss))
lcl_vg = jax.jit(jax.value_and_grad(M.label_contrastive_loss))


# ---------------------------------------------------------------- NumPy references (loops)
def ref_normalize(v):
    v = np.asarray(v, np.float64)
    return v / max(math.sqrt(sum(float(a) ** 2 for a in v)), EPS)


def ref_cos(a, b):
    a, b = ref_normalize(a), ref_normalize(b)
    return sum(float(x) * float(y) for x, y in zip(a, b))


def ref_ce(logits, labels, smoothing=0.0):
    total = 0.0
    n, c = len(logits), len(logits[0])
    for i in range(n):
        mx = max(logits[i])
        lse = mx + math.log(sum(math.exp(v - mx) for v in logits[i]))
        for k in range(c):
            target = (1 - smoothing) * (k == labels[i]) + smoothing / c
            total -= target * (logits[i][k] - lse)
    return total / n


def ref_supcon(z, labels, tau):
    b = len(labels)
    s = [[ref_cos(z[i], z[j]) / tau for j in range(b)] for i in range(b)]
    losses = []
    for i in range(b):
        pos = [p for p in range(b) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        log_den = math.log(sum(math.exp(s[i][a]) for a in range(b) if a != i))
        losses.append(-sum(s[i][p] - log_den for p in pos) / len(pos))
    return sum(losses) / len(losses) if losses else 0.0


def ref_proto(z, labels, g, tau):
    logits = np.array([[ref_cos(z[i], g[c]) / tau for c in range(len(g))] for i in range(len(z))])
    return ref_ce(logits, labels)


CASES = {
    # name: (C, labels)
    "c2": (2, [0, 1, 1, 0, 1, 0]),
    "c10_absent": (10, [1, 4, 4, 9, 1, 1, 0, 4, 9, 9, 2, 2]),
    "one_absent": (3, [0, 0, 2, 2, 2]),
    "all_distinct": (5, [3, 0, 4, 1]),
    "single_pair": (4, [2, 0, 2, 1]),
}


def _case(name, d=6):
    c, labels = CASES[name]
    rng = np.random.default_rng(len(labels) * 7 + c)
    z = rng.normal(size=(len(labels), d)).astype(np.float32) * 2
    g = rng.normal(size=(c, d)).astype(np.float32)
    return z, np.asarray(labels, np.int32), g


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("c", [2, 10])
def test_cross_entropy_matches_reference(c, smoothing):
    rng = np.random.default_rng(c)
    logits = rng.normal(size=(5, c)).astype(np.float32) * 3
    labels = rng.integers(0, c, 5).astype(np.int32)
    out = ce_jit(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=smoothing)
    assert out.shape == () and out.dtype == jnp.float32
    np.testing.assert_allclose(float(out), ref_ce(logits.tolist(), labels, smoothing), rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supervised_contrastive_matches_reference(name, tau):
    z, labels, _ = _case(name)
    out = supcon_jit(jnp.asarray(z), jnp.asarray(labels), tau=tau)
    assert out.shape == () and out.dtype == jnp.float32
    np.testing.assert_allclose(float(out), ref_supcon(z, labels, tau), rtol=1e-5, atol=1e-6)


def test_supervised_contrastive_no_positives_is_exactly_zero():
    z, labels, _ = _case("all_distinct")
    assert float(supcon_jit(jnp.asarray(z), jnp.asarray(labels), tau=0.1)) == 0.0
    one = supcon_jit(jnp.ones((1, 3)), jnp.array([0]))
    assert float(one) == 0.0


@pytest.mark.parametrize("name", ["c2", "c10_absent", "one_absent"])
def test_prototype_and_label_contrastive_match_reference(name):
    z, labels, g = _case(name)
    args = (jnp.asarray(z), jnp.asarray(labels), jnp.asarray(g))
    want_proto = ref_proto(z, labels, g, 0.1)
    np.testing.assert_allclose(float(proto_jit(*args, tau=0.1)), want_proto, rtol=1e-5)
    want = want_proto + 0.5 * ref_supcon(z, labels, 0.1)
    np.testing.assert_allclose(float(lcl_jit(*args, tau=0.1, w_ss=0.5)), want, rtol=1e-5)
    np.testing.assert_allclose(float(lcl_jit(*args, tau=0.1, w_ss=0.0)), want_proto, rtol=1e-5)


def test_prototype_loss_stops_gradient_to_global_embeddings():
    z, labels, g = _case("c2")
    grad_g = jax.grad(M.prototype_contrastive_loss, argnums=2)(jnp.asarray(z), jnp.asarray(labels), jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(grad_g), 0.0)


def test_vmap_supcon_over_leading_axis():
    rng = np.random.default_rng(11)
    z = rng.normal(size=(3, 6, 4)).astype(np.float32)
    labels = np.array([[0, 0, 1, 1, 2, 2], [0, 1, 2, 3, 4, 5], [1, 1, 1, 0, 0, 3]], np.int32)
    out = jax.jit(jax.vmap(M.supervised_contrastive_loss))(jnp.asarray(z), jnp.asarray(labels))
    for e in range(3):
        np.testing.assert_allclose(float(out[e]), ref_supcon(z[e], labels[e], 0.1), rtol=1e-5, atol=1e-6)


def test_bf16_inputs_give_f32_losses_close_to_f32():
    z, labels, g = _case("c10_absent", d=16)
    zb, gb = jnp.asarray(z, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16)
    zr, gr = np.asarray(zb, np.float32), np.asarray(gb, np.float32)  # the bf16 values, exactly
    sup = supcon_jit(zb, jnp.asarray(labels))
    lcl = lcl_jit(zb, jnp.asarray(labels), gb)
    ce = ce_jit(zb[:, :10], jnp.asarray(labels))
    for out in (sup, lcl, ce):
        assert out.dtype == jnp.float32
    # accumulated in f32: equal to the f32 computation on the same (rounded) values ...
    np.testing.assert_allclose(float(sup), ref_supcon(zr, labels, 0.1), rtol=1e-5)
    want_lcl = ref_proto(zr, labels, gr, 0.1) + ref_supcon(zr, labels, 0.1)
    np.testing.assert_allclose(float(lcl), want_lcl, rtol=1e-5)
    np.testing.assert_allclose(float(ce), ref_ce(zr[:, :10].tolist(), labels), rtol=1e-5)
    # ... and close to the unrounded f32 inputs.
    np.testing.assert_allclose(float(sup), ref_supcon(z, labels, 0.1), rtol=2e-2)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", ["c2", "c10_absent", "all_distinct"])
def test_loss_gradients_match_finite_differences(name):
    z, labels, g = _case(name, d=4)
    with jax.enable_x64(True):
        z64, g64, y = jnp.asarray(z, jnp.float64), jnp.asarray(g, jnp.float64), jnp.asarray(labels)
        check_grads(jax.jit(lambda z: M.supervised_contrastive_loss(z, y, 0.5)), (z64,), 1, modes=["rev"])
        check_grads(jax.jit(lambda z: M.prototype_contrastive_loss(z, y, g64)), (z64,), 1, modes=["rev"])
        check_grads(jax.jit(lambda z: M.label_contrastive_loss(z, y, g64, 0.2, 0.7)), (z64,), 1,
                    modes=["rev"])
        logits = z64[:, : min(4, g.shape[0])]
        y_ce = jnp.minimum(y, logits.shape[1] - 1)
        check_grads(jax.jit(lambda x: M.cross_entropy_loss(x, y_ce, 0.1)), (logits,), 1, modes=["rev"])


@pytest.mark.parametrize(
    "z",
    [
        np.zeros((4, 3), np.float32),  # all-zero embeddings
        np.ones((4, 3), np.float32),  # all duplicates
        np.array([[1, 2, 3], [1, 2, 3], [0, 0, 0], [-1, 0, 2]], np.float32),  # mixed
    ],
    ids=["zeros", "duplicates", "mixed"],
)
@pytest.mark.parametrize("labels", [[0, 0, 1, 1], [0, 1, 2, 3]], ids=["pairs", "distinct"])
def test_gradients_finite_on_degenerate_embeddings(z, labels):
    y = jnp.asarray(labels)
    g = jnp.array([[1.0, 0, 0], [0, 0, 0], [0, 1.0, 0], [0, 0, 0]])  # some classes unseen (zero)
    for val, grad in (supcon_vg(jnp.asarray(z), y), lcl_vg(jnp.asarray(z), y, g)):
        assert np.isfinite(float(val))
        assert np.all(np.isfinite(np.asarray(grad)))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        M.supervised_contrastive_loss(jnp.ones((3, 2)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="tau"):
        M.supervised_contrastive_loss(jnp.ones((3, 2)), jnp.array([0, 1, 1]), tau=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        M.cross_entropy_loss(jnp.ones((3, 2)), jnp.array([0, 1, 1]), label_smoothing=1.0)
    with pytest.raises(AssertionError):
        M.supervised_contrastive_loss(jnp.ones((3,)), jnp.array([0, 1, 1]))
