"""Saliency methods on volumes (B, D, H, W, C): MONAI / PyTorch / NumPy references on a tiny 3D CNN.

The network (conv-bn-relu x2, global average pool, linear) is written twice, in Flax (with the
``lclsc_jax.models`` output contract) and in PyTorch with the same weights; every reference map
is computed from the PyTorch model (hooks, brute-force perturbation loops) or by MONAI.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax.explain import api, perturbation, registry

torch = pytest.importorskip("torch")
F = torch.nn.functional

B, C, K, WIDTH, EMB = 2, 1, 3, 4, 5
SPATIAL = (6, 7, 8)  # not a cube: catches axis mix-ups


class Tiny3D(nn.Module):
    """conv-bn-relu (stage1), strided conv-bn-relu (stage2), mean pool, linear head and a projection."""

    num_classes: int = K
    width: int = WIDTH
    stage_names = ("stage1", "stage2")
    last_stage = "stage2"
    head_type = "linear"
    projection = True
    spatial_ndim = 3

    def setup(self):
        pad = ((1, 1),) * 3
        self.conv1 = nn.Conv(self.width, (3, 3, 3), padding=pad, use_bias=False)
        self.bn1 = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
        self.conv2 = nn.Conv(self.width, (3, 3, 3), strides=(2, 2, 2), padding=pad, use_bias=False)
        self.bn2 = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
        self.fc = nn.Dense(self.num_classes)
        self.proj = nn.Dense(EMB)

    def _head(self, feats):
        f = feats["stage2"]
        pooled = jnp.mean(f, axis=(1, 2, 3))
        return {"features": feats, "pooled": pooled, "embedding": self.proj(pooled), "local_embedding": self.proj(f),
                "logits": self.fc(pooled)}

    def _stage2(self, f1):
        return nn.relu(self.bn2(self.conv2(f1)))

    def __call__(self, x, train=False):
        f1 = nn.relu(self.bn1(self.conv1(x)))
        return self._head({"stage1": f1, "stage2": self._stage2(f1)})

    def from_stage(self, feats, stage, train=False):
        if stage == "stage1":
            return self._head({"stage1": feats, "stage2": self._stage2(feats)})
        return self._head({"stage2": feats})


class TorchTiny3D(torch.nn.Module):
    """The same network in PyTorch (NCDHW)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv3d(C, WIDTH, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm3d(WIDTH)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv3d(WIDTH, WIDTH, 3, stride=2, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm3d(WIDTH)
        self.relu2 = torch.nn.ReLU()
        self.fc = torch.nn.Linear(WIDTH, K)

    def stage1(self, x):
        return self.relu1(self.bn1(self.conv1(x)))

    def stage2(self, f1):
        return self.relu2(self.bn2(self.conv2(f1)))

    def tail(self, f2):
        return self.fc(f2.mean(dim=(2, 3, 4)))

    def forward(self, x):
        return self.tail(self.stage2(self.stage1(x)))


@pytest.fixture(scope="module")
def nets():
    """``(flax model, variables, torch model, x (B, D, H, W, C) f32)`` with shared random weights."""
    torch.manual_seed(0)
    tm = TorchTiny3D().double()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for bn in (tm.bn1, tm.bn2):
            bn.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.2, WIDTH)))
            bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, WIDTH)))
            bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, WIDTH)))
            bn.bias.copy_(torch.from_numpy(rng.normal(0.2, 0.3, WIDTH)))
    tm.eval()
    fm = Tiny3D()
    x = rng.random((B,) + SPATIAL + (C,)).astype(np.float32)
    variables = fm.init(jax.random.key(0), jnp.asarray(x))
    p = {k: dict(v) for k, v in variables["params"].items()}
    st = {k: dict(v) for k, v in variables["batch_stats"].items()}
    to = lambda t: jnp.asarray(t.detach().numpy(), jnp.float32)  # noqa: E731
    p["conv1"]["kernel"] = to(tm.conv1.weight.permute(2, 3, 4, 1, 0))
    p["conv2"]["kernel"] = to(tm.conv2.weight.permute(2, 3, 4, 1, 0))
    for name in ("bn1", "bn2"):
        bn = getattr(tm, name)
        p[name] = {"scale": to(bn.weight), "bias": to(bn.bias)}
        st[name] = {"mean": to(bn.running_mean), "var": to(bn.running_var)}
    p["fc"] = {"kernel": to(tm.fc.weight.T), "bias": to(tm.fc.bias)}
    variables = {"params": p, "batch_stats": st}
    return fm, variables, tm, x


