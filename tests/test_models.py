"""Backbones: shapes for every arch, from_stage re-entry, head semantics, BN updates, dtypes.

Expected values come from independent NumPy computations (PyTorch's output-size formula, a
NumPy MLP / convolution), never from the model under test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax import models
from lclsc_jax.models.blocks import BasicBlock

RESNETS = ("resnet18", "resnet34", "resnet50")
STAGE_CH = {
    "tiny": (16, 32, 64, 128, 128),
    "resnet18": (64, 64, 128, 256, 512),
    "resnet34": (64, 64, 128, 256, 512),
    "resnet50": (64, 256, 512, 1024, 2048),
}


def torch_out_size(n: int, k: int, s: int, p: int) -> int:
    """PyTorch's conv / pool output-size formula."""
    return (n + 2 * p - k) // s + 1


def expected_sizes(arch: str, n: int) -> list[int]:
    """Spatial size of each stage for an n-pixel side, from the layer recipe."""
    if arch == "tiny":
        sizes, s = [], n
        for stride in (1, 2, 2, 2, 1):
            s = torch_out_size(s, 3, stride, 1)
            sizes.append(s)
        return sizes
    s = torch_out_size(torch_out_size(n, 7, 2, 3), 3, 2, 1)  # conv1 + maxpool
    sizes = [s, s]
    for _ in range(3):
        s = torch_out_size(s, 3, 2, 1)
        sizes.append(s)
    return sizes


def init_and_apply(model, x, seed=0):
    variables = jax.jit(lambda k, im: model.init(k, im, train=False))(jax.random.key(seed), x)
    out = jax.jit(lambda v, im: model.apply(v, im, train=False))(variables, x)
    return variables, out


# The ResNet-family contract (stem + stage1-4, torch's padded sizes); registry backbones: test_backbone_registry.py.
CORE_ARCHS = ("tiny", "resnet18", "resnet34", "resnet50")


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("head", ["gei", "linear"])
def test_output_shapes_odd_sizes(arch, channels, head):
    model = models.create(arch, num_classes=5, head=head, embed_dim=24, in_channels=channels)
    h, w = 37, 45
    x = jax.ShapeDtypeStruct((2, h, w, channels), jnp.float32)

    def fwd(im):
        variables = model.init(jax.random.key(0), im, train=False)
        return model.apply(variables, im, train=False)

    out = jax.eval_shape(fwd, x)
    assert model.stage_names == ("stem", "stage1", "stage2", "stage3", "stage4")
    assert model.last_stage == "stage4"
    expected_keys = {"features", "pooled", "embedding", "local_embedding"} | ({"logits"} if head == "linear" else set())
    assert set(out) == expected_keys
    assert set(out["features"]) == set(model.stage_names)
    for name, c, sh, sw in zip(model.stage_names, STAGE_CH[arch], expected_sizes(arch, h), expected_sizes(arch, w)):
        assert out["features"][name].shape == (2, sh, sw, c), name
    hl, wl = expected_sizes(arch, h)[-1], expected_sizes(arch, w)[-1]
    assert out["pooled"].shape == (2, STAGE_CH[arch][-1])
    assert out["embedding"].shape == (2, 24)
    assert out["local_embedding"].shape == (2, hl, wl, 24)
    if head == "linear":
        assert out["logits"].shape == (2, 5)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_stage_strides_match_feature_sizes(arch):
    model = models.create(arch, num_classes=2)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    out = jax.eval_shape(lambda im: model.apply(model.init(jax.random.key(0), im, train=False), im), x)
    strides = models.stage_strides(arch)
    assert set(strides) == set(model.stage_names)
    for name, feat in out["features"].items():
        assert feat.shape[1] == 64 // strides[name], name


@pytest.mark.parametrize(
    "arch,expected", [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)]
)
def test_param_counts_match_torchvision(arch, expected):
    embed = 128
    model = models.create(arch, num_classes=1000, head="linear", embed_dim=embed)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    head = models.num_params(variables["params"]["head"])
    c = STAGE_CH[arch][-1]
    assert head == (c * c + c) + (c * embed + embed)  # Dense(c) - ReLU - Dense(D)
    assert models.num_params(variables) - head == expected


