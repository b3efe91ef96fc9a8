"""Faithfulness metrics vs hand-computed cases and independent NumPy/SciPy loops.

The model is analytic: logits_k = a_k * (sum of the pixels in region k), probabilities
their softmax, so every perturbed score can be recomputed in NumPy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage, stats
from sklearn import metrics as skm

from lclsc_jax.evaluate.faithfulness import (
    confidence_change,
    curve_auc,
    deletion_curve,
    gaussian_blur,
    insertion_curve,
    noisy_linear_impute,
    road,
    saliency_ranks,
    target_scores,
)

H = W = 6
REGIONS = np.zeros((3, H, W), np.float32)
REGIONS[0, :, :3] = 1  # left half
REGIONS[1, :, 3:] = 1  # right half
REGIONS[2, 2:4, 2:4] = 1  # centre
SCALES = np.array([0.3, -0.2, 0.5], np.float32)


def analytic_probs_np(x: np.ndarray) -> np.ndarray:
    """NumPy twin of ``analytic_score_fn`` on (B, H, W, C) images."""
    sums = np.einsum("bhwc,khw->bk", x.astype(np.float64), REGIONS.astype(np.float64))
    z = sums * SCALES
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def analytic_score_fn(x: jax.Array) -> jax.Array:
    sums = jnp.einsum("bhwc,khw->bk", x, jnp.asarray(REGIONS))
    return jax.nn.softmax(sums * jnp.asarray(SCALES), axis=-1)


def analytic_logits_np(x: np.ndarray) -> np.ndarray:
    """The analytic model's logits (B, 3) in NumPy."""
    return np.einsum("bhwc,khw->bk", x.astype(np.float64), REGIONS.astype(np.float64)) * SCALES


def analytic_logit_fn(x: jax.Array) -> jax.Array:
    """The same model's logits: softmax of these is ``analytic_score_fn``."""
    return jnp.einsum("bhwc,khw->bk", x, jnp.asarray(REGIONS)) * jnp.asarray(SCALES)


def _margin_np(z: np.ndarray, t: int) -> float:
    """Logit margin of class ``t`` by a loop: its logit minus the largest other."""
    return z[t] - max(z[c] for c in range(len(z)) if c != t)


def _rank_np(z: np.ndarray, t: int) -> float:
    """Share of the other classes that class ``t`` beats (ties 1/2), by a loop."""
    others = [c for c in range(len(z)) if c != t]
    return sum(1.0 if z[c] < z[t] else 0.5 if z[c] == z[t] else 0.0 for c in others) / len(others)


