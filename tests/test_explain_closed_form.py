"""Every saliency method against an independent computation on a model whose answer can be derived.

The model (``AffineCAMNet``) follows the ``lclsc_jax.models`` contract and is simple enough for
closed forms in NumPy: ``stem = conv1x1(x) + b`` (16x16), ``stage4 = relu(BN(avgpool4(stem) @ P))``
(4x4), ``logits = mean(stage4) @ W + b``, ``embedding = mean(stage4) @ E``. Scores are linear in
``stage4``, so dS/dA = W[:, c] / n everywhere, and every CAM weighting has a closed form.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.transform import resize as sk_resize

from lclsc_jax import explain

H = W_IMG = 16
POOL = 4
C_IN, C_STEM, C_FEAT, K, D = 3, 4, 6, 3, 5


class AffineCAMNet(nn.Module):
    """Test network following the models contract; see the module docstring."""

    num_classes: int = K
    head_type: str = "linear"
    use_relu: bool = True

    stage_names = ("stem", "stage4")
    last_stage = "stage4"

    def setup(self) -> None:
        self.stem_conv = nn.Conv(C_STEM, (1, 1), use_bias=True)
        self.proj = nn.Dense(C_FEAT, use_bias=False)
        self.bn = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
        self.fc = nn.Dense(self.num_classes)
        self.emb = nn.Dense(D, use_bias=False)

    def _run(self, feats: dict, stage: str) -> dict:
        x = feats[stage]
        if stage == "stem":
            p = nn.avg_pool(x, (POOL, POOL), strides=(POOL, POOL))
            z = self.bn(self.proj(p))
            x = nn.relu(z) if self.use_relu else z
            feats["stage4"] = x
        pooled = jnp.mean(x, axis=(1, 2))
        out = {"features": feats, "pooled": pooled, "embedding": self.emb(pooled),
               "local_embedding": self.emb(x)}
        if self.head_type == "linear":
            out["logits"] = self.fc(pooled)
        return out

    def __call__(self, x: jax.Array, train: bool = False) -> dict:
        return self._run({"stem": self.stem_conv(x)}, "stem")

    def from_stage(self, feats: jax.Array, stage: str, train: bool = False) -> dict:
        if stage == "input":
            return self(feats)
        return self._run({stage: feats}, stage)


def _init(model: AffineCAMNet, seed: int = 0) -> dict:
    x = jnp.zeros((1, H, W_IMG, C_IN))
    v = model.init(jax.random.key(seed), x)
    rs = np.random.RandomState(seed + 1)
    v = jax.tree_util.tree_map(lambda a: a, v)
    v["params"]["stem_conv"]["bias"] = jnp.asarray(rs.randn(C_STEM).astype(np.float32))
    v["params"]["bn"]["scale"] = jnp.asarray(rs.uniform(0.5, 1.5, C_FEAT).astype(np.float32))
    v["params"]["bn"]["bias"] = jnp.asarray(rs.randn(C_FEAT).astype(np.float32) * 0.3)
    v["batch_stats"]["bn"]["mean"] = jnp.asarray(rs.randn(C_FEAT).astype(np.float32) * 0.2)
    v["batch_stats"]["bn"]["var"] = jnp.asarray(rs.uniform(0.5, 2.0, C_FEAT).astype(np.float32))
    v["params"]["fc"]["bias"] = jnp.asarray(rs.randn(K).astype(np.float32))
    return v


@pytest.fixture(scope="module")
def setup():
    model = AffineCAMNet()
    v = _init(model)
    x = jax.random.normal(jax.random.key(3), (2, H, W_IMG, C_IN))
    out = model.apply(v, x)
    acts = np.asarray(out["features"]["stage4"], np.float64)  # (B, 4, 4, c)
    logits = np.asarray(out["logits"], np.float64)
    targets = np.array([0, 2], np.int32)
    return model, v, x, acts, logits, targets


def _p(v, *path):
    a = v
    for p in path:
        a = a[p]
    return np.asarray(a, np.float64)


def _ref_finish(raw: np.ndarray, size=(H, W_IMG)) -> np.ndarray:
    """pytorch-grad-cam post-processing in NumPy: ReLU, min-max, bilinear upsample, min-max."""
    out = []
    for m in raw:
        m = np.maximum(m, 0)
        m = m - m.min()
        m = m / m.max() if m.max() > 0 else m
        m = sk_resize(m, size, order=1, mode="edge", anti_aliasing=False)
        m = np.maximum(m, 0) - np.maximum(m, 0).min()
        out.append(m / m.max() if m.max() > 0 else m)
    return np.stack(out)


def _score_linear(v, pooled: np.ndarray) -> np.ndarray:
    return pooled @ _p(v, "params", "fc", "kernel") + _p(v, "params", "fc", "bias")


# ---------------------------------------------------------------- gradient CAMs in closed form


def _closed_form_cam(method: str, acts: np.ndarray, w_col: np.ndarray) -> np.ndarray:
    n = acts.shape[1] * acts.shape[2]
    g = np.broadcast_to(w_col / n, acts.shape)
    if method in ("gradcam", "hirescam"):
        return (g * acts).sum(-1)  # mean_hw(g) = g for Grad-CAM; sum_c g*A for HiResCAM
    if method == "gradcam_elementwise":
        return np.maximum(g * acts, 0).sum(-1)
    if method == "layercam":
        return (np.maximum(g, 0) * acts).sum(-1)
    if method == "xgradcam":
        wk = (g * acts).sum((1, 2)) / (acts.sum((1, 2)) + 1e-7)
        return np.einsum("bhwc,bc->bhw", acts, wk)
    if method == "gradcam++":
        s = acts.sum((1, 2), keepdims=True)
        alpha = np.where(g != 0, g**2 / (2 * g**2 + s * g**3 + 1e-6), 0)
        wk = (np.maximum(g, 0) * alpha).sum((1, 2))
        return np.einsum("bhwc,bc->bhw", acts, wk)
    raise AssertionError(method)


@pytest.mark.parametrize("method", explain.GRADIENT_CAMS)
def test_gradient_cams_closed_form(setup, method):
    model, v, x, acts, _, targets = setup
    wfc = _p(v, "params", "fc", "kernel")
    raw = np.stack([_closed_form_cam(method, acts[i:i + 1], wfc[:, t])[0] for i, t in enumerate(targets)])
    got_raw = np.asarray(explain.saliency(method, model, v, x, targets, normalize=False))
    want_raw = np.stack([sk_resize(m, (H, W_IMG), order=1, mode="edge", anti_aliasing=False) for m in raw])
    np.testing.assert_allclose(got_raw, want_raw, rtol=1e-4, atol=1e-5)
    got = np.asarray(explain.saliency(method, model, v, x, targets))
    np.testing.assert_allclose(got, _ref_finish(raw), atol=1e-5)


def test_gradcam_equals_class_weighted_activation_sum(setup):
    """For a linear head on a feature map, Grad-CAM = sum_k W[k, c] A_k / n (the CAM of Zhou et al.)."""
    model, v, x, acts, _, targets = setup
    wfc = _p(v, "params", "fc", "kernel")
    cam = np.einsum("bhwk,bk->bhw", acts, wfc[:, targets].T) / 16
    got = np.asarray(explain.saliency("gradcam", model, v, x, targets, normalize=False))
    assert got.shape == (2, H, W_IMG) and got.dtype == np.float32
    np.testing.assert_allclose(got, np.stack([sk_resize(c, (H, W_IMG), order=1, mode="edge") for c in cam]),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- gradient-free CAMs


def test_ablation_cam_closed_form(setup):
    model, v, x, acts, logits, targets = setup
    wfc = _p(v, "params", "fc", "kernel")
    y = logits[np.arange(2), targets]
    mean_a = acts.mean((1, 2))
    wk = wfc[:, targets].T * mean_a / y[:, None]  # (y - y_k) / y with y_k = y - W_kc mean(A_k)
    raw = np.einsum("bhwc,bc->bhw", acts, wk)
    got = np.asarray(explain.saliency("ablationcam", model, v, x, targets, normalize=False, chunk_size=4))
    np.testing.assert_allclose(got, np.stack([sk_resize(m, (H, W_IMG), order=1, mode="edge") for m in raw]),
                               rtol=1e-4, atol=1e-5)


def test_crm_matches_location_loop(setup):
    """CRM against a loop that zeroes each location of the last feature map and recomputes."""
    model, v, x, acts, logits, targets = setup
    wfc, bfc = _p(v, "params", "fc", "kernel"), _p(v, "params", "fc", "bias")

    def probs(a):
        z = a.mean((0, 1)) @ wfc + bfc
        e = np.exp(z - z.max())
        return e / e.sum()

    want = np.zeros((2, 4, 4))
    for b in range(2):
        d = np.eye(K)[targets[b]]
        base = np.sum((d - probs(acts[b])) ** 2)
        for i in range(4):
            for j in range(4):
                a = acts[b].copy()
                a[i, j, :] = 0
                want[b, i, j] = np.sum((d - probs(a)) ** 2) - base
    got = np.asarray(explain.saliency("crm", model, v, x, targets, normalize=False, chunk_size=6))
    np.testing.assert_allclose(got, np.stack([sk_resize(m, (H, W_IMG), order=1, mode="edge") for m in want]),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(explain.saliency("crm", model, v, x, targets)), _ref_finish(want), atol=2e-4)


def test_score_cam_matches_channel_loop(setup):
    model, v, x, acts, _, targets = setup
    xs = np.asarray(x, np.float64)
    want = []
    for b in range(2):
        scores = []
        for k in range(C_FEAT):
            up = ndi.zoom(acts[b, :, :, k], (H / 4, W_IMG / 4), order=1, grid_mode=False, mode="nearest")
            up = (up - up.min()) / (up.max() - up.min() + 1e-8)
            o = model.apply(v, jnp.asarray((xs[b] * up[..., None])[None], jnp.float32))
            scores.append(float(o["logits"][0, targets[b]]))
        w = np.exp(np.array(scores) - max(scores))
        w = w / w.sum()
        want.append(np.einsum("hwc,c->hw", acts[b], w))
    got = np.asarray(explain.saliency("scorecam", model, v, x, targets, chunk_size=3))
    np.testing.assert_allclose(got, _ref_finish(np.stack(want)), atol=1e-4)


def test_eigen_cam_first_component_with_fixed_sign(setup):
    model, v, x, acts, _, _ = setup
    want = []
    for a in acts:
        flat = a.reshape(-1, C_FEAT)
        cen = flat - flat.mean(0)
        proj = cen @ np.linalg.svd(cen)[2][0]
        mean_act = flat.mean(1)
        if np.dot(proj, mean_act - mean_act.mean()) < 0:
            proj = -proj
        want.append(proj.reshape(4, 4))
    got = np.asarray(explain.saliency("eigencam", model, v, x, None, normalize=False))
    np.testing.assert_allclose(got, np.stack([sk_resize(m, (H, W_IMG), order=1, mode="edge") for m in want]),
                               rtol=1e-3, atol=1e-4)
    # the sign rule: the map correlates positively with the mean activation, whatever SVD returns
    mean_up = np.stack([sk_resize(a.mean(-1), (H, W_IMG), order=1, mode="edge") for a in acts])
    for g, m in zip(got, mean_up):
        assert np.corrcoef(g.ravel(), m.ravel())[0, 1] > 0


def test_sc_map_is_cosine_to_global_embedding(setup):
    model, v, x, acts, _, targets = setup
    g = np.random.RandomState(5).randn(K, D)
    local = acts @ _p(v, "params", "emb", "kernel")
    cos = np.einsum("bhwd,bd->bhw", local / np.linalg.norm(local, axis=-1, keepdims=True),
                    (g / np.linalg.norm(g, axis=-1, keepdims=True))[targets])
    got = np.asarray(explain.saliency("sc", model, v, x, targets, normalize=False, global_emb=jnp.asarray(g, jnp.float32)))
    np.testing.assert_allclose(got, np.stack([sk_resize(m, (H, W_IMG), order=1, mode="edge") for m in cos]),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- input-level methods


def _input_grad(v, x: np.ndarray, target: int, use_relu: bool = True) -> np.ndarray:
    """Closed-form dS/dx of AffineCAMNet for one image ``x (H, W, C)``; also d/d(stem), d/d(bn out)."""
    p1, b1 = _p(v, "params", "stem_conv", "kernel")[0, 0], _p(v, "params", "stem_conv", "bias")
    p2 = _p(v, "params", "proj", "kernel")
    scale, beta = _p(v, "params", "bn", "scale"), _p(v, "params", "bn", "bias")
    mean, var = _p(v, "batch_stats", "bn", "mean"), _p(v, "batch_stats", "bn", "var")
    stem = x @ p1 + b1
    pooled = stem.reshape(4, POOL, 4, POOL, C_STEM).mean((1, 3))
    z = (pooled @ p2 - mean) / np.sqrt(var + 1e-5) * scale + beta
    g_bn = np.broadcast_to(_p(v, "params", "fc", "kernel")[:, target] / 16, z.shape) * (
        (z > 0) if use_relu else 1.0)
    g_pool = (g_bn * scale / np.sqrt(var + 1e-5)) @ p2.T
    g_stem = np.repeat(np.repeat(g_pool, POOL, 0), POOL, 1) / POOL**2
    return g_stem @ p1.T, g_stem, g_bn


@pytest.mark.parametrize("channels", ["max_abs", "sum", None])  # None: the default, Simonyan's max_c |.|
def test_gradient_closed_form(setup, channels):
    model, v, x, _, _, targets = setup
    xs = np.asarray(x, np.float64)
    grads = np.stack([_input_grad(v, xs[b], targets[b])[0] for b in range(2)])  # (B, H, W, C)
    want = grads.sum(-1) if channels == "sum" else np.abs(grads).max(-1)
    opts = {} if channels is None else {"channels": channels}
    got = np.asarray(explain.saliency("gradient", model, v, x, targets, normalize=False, **opts))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    norm = np.abs(want) - np.abs(want).min((1, 2), keepdims=True)
    np.testing.assert_allclose(np.asarray(explain.saliency("gradient", model, v, x, targets, **opts)),
                               norm / norm.max((1, 2), keepdims=True), atol=1e-5)
    if channels == "sum":  # on C_IN > 1 channels the two conventions are different maps
        assert not np.allclose(np.abs(want), np.abs(grads).max(-1), atol=1e-4)
    with pytest.raises(ValueError, match="channels must be one of"):
        explain.saliency("gradient", model, v, x, targets, channels="mean")


def test_smoothgrad_equals_gradient_on_a_linear_model():
    model = AffineCAMNet(use_relu=False)
    v = _init(model, 4)
    x = jax.random.normal(jax.random.key(7), (2, H, W_IMG, C_IN))
    t = np.array([1, 0])
    want = np.stack([_input_grad(v, np.asarray(x[b], np.float64), t[b], use_relu=False)[0].sum(-1) for b in range(2)])
    got = np.asarray(explain.saliency("smoothgrad", model, v, x, t, normalize=False, num_samples=5, chunk_size=4))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)


def test_integrated_gradients_closed_form_and_completeness(setup):
    model, v, x, _, logits, targets = setup
    xs = np.asarray(x, np.float64)
    steps = 16
    want = []
    for b in range(2):
        gs = [_input_grad(v, (k + 0.5) / steps * xs[b], targets[b])[0] for k in range(steps)]
        want.append((xs[b] * np.mean(gs, axis=0)).sum(-1))
    got = np.asarray(explain.saliency("integrated_gradients", model, v, x, targets, normalize=False,
                                      steps=steps, chunk_size=6))
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-3, atol=1e-6)
    # completeness (approximate, midpoint rule): sum of attributions ~ S(x) - S(0)
    zero = np.asarray(model.apply(v, jnp.zeros_like(x))["logits"])
    fine = np.asarray(explain.saliency("integrated_gradients", model, v, x, targets, normalize=False, steps=128))
    diff = logits[np.arange(2), targets] - zero[np.arange(2), targets]
    np.testing.assert_allclose(fine.sum((1, 2)), diff, rtol=0.02, atol=0.02)


def test_fullgrad_closed_form(setup):
    """Input term plus the conv-bias term (stem, full res) and the BN-bias term (4x4, upsampled)."""
    model, v, x, _, _, targets = setup
    xs = np.asarray(x, np.float64)
    scale, beta = _p(v, "params", "bn", "scale"), _p(v, "params", "bn", "bias")
    mean, var = _p(v, "batch_stats", "bn", "mean"), _p(v, "batch_stats", "bn", "var")
    b_bn = beta - mean * scale / np.sqrt(var + 1e-5)
    b_stem = _p(v, "params", "stem_conv", "bias")

    def chan_norm_sum(m):  # (h, w, c): min-max per channel, sum
        lo = m.min((0, 1), keepdims=True)
        m = m - lo
        hi = m.max((0, 1), keepdims=True)
        return np.where(hi > 0, m / np.where(hi > 0, hi, 1), 0).sum(-1)

    want = []
    for b in range(2):
        gx, g_stem, g_bn = _input_grad(v, xs[b], targets[b])
        total = chan_norm_sum(np.abs(xs[b] * gx)) + chan_norm_sum(np.abs(b_stem * g_stem))
        total = total + sk_resize(chan_norm_sum(np.abs(b_bn * g_bn)), (H, W_IMG), order=1, mode="edge")
        want.append(total)
    got = np.asarray(explain.saliency("fullgrad", model, v, x, targets, normalize=False))
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-5)


def test_occlusion_matches_window_loop(setup):
    model, v, x, _, logits, targets = setup
    xs = np.asarray(x)
    patch, stride = 6, 5  # starts 0, 5, 10 (the last window ends at the border)
    acc = np.zeros((2, H, W_IMG))
    cnt = np.zeros((H, W_IMG))
    for i in (0, 5, 10):
        for j in (0, 5, 10):
            occ = xs.copy()
            occ[:, i:i + patch, j:j + patch] = 0.0
            s = np.asarray(model.apply(v, jnp.asarray(occ))["logits"])[np.arange(2), targets]
            acc[:, i:i + patch, j:j + patch] += (logits[np.arange(2), targets] - s)[:, None, None]
            cnt[i:i + patch, j:j + patch] += 1
    got = np.asarray(explain.saliency("occlusion", model, v, x, targets, normalize=False, patch_size=patch,
                                      stride=stride, chunk_size=5))
    np.testing.assert_allclose(got, acc / cnt, rtol=1e-4, atol=1e-5)


def test_superpixel_matches_segment_loop(setup):
    model, v, x, _, logits, targets = setup
    xs = np.asarray(x)
    rs = np.random.RandomState(0)
    seg = np.stack([np.kron(rs.permutation(16).reshape(4, 4), np.ones((4, 4), int)) % 7 for _ in range(2)])
    want = np.zeros((2, H, W_IMG))
    for b in range(2):
        for s in np.unique(seg[b]):
            occ = xs[b].copy()
            occ[seg[b] == s] = occ.mean((0, 1))
            sc = float(model.apply(v, jnp.asarray(occ[None]))["logits"][0, targets[b]])
            want[b][seg[b] == s] = logits[b, targets[b]] - sc
    got = np.asarray(explain.saliency("superpixel", model, v, x, targets, normalize=False, segments=seg,
                                      fill="mean", chunk_size=4))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_superpixel_default_slic_segments_cover_the_image(setup):
    model, v, x, *_ = setup
    seg = explain.slic_segments(np.asarray(x), n_segments=8)
    assert seg.shape == (2, H, W_IMG) and seg.min() == 0
    m = np.asarray(explain.saliency("superpixel", model, v, x, n_segments=8))
    assert m.shape == (2, H, W_IMG) and np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1


# ---------------------------------------------------------------- targets


def test_embedding_target_is_cosine_to_reference(setup):
    model, v, x, acts, _, _ = setup
    ref = np.random.RandomState(2).randn(D)
    e = _p(v, "params", "emb", "kernel")
    # d cos(mean(A) E, r) / dA is constant over space: grad-CAM weights = that gradient / n
    want = []
    for a in acts:
        z = a.mean((0, 1)) @ e
        nz = np.linalg.norm(z)
        dz = ref / np.linalg.norm(ref) / nz - z * np.dot(z, ref) / (nz**3 * np.linalg.norm(ref))
        want.append(np.einsum("hwc,c->hw", a, e @ dz / 16))
    got = np.asarray(explain.saliency("gradcam", model, v, x, None, normalize=False,
                                      target_embedding=jnp.asarray(ref, jnp.float32)))
    np.testing.assert_allclose(got, np.stack([sk_resize(m, (H, W_IMG), order=1, mode="edge") for m in want]),
                               rtol=1e-3, atol=1e-6)


def test_gei_score_is_cosine_over_tau(setup):
    model, v, x, acts, _, targets = setup
    g = np.random.RandomState(6).randn(K, D)
    e = _p(v, "params", "emb", "kernel")
    gn = g / np.linalg.norm(g, axis=-1, keepdims=True)
    # Ablation-CAM uses score ratios; recompute GEI logits by hand for each ablated channel
    want = []
    for b, a in enumerate(acts):
        def score(aa):
            z = aa.mean((0, 1)) @ e
            return np.dot(z / np.linalg.norm(z), gn[targets[b]]) / 0.5
        y = score(a)
        wk = []
        for k in range(C_FEAT):
            aa = a.copy()
            aa[..., k] = 0
            wk.append((y - score(aa)) / y)
        want.append(np.einsum("hwc,c->hw", a, np.array(wk)))
    got = np.asarray(explain.saliency("ablationcam", model, v, x, targets, normalize=False,
                                      global_emb=jnp.asarray(g, jnp.float32), tau=0.5, score="gei"))
    np.testing.assert_allclose(got, np.stack([sk_resize(m, (H, W_IMG), order=1, mode="edge") for m in want]),
                               rtol=1e-3, atol=1e-5)
