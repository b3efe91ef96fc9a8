"""The temporal model on frozen embeddings: NumPy forward reference, causality, padding, fitting, msgpack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax.models.temporal import TemporalHead, temporal_padding
from lclsc_jax.train import temporal as tt


def _numpy_forward(params, z, keep, window, causal):
    """Independent forward pass: explicit loops over time and kernel taps."""
    x = np.concatenate([z * keep[:, None], keep[:, None].astype(float)], axis=1)  # (T, D+1)
    t = len(x)
    left = window - 1 if causal else window // 2
    w = np.asarray(params["conv"]["kernel"])  # (W, D+1, H)
    h = np.zeros((t, w.shape[2]))
    for i in range(t):
        for j in range(window):
            src = i - left + j
            if 0 <= src < t:
                h[i] += x[src] @ w[j]
    h = np.maximum(h + np.asarray(params["conv"]["bias"]), 0)
    h = np.maximum(h @ np.asarray(params["mlp"]["kernel"]) + np.asarray(params["mlp"]["bias"]), 0)
    return h @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"])


@pytest.mark.parametrize("causal", [True, False])
def test_forward_matches_numpy_loops(causal):
    r = np.random.default_rng(0)
    z = r.normal(size=(1, 9, 5)).astype(np.float32)
    keep = r.random((1, 9)) < 0.7
    m = TemporalHead(num_classes=3, window=4, hidden=8, causal=causal)
    params = m.init(jax.random.PRNGKey(1), jnp.asarray(z), jnp.asarray(keep))["params"]
    out = np.asarray(m.apply({"params": params}, jnp.asarray(z), jnp.asarray(keep)))
    ref = _numpy_forward(jax.device_get(params), z[0].astype(np.float64), keep[0], 4, causal)
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-5)


def test_causal_model_ignores_the_future_and_padding():
    r = np.random.default_rng(2)
    z = r.normal(size=(12, 4)).astype(np.float32)
    m = TemporalHead(num_classes=2, window=3, hidden=8, causal=True)
    params = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 4)), jnp.ones((1, 12), bool))["params"]
    z2 = z.copy()
    z2[7:] = r.normal(size=(5, 4))
    a, b = tt.predict_temporal(m, params, [z, z2])
    np.testing.assert_allclose(a[:7], b[:7], rtol=1e-6, atol=1e-7)
    assert not np.allclose(a[7:], b[7:])
    # a short sequence padded into a batch gives the same probabilities as alone
    (alone,) = tt.predict_temporal(m, params, [z[:5]])
    batched = tt.predict_temporal(m, params, [z[:5], z])[0]
    np.testing.assert_allclose(alone, batched, rtol=1e-6, atol=1e-7)
    assert temporal_padding(4, causal=False) == (2, 1) and temporal_padding(4) == (3, 0)
    with pytest.raises(ValueError):
        temporal_padding(0)


def _toy(seed, n_seq=12, d=6):
    """Sequences whose class is only visible in the mean over 3 frames (single frames are noisy)."""
    r = np.random.default_rng(seed)
    mu = np.eye(d)[:2] * 1.0
    zs, ys = [], []
    for i in range(n_seq):
        y = i % 2
        t = int(r.integers(8, 15))
        zs.append((mu[y] + r.normal(scale=1.0, size=(t, d))).astype(np.float32))
        ys.append(np.full(t, y))
    return zs, ys


def test_fit_is_deterministic_learns_and_round_trips(tmp_path):
    zs, ys = _toy(0)
    m = TemporalHead(num_classes=2, window=5, hidden=16, causal=True)
    p1, losses = tt.fit_temporal(m, zs, ys, steps=150, seed=3)
    p2, _ = tt.fit_temporal(m, zs, ys, steps=150, seed=3)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p1, p2)
    assert losses[-1] < 0.5 * losses[0]
    zt, yt = _toy(1, n_seq=40)
    probs = tt.predict_temporal(m, p1, zt)
    acc = np.mean([np.mean(p[4:].argmax(1) == y[4:]) for p, y in zip(probs, yt)])
    single = np.mean([np.mean(z[4:, :2].argmax(1) == y[4:]) for z, y in zip(zt, yt)])  # a one-frame rule
    assert acc > single + 0.05, (acc, single)
    path = tmp_path / "temporal.msgpack"
    tt.save_params(str(path), p1)
    back = tt.load_params(str(path), jax.tree.map(np.zeros_like, p1))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p1, back)


def test_rejected_frames_carry_no_loss():
    zs, ys = _toy(4, n_seq=4)
    keep = [np.zeros(len(z), bool) for z in zs]
    m = TemporalHead(num_classes=2, window=3, hidden=4)
    with pytest.raises(ValueError, match="no kept frame"):
        tt.fit_temporal(m, zs, ys, keep, steps=1)