@pytest.mark.parametrize("arch,expected", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_plain_classifier_has_no_projection_head(arch, expected):
    """projection=False: torchvision's exact parameter tree; embedding = pooled, local = last map."""
    model = models.create(arch, num_classes=1000, head="linear", projection=False)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda im: model.init(jax.random.key(0), im, train=False), x)
    assert "head" not in variables["params"] and "fc" in variables["params"]
    assert models.num_params(variables) == expected
    out = jax.eval_shape(lambda v, im: model.apply(v, im, train=False), variables, x)
    c = STAGE_CH[arch][-1]
    assert out["embedding"].shape == (2, c) and out["local_embedding"].shape == (2, 2, 2, c)
    assert out["embedding"].dtype == jnp.float32 and out["logits"].shape == (2, 1000)
    assert model.embedding_dim == c


def test_plain_model_embedding_is_pooled_features():
    model = models.create("tiny", num_classes=3, head="linear", projection=False, in_channels=1)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
    variables, out = init_and_apply(model, x)
    last = np.asarray(out["features"]["stage4"], np.float64)
    np.testing.assert_allclose(np.asarray(out["embedding"]), last.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["local_embedding"]), last.astype(np.float32))
    k, b = (np.asarray(variables["params"]["fc"][n], np.float64) for n in ("kernel", "bias"))
    np.testing.assert_allclose(np.asarray(out["logits"]), last.mean(axis=(1, 2)) @ k + b, rtol=1e-4, atol=1e-5)
    again = model.apply(variables, out["features"]["stage3"], stage="stage3", train=False, method=model.from_stage)
    np.testing.assert_allclose(np.asarray(again["logits"]), np.asarray(out["logits"]), rtol=1e-5, atol=1e-6)


def test_check_variables_names_every_mismatch():
    with_head = models.create("tiny", num_classes=3, head="linear")
    plain = models.create("tiny", num_classes=3, head="linear", projection=False)
    x = jnp.zeros((1, 16, 16, 3))
    v = jax.eval_shape(lambda: plain.init(jax.random.key(0), x, train=False))
    models.check_variables(plain, v)  # abstract leaves are fine
    with pytest.raises(models.VariablesMismatchError) as e:
        models.check_variables(with_head, v)
    assert set(e.value.missing) == {f"params/head/{m}/{p}" for m in ("hidden", "proj") for p in ("kernel", "bias")}
    assert "projection=False" in str(e.value) and not e.value.unexpected
    v2 = jax.eval_shape(lambda: with_head.init(jax.random.key(0), x, train=False))
    with pytest.raises(models.VariablesMismatchError, match="unexpected 4: params/head/hidden/bias") as e:
        models.check_variables(plain, v2)
    assert "projection=True" in str(e.value)
    bad = {"params": {**v["params"], "fc": {"kernel": jnp.zeros((128, 4)), "bias": jnp.zeros(3)}},
           "batch_stats": {k: s for k, s in v["batch_stats"].items() if k != "stem_bn"}}
    with pytest.raises(models.VariablesMismatchError) as e:
        models.check_variables(plain, bad)
    assert e.value.missing == ("batch_stats/stem_bn/mean", "batch_stats/stem_bn/var")
    assert e.value.mismatched == (("params/fc/kernel", (128, 4), (128, 3)),)
    with pytest.raises(models.VariablesMismatchError, match="model.init's structure"):
        models.check_variables(plain, v["params"])  # params without the collection level


@pytest.fixture(scope="module", params=["tiny", "resnet18"])
def built(request):
    arch = request.param
    model = models.create(arch, num_classes=3, head="linear", embed_dim=16, in_channels=1)
    x = jax.random.normal(jax.random.key(1), (2, 33, 31, 1))
    variables, out = init_and_apply(model, x)
    # Non-trivial running statistics so eval-mode BN is not the identity.
    rng = np.random.default_rng(2)

    def randomize(path, leaf):
        if path[-1].key == "mean":
            return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), jnp.float32)
        return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)

    stats = jax.tree_util.tree_map_with_path(randomize, variables["batch_stats"])
    variables = {**variables, "batch_stats": stats}
    out = jax.jit(lambda v, im: model.apply(v, im, train=False))(variables, x)
    assert np.abs(np.asarray(out["logits"])).max() > 1e-3  # not a degenerate all-zero network
    return model, variables, x, out


