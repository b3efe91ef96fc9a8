"""Saliency maps, TK-MMP (with masks) and the SC loss (with the equivariance term) vs NumPy loops."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

import lclsc_jax.method as M
from lclsc_jax.method.saliency_consistency import _dihedral_select

EPS = 1e-6

tk_jit = jax.jit(M.tk_mmp, static_argnames=("k_max", "k_min"))
sal_jit = jax.jit(M.class_saliency_maps)
sc_jit = jax.jit(M.saliency_consistency_loss, static_argnames=("tau", "k_max", "k_min"))
# D4 indices are an array argument (traced), so the equivariance term compiles once.
sc_d4_jit = jax.jit(lambda maps, y, alpha, maps_t, t, mask: M.saliency_consistency_loss(
    maps, y, tau=0.1, k_max=3 / 16, k_min=2 / 16, alpha=alpha, maps_transformed=maps_t, transform=t, w_eq=0.5,
    mask=mask))


# ---------------------------------------------------------------- NumPy references (loops)
def ref_normalize(v):
    v = np.asarray(v, np.float64)
    return v / max(math.sqrt(sum(float(a) ** 2 for a in v)), EPS)


def ref_saliency(local_z, g):
    b, h, w, _ = local_z.shape
    out = np.zeros((b, h, w, len(g)))
    for n in range(b):
        for i in range(h):
            for j in range(w):
                zi = ref_normalize(local_z[n, i, j])
                for c in range(len(g)):
                    out[n, i, j, c] = float(np.dot(zi, ref_normalize(g[c])))
    return out


def ref_tk_mmp(maps, k_max, k_min, alpha, mask=None):
    b, h, w, c = maps.shape
    if mask is not None:
        mask = np.broadcast_to(np.asarray(mask, bool), (b, h, w))
    out = np.zeros((b, c))
    for n in range(b):
        for k in range(c):
            vals = [float(maps[n, i, j, k]) for i in range(h) for j in range(w)
                    if mask is None or mask[n, i, j]]
            if not vals:
                continue  # no valid location: pools to 0
            desc, asc = sorted(vals, reverse=True), sorted(vals)
            kx, kn = min(k_max, len(vals)), min(k_min, len(vals))
            out[n, k] = sum(desc[:kx]) / kx + alpha * sum(asc[:kn]) / kn
    return out


def ref_dihedral(a, t):
    """D4 element ``t`` on a square ``a (n, n, ...)``: ``t % 4`` CCW quarter turns, then a width flip."""
    n = a.shape[0]
    out = np.array(a)
    for _ in range(t % 4):
        rot = np.empty_like(out)
        for i in range(n):
            for j in range(n):
                rot[i, j] = out[j, n - 1 - i]  # counter-clockwise quarter turn
        out = rot
    if t >= 4:
        out = np.stack([out[:, n - 1 - j] for j in range(n)], axis=1)
    return out


def ref_ce(logits, labels):
    total = 0.0
    for row, y in zip(logits, labels):
        mx = max(row)
        total -= row[y] - (mx + math.log(sum(math.exp(v - mx) for v in row)))
    return total / len(labels)


def ref_equiv(maps, maps_t, transform_one, mask=None):
    b, h, w, c = maps.shape
    mask = np.ones((b, h, w), bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), (b, h, w))
    total, count = 0.0, 0
    for n in range(b):
        target = transform_one(n, maps[n])
        valid = transform_one(n, mask[n])
        for i in range(maps_t.shape[1]):
            for j in range(maps_t.shape[2]):
                if valid[i, j]:
                    total += sum((float(maps_t[n, i, j, k]) - float(target[i, j, k])) ** 2 for k in range(c))
                    count += c
    return total / max(count, 1)


def circle_mask(h, w):
    yy, xx = np.mgrid[:h, :w]
    return (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= (min(h, w) / 2) ** 2


def _maps(seed, *shape):
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


# ---------------------------------------------------------------- class_saliency_maps
@pytest.mark.parametrize("shape,c", [((2, 3, 4, 5), 2), ((1, 2, 2, 3), 10)])
def test_class_saliency_maps_match_reference(shape, c):
    rng = np.random.default_rng(c)
    local_z = rng.normal(size=shape).astype(np.float32)
    local_z[0, 0, 0] = 0.0  # a dead location: cosine 0, not NaN
    g = rng.normal(size=(c, shape[-1])).astype(np.float32)
    out = sal_jit(jnp.asarray(local_z), jnp.asarray(g))
    chex.assert_shape(out, shape[:3] + (c,))
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(np.asarray(out), ref_saliency(local_z, g), rtol=1e-5, atol=1e-6)


def test_class_saliency_maps_bf16_accumulate_in_f32():
    rng = np.random.default_rng(0)
    local_z = jnp.asarray(rng.normal(size=(2, 3, 3, 32)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(4, 32)), jnp.bfloat16)
    out = sal_jit(local_z, g)
    assert out.dtype == jnp.float32
    want = ref_saliency(np.asarray(local_z, np.float32), np.asarray(g, np.float32))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- resolve_k / tk_mmp
@pytest.mark.parametrize(
    "k,n,want", [(1 / 16, 16, 1), (1.0, 16, 16), (0.1, 49, 5), (0.01, 16, 1), (0.5, 9, 5),
                 (np.float32(1 / 3), 9, 3), (2 / 15, 15, 2)]
)
def test_resolve_k(k, n, want):
    assert M.resolve_k(k, n) == want


@pytest.mark.parametrize("k", [0.0, 1.5, -0.2])
def test_resolve_k_rejects_out_of_range(k):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        M.resolve_k(k, 16)


@pytest.mark.parametrize("k", [1, 16, np.int32(3), True])
def test_k_is_a_fraction_only_so_one_never_means_one_location(k):
    # The config reads loss.k_max=1 as 1.0 (all locations); an int 1 in the API would have meant one.
    with pytest.raises(TypeError, match="fraction"):
        M.resolve_k(k, 16)
    with pytest.raises(TypeError, match="fraction"):
        M.tk_mmp(jnp.zeros((1, 4, 4, 2)), k, 0.5, -1.0)


TK_CASES = [
    # (shape, k_max, k_min, counts for the reference)
    ((2, 3, 4, 2), 1 / 12, 1 / 12),  # one location each
    ((2, 3, 4, 2), 1.0, 1.0),  # k = h*w: plain average
    ((2, 3, 4, 2), 0.25, 1.0),  # 3 and 12
    ((3, 4, 4, 10), 3 / 16, 1 / 16),
    ((3, 4, 4, 10), 1.0, 5 / 16),
]


@pytest.mark.parametrize("shape,k_max,k_min", TK_CASES)
def test_tk_mmp_matches_reference(shape, k_max, k_min):
    b, h, w, c = shape
    maps = _maps(sum(shape), *shape)
    kx, kn = M.resolve_k(k_max, h * w), M.resolve_k(k_min, h * w)
    per_sample = np.ones((b, h, w), bool)
    per_sample[0] = circle_mask(h, w)
    per_sample[1] = False
    per_sample[1, 0, :2] = True  # 2 valid locations: fewer than k -> mean of the valid ones
    if b > 2:
        per_sample[2] = False  # nothing valid: pools to 0
    masks = [None, circle_mask(h, w), per_sample, per_sample.astype(np.float32)]
    for mask in masks:
        m = None if mask is None else jnp.asarray(mask)
        for alpha in (1.0, -1.0, 0.0):
            out = tk_jit(jnp.asarray(maps), k_max=k_max, k_min=k_min, alpha=alpha, mask=m)
            chex.assert_shape(out, (b, c))
            chex.assert_type(out, jnp.float32)
            assert np.all(np.isfinite(np.asarray(out)))
            np.testing.assert_allclose(
                np.asarray(out), ref_tk_mmp(maps, kx, kn, alpha, mask), rtol=1e-5, atol=1e-6,
                err_msg=f"alpha={alpha} mask={None if mask is None else mask.shape}")


def test_tk_mmp_known_values():
    """Hand-computed: values 1..4 in a 2x2 map."""
    maps = jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)
    assert float(tk_jit(maps, k_max=0.25, k_min=0.25, alpha=1.0)[0, 0]) == 5.0  # 4 + 1
    assert float(tk_jit(maps, k_max=0.5, k_min=0.5, alpha=-1.0)[0, 0]) == 2.0  # 3.5 - 1.5
    assert float(tk_jit(maps, k_max=1.0, k_min=0.25, alpha=0.0)[0, 0]) == 2.5  # plain mean
    mask = jnp.array([[True, False], [True, False]])  # keeps 1 and 3
    assert float(tk_jit(maps, k_max=1.0, k_min=0.25, alpha=1.0, mask=mask)[0, 0]) == 3.0  # mean(1, 3) + 1


def test_sc_logits_is_tk_mmp_over_tau():
    maps = _maps(1, 2, 3, 3, 4)
    out = M.sc_logits(jnp.asarray(maps), 2 / 9, 3 / 9, -1.0, 0.2)
    np.testing.assert_allclose(np.asarray(out), ref_tk_mmp(maps, 2, 3, -1.0) / 0.2, rtol=1e-5, atol=1e-5)


def test_tk_mmp_vmap_over_leading_axis():
    maps = _maps(2, 3, 2, 4, 4, 3)
    mask = circle_mask(4, 4)
    f = jax.jit(jax.vmap(lambda m, k: M.tk_mmp(m, 2 / 16, 3 / 16, -1.0, k), in_axes=(0, None)))
    out = f(jnp.asarray(maps), jnp.asarray(mask))
    for e in range(3):
        np.testing.assert_allclose(np.asarray(out[e]), ref_tk_mmp(maps[e], 2, 3, -1.0, mask), rtol=1e-5, atol=1e-6)


def test_tk_mmp_bf16_gives_f32():
    maps = jnp.asarray(_maps(3, 2, 4, 4, 3), jnp.bfloat16)
    out = tk_jit(maps, k_max=3 / 16, k_min=2 / 16, alpha=-1.0)
    assert out.dtype == jnp.float32
    want = ref_tk_mmp(np.asarray(maps, np.float32), 3, 2, -1.0)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)


@jax.jit
def tk_all_k(maps, mask):
    """``(2, 9, B, C)``: alpha=0 scores for k_max = 1..9, and alpha=1 scores (k_max=9) for k_min = 1..9."""
    tops = jnp.stack([M.tk_mmp(maps, k / 9, 1 / 9, 0.0, mask) for k in range(1, 10)])
    bots = jnp.stack([M.tk_mmp(maps, 1.0, k / 9, 1.0, mask) for k in range(1, 10)])
    return jnp.stack([tops, bots])


@settings(max_examples=25, deadline=None)
@given(
    maps=hnp.arrays(np.float32, (2, 3, 3, 2), elements=st.floats(-1, 1, width=32)),
    mask=hnp.arrays(np.bool_, (3, 3)),
)
def test_tk_mmp_monotone_in_k(maps, mask):
    """alpha = 0: the top-k mean never increases with k_max; alpha = 1, k_max fixed: the
    bottom-k mean never decreases with k_min (with or without a mask)."""
    for m in (None, jnp.asarray(mask)):
        tops, bots = np.asarray(tk_all_k(jnp.asarray(maps), m))
        assert np.all(tops[1:] <= tops[:-1] + 1e-6)
        assert np.all(bots[1:] >= bots[:-1] - 1e-6)


# ---------------------------------------------------------------- transforms
def test_dihedral_select_matches_loops_and_dihedral_batch():
    x = _maps(4, 8, 3, 3, 2)
    t = np.array([5, 0, 7, 2, 1, 6, 3, 4], np.int32)
    sel = np.asarray(_dihedral_select(jnp.asarray(x), jnp.asarray(t)))
    vm = np.asarray(M.dihedral_batch(jnp.asarray(x), jnp.asarray(t)))
    for n in range(8):
        np.testing.assert_array_equal(sel[n], ref_dihedral(x[n], t[n]))
        np.testing.assert_array_equal(vm[n], ref_dihedral(x[n], t[n]))


# ---------------------------------------------------------------- SC loss
@pytest.mark.parametrize("alpha", [1.0, -1.0])
@pytest.mark.parametrize("c,k_max,k_min", [(2, 1 / 16, 1.0), (10, 0.25, 0.1)])
def test_sc_loss_without_second_view(alpha, c, k_max, k_min):
    maps = _maps(c, 4, 4, 4, c)
    labels = np.random.default_rng(c).integers(0, c, 4).astype(np.int32)
    kx, kn = M.resolve_k(k_max, 16), M.resolve_k(k_min, 16)
    for mask in (None, circle_mask(4, 4)):
        m = None if mask is None else jnp.asarray(mask)
        out = sc_jit(jnp.asarray(maps), jnp.asarray(labels), tau=0.1, k_max=k_max, k_min=k_min, alpha=alpha, mask=m)
        assert out.shape == () and out.dtype == jnp.float32
        want = ref_ce(ref_tk_mmp(maps, kx, kn, alpha, mask) / 0.1, labels)
        np.testing.assert_allclose(float(out), want, rtol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, -1.0])
def test_sc_loss_with_d4_equivariance_term(alpha):
    b, h, c = 8, 4, 3
    maps, maps_t = _maps(10, b, h, h, c), _maps(11, b, h, h, c)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 0], np.int32)
    t = np.array([5, 0, 7, 2, 1, 6, 3, 4], np.int32)
    per_sample = np.stack([np.roll(circle_mask(h, h), n, axis=1) for n in range(b)])  # not D4-invariant
    for mask in (None, circle_mask(h, h), per_sample):
        m = None if mask is None else jnp.asarray(mask)
        out = sc_d4_jit(jnp.asarray(maps), jnp.asarray(labels), alpha, jnp.asarray(maps_t), jnp.asarray(t), m)
        ce = ref_ce(ref_tk_mmp(maps, 3, 2, alpha, mask) / 0.1, labels)
        eq = ref_equiv(maps, maps_t, lambda n, a: ref_dihedral(a, t[n]), mask)
        np.testing.assert_allclose(float(out), ce + 0.5 * eq, rtol=1e-5)


def test_sc_loss_with_callable_transform_on_non_square_maps():
    maps, maps_t = _maps(12, 3, 3, 5, 2), _maps(13, 3, 3, 5, 2)
    labels = np.array([1, 0, 1], np.int32)
    mask = circle_mask(3, 5)
    mask[0, :] = False  # not flip-invariant
    flip_w = lambda x: jnp.flip(x, axis=2)  # noqa: E731
    out = jax.jit(lambda a, y, at, m: M.saliency_consistency_loss(
        a, y, tau=0.1, k_max=2 / 15, k_min=2 / 15, alpha=-1.0, maps_transformed=at, transform=flip_w, w_eq=2.0,
        mask=m))(jnp.asarray(maps), jnp.asarray(labels),
                                                      jnp.asarray(maps_t), jnp.asarray(mask))
    flip_ref = lambda n, a: np.stack([a[:, a.shape[1] - 1 - j] for j in range(a.shape[1])], axis=1)  # noqa: E731
    ce = ref_ce(ref_tk_mmp(maps, 2, 2, -1.0, mask) / 0.1, labels)
    np.testing.assert_allclose(float(out), ce + 2.0 * ref_equiv(maps, maps_t, flip_ref, mask), rtol=1e-5)


def test_sc_loss_bf16_gives_f32():
    maps = jnp.asarray(_maps(14, 4, 4, 4, 3), jnp.bfloat16)
    maps_t = jnp.asarray(_maps(15, 4, 4, 4, 3), jnp.bfloat16)
    labels, t = np.array([0, 2, 1, 1], np.int32), np.array([1, 4, 6, 3], np.int32)
    out = jax.jit(lambda a, y, at, t: M.saliency_consistency_loss(
        a, y, tau=0.1, k_max=2 / 16, k_min=3 / 16, alpha=-1.0, maps_transformed=at, transform=t))(
        maps, jnp.asarray(labels), maps_t, jnp.asarray(t))
    assert out.dtype == jnp.float32
    a, at = np.asarray(maps, np.float32), np.asarray(maps_t, np.float32)
    want = ref_ce(ref_tk_mmp(a, 2, 3, -1.0) / 0.1, labels) + ref_equiv(a, at, lambda n, x: ref_dihedral(x, t[n]))
    np.testing.assert_allclose(float(out), want, rtol=1e-5)


# ---------------------------------------------------------------- gradients
def test_sc_loss_gradients_match_finite_differences():
    maps, maps_t = _maps(20, 3, 4, 4, 2), _maps(21, 3, 4, 4, 2)
    labels, t = jnp.array([0, 1, 1]), jnp.array([3, 5, 0])
    mask = jnp.asarray(circle_mask(4, 4))
    with jax.enable_x64(True):
        sc = jax.jit(lambda a, at, alpha: M.saliency_consistency_loss(
            a, labels, tau=0.2, k_max=3 / 16, k_min=2 / 16, alpha=alpha, maps_transformed=at, transform=t, w_eq=0.7,
            mask=mask))
        tk = jax.jit(lambda a, alpha: M.tk_mmp(a, 0.25, 1.0, alpha, mask))
        args = (jnp.asarray(maps, jnp.float64), jnp.asarray(maps_t, jnp.float64))
        for alpha in (1.0, -1.0):
            check_grads(lambda a, at: sc(a, at, alpha), args, 1, modes=["rev"])
            check_grads(lambda a: tk(a, alpha), args[:1], 1, modes=["rev"])
        local_z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2, 3)))
        ge = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3)))
        check_grads(jax.jit(lambda z: M.class_saliency_maps(z, ge)), (local_z,), 1, modes=["rev"])


def test_sc_gradients_finite_on_degenerate_inputs():
    """Zero features, constant (all-tied) maps, and a sample with no valid location."""
    local_z = jnp.zeros((2, 3, 3, 4)).at[1].set(1.0)
    g = jnp.array([[1.0, 0, 0, 0], [0, 0, 0, 0]])
    mask = jnp.ones((2, 3, 3), bool).at[0].set(False)

    def loss(z):
        maps = M.class_saliency_maps(z, g)
        return M.saliency_consistency_loss(maps, jnp.array([0, 1]), tau=0.1, k_max=2 / 9, k_min=2 / 9, alpha=-1.0,
                                           maps_transformed=maps, transform=jnp.array([1, 6]), w_eq=1.0, mask=mask)

    val, grad = jax.jit(jax.value_and_grad(loss))(local_z)
    assert np.isfinite(float(val))
    assert np.all(np.isfinite(np.asarray(grad)))


# ---------------------------------------------------------------- errors
def test_sc_rejects_bad_input():
    maps, y = jnp.zeros((2, 3, 3, 2)), jnp.array([0, 1])
    scl = functools.partial(M.saliency_consistency_loss, k_max=0.5, k_min=0.5, alpha=-1.0)
    with pytest.raises(ValueError, match="without the transform"):
        scl(maps, y, maps_transformed=maps)
    with pytest.raises(ValueError, match="without maps_transformed"):
        scl(maps, y, transform=jnp.array([0, 1]))
    with pytest.raises(ValueError, match="square"):
        scl(jnp.zeros((2, 3, 4, 2)), y, maps_transformed=jnp.zeros((2, 3, 4, 2)),
                                    transform=jnp.array([0, 1]))
    with pytest.raises(ValueError, match="D4 indices of shape"):
        scl(maps, y, maps_transformed=maps, transform=jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="mask must have shape"):
        M.tk_mmp(maps, 0.1, 0.1, -1.0, mask=jnp.ones((4, 4), bool))
    with pytest.raises(ValueError, match="k_max"):
        M.tk_mmp(maps, 1.5, 0.1, -1.0)
    with pytest.raises(ValueError, match="maps_transformed has"):
        scl(maps, y, maps_transformed=jnp.zeros((2, 4, 4, 2)),
                                    transform=lambda m: m)
    with pytest.raises(AssertionError):
        M.tk_mmp(jnp.zeros((3, 3, 2)), 0.1, 0.1, -1.0)


# ---------------------------------------------------------------- the decision-tied variants
def test_decomposed_maps_average_to_the_gei_cosine_under_a_linear_head():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(2, 3, 4, 5))  # backbone features F(u), (B, h, w, c)
    w, b = rng.normal(size=(5, 6)), rng.normal(size=6)  # a linear projection head
    g = rng.normal(size=(3, 6))
    local_z = feats @ w + b
    z = feats.mean(axis=(1, 2)) @ w + b  # the head on the pooled features
    maps = np.asarray(M.decomposed_saliency_maps(jnp.asarray(local_z, jnp.float32), jnp.asarray(z, jnp.float32),
                                                 jnp.asarray(g, jnp.float32)))
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    want = np.einsum("bhwd,cd->bhwc", local_z, gn) / np.linalg.norm(z, axis=1)[:, None, None, None]
    np.testing.assert_allclose(maps, want, rtol=1e-5, atol=1e-6)
    cos = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ gn.T
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), cos, rtol=1e-5, atol=1e-6)
    # TK-MMP with every location and no bottom term is the plain mean: SC logits == GEI logits.
    np.testing.assert_allclose(np.asarray(M.sc_logits(jnp.asarray(maps), 1.0, 1.0, 0.0, 0.1)), cos / 0.1,
                               rtol=1e-5, atol=1e-5)


def test_prediction_consistency_is_kl_from_the_gei_decision():
    rng = np.random.default_rng(4)
    sc, gei = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))

    def softmax(v):
        e = np.exp(v - v.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(gei), softmax(sc)
    want = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))
    f = jax.jit(M.prediction_consistency_loss)
    np.testing.assert_allclose(float(f(jnp.asarray(sc), jnp.asarray(gei))), want, rtol=1e-5)
    assert abs(float(f(jnp.asarray(gei), jnp.asarray(gei)))) < 1e-6
    g_sc, g_gei = jax.grad(lambda a, b: M.prediction_consistency_loss(a, b), argnums=(0, 1))(
        jnp.asarray(sc, jnp.float32), jnp.asarray(gei, jnp.float32))
    assert np.all(np.asarray(g_gei) == 0)  # the decision is the teacher
    np.testing.assert_allclose(np.asarray(g_sc), (q - p) / len(sc), rtol=1e-4, atol=1e-6)
