"""ViT-S/16 and ViT-B/16 registry backbones (class token and mean pool) against timm's VisionTransformer.

The timm reference is built with ``dynamic_img_size=True`` (the specs' ``timm_kwargs``), so at sizes
other than 224 px it resamples ``pos_embed`` at forward time, as the JAX model does.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax import interop, models
from lclsc_jax.models.backbones import vit

K = 5
# arch -> (image size, batch) parity cases: 224 px uses the stored 14x14 pos_embed, the others resample it.
CASES = {
    "vit_small_patch16": ((224, 1), (96, 2)),
    "vit_small_patch16_gap": ((224, 1), (96, 2)),
    "vit_base_patch16": ((64, 2),),
}


def _images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------- no torch needed


def test_specs_and_shapes():
    for arch in CASES:
        spec = models.BACKBONES[arch]
        assert spec.torch_tokens and spec.num_prefix_tokens == (0 if arch.endswith("_gap") else 1)
        assert spec.stage_strides == (16,) * 5 and len(set(spec.stage_channels)) == 1
    model = models.create("vit_small_patch16", K, head="linear", embed_dim=8)
    for size, hw in ((16, 1), (40, 2), (224, 14)):  # min size; a remainder is dropped like torch's conv
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        out = jax.eval_shape(lambda im: model.init_with_output(jax.random.key(0), im)[0], x)
        assert all(f.shape == (1, hw, hw, 384) for f in out["features"].values())
        assert out["local_embedding"].shape == (1, hw, hw, 8) and out["logits"].shape == (1, K)
    with pytest.raises(ValueError, match="square"):
        jax.eval_shape(lambda im: model.init(jax.random.key(0), im), jax.ShapeDtypeStruct((1, 32, 48, 3), jnp.float32))


def _random_variables(model, seed: int = 0) -> dict:
    """O(1)-scaled random variables for ``model`` from numpy (no compiled init): kernels 1/sqrt(fan_in)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        name = str(path[-1].key)
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * z)
        return jnp.asarray(z / np.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.2 * z)

    return jax.tree_util.tree_map_with_path(fill, models.abstract_variables(model))


@pytest.fixture(scope="module")
def gap_model():
    """(model, random variables, images, float32 eval output) of vit_small_patch16_gap, no projection head."""
    model = models.create("vit_small_patch16_gap", K, head="linear", projection=False)
    variables = _random_variables(model)
    x = jnp.asarray(_images(48, seed=2))
    with jax.default_matmul_precision("float32"):
        out = jax.jit(lambda v, im: model.apply(v, im, train=False))(variables, x)
    return model, variables, x, out


def test_from_stage_reentry(gap_model):
    model, variables, x, out = gap_model
    reenter = jax.jit(lambda v, f, stage: model.apply(v, f, stage, method=model.from_stage), static_argnums=2)
    with jax.default_matmul_precision("float32"):
        for stage in ("stem", "stage2", "stage4"):
            again = reenter(variables, out["features"][stage], stage)
            for key in ("logits", "pooled", "local_embedding"):
                np.testing.assert_allclose(again[key], out[key], rtol=1e-5, atol=1e-5, err_msg=f"{stage} {key}")
    with pytest.raises(ValueError, match="square"):  # 2x8 tokens would silently re-grid as 4x4
        jax.eval_shape(lambda f: model.apply(variables, f, "stage2", method=model.from_stage),
                       jax.ShapeDtypeStruct((1, 2, 8, 384), jnp.float32))
    cls = models.create("vit_small_patch16", K, head="linear")
    feats = jax.ShapeDtypeStruct((1, 3, 3, 384), jnp.float32)
    with pytest.raises(ValueError, match="vit_small_patch16_gap"):
        jax.eval_shape(lambda f: cls.init(jax.random.key(0), f, "stage2", method=cls.from_stage), feats)


def test_gap_local_is_pool_of_each_token(gap_model):
    """mean pool + fc_norm: a constant token map gives local == pool everywhere."""
    model, variables, _, _ = gap_model
    v = jax.random.normal(jax.random.key(1), (2, 1, 384))
    with jax.default_matmul_precision("float32"):
        pooled, local = model.apply(variables, jnp.broadcast_to(v, (2, 9, 384)),
                                    method=lambda m, t: (m.backbone.pool(t, False), m.backbone.local(t, False)))
    assert local.shape == (2, 3, 3, 384) and pooled.dtype == local.dtype == jnp.float32
    np.testing.assert_allclose(local, jnp.broadcast_to(pooled[:, None, None], local.shape), rtol=1e-5, atol=1e-5)