def _t(x):
    """NDHWC float32 -> NCDHW float64 tensor."""
    return torch.from_numpy(np.moveaxis(np.asarray(x, np.float64), -1, 1).copy())


def _up(m, size=SPATIAL, align_corners=False):
    """Trilinear upsampling (PyTorch) of maps ``(B, d, h, w)`` -> ``(B, *size)`` NumPy."""
    t = torch.as_tensor(np.asarray(m, np.float64))[:, None]
    return F.interpolate(t, size=size, mode="trilinear", align_corners=align_corners)[:, 0].numpy()


def _minmax(m):
    m = m - m.reshape(len(m), -1).min(1).reshape(-1, 1, 1, 1)
    return m / m.reshape(len(m), -1).max(1).reshape(-1, 1, 1, 1)


def _targets(tm, x):
    with torch.no_grad():
        return tm(_t(x)).argmax(1).numpy()


def _acts_grads(tm, x, stage):
    """Torch activations and gradients ``(B, c, d, h, w)`` of the predicted-class logit at ``stage``."""
    xt = _t(x)
    f1 = tm.stage1(xt)
    f1.retain_grad()
    f2 = tm.stage2(f1)
    f2.retain_grad()
    logits = tm.tail(f2)
    tgt = logits.argmax(1)
    logits.gather(1, tgt[:, None]).sum().backward()
    a = f1 if stage == "stage1" else f2
    return a.detach().numpy(), a.grad.numpy()


def _sal(nets, method, stage="stage2", normalize=False, **kw):
    fm, variables, _, x = nets
    return np.asarray(api.saliency(method, fm, variables, jnp.asarray(x), None, stage, normalize=normalize, **kw))


def test_forward_parity(nets):
    fm, variables, tm, x = nets
    with torch.no_grad():
        ref = tm(_t(x)).numpy()
    np.testing.assert_allclose(np.asarray(fm.apply(variables, jnp.asarray(x))["logits"]), ref, rtol=1e-4, atol=1e-5)


def _pgc_weights(method, a, g):
    """pytorch-grad-cam's weights on ``(B, c, *s)`` NumPy arrays, broadcastable to ``a``."""
    ax = (2, 3, 4)
    if method == "gradcam":
        return g.mean(ax, keepdims=True)
    if method == "hirescam":
        return g
    if method == "layercam":
        return np.maximum(g, 0)
    if method == "gradcam_elementwise":
        return np.where(g * a > 0, g, 0)
    if method == "xgradcam":
        return (g * a / (a.sum(ax, keepdims=True) + 1e-7)).sum(ax, keepdims=True)
    if method == "gradcam++":
        g2, g3 = g**2, g**3
        alpha = g2 / (2 * g2 + a.sum(ax, keepdims=True) * g3 + 1e-6)
        alpha = np.where(g != 0, alpha, 0)
        return (np.maximum(g, 0) * alpha).sum(ax, keepdims=True)
    raise KeyError(method)


@pytest.mark.torch
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_gradient_cams_match_torch_formulas(nets, stage):
    a, g = _acts_grads(nets[2], nets[3], stage)
    for method in ("gradcam", "hirescam", "layercam", "gradcam_elementwise", "xgradcam", "gradcam++"):
        raw = (_pgc_weights(method, a, g) * a).sum(1)
        ref = _up(raw)
        got = _sal(nets, method, stage)
        assert got.shape == (B,) + SPATIAL
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max(), err_msg=method)


@pytest.mark.torch
def test_gradcam_matches_monai(nets):
    pytest.importorskip("monai")
    from monai.visualize import GradCAM

    _, _, tm, x = nets
    cam = GradCAM(nn_module=tm, target_layers="relu2", postprocessing=lambda m: m)
    got = _sal(nets, "gradcam", normalize=True)
    tgt = _targets(tm, x)
    for i in range(B):
        ref = cam(_t(x[i:i + 1]), class_idx=int(tgt[i])).detach().numpy()[:, 0]  # relu(raw) upsampled trilinear
        np.testing.assert_allclose(got[i:i + 1], _minmax(ref), atol=1e-4)