def test_from_stage_reproduces_full_forward(built):
    model, variables, x, full = built
    run = jax.jit(
        lambda v, f, stage: model.apply(v, f, stage=stage, train=False, method=model.from_stage),
        static_argnums=2,
    )
    for stage in ("input", *model.stage_names):
        feats = x if stage == "input" else full["features"][stage]
        out = run(variables, feats, stage)
        later = model.stage_names if stage == "input" else model.stage_names[model.stage_names.index(stage):]
        assert set(out["features"]) == set(later), stage
        for name in later:
            np.testing.assert_allclose(out["features"][name], full["features"][name], rtol=1e-5, atol=1e-5)
        for key in ("pooled", "embedding", "local_embedding", "logits"):
            np.testing.assert_allclose(out[key], full[key], rtol=1e-5, atol=1e-5, err_msg=f"{stage}/{key}")


def test_from_stage_detects_perturbation(built):
    """Zeroing one channel of stage3 changes the downstream outputs (the path is live)."""
    model, variables, _, full = built
    feats = full["features"]["stage3"]
    ablated = feats.at[..., 0].set(0.0)
    out = model.apply(variables, ablated, stage="stage3", train=False, method=model.from_stage)
    assert not np.allclose(out["logits"], full["logits"])


def test_heads_match_numpy(built):
    model, variables, _, out = built
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    last = np.asarray(out["features"][model.last_stage], np.float64)

    def mlp(v):
        h = np.maximum(v @ p["head"]["hidden"]["kernel"] + p["head"]["hidden"]["bias"], 0.0)
        return h @ p["head"]["proj"]["kernel"] + p["head"]["proj"]["bias"]

    pooled = last.mean(axis=(1, 2))
    np.testing.assert_allclose(out["pooled"], pooled, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["embedding"], mlp(pooled), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["logits"], pooled @ p["fc"]["kernel"] + p["fc"]["bias"], rtol=1e-4, atol=1e-5)
    b, h, w, _ = last.shape
    for i in range(h):
        for j in range(w):
            np.testing.assert_allclose(out["local_embedding"][:, i, j], mlp(last[:, i, j]), rtol=1e-4, atol=1e-5)
    assert out["embedding"].dtype == out["local_embedding"].dtype == out["logits"].dtype == jnp.float32