def test_bf16_forward(gap_model):
    model, variables, x, ref = gap_model
    m16 = models.create("vit_small_patch16_gap", K, head="linear", projection=False, dtype=jnp.bfloat16)
    out = jax.jit(m16.apply)(variables, x)
    assert out["features"]["stage4"].dtype == jnp.bfloat16
    assert out["pooled"].dtype == out["logits"].dtype == out["local_embedding"].dtype == jnp.float32
    assert all(bool(jnp.all(jnp.isfinite(out[k]))) for k in ("logits", "embedding", "local_embedding"))
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=0.05 * float(jnp.abs(ref["logits"]).max()))


def test_train_mode_drop_path_remat_and_gradient():
    """Train mode with stochastic depth and remat; the gradient through the last stage (3 blocks, fc_norm, fc).

    (The gradient is taken from stage3 on: compiling it through all 12 blocks costs ~15 s on a CPU.)
    """
    model = models.create("vit_small_patch16_gap", K, head="linear", drop_path_rate=0.3, remat=True)
    variables = _random_variables(model)
    feats = jax.random.normal(jax.random.key(0), (2, 3, 3, 384))

    def loss(params, rng):
        out = model.apply({"params": params}, feats, "stage3", True, rngs={"dropout": rng}, method=model.from_stage)
        return jnp.sum(out["logits"] ** 2) + jnp.mean(out["local_embedding"] ** 2), out["logits"]

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (value, logits), grads = grad_fn(variables["params"], jax.random.key(1))
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    used = {str(i) for i in range(9, 12)}  # stage4 = blocks 9..11; the others get zero gradients
    for name, block in grads["backbone"]["blocks"].items():
        assert (float(jnp.abs(block["attn"]["qkv"]["kernel"]).max()) > 0) == (name in used), name
    (_, again), _ = grad_fn(variables["params"], jax.random.key(1))
    np.testing.assert_array_equal(again, logits)
    others = [grad_fn(variables["params"], jax.random.key(k))[0][1] for k in (2, 3, 4)]
    assert any(not np.allclose(o, logits) for o in others)  # the rng drops residual branches


# ---------------------------------------------------------------- against torch / timm


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    return torch


@pytest.fixture(scope="module")
def timm_ref(torch):
    """``(reference_model, stage_outputs)`` from lclsc_jax.interop.timm_reference; skips without timm."""
    try:
        from lclsc_jax.interop.timm_reference import reference_model, require_timm, stage_outputs

        require_timm()
    except ImportError:
        pytest.skip("timm is not installed")
    return reference_model, stage_outputs


@pytest.mark.torch
def test_bicubic_matrices_are_torchs(torch):
    """Our numpy interpolation matrices == F.interpolate(bicubic, align_corners=False), both antialias modes.

    (Square outputs, as ViT patch grids are, and non-square ones with both sides >= 2: torch's
    antialiased kernel treats an output of width 1 and height > 1 differently from the separable
    product, a case a square grid never meets.)
    """
    f = torch.nn.functional
    gen = torch.Generator().manual_seed(0)
    sizes = [(14, n, n) for n in (1, 2, 3, 6, 13, 15, 28)] + [(14, 3, 20), (14, 9, 2), (5, 2, 9)]
    for antialias in (True, False):
        for n_in, h, w in sizes:
            img = torch.randn(1, 2, n_in, n_in, generator=gen)
            ref = f.interpolate(img, size=(h, w), mode="bicubic", align_corners=False, antialias=antialias)
            mh, mw = (vit.torch_bicubic_matrix(n_in, n, antialias) for n in (h, w))
            ours = np.einsum("ph,chw,qw->cpq", mh, img[0].double().numpy(), mw)
            assert _max_diff(ours, ref[0].numpy()) < 2e-5, (antialias, n_in, h, w)
    assert _max_diff(vit.torch_bicubic_matrix(14, 6, True), vit.torch_bicubic_matrix(14, 6, False)) > 0.05