@pytest.mark.torch
def test_gradcampp_gradients_match_monai_formula(nets):
    """MONAI's GradCAMpp (its alpha: 2 g^2 + sum_s(A g^3)) from our activations/gradients == MONAI's map."""
    pytest.importorskip("monai")
    from monai.visualize import GradCAMpp

    from lclsc_jax.explain import cam as cam_mod
    from lclsc_jax.explain import core

    fm, variables, tm, x = nets
    scorer = core.make_scorer(fm, B)
    acts, grads, tgt = cam_mod.stage_gradients(fm, variables, scorer, jnp.asarray(x), None, "stage2")
    a, g = np.asarray(acts, np.float64), np.asarray(grads, np.float64)
    ax = (1, 2, 3)
    alpha = g**2 / (2 * g**2 + (a * g**3).sum(ax, keepdims=True) + 1e-7)
    w = (alpha * np.maximum(g, 0)).sum(ax, keepdims=True)
    raw = np.maximum((w * a).sum(-1), 0)
    ref_cam = GradCAMpp(nn_module=tm, target_layers="relu2", postprocessing=lambda m: m)
    for i in range(B):
        ref = ref_cam(_t(x[i:i + 1]), class_idx=int(tgt[i])).detach().numpy()[:, 0]
        np.testing.assert_allclose(_minmax(_up(raw[i:i + 1])), _minmax(ref), atol=1e-4)


