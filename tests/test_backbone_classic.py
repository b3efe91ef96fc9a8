"""AlexNet and LeNet-5 registry backbones against their plain-torch references (lclsc_jax.interop.torch_classic)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lclsc_jax import interop, models  # noqa: E402
from lclsc_jax.interop.timm_reference import reference_model, stage_outputs  # noqa: E402  (no timm needed here)
from lclsc_jax.interop.torch_classic import torch_alexnet  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

K = 5
SIZES = {"alexnet": (64, 96), "lenet5": (32, 48)}  # AlexNet: 1x1 and 2x2 last maps; LeNet-5: 5x5 and 9x9
TEMPLATE_SIZE = 64  # >= every arch's min_image_size (AlexNet: 63)

# torchvision/models/alexnet.py (AlexNet(num_classes=1000)): every state_dict key and its shape.
TORCHVISION_ALEXNET = {
    "features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
    "classifier.1.weight": (4096, 9216), "classifier.1.bias": (4096,),
    "classifier.4.weight": (4096, 4096), "classifier.4.bias": (4096,),
    "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,),
}


def _randomize(net, seed: int = 0):
    """He-normal weights, N(0, 0.1) biases, in place: O(1) logits (torch's default init gives ~1e-2 AlexNet logits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / m.weight[0].numel()) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return net


def _images(size: int, seed: int = 0, c: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, size, size, c)).astype(np.float32)


def _nchw(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module", params=["alexnet", "lenet5"])
def ref(request):
    """(arch, torch net with O(1) random weights, JAX model, variables, jitted eval forward), shared per arch."""
    arch = request.param
    net = _randomize(reference_model(arch, num_classes=K))
    model, variables = interop.load_torch_model(net.state_dict(), arch)

    @jax.jit
    def forward(v, x):
        with jax.default_matmul_precision("float32"):
            return model.apply(v, x, train=False)

    return arch, net, model, variables, forward


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_alexnet_keys_are_torchvisions():
    ours = {k: tuple(v.shape) for k, v in torch_alexnet().state_dict().items()}
    assert ours == TORCHVISION_ALEXNET
    model = models.create("alexnet", 1000, head="linear", projection=False)
    template = models.abstract_variables(model, (1, TEMPLATE_SIZE, TEMPLATE_SIZE, 3))
    exported = {interop.torch_key(c, p, "alexnet"): interop.weights._torch_shape(tuple(leaf.shape))
                for (c, p), leaf in interop.weights._flatten(template).items()}
    assert exported == TORCHVISION_ALEXNET


def test_parity_logits_and_stages(ref):
    arch, net, model, variables, forward = ref
    spec = models.BACKBONES[arch]
    pre = {}
    hook = dict(net.named_modules())[spec.classifier_key].register_forward_pre_hook(
        lambda m, inp: pre.__setitem__("x", inp[0].detach().numpy()))
    try:
        for size in SIZES[arch]:
            x = _images(size)
            feats, logits = stage_outputs(net, arch, _nchw(x))
            out = forward(variables, jnp.asarray(x))
            assert logits.abs().max() > 0.5  # O(1) logits: the tolerance means something
            d_logits = _max_diff(out["logits"], logits.numpy())
            d_pooled = _max_diff(out["pooled"], pre["x"])
            d_stages = {s: _max_diff(out["features"][s], feats[s]) for s in spec.stage_names}
            print(f"{arch} {size}px: logits {d_logits:.2e}, pooled {d_pooled:.2e}, stages {d_stages}")
            assert d_logits <= 1e-4 and d_pooled <= 1e-4
            for s in spec.stage_names:
                assert out["features"][s].shape == feats[s].shape
                assert d_stages[s] <= 1e-4 * max(1.0, float(np.abs(feats[s]).max())), s
    finally:
        hook.remove()


def test_export_round_trip(ref):
    arch, net, model, variables, forward = ref
    sd = interop.variables_to_state_dict(variables, arch)
    fresh = reference_model(arch, num_classes=K)
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    x = _nchw(_images(SIZES[arch][0], seed=1))
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(x).numpy(), net(x).numpy())


def test_from_stage_reentry(ref):
    arch, net, model, variables, forward = ref
    out = forward(variables, jnp.asarray(_images(SIZES[arch][-1], seed=2)))
    names = models.BACKBONES[arch].stage_names
    for stage in dict.fromkeys((names[0], names[-2], names[-1])):  # first, an inner one, the last
        with jax.default_matmul_precision("float32"):
            again = model.apply(variables, out["features"][stage], stage, method=model.from_stage)
        for key in ("logits", "pooled", "local_embedding"):
            np.testing.assert_allclose(again[key], out[key], rtol=1e-5, atol=1e-5, err_msg=f"{stage} {key}")


