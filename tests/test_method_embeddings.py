"""Global embeddings: normalize, GEI logits/prediction, EMA update — against NumPy loops."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

import lclsc_jax.method as M

EPS = 1e-6

gei_jit = jax.jit(M.gei_logits, static_argnames="tau")
predict_jit = jax.jit(M.gei_predict, static_argnames="tau")
ema_jit = jax.jit(M.ema_update)


# ---------------------------------------------------------------- NumPy references (loops)
def ref_normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    n = np.sqrt(sum(float(a) ** 2 for a in v))
    return v / max(n, EPS)


def ref_gei(z: np.ndarray, g: np.ndarray, tau: float) -> np.ndarray:
    out = np.zeros((z.shape[0], g.shape[0]))
    for i in range(z.shape[0]):
        zi = ref_normalize(z[i])
        for c in range(g.shape[0]):
            gc = ref_normalize(g[c])
            out[i, c] = sum(zi[d] * gc[d] for d in range(z.shape[1])) / tau
    return out


def ref_ema(g, seen, z, labels, m):
    g = np.array(g, np.float64)
    seen = np.array(seen, bool)
    for c in range(g.shape[0]):
        members = [ref_normalize(z[i]) for i in range(len(labels)) if labels[i] == c]
        if not members:
            continue
        mu = sum(members) / len(members)
        g[c] = ref_normalize(m * g[c] + (1 - m) * mu if seen[c] else mu)
        seen[c] = True
    return g, seen


def _rand(rng, *shape):
    return rng.normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------- normalize
def test_normalize_matches_loop_and_keeps_zero():
    rng = np.random.default_rng(0)
    x = _rand(rng, 5, 7)
    x[2] = 0.0
    x[3] = 1e-8  # below eps: scaled by 1/eps, not blown up to unit norm
    out = np.asarray(M.normalize(jnp.asarray(x)))
    assert out.dtype == np.float32
    for i in range(5):
        np.testing.assert_allclose(out[i], ref_normalize(x[i]), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out[2], 0.0)


def test_normalize_gradient_finite_at_zero_and_correct_elsewhere():
    g0 = jax.grad(lambda x: jnp.sum(M.normalize(x) * jnp.arange(1.0, 4.0)))(jnp.zeros(3))
    assert np.all(np.isfinite(np.asarray(g0)))
    np.testing.assert_allclose(np.asarray(g0), np.arange(1.0, 4.0) / EPS, rtol=1e-5)
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)))
        check_grads(jax.jit(M.normalize), (x,), order=1, modes=["rev"])


# ---------------------------------------------------------------- GEI
@pytest.mark.parametrize("b,d,c,tau", [(5, 3, 2, 0.1), (7, 6, 10, 0.5)])
def test_gei_logits_matches_reference(b, d, c, tau):
    rng = np.random.default_rng(b * 100 + c)
    z, g = _rand(rng, b, d) * 3.0, _rand(rng, c, d)
    out = gei_jit(jnp.asarray(z), jnp.asarray(g), tau=tau)
    chex.assert_shape(out, (b, c))
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(np.asarray(out), ref_gei(z, g, tau), rtol=1e-5, atol=1e-5)


def test_gei_predict_softmax_and_argmax():
    rng = np.random.default_rng(3)
    z, g = _rand(rng, 6, 4), _rand(rng, 10, 4)
    probs, labels = predict_jit(jnp.asarray(z), jnp.asarray(g), tau=0.1)
    logits = ref_gei(z, g, 0.1)
    for i in range(6):
        e = [np.exp(v - max(logits[i])) for v in logits[i]]
        np.testing.assert_allclose(np.asarray(probs[i]), np.array(e) / sum(e), rtol=1e-5, atol=1e-6)
        assert int(labels[i]) == int(np.argmax(logits[i]))
    assert labels.dtype == jnp.int32


def test_gei_zero_global_embedding_gives_zero_logit():
    """An unseen (zero) class embedding has cosine 0 with everything, and no NaN."""
    z = jnp.ones((2, 3))
    g = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = np.asarray(M.gei_logits(z, g, 0.1))
    np.testing.assert_allclose(out[:, 1], 0.0)
    np.testing.assert_allclose(out[:, 0], 1 / np.sqrt(3) / 0.1, rtol=1e-6)


def test_gei_vmap_over_leading_axis():
    rng = np.random.default_rng(4)
    z, g = _rand(rng, 3, 5, 4), _rand(rng, 2, 4)
    out = jax.vmap(M.gei_logits, in_axes=(0, None))(jnp.asarray(z), jnp.asarray(g))
    for e in range(3):
        np.testing.assert_allclose(np.asarray(out[e]), ref_gei(z[e], g, 0.1), rtol=1e-5, atol=1e-5)


def test_gei_bf16_inputs_accumulate_in_f32():
    rng = np.random.default_rng(5)
    z = jnp.asarray(_rand(rng, 6, 16), jnp.bfloat16)
    g = jnp.asarray(_rand(rng, 3, 16), jnp.bfloat16)
    out = M.gei_logits(z, g)
    assert out.dtype == jnp.float32
    exact = ref_gei(np.asarray(z, np.float32), np.asarray(g, np.float32), 0.1)
    np.testing.assert_allclose(np.asarray(out), exact, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    z=hnp.arrays(np.float32, (3, 4), elements=st.floats(-10, 10, width=32)),
    scale=st.floats(1e-2, 1e3),
)
def test_gei_invariant_to_positive_scaling(z, scale):
    assume(np.min(np.linalg.norm(z, axis=1)) > 1e-2)
    g = jnp.asarray(np.eye(2, 4, dtype=np.float32) + 0.3)
    a = gei_jit(jnp.asarray(z), g, tau=0.1)
    b = gei_jit(jnp.asarray(z * np.float32(scale)), g, tau=0.1)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_gei_rejects_bad_input():
    with pytest.raises(ValueError, match="embedding sizes differ"):
        M.gei_logits(jnp.ones((2, 3)), jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="tau"):
        M.gei_logits(jnp.ones((2, 3)), jnp.ones((4, 3)), tau=0.0)
    with pytest.raises(AssertionError):
        M.gei_logits(jnp.ones((2, 3, 1)), jnp.ones((4, 3)))


# ---------------------------------------------------------------- EMA
EMA_CASES = {
    # name: (C, labels, seen)
    "two_classes_both_present": (2, [0, 1, 1, 0, 1], [True, False]),
    "ten_classes_some_absent": (10, [3, 3, 7, 0, 7, 7, 9, 3], [True] * 5 + [False] * 5),
    "one_class_absent": (3, [0, 2, 2, 0, 0, 2], [True, True, True]),
    "all_labels_distinct": (6, [5, 1, 0, 4], [False, True, False, True, False, True]),
}


@pytest.mark.parametrize("name", list(EMA_CASES))
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_ema_update_matches_reference(name, momentum):
    c, labels, seen = EMA_CASES[name]
    rng = np.random.default_rng(len(labels) + c)
    g = np.stack([ref_normalize(v) for v in _rand(rng, c, 5)]).astype(np.float32)
    z = _rand(rng, len(labels), 5) * 2.0
    new_g, new_seen = ema_jit(jnp.asarray(g), jnp.asarray(seen), jnp.asarray(z),
                              jnp.asarray(labels, jnp.int32), momentum)
    want_g, want_seen = ref_ema(g, seen, z, labels, momentum)
    chex.assert_shape(new_g, (c, 5))
    assert new_g.dtype == jnp.float32 and new_seen.dtype == jnp.bool_
    np.testing.assert_allclose(np.asarray(new_g), want_g, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new_seen), want_seen)
    absent = [k for k in range(c) if k not in labels]
    np.testing.assert_array_equal(np.asarray(new_g)[absent], g[absent])  # bit-identical


def test_ema_update_ignores_out_of_range_labels_and_keeps_dtype():
    g = jnp.zeros((3, 4), jnp.bfloat16)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.bfloat16)
    labels = jnp.array([1, -1, 1, 3])
    new_g, seen = M.ema_update(g, jnp.zeros(3, bool), z, labels)
    assert new_g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(seen), [False, True, False])
    want, _ = ref_ema(np.zeros((3, 4)), [False] * 3, np.asarray(z, np.float32), [1, 9, 1, 9], 0.99)
    np.testing.assert_allclose(np.asarray(new_g, np.float32), want, atol=1e-2)


def test_ema_update_passes_no_gradient():
    rng = np.random.default_rng(6)
    z = jnp.asarray(_rand(rng, 4, 3))
    g = jnp.asarray(_rand(rng, 2, 3))

    def f(z, g):
        return jnp.sum(M.ema_update(g, jnp.array([True, False]), z, jnp.array([0, 1, 0, 1]))[0])

    gz, gg = jax.grad(f, argnums=(0, 1))(z, g)
    np.testing.assert_array_equal(np.asarray(gz), 0.0)
    np.testing.assert_array_equal(np.asarray(gg), 0.0)


def test_ema_update_vmap_over_independent_states():
    rng = np.random.default_rng(7)
    g = _rand(rng, 2, 3, 4)
    z = _rand(rng, 2, 5, 4)
    labels = np.array([[0, 0, 1, 1, 0], [2, 2, 2, 0, 0]])
    seen = np.array([[True, False, True], [False, False, True]])
    out_g, out_seen = jax.vmap(M.ema_update, in_axes=(0, 0, 0, 0, None))(
        jnp.asarray(g), jnp.asarray(seen), jnp.asarray(z), jnp.asarray(labels), 0.5)
    for e in range(2):
        want_g, want_seen = ref_ema(g[e], seen[e], z[e], labels[e], 0.5)
        np.testing.assert_allclose(np.asarray(out_g[e]), want_g, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(out_seen[e]), want_seen)


@settings(max_examples=25, deadline=None)
@given(
    z=hnp.arrays(np.float32, (6, 3), elements=st.floats(-5, 5, width=32)),
    labels=hnp.arrays(np.int32, (6,), elements=st.integers(0, 2)),
    seen=hnp.arrays(np.bool_, (3,)),
)
def test_ema_momentum_zero_gives_normalised_class_means(z, labels, seen):
    assume(np.min(np.linalg.norm(z, axis=1)) > 1e-2)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    means = {c: zn[labels == c].mean(0) for c in range(3) if np.any(labels == c)}
    assume(all(np.linalg.norm(v) > 1e-2 for v in means.values()))  # direction well defined
    g = np.full((3, 3), 0.5, np.float32)
    new_g, new_seen = ema_jit(jnp.asarray(g), jnp.asarray(seen), jnp.asarray(z), jnp.asarray(labels), 0.0)
    for c in range(3):
        if c in means:
            want = means[c] / np.linalg.norm(means[c])
            np.testing.assert_allclose(np.asarray(new_g[c]), want, rtol=1e-4, atol=1e-5)
            assert bool(new_seen[c])
        else:
            np.testing.assert_array_equal(np.asarray(new_g[c]), g[c])
            assert bool(new_seen[c]) == bool(seen[c])


def test_ema_rejects_bad_input():
    g, seen = M.init_global_embeddings(3, 4)
    with pytest.raises(ValueError, match="momentum"):
        M.ema_update(g, seen, jnp.ones((2, 4)), jnp.array([0, 1]), momentum=1.5)
    with pytest.raises(ValueError, match="seen"):
        M.ema_update(g, jnp.zeros(2, bool), jnp.ones((2, 4)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="D=5"):
        M.ema_update(g, seen, jnp.ones((2, 5)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        M.ema_update(g, seen, jnp.ones((2, 4)), jnp.array([0, 1, 2]))
    with pytest.raises(AssertionError):
        M.ema_update(g, seen, jnp.ones((2, 4)), jnp.array([0.0, 1.0]))