@pytest.mark.torch
def test_eigencam_ablation_scorecam_match_torch(nets):
    _, _, tm, x = nets
    a, _ = _acts_grads(tm, x, "stage2")
    tgt = _targets(tm, x)
    bidx = np.arange(B)
    # Eigen-CAM: first right singular vector of the centred activations, sign towards the channel mean.
    flat = a.reshape(B, WIDTH, -1).transpose(0, 2, 1)
    cen = flat - flat.mean(1, keepdims=True)
    ref = []
    for i in range(B):
        proj = cen[i] @ np.linalg.svd(cen[i], full_matrices=False)[2][0]
        mean_act = flat[i].mean(-1) - flat[i].mean()
        ref.append(proj * (-1 if (proj * mean_act).sum() < 0 else 1))
    ref = _up(np.stack(ref).reshape((B,) + a.shape[2:]))
    np.testing.assert_allclose(_sal(nets, "eigencam"), ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    with torch.no_grad():
        at = torch.from_numpy(a)
        y = tm.tail(at).numpy()[bidx, tgt]
        # Ablation-CAM: zero one channel of stage2, re-run the tail.
        yk = np.stack([tm.tail(at * (torch.arange(WIDTH) != k).double()[None, :, None, None, None]).numpy()[bidx, tgt]
                       for k in range(WIDTH)], 1)
        w = (y[:, None] - yk) / y[:, None]
        ref = _up(np.einsum("bc...,bc->b...", a, w))
        np.testing.assert_allclose(_sal(nets, "ablationcam", chunk_size=3), ref, rtol=1e-3,
                                   atol=1e-4 * np.abs(ref).max())
        # Score-CAM: channels upsampled (align_corners), min-max scaled, used as input masks.
        xt = _t(x)
        s = []
        for k in range(WIDTH):
            m = F.interpolate(at[:, k:k + 1], size=SPATIAL, mode="trilinear", align_corners=True)
            lo = m.amin(dim=(2, 3, 4), keepdim=True)
            hi = m.amax(dim=(2, 3, 4), keepdim=True)
            s.append(tm(xt * (m - lo) / (hi - lo + 1e-8)).numpy()[bidx, tgt])
        w = torch.softmax(torch.from_numpy(np.stack(s, 1)), dim=1).numpy()
        ref = _up(np.einsum("bc...,bc->b...", a, w))
    np.testing.assert_allclose(_sal(nets, "scorecam", chunk_size=2), ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def _brute_drops(tm, x, masks):
    """Score drop of the predicted class when each boolean mask ``(*S)`` or ``(B, *S)`` is set to 0: ``(n, B)``."""
    tgt = _targets(tm, x)
    with torch.no_grad():
        xt = _t(x)
        s0 = tm(xt).numpy()[np.arange(B), tgt]
        out = []
        for m in masks:
            m = m[:, None] if m.ndim == 4 else m  # per-sample masks (B, *S) or one mask (*S)
            mt = torch.from_numpy(np.broadcast_to(m, (B, 1) + m.shape[-3:]).copy())
            out.append(s0 - tm(torch.where(mt, 0.0, xt)).numpy()[np.arange(B), tgt])
    return np.stack(out)


@pytest.mark.torch
def test_occlusion_3d_matches_brute_force_and_monai(nets):
    _, _, tm, x = nets
    patch, stride = (2, 3, 2), (1, 2, 1)
    got = _sal(nets, "occlusion", patch_size=patch, stride=stride, chunk_size=7)
    # NumPy brute force: every window (starts every `stride`, the last one ending at the border).
    starts = []
    for n, p, s in zip(SPATIAL, patch, stride):
        st = list(range(0, n - p + 1, s))
        starts.append(st if st[-1] == n - p else st + [n - p])
    total = np.zeros((B,) + SPATIAL)
    count = np.zeros(SPATIAL)
    masks = []
    for i in starts[0]:
        for j in starts[1]:
            for k in starts[2]:
                m = np.zeros(SPATIAL, bool)
                m[i:i + patch[0], j:j + patch[1], k:k + patch[2]] = True
                masks.append(m)
    drops = _brute_drops(tm, x, masks)
    for m, d in zip(masks, drops):
        total += d[:, None, None, None] * m
        count += m
    ref = total / count
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    # Chunking changes nothing.
    np.testing.assert_allclose(_sal(nets, "occlusion", patch_size=patch, stride=stride, chunk_size=1000), got,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(perturbation.window_counts(SPATIAL, patch, stride), count)

    monai = pytest.importorskip("monai")
    from monai.visualize import OcclusionSensitivity

    # MONAI (constant fill 0, raw logits, stride = int(mask * (1 - overlap)) = 1): per-voxel mean logit.
    occ = OcclusionSensitivity(nn_module=tm, mask_size=2, n_batch=16, mode=0.0, overlap=0.5, activate=False)
    got = _sal(nets, "occlusion", patch_size=2, stride=1)
    tgt = _targets(tm, x)
    with torch.no_grad():
        for i in range(B):
            s0 = tm(_t(x[i:i + 1])).numpy()[0, tgt[i]]
            m, _ = occ(_t(x[i:i + 1]))
            ref = s0 - np.asarray(m)[0, tgt[i]]
            np.testing.assert_allclose(got[i], ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    assert monai


@pytest.mark.torch
def test_supervoxels_3d(nets):
    _, _, tm, x = nets
    seg = perturbation.slic_segments(x, n_segments=6, compactness=0.5, sigma=0.0)
    assert seg.shape == (B,) + SPATIAL
    assert all(len(np.unique(s)) > 1 for s in seg)
    got = _sal(nets, "superpixel", segments=seg, chunk_size=3)
    ref = np.zeros((B,) + SPATIAL)
    for lab in range(int(seg.max()) + 1):
        drops = _brute_drops(tm, x, [seg == lab])[0]  # per-sample masks (B, *S)
        ref += drops[:, None, None, None] * (seg == lab)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    # SLIC on the host when segments are not given.
    assert _sal(nets, "superpixel", n_segments=4).shape == (B,) + SPATIAL


@pytest.mark.torch
def test_sc_maps_3d(nets):
    fm, variables, _, x = nets
    g = np.random.default_rng(1).normal(size=(K, EMB)).astype(np.float32)
    got = _sal(nets, "sc", stage="last", global_emb=jnp.asarray(g), score="gei")
    out = fm.apply(variables, jnp.asarray(x))
    loc = np.asarray(out["local_embedding"], np.float64)
    gei = np.asarray(out["embedding"], np.float64)
    gei = gei / np.linalg.norm(gei, axis=-1, keepdims=True) @ (g / np.linalg.norm(g, axis=-1, keepdims=True)).T
    tgt = gei.argmax(1)
    gn = g / np.linalg.norm(g, axis=-1, keepdims=True)
    cos = (loc / np.linalg.norm(loc, axis=-1, keepdims=True) * gn[tgt][:, None, None, None]).sum(-1)
    np.testing.assert_allclose(got, _up(cos), rtol=1e-3, atol=1e-4)


def test_every_volume_method_runs(nets):
    """Every method of VOLUME_METHODS gives finite (B, D, H, W) maps in [0, 1] on a volume batch."""
    g = jnp.asarray(np.random.default_rng(2).normal(size=(K, EMB)).astype(np.float32))
    small = {"scorecam": {"chunk_size": 2}, "crm": {"chunk_size": 8}, "smoothgrad": {"num_samples": 2},
             "integrated_gradients": {"steps": 2}, "occlusion": {"patch_size": 3, "stride": 3},
             "superpixel": {"n_segments": 4}}
    # Every method but the trained perturbation generator (needs a trained U-Net; tested with it).
    methods = [m for m in registry.METHODS if m != "perturbation_generator"]
    assert set(methods) <= set(registry.VOLUME_METHODS)
    for method in methods:
        kw = {"global_emb": g, "score": "gei"} if method == "sc" else {}
        m = _sal(nets, method, stage="last", normalize=True, **kw, **small.get(method, {}))
        assert m.shape == (B,) + SPATIAL, method
        assert np.all(np.isfinite(m)) and m.min() >= 0 and m.max() <= 1 + 1e-6, method


def test_volume_refusal_is_clear():
    spec = registry.MethodSpec("fake2d", "cam.gradcam_weights", "gradient_cam", "s", "f", "c", volumes=False)
    with pytest.raises(ValueError, match="'fake2d' does not run on volumes"):
        registry.check_volumes(spec, 3)
    registry.check_volumes(spec, 2)
    with pytest.raises(ValueError, match="spatial axes"):
        registry.check_volumes(registry.get("gradcam"), 4)


def test_tiny3d_model_maps():
    """The project's own 3D arch: CAMs at every stage, SC maps, occlusion; gradcam vs a NumPy Grad-CAM."""
    from lclsc_jax import models
    from lclsc_jax.explain import cam as cam_mod
    from lclsc_jax.explain import core

    model = models.create("tiny3d", 3, head="linear", in_channels=1, embed_dim=8)
    x = jnp.asarray(np.random.default_rng(4).random((2, 8, 8, 8, 1)), jnp.float32)
    variables = model.init(jax.random.key(1), x, train=False)
    for stage in model.stage_names:
        m = np.asarray(api.saliency("gradcam", model, variables, x, None, stage, normalize=False))
        acts, grads, _ = cam_mod.stage_gradients(model, variables, core.make_scorer(model, 2), x, None, stage)
        a, g = np.asarray(acts, np.float64), np.asarray(grads, np.float64)
        raw = (g.mean(axis=(1, 2, 3), keepdims=True) * a).sum(-1)
        ref = _up(raw, (8, 8, 8))
        np.testing.assert_allclose(m, ref, rtol=1e-3, atol=1e-4 * max(np.abs(ref).max(), 1e-12), err_msg=stage)
    occ = np.asarray(api.saliency("occlusion", model, variables, x, None, patch_size=4, stride=4))
    assert occ.shape == (2, 8, 8, 8) and np.all(np.isfinite(occ))
    g = jnp.asarray(np.random.default_rng(5).normal(size=(3, 8)).astype(np.float32))
    sc = np.asarray(api.saliency("sc", model, variables, x, None, global_emb=g, score="gei"))
    assert sc.shape == (2, 8, 8, 8) and 0 <= sc.min() and sc.max() <= 1 + 1e-6


def test_occlusion_memory_is_bounded_by_the_chunk(nets):
    """XLA's temporary buffers of a jitted 3D occlusion grow with chunk_size, not with the number of windows."""
    from lclsc_jax.explain import core

    fm, variables, _, _ = nets
    x = jnp.asarray(np.random.default_rng(0).random((1, 24, 24, 24, 1)), jnp.float32)
    temp = {}
    for chunk in (4, 64):
        f = jax.jit(lambda v, c=chunk: perturbation.occlusion(core.Explainer(fm, variables, core.make_scorer(fm, 1)),
                                                              v, None, patch_size=2, stride=2, chunk_size=c))
        temp[chunk] = f.lower(x).compile().memory_analysis().temp_size_in_bytes
    all_windows = 12**3 * 24**3 * 4  # (n_windows, D, H, W) float32, what materialising every window would cost
    assert temp[4] < all_windows / 20
    assert temp[4] < temp[64] / 4
