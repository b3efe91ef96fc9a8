"""DINOHead against a PyTorch DINOHead built here (weights copied), and SelfSupervisedModel's variable layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax import models

torch = pytest.importorskip("torch")

IN, HID, BOT, OUT = 12, 16, 8, 20


class _TorchDINOHead(torch.nn.Module):
    """facebookresearch/dino's DINOHead (use_bn=False), with torch's parametrised weight_norm (dim=0)."""

    def __init__(self, in_dim, out_dim, norm_last_layer=True, nlayers=3, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = torch.nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [torch.nn.Linear(in_dim, hidden_dim), torch.nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [torch.nn.Linear(hidden_dim, hidden_dim), torch.nn.GELU()]
            layers.append(torch.nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = torch.nn.Sequential(*layers)
        wn = torch.nn.utils.parametrizations.weight_norm
        self.last_layer = wn(torch.nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1)  # g
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x):
        x = torch.nn.functional.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def _head(num_layers=3, norm_last_layer=True, dtype=jnp.float32):
    return models.DINOHead(out_dim=OUT, hidden_dim=HID, bottleneck_dim=BOT, num_layers=num_layers,
                           norm_last_layer=norm_last_layer, dtype=dtype)


def _torch_from_flax(params, num_layers, norm_last_layer):
    """The PyTorch head with the Flax parameters copied in (kernels transposed)."""
    ref = _TorchDINOHead(IN, OUT, norm_last_layer, num_layers, HID, BOT).double()
    linears = [m for m in ref.mlp.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            lin.weight.copy_(torch.tensor(np.asarray(params[f"mlp_{i}"]["kernel"]).T))
            lin.bias.copy_(torch.tensor(np.asarray(params[f"mlp_{i}"]["bias"])))
        wn = ref.last_layer.parametrizations.weight
        wn.original1.copy_(torch.tensor(np.asarray(params["last_v"]).T))
        if not norm_last_layer:
            wn.original0.copy_(torch.tensor(np.asarray(params["last_g"]))[:, None])
    return ref


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_matches_pytorch_and_has_its_parameter_count(num_layers, norm_last_layer):
    head = _head(num_layers, norm_last_layer)
    x = np.random.default_rng(num_layers).normal(size=(5, IN)).astype(np.float32)
    params = head.init(jax.random.PRNGKey(0), jnp.zeros((1, IN)))["params"]
    if not norm_last_layer:  # a trained g: make it differ from 1
        params = {**params, "last_g": jnp.linspace(0.5, 2.0, OUT)}
    out = head.apply({"params": params}, jnp.asarray(x))
    assert out.shape == (5, OUT) and out.dtype == jnp.float32
    ref = _torch_from_flax(params, num_layers, norm_last_layer)
    want = ref(torch.as_tensor(x, dtype=torch.float64)).detach().numpy()
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
    trainable = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert models.num_params(params) == trainable
    assert ("last_g" in params) == (not norm_last_layer)


def test_last_layer_weight_has_unit_norm_per_output_unit_whatever_v_becomes():
    head = _head()
    params = head.init(jax.random.PRNGKey(1), jnp.zeros((1, IN)))["params"]
    rng = np.random.default_rng(0)
    # An arbitrary v (as after training): per-unit scales far from 1, random directions.
    v = rng.normal(size=(BOT, OUT)) * rng.uniform(0.01, 50.0, size=(1, OUT))
    params = {**params, "last_v": jnp.asarray(v, jnp.float32)}
    x = jnp.asarray(rng.normal(size=(64, IN)), jnp.float32)
    out, state = head.apply({"params": params}, x, capture_intermediates=True)
    u = np.asarray(state["intermediates"]["mlp_2"]["__call__"][0], np.float64)  # bottleneck (64, BOT)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w, *_ = np.linalg.lstsq(u, np.asarray(out, np.float64), rcond=None)  # the effective (BOT, OUT) weight
    np.testing.assert_allclose(np.linalg.norm(w, axis=0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(w, v / np.linalg.norm(v, axis=0, keepdims=True), atol=1e-5)
    # hence every logit is a cosine: |out| <= 1
    assert np.all(np.abs(np.asarray(out)) <= 1.0 + 1e-6)


def test_dino_head_initialisation_follows_the_reference():
    head = models.DINOHead(out_dim=512, hidden_dim=256, bottleneck_dim=64, num_layers=3)
    params = jax.jit(head.init)(jax.random.PRNGKey(2), jnp.zeros((1, 128)))["params"]
    k = np.asarray(params["mlp_1"]["kernel"])  # trunc_normal_(std=.02), bounds +-2 absolute: N(0, 0.02)
    assert abs(k.std() - 0.02) < 0.02 * 0.02 and np.abs(k).max() > 2 * 0.02
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(params[f"mlp_{i}"]["bias"]), 0.0)
    v = np.asarray(params["last_v"])  # nn.Linear's default: U(-1/sqrt(64), 1/sqrt(64))
    assert np.abs(v).max() <= 1 / 8 and abs(v.std() - 1 / (8 * np.sqrt(3))) < 0.02 / (8 * np.sqrt(3))


def test_dino_head_in_bfloat16_gives_float32_close_to_float32():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, IN)), jnp.float32)
    params = _head().init(jax.random.PRNGKey(0), x)["params"]
    low = _head(dtype=jnp.bfloat16).apply({"params": params}, x)
    assert low.dtype == jnp.float32 and jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda p: p.dtype == jnp.float32, params))
    np.testing.assert_allclose(np.asarray(low), np.asarray(_head().apply({"params": params}, x)), atol=3e-2)


@pytest.fixture(scope="module")
def ssl_setup():
    encoder = models.create("tiny", num_classes=3, head="gei", embed_dim=6, in_channels=1)
    model = models.SelfSupervisedModel(encoder=encoder, dino_head=_head())
    images = jnp.asarray(np.random.default_rng(4).normal(size=(3, 16, 16, 1)), jnp.float32)
    variables = jax.jit(model.init, static_argnames="train")(jax.random.PRNGKey(0), images, train=False)
    enc_vars = jax.eval_shape(lambda key: encoder.init(key, images, train=False), jax.random.PRNGKey(1))
    return encoder, model, images, variables, enc_vars


def test_ssl_model_keeps_the_encoder_variables_exactly_as_a_models_tree(ssl_setup):
    encoder, model, images, variables, enc_vars = ssl_setup
    assert set(variables["params"]) == {"encoder", "dino_head"}
    shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), variables["params"]["encoder"])
    assert shapes == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), enc_vars["params"])
    assert jax.tree_util.tree_structure(variables["batch_stats"]["encoder"]) == \
        jax.tree_util.tree_structure(enc_vars["batch_stats"])
    assert set(variables["batch_stats"]) == {"encoder"}
    assert models.check_variables(encoder, {"params": variables["params"]["encoder"],
                                            "batch_stats": variables["batch_stats"]["encoder"]}) is None


def test_ssl_model_outputs_are_the_encoders_and_the_heads(ssl_setup):
    encoder, model, images, variables, _ = ssl_setup
    out = jax.jit(model.apply, static_argnames="train")(variables, images, train=False)
    assert set(out) == {"pooled", "embedding", "dino"}
    enc = jax.jit(encoder.apply, static_argnames="train")(
        {"params": variables["params"]["encoder"], "batch_stats": variables["batch_stats"]["encoder"]}, images,
        train=False)
    np.testing.assert_array_equal(np.asarray(out["pooled"]), np.asarray(enc["pooled"]))
    np.testing.assert_array_equal(np.asarray(out["embedding"]), np.asarray(enc["embedding"]))
    assert out["pooled"].shape == (3, 128) and out["embedding"].shape == (3, 6) and out["dino"].shape == (3, OUT)
    dino = _head().apply({"params": variables["params"]["dino_head"]}, enc["pooled"])
    np.testing.assert_allclose(np.asarray(out["dino"]), np.asarray(dino), rtol=1e-6)
    # Model's projection head does not L2-normalise: the losses do.
    assert not np.allclose(np.linalg.norm(np.asarray(out["embedding"]), axis=1), 1.0)
    bare = models.SelfSupervisedModel(encoder=encoder)
    bare_vars = {"params": {"encoder": variables["params"]["encoder"]}, "batch_stats": variables["batch_stats"]}
    assert set(jax.eval_shape(lambda v: bare.apply(v, images, train=False), bare_vars)) == {"pooled", "embedding"}