def _data(seed: int, b: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.random((b, H, W, 2)).astype(np.float32)
    saliency = rng.random((b, H, W)).astype(np.float32)  # continuous: no ties
    targets = rng.integers(0, 3, b)
    return images, saliency, targets


def _np_curve(images, saliency, targets, n_steps, start, fill):
    """Independent loop: at step i the floor(i*HW/n) most salient pixels show ``fill``."""
    out = np.zeros((len(images), n_steps + 1))
    for b in range(len(images)):
        order = np.argsort(-saliency[b].ravel(), kind="stable")
        for i in range(n_steps + 1):
            k = i * H * W // n_steps
            x = start[b].reshape(H * W, -1).copy()
            x[order[:k]] = fill[b].reshape(H * W, -1)[order[:k]]
            out[b, i] = analytic_probs_np(x.reshape(1, H, W, -1))[0, targets[b]]
    return out


# ------------------------------------------------------------------ deletion/insertion


def test_deletion_hand_computed():
    # One 1x2 image [1, 2]; p(target=1) = sigmoid(sum); most salient pixel is the 2.
    def fn(x):
        s = x.sum(axis=(1, 2, 3))
        return jax.nn.softmax(jnp.stack([jnp.zeros_like(s), s], -1), -1)

    img = np.array([[[[1.0], [2.0]]]], np.float32)
    out = deletion_curve(fn, img, np.array([[[0.1, 0.9]]]), np.array([1]), n_steps=2)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    np.testing.assert_allclose(out["curves"][0], [sig(3), sig(1), 0.5], rtol=1e-6)
    np.testing.assert_allclose(out["x"], [0, 0.5, 1])
    auc = 0.5 * (sig(3) + sig(1)) / 2 + 0.5 * (sig(1) + 0.5) / 2
    assert out["auc"][0] == pytest.approx(auc, rel=1e-6)


@pytest.mark.parametrize("max_batch", [5, 64])
def test_deletion_matches_numpy_loop(max_batch):
    images, saliency, targets = _data(0)
    out = deletion_curve(analytic_score_fn, images, saliency, targets, n_steps=7, max_batch=max_batch)
    ref = _np_curve(images, saliency, targets, 7, images, np.zeros_like(images))
    np.testing.assert_allclose(out["curves"], ref, rtol=1e-5, atol=1e-6)
    auc = [np.trapezoid(r, np.linspace(0, 1, 8)) for r in ref]
    np.testing.assert_allclose(out["auc"], auc, rtol=1e-5)
    assert out["mean_auc"] == pytest.approx(np.mean(auc), rel=1e-5)


def test_insertion_with_blur_matches_numpy_loop():
    images, saliency, targets = _data(1)
    blurred = ndimage.gaussian_filter(images, sigma=(0, 1.5, 1.5, 0), mode="nearest", truncate=4.0)
    out = insertion_curve(analytic_score_fn, images, saliency, targets, n_steps=9, blur_sigma=1.5, max_batch=4)
    ref = _np_curve(images, saliency, targets, 9, blurred, images)
    np.testing.assert_allclose(out["curves"], ref, rtol=1e-5, atol=1e-6)
    # Endpoints: blurred image, then the original.
    full = analytic_probs_np(images)[np.arange(3), targets]
    np.testing.assert_allclose(out["curves"][:, -1], full, rtol=1e-5)


def test_low_resolution_saliency_is_upsampled():
    images, _, targets = _data(2)
    low = np.random.default_rng(2).random((3, 3, 3)).astype(np.float32)
    up = np.asarray(jax.image.resize(jnp.asarray(low), (3, H, W), "bilinear"))
    a = deletion_curve(analytic_score_fn, images, low, targets, n_steps=4)
    b = deletion_curve(analytic_score_fn, images, up, targets, n_steps=4)
    np.testing.assert_allclose(a["curves"], b["curves"])


def test_gaussian_blur_matches_scipy():
    x = np.random.default_rng(3).random((2, 9, 7, 3)).astype(np.float32)
    for sigma in (0.7, 2.0, 5.0):  # 5.0: radius 20 > image size
        ref = ndimage.gaussian_filter(x.astype(np.float64), (0, sigma, sigma, 0), mode="nearest", truncate=4.0)
        np.testing.assert_allclose(np.asarray(gaussian_blur(jnp.asarray(x), sigma)), ref, atol=1e-5)


def test_saliency_ranks_ties_in_raster_order():
    s = jnp.asarray([[[0.5, 0.9], [0.5, 0.1]]])
    np.testing.assert_array_equal(np.asarray(saliency_ranks(s)), [[1, 0, 2, 3]])


def test_saliency_ranks_match_scipy_rankdata():
    # Integer values so ties are frequent; SciPy's "ordinal" ranks break ties by position too.
    s = np.random.default_rng(4).integers(0, 5, (3, 5, 7)).astype(np.float32)
    ref = stats.rankdata(-s.reshape(3, -1), method="ordinal", axis=1) - 1
    np.testing.assert_array_equal(np.asarray(saliency_ranks(jnp.asarray(s))), ref)


def test_curve_auc_hand_computed():
    np.testing.assert_allclose(curve_auc([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), [0.5, 0.5, 1.0])
    np.testing.assert_allclose(curve_auc([[0.0, 1.0, 0.0]]), [0.5])


def test_curve_auc_matches_sklearn_auc():
    curves = np.random.default_rng(5).random((4, 33))
    ref = [skm.auc(np.linspace(0.0, 1.0, curves.shape[1]), c) for c in curves]
    np.testing.assert_allclose(curve_auc(curves), ref, rtol=1e-12)


# ------------------------------------------------------------------------------- ROAD


def _dense_impute(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Independent dense solve, one equation per removed pixel, explicit loops."""
    h, w, c = img.shape
    pix = [(r, q) for r in range(h) for q in range(w) if removed[r, q]]
    index = {p: i for i, p in enumerate(pix)}
    a = np.zeros((len(pix), len(pix)))
    rhs = np.zeros((len(pix), c))
    for i, (r, q) in enumerate(pix):
        total = 0.0
        for dr in (-1, 0, 1):
            for dq in (-1, 0, 1):
                if (dr, dq) == (0, 0) or not (0 <= r + dr < h and 0 <= q + dq < w):
                    continue
                wt = 1 / 12 if dr and dq else 1 / 6
                total += wt
                nb = (r + dr, q + dq)
                if nb in index:
                    a[i, index[nb]] -= wt
                else:
                    rhs[i] += wt * img[nb]
        a[i, i] += total
    out = img.copy()
    sol = np.linalg.solve(a, rhs)
    for i, p in enumerate(pix):
        out[p] = sol[i]
    return out


def test_impute_constant_image_stays_constant():
    img = np.full((7, 8, 2), 0.37)
    removed = np.random.default_rng(0).random((7, 8)) < 0.6
    np.testing.assert_allclose(noisy_linear_impute(img, removed, noise_std=0.0), img, atol=1e-12)


def test_impute_linear_ramp_is_exact_in_the_interior():
    r, q = np.mgrid[0:9, 0:10]
    img = np.stack([0.1 * r + 0.05 * q + 0.2, 0.3 - 0.02 * q], -1)
    removed = np.zeros((9, 10), bool)
    removed[2:6, 3:8] = True  # a block away from the border (symmetric neighbourhoods)
    removed[7, 1] = True
    np.testing.assert_allclose(noisy_linear_impute(img, removed, noise_std=0.0), img, atol=1e-12)


def test_impute_matches_dense_solve_including_border():
    rng = np.random.default_rng(4)
    img = rng.random((6, 5, 3))
    removed = rng.random((6, 5)) < 0.5
    out = noisy_linear_impute(img, removed, noise_std=0.0)
    np.testing.assert_allclose(out, _dense_impute(img, removed), atol=1e-10)
    np.testing.assert_array_equal(out[~removed], img[~removed])


def test_impute_noise_only_on_removed_pixels():
    img = np.full((20, 20, 1), 0.5)
    removed = np.zeros((20, 20), bool)
    removed[:, :10] = True
    out = noisy_linear_impute(img, removed, noise_std=0.1, key=jax.random.key(0))
    np.testing.assert_array_equal(out[~removed], img[~removed])
    assert 0.07 < np.std(out[removed] - 0.5) < 0.13
    with pytest.raises(ValueError, match="every pixel"):
        noisy_linear_impute(img, np.ones((20, 20), bool))


def test_road_matches_independent_loop():
    images, saliency, targets = _data(5, b=2)
    pcts = (20, 50, 80)
    out = road(analytic_score_fn, images, saliency, targets, percentages=pcts, noise_std=0.0, max_batch=4)
    for b in range(2):
        order = np.argsort(-saliency[b].ravel(), kind="stable")
        for j, p in enumerate(pcts):
            k = int(round(p / 100 * H * W))
            for name, drop in (("morf", order[:k]), ("lerf", order[H * W - k :])):
                removed = np.zeros(H * W, bool)
                removed[drop] = True
                x = _dense_impute(images[b].astype(np.float64), removed.reshape(H, W))
                ref = analytic_probs_np(x[None])[0]
                assert out[name][b, j] == pytest.approx(ref[targets[b]], rel=1e-5)
                assert out[f"{name}_correct"][b, j] == (ref.argmax() == targets[b])
    assert out["mean_morf"] == pytest.approx(out["morf"].mean())
    assert out["gap"] == pytest.approx(out["lerf"].mean() - out["morf"].mean())
    np.testing.assert_allclose(out["morf_mean"], out["morf"].mean(1))


def test_road_noise_is_reproducible_with_a_key():
    images, saliency, targets = _data(6, b=1)
    kw = dict(percentages=(30, 60), noise_std=0.05)
    a = road(analytic_score_fn, images, saliency, targets, key=jax.random.key(1), **kw)
    b = road(analytic_score_fn, images, saliency, targets, key=jax.random.key(1), **kw)
    c = road(analytic_score_fn, images, saliency, targets, noise_std=0.0, percentages=(30, 60))
    np.testing.assert_array_equal(a["morf"], b["morf"])
    assert not np.allclose(a["morf"], c["morf"], rtol=0, atol=1e-9)


def test_target_scores_match_loops_with_ties():
    z = np.array([[2.0, 1.0, 2.0, -1.0], [0.5, 3.0, 0.0, 0.1], [1.0, 1.0, 1.0, 1.0]])
    t = np.array([0, 2, 3])
    np.testing.assert_allclose(target_scores(z, t, "prob"), [2.0, 0.0, 1.0])
    np.testing.assert_allclose(target_scores(z, t, "margin"), [_margin_np(z[i], t[i]) for i in range(3)])
    np.testing.assert_allclose(target_scores(z, t, "rank"), [_rank_np(z[i], t[i]) for i in range(3)])
    np.testing.assert_allclose(target_scores(z, t, "rank"), [2.5 / 3, 0.0, 0.5])
    np.testing.assert_allclose(np.asarray(target_scores(jnp.asarray(z), jnp.asarray(t), "margin")),
                               [0.0, -3.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="score must be"):
        target_scores(z, t, "logit")


def test_road_on_the_logit_margin_matches_independent_loop():
    images, saliency, targets = _data(9, b=2)
    pcts = (25, 75)
    out = road(analytic_logit_fn, images, saliency, targets, percentages=pcts, noise_std=0.0, score="margin")
    assert out["score"] == "margin" and out["outputs"].shape == (2, 2, 2, 3)
    for b in range(2):
        order = np.argsort(-saliency[b].ravel(), kind="stable")
        for j, p in enumerate(pcts):
            k = int(round(p / 100 * H * W))
            for o, (name, drop) in enumerate((("morf", order[:k]), ("lerf", order[H * W - k :]))):
                removed = np.zeros(H * W, bool)
                removed[drop] = True
                x = _dense_impute(images[b].astype(np.float64), removed.reshape(H, W))
                z = analytic_logits_np(x[None])[0]
                assert out[name][b, j] == pytest.approx(_margin_np(z, targets[b]), rel=1e-4, abs=1e-5)
                np.testing.assert_allclose(out["outputs"][b, o, j], z, rtol=1e-4, atol=1e-5)
    assert out["gap"] == pytest.approx(out["lerf"].mean() - out["morf"].mean())


def test_rank_scored_curves_do_not_depend_on_calibration():
    # Softmax probabilities and logits (a monotone map per frame) give the same rank curves; a
    # temperature-scaled head (logits / 7, like cos / tau vs a linear head) the same rank and a
    # margin scaled by exactly 1/7, while its probability curve changes shape.
    images, saliency, targets = _data(10, b=3)
    cool = lambda x: analytic_logit_fn(x) / 7.0  # noqa: E731
    kw = dict(percentages=(30, 60), noise_std=0.0)
    r_prob = road(analytic_score_fn, images, saliency, targets, score="rank", **kw)
    r_logit = road(analytic_logit_fn, images, saliency, targets, score="rank", **kw)
    r_cool = road(cool, images, saliency, targets, score="rank", **kw)
    np.testing.assert_array_equal(r_prob["morf"], r_logit["morf"])
    np.testing.assert_array_equal(r_logit["lerf"], r_cool["lerf"])
    m = road(analytic_logit_fn, images, saliency, targets, score="margin", **kw)
    m_cool = road(cool, images, saliency, targets, score="margin", **kw)
    np.testing.assert_allclose(m_cool["morf"], m["morf"] / 7.0, rtol=1e-4, atol=1e-6)
    for name in ("morf", "lerf"):
        want = np.array([[_rank_np(z, targets[b]) for z in r_logit["outputs"][b, 0 if name == "morf" else 1]]
                         for b in range(3)])
        np.testing.assert_array_equal(r_logit[name], want)


def test_deletion_on_the_margin_matches_numpy_loop():
    images, saliency, targets = _data(11)
    out = deletion_curve(analytic_logit_fn, images, saliency, targets, n_steps=5, max_batch=4, score="margin")
    ref = np.zeros((3, 6))
    for b in range(3):
        order = np.argsort(-saliency[b].ravel(), kind="stable")
        for i in range(6):
            x = images[b].reshape(H * W, -1).copy()
            x[order[: i * H * W // 5]] = 0.0
            ref[b, i] = _margin_np(analytic_logits_np(x.reshape(1, H, W, -1))[0], targets[b])
    np.testing.assert_allclose(out["curves"], ref, rtol=1e-4, atol=1e-5)
    rank = insertion_curve(analytic_score_fn, images, saliency, targets, n_steps=3, score="rank")
    assert set(np.unique(rank["curves"])) <= {0.0, 0.5, 1.0}


# ------------------------------------------------------------------ confidence change


def test_confidence_change_matches_numpy():
    images, saliency, targets = _data(7, b=4)
    out = confidence_change(analytic_score_fn, images, saliency, targets, max_batch=3)
    y = analytic_probs_np(images)[np.arange(4), targets]
    o = analytic_probs_np(images * saliency[..., None])[np.arange(4), targets]
    np.testing.assert_allclose(out["full"], y, rtol=1e-5)
    np.testing.assert_allclose(out["masked"], o, rtol=1e-5)
    drop = 100 * np.maximum(0, y - o) / y
    assert out["average_drop"] == pytest.approx(drop.mean(), rel=1e-4, abs=1e-6)
    assert out["increase_in_confidence"] == pytest.approx(100 * np.mean(o > y))


def test_confidence_change_hand_case():
    # p(1) = sigmoid(sum): masking with a map of ones changes nothing (no drop, no increase);
    # a map of zeros sends p(1) from sigmoid(2) to 0.5.
    def fn(x):
        s = x.sum(axis=(1, 2, 3))
        return jax.nn.softmax(jnp.stack([jnp.zeros_like(s), s], -1), -1)

    img = np.ones((2, 1, 2, 1), np.float32)
    maps = np.stack([np.ones((1, 2)), np.zeros((1, 2))]).astype(np.float32)
    out = confidence_change(fn, img, maps, np.array([1, 1]))
    sig2 = 1 / (1 + np.exp(-2))
    np.testing.assert_allclose(out["drop"], [0.0, 100 * (sig2 - 0.5) / sig2], rtol=1e-5, atol=1e-7)
    assert out["increase_in_confidence"] == 0.0


# ---------------------------------------------------------------------------- errors


def test_bad_input():
    images, saliency, targets = _data(8)
    with pytest.raises(ValueError, match="targets must lie"):
        deletion_curve(analytic_score_fn, images, saliency, np.array([0, 1, 5]))
    with pytest.raises(ValueError, match="saliency must have shape"):
        deletion_curve(analytic_score_fn, images, saliency[:2], targets)
    with pytest.raises(ValueError, match="images must have shape"):
        deletion_curve(analytic_score_fn, images[0], saliency, targets)
    with pytest.raises(ValueError, match="n_steps"):
        deletion_curve(analytic_score_fn, images, saliency, targets, n_steps=0)
    with pytest.raises(ValueError, match="baseline"):
        deletion_curve(analytic_score_fn, images, saliency, targets, baseline="noise")
    with pytest.raises(ValueError, match="percentages"):
        road(analytic_score_fn, images, saliency, targets, percentages=(50, 100))
    with pytest.raises(ValueError, match="score must be"):
        road(analytic_score_fn, images, saliency, targets, score="probability")
    with pytest.raises(ValueError, match="score must be"):
        deletion_curve(analytic_score_fn, images, saliency, targets, score="logits")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        confidence_change(analytic_score_fn, images, saliency * 3, targets)
    with pytest.raises(ValueError, match="targets must be integer"):
        confidence_change(analytic_score_fn, images, saliency, targets.astype(float))