def _randomize(net, torch, seed: int = 0):
    """O(1) random values in every tensor (timm's init leaves LayerNorms at 1/0, biases at 0, cls_token ~1e-6)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("weight") and p.ndim >= 2:  # Linear / conv: 1/sqrt(fan_in)
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # LayerNorm scale
                p.copy_(1.0 + 0.2 * noise)
            else:  # biases, cls_token, pos_embed
                p.copy_(0.2 * noise if name.endswith("bias") else 0.5 * noise)
    return net


@pytest.fixture(scope="module", params=list(CASES))
def ref(request, torch, timm_ref):
    """(arch, timm net with random values, JAX model, variables, jitted eval forward), shared per arch."""
    from lclsc_jax.interop import torch_reference as tref

    arch = request.param
    reference_model, _ = timm_ref
    torch.manual_seed(0)
    net = _randomize(reference_model(arch, num_classes=K), torch)
    tref.randomize_batch_norm(net)  # (no BatchNorm in a ViT: a no-op, kept for the common recipe)
    model, variables = interop.load_torch_model({k: v.detach().numpy() for k, v in net.state_dict().items()}, arch)

    @jax.jit
    def forward(v, x):
        with jax.default_matmul_precision("float32"):
            return model.apply(v, x, train=False)

    return arch, net, model, variables, forward


@pytest.mark.torch
@pytest.mark.slow
def test_parity_logits_stages_pooled_local(ref, torch, timm_ref):
    arch, net, model, variables, forward = ref
    _, stage_outputs = timm_ref
    spec = models.BACKBONES[arch]
    final_norm = net.fc_norm if arch.endswith("_gap") else net.norm
    pre = {}
    hook = net.head.register_forward_pre_hook(lambda m, inp: pre.__setitem__("x", inp[0].detach().numpy()))
    try:
        for size, batch in CASES[arch]:
            x = _images(size, batch)
            feats, logits = stage_outputs(net, arch, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
            with torch.no_grad():  # the final norm on each patch token of the last stage
                local = final_norm(torch.from_numpy(feats["stage4"]).float()).double().numpy()
            out = forward(variables, jnp.asarray(x))
            assert logits.abs().max() > 0.5  # O(1) logits: the tolerance means something
            d = {"logits": _max_diff(out["logits"], logits.numpy()), "pooled": _max_diff(out["pooled"], pre["x"]),
                 "local": _max_diff(out["local_embedding"], local)}
            stages = {s: _max_diff(out["features"][s], feats[s]) for s in spec.stage_names}
            scale = {s: max(1.0, float(np.abs(feats[s]).max())) for s in spec.stage_names}
            worst = max(stages, key=lambda s: stages[s] / scale[s])
            print(f"parity {arch} {size}px x{batch}: {', '.join(f'{k} {v:.2e}' for k, v in d.items())}; "
                  f"worst stage {worst} {stages[worst]:.2e} (max |ref| {scale[worst]:.1f})")
            assert d["logits"] <= 1e-4 and d["pooled"] <= 1e-4 and d["local"] <= 1e-4, d
            for s in spec.stage_names:
                assert out["features"][s].shape == feats[s].shape
                assert stages[s] <= 1e-5 * scale[s], (s, stages[s])
    finally:
        hook.remove()


@pytest.mark.torch
@pytest.mark.slow
def test_export_round_trip(ref, torch):
    arch, net, model, variables, forward = ref
    sd = interop.variables_to_state_dict(variables, arch)
    fresh = copy.deepcopy(net)  # same architecture; every tensor overwritten below
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    x = torch.from_numpy(_images(32, seed=1).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(x).numpy(), net(x).numpy())


@pytest.mark.torch
def test_drop_path_rates_are_timms(timm_ref):
    reference_model, _ = timm_ref
    net = reference_model("vit_small_patch16", num_classes=0, drop_path_rate=0.3)
    theirs = [getattr(b.drop_path1, "drop_prob", 0.0) for b in net.blocks]  # rate 0: an Identity
    assert theirs == [getattr(b.drop_path2, "drop_prob", 0.0) for b in net.blocks] and theirs[-1] > 0
    np.testing.assert_allclose(vit.drop_path_rates(0.3, 12), theirs, rtol=1e-6)