def numpy_conv3x3(x: np.ndarray, k: np.ndarray, stride: int) -> np.ndarray:
    """Direct 3x3 convolution with zero padding 1: (B, H, W, Ci), (3, 3, Ci, Co) -> (B, H', W', Co)."""
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho, wo = torch_out_size(h, 3, stride, 1), torch_out_size(w, 3, stride, 1)
    out = np.zeros((b, ho, wo, k.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            patch = xp[:, dy : dy + stride * ho : stride, dx : dx + stride * wo : stride]
            out += patch @ k[dy, dx]
    return out


def test_train_mode_updates_batch_stats():
    model = models.create("tiny", num_classes=2, in_channels=1)
    x = jax.random.normal(jax.random.key(3), (2, 16, 16, 1)) * 2.0 + 0.5
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
    out, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    assert set(updates) == {"batch_stats"}
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), variables["batch_stats"], updates["batch_stats"])
    assert all(jax.tree_util.tree_leaves(changed))
    # First BN: running = 0.9 * init + 0.1 * batch statistic (biased variance), as Flax/torch.
    pre = numpy_conv3x3(np.asarray(x, np.float64), np.asarray(variables["params"]["stem_conv"]["kernel"]), 1)
    stats = updates["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(stats["mean"], 0.1 * pre.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * pre.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    # Train mode normalises with batch statistics: differs from eval with the initial stats.
    eval_out = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
    assert not np.allclose(out["features"]["stem"], eval_out["features"]["stem"])


@pytest.mark.parametrize("arch", ["tiny", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_bfloat16_compute(arch):
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    m32 = models.create(arch, num_classes=4, head="linear")
    m16 = models.create(arch, num_classes=4, head="linear", dtype=jnp.bfloat16)
    variables, out32 = init_and_apply(m32, x)
    out16 = jax.jit(lambda v, im: m16.apply(v, im, train=False))(variables, x)
    v16 = jax.eval_shape(lambda: m16.init(jax.random.key(0), x, train=False))
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(v16))  # params stay f32
    assert out16["features"]["stage4"].dtype == jnp.bfloat16
    for key in ("pooled", "embedding", "local_embedding", "logits"):
        a, b = np.asarray(out16[key]), np.asarray(out32[key])
        assert a.dtype == np.float32, key
        assert np.all(np.isfinite(a)), key
        assert np.max(np.abs(a - b)) <= 0.05 * np.max(np.abs(b)) + 1e-3, key


@pytest.mark.slow
def test_remat_same_names_and_values():
    x = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
    plain = models.create("resnet18", num_classes=2, head="linear")
    remat = models.create("resnet18", num_classes=2, head="linear", remat=True)
    variables, out = init_and_apply(plain, x)
    abstract = jax.eval_shape(lambda: remat.init(jax.random.key(0), x, train=False))
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(variables)

    def loss(model, v):
        o, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
        return jnp.sum(o["logits"] ** 2)

    g_plain = jax.jit(jax.grad(lambda v: loss(plain, v)))(variables)
    g_remat = jax.jit(jax.grad(lambda v: loss(remat, v)))(variables)
    for a, b in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_initialisation_follows_torchvision():
    block = BasicBlock(planes=128, stride=2, downsample=True, zero_init_residual=True)
    v = jax.jit(lambda k: block.init(k, jnp.zeros((1, 8, 8, 64)), False))(jax.random.key(0))
    k = np.asarray(v["params"]["conv2"]["kernel"])  # (3, 3, 128, 128)
    std = np.sqrt(2.0 / (3 * 3 * 128))  # kaiming_normal, fan_out, relu
    assert abs(k.std() / std - 1) < 0.05 and abs(k.mean()) < 0.05 * std
    assert np.all(np.asarray(v["params"]["bn2"]["scale"]) == 0)  # zero-init last BN gamma
    assert np.all(np.asarray(v["params"]["bn1"]["scale"]) == 1)
    assert v["params"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 128)
    # The model forwards the flag and builds downsample only where torchvision does.
    model = models.create("resnet50", num_classes=2, zero_init_residual=True)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    assert all("downsample_conv" in abstract["params"][f"layer{i}_0"] for i in (1, 2, 3, 4))
    assert "downsample_conv" not in abstract["params"]["layer1_1"]
    assert model.zero_init_residual


def test_clear_errors():
    model = models.create("tiny", num_classes=2, in_channels=1)
    with pytest.raises(ValueError, match=r"\(B, H, W, 1\)"):
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    with pytest.raises(ValueError, match="unknown arch"):
        models.create("vgg", 2)
    with pytest.raises(ValueError, match="head must be"):
        models.create("tiny", 2, head="mlp")
    with pytest.raises(TypeError, match="unknown kwargs"):
        models.create("tiny", 2, widht=3)
    x = jnp.zeros((1, 16, 16, 1))
    v = model.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="unknown stage"):
        model.apply(v, x, stage="layer3", method=model.from_stage)
    with pytest.raises(ValueError, match="stage2"):
        model.apply(v, jnp.zeros((1, 4, 4, 7)), stage="stage2", method=model.from_stage)


@pytest.mark.parametrize("shape,kernel,stride,pad", [((3, 2, 2, 16), 3, 1, 1), ((2, 1, 2, 8), 3, 2, 1),
                                                     ((2, 2, 2, 8), 5, 1, 2), ((2, 6, 6, 4), 3, 1, 1)])
def test_patch_conv_equals_lax_conv_and_its_gradients(shape, kernel, stride, pad):
    """The patches @ kernel path for maps smaller than the kernel (and the fallback) vs lax.conv."""
    from lclsc_jax.models.layers import patch_conv

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, shape[-1], 7), np.float32))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    args = ((stride, stride), ((pad, pad), (pad, pad)))
    hi = jax.lax.Precision.HIGHEST

    def ref(x_, w_):
        return jax.lax.conv_general_dilated(x_, w_, *args, dimension_numbers=dn, precision=hi)

    def ours(x_, w_):
        return patch_conv(x_, w_, *args, dimension_numbers=dn, precision=hi)

    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    ct = jnp.asarray(rng.standard_normal(ref(x, w).shape, np.float32))
    g_ref = jax.grad(lambda a, b: jnp.sum(ref(a, b) * ct), argnums=(0, 1))(x, w)
    g_ours = jax.grad(lambda a, b: jnp.sum(ours(a, b) * ct), argnums=(0, 1))(x, w)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def numpy_padded_conv(x: np.ndarray, k: np.ndarray, stride: int, np_mode: str) -> np.ndarray:
    """NumPy reference: ``np.pad(x, kernel // 2, mode)`` then a direct VALID convolution (float64)."""
    kh = k.shape[0]
    p = kh // 2
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (p, p), (p, p), (0, 0)), mode=np_mode)
    ho, wo = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kh) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, k.shape[-1]))
    for dy in range(kh):
        for dx in range(kh):
            out += xp[:, dy : dy + stride * (ho - 1) + 1 : stride, dx : dx + stride * (wo - 1) + 1 : stride] @ k[dy, dx]
    return out