def test_local_is_pool_of_the_location_vector(ref):
    """local at (i, j) == pool of a map filled with that location's vector; so a constant map gives local == pool."""
    arch, net, model, variables, forward = ref
    c = model.stage_channels[model.last_stage]

    @jax.jit
    def pool_and_local(v, fmap):
        with jax.default_matmul_precision("float32"):
            return model.apply(v, fmap, method=lambda m, f: (m.backbone.pool(f, False), m.backbone.local(f, False)))

    vec = jax.random.normal(jax.random.key(1), (2, 1, 1, c))
    pooled, local = pool_and_local(variables, jnp.broadcast_to(vec, (2, 3, 4, c)))
    tol = 1e-5 * float(jnp.abs(pooled).max())
    assert local.shape == (2, 3, 4, pooled.shape[-1]) and tol > 1e-6
    np.testing.assert_allclose(local, jnp.broadcast_to(pooled[:, None, None], local.shape), rtol=1e-5, atol=tol)
    fmap = jax.random.normal(jax.random.key(2), (2, 3, 4, c))
    _, local = pool_and_local(variables, fmap)
    for i, j in ((0, 0), (2, 3)):
        pooled_ij, _ = pool_and_local(variables, jnp.broadcast_to(fmap[:, i:i + 1, j:j + 1], (2, 3, 4, c)))
        np.testing.assert_allclose(local[:, i, j], pooled_ij, rtol=1e-5, atol=tol)


def test_train_mode_dropout_and_gradient(ref):
    arch, net, model, variables, forward = ref
    train_model = models.create(arch, K, head="linear", projection=False, drop_path_rate=0.1, remat=True)
    x = jnp.asarray(_images(models.BACKBONES[arch].min_image_size))

    def loss(params, rng):
        out = train_model.apply({"params": params}, x, train=True, rngs={"dropout": rng})
        return jnp.mean(out["logits"] ** 2) + jnp.mean(out["local_embedding"] ** 2), out["logits"]

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (value, logits), grads = grad_fn(variables["params"], jax.random.key(1))
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["backbone"]["features"]["0"]["kernel"]).max()) > 0
    (_, again), _ = grad_fn(variables["params"], jax.random.key(1))
    (_, other), _ = grad_fn(variables["params"], jax.random.key(2))
    np.testing.assert_array_equal(again, logits)
    assert (not np.allclose(other, logits)) == (arch == "alexnet")  # AlexNet's Dropout(0.5); LeNet-5 has none


def test_bf16_forward(ref):
    arch, net, model, variables, forward = ref
    x = jnp.asarray(_images(SIZES[arch][0]))
    out = jax.jit(models.create(arch, K, head="linear", projection=False, dtype=jnp.bfloat16).apply)(variables, x)
    f32 = forward(variables, x)
    assert out["features"][model.last_stage].dtype == jnp.bfloat16
    assert out["pooled"].dtype == out["logits"].dtype == out["local_embedding"].dtype == jnp.float32
    assert all(bool(jnp.all(jnp.isfinite(out[k]))) for k in ("logits", "embedding", "local_embedding"))
    scale = float(jnp.abs(f32["logits"]).max())
    diff = _max_diff(out["logits"], f32["logits"])
    print(f"{arch} bf16: max |logits - f32| {diff:.3f} (f32 max |logits| {scale:.2f})")
    np.testing.assert_allclose(out["logits"], f32["logits"], atol=0.1 * scale)


@pytest.mark.parametrize(("arch", "last_hw"), [("alexnet", 1), ("lenet5", 5)])
def test_min_image_size(arch, last_hw):
    spec = models.BACKBONES[arch]
    model = models.create(arch, K, head="linear")
    x = jax.ShapeDtypeStruct((1, spec.min_image_size, spec.min_image_size, 3), jnp.float32)
    out = jax.eval_shape(lambda im: model.init_with_output(jax.random.key(0), im)[0], x)
    assert out["features"][model.last_stage].shape == (1, last_hw, last_hw, spec.stage_channels[-1])


def test_load_torch_model_alexnet():
    model, variables = interop.load_torch_model(torch_alexnet(num_classes=K).state_dict(), "alexnet")
    assert model.num_classes == K and not model.projection