@pytest.mark.parametrize("mode,np_mode", [("reflect", "reflect"), ("replicate", "edge"), ("circular", "wrap")])
@pytest.mark.parametrize("shape,kernel,stride", [((2, 9, 7, 3), 3, 1), ((2, 10, 9, 3), 3, 2), ((1, 11, 12, 2), 7, 2),
                                                 ((2, 2, 2, 4), 3, 1)])  # the last: map smaller than the kernel
def test_conv_padding_modes_match_numpy_pad_reference(mode, np_mode, shape, kernel, stride):
    """layers.conv(padding=mode) == np.pad(mode) + VALID conv, values and input gradients (torch padding_mode)."""
    from lclsc_jax.models.layers import conv

    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    layer = conv(5, kernel, stride, padding=mode)
    variables = layer.init(jax.random.key(0), x)
    k = np.asarray(variables["params"]["kernel"], np.float64)
    out = jax.jit(layer.apply)(variables, x)
    np.testing.assert_allclose(out, numpy_padded_conv(np.asarray(x), k, stride, np_mode), rtol=1e-4, atol=1e-4)
    # jnp.pad + lax VALID conv: the same function, so the same input gradients.
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    p = kernel // 2

    def ref(x_):
        xp = jnp.pad(x_, ((0, 0), (p, p), (p, p), (0, 0)), mode=np_mode)
        return jax.lax.conv_general_dilated(xp, jnp.asarray(k, jnp.float32), (stride, stride), "VALID",
                                            dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST)

    ct = jnp.asarray(rng.standard_normal(out.shape, np.float32))
    g_ours = jax.grad(lambda a: jnp.sum(layer.apply(variables, a) * ct))(x)
    g_ref = jax.grad(lambda a: jnp.sum(ref(a) * ct))(x)
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-4)


def test_model_padding_option():
    """padding= keeps the variables, changes only the border, defaults to zeros; bad modes are refused."""
    zeros = models.create("tiny", num_classes=2, in_channels=1)
    reflect = models.create("tiny", num_classes=2, in_channels=1, padding="reflect")
    assert zeros.padding == "zeros" and set(models.PADDING_MODES) == {"zeros", "reflect", "replicate", "circular"}
    x = jax.random.normal(jax.random.key(8), (2, 16, 16, 1))
    variables, out_z = init_and_apply(zeros, x)
    out_r = jax.jit(lambda v, im: reflect.apply(v, im, train=False))(variables, x)
    # stem = ReLU(BN(conv(x))) with fresh BN statistics (mean 0, var 1, scale 1, bias 0).
    k = np.asarray(variables["params"]["stem_conv"]["kernel"], np.float64)
    stem = np.maximum(numpy_padded_conv(np.asarray(x), k, 1, "reflect") / np.sqrt(1 + 1e-5), 0.0)
    np.testing.assert_allclose(out_r["features"]["stem"], stem, rtol=1e-4, atol=1e-5)
    inner = (slice(None), slice(1, -1), slice(1, -1))  # away from the border the modes agree
    np.testing.assert_allclose(out_r["features"]["stem"][inner], out_z["features"]["stem"][inner], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out_r["features"]["stem"], out_z["features"]["stem"])
    r18 = models.create("resnet18", num_classes=2, padding="reflect")
    shapes = jax.eval_shape(lambda: r18.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    ref = jax.eval_shape(lambda: models.create("resnet18", num_classes=2).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(ref)
    with pytest.raises(ValueError, match="padding must be one of"):
        models.create("tiny", 2, padding="mirror")
