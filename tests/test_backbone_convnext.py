"""ConvNeXt-T (``convnext_tiny``) against timm: weights, stages, pre-logits, logits, export, stochastic depth."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
try:
    from lclsc_jax.interop.timm_reference import require_timm

    require_timm()
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"needs timm: {e}", allow_module_level=True)

import jax
import jax.numpy as jnp

from lclsc_jax import interop, models
from lclsc_jax.interop.timm_reference import reference_model, stage_outputs
from lclsc_jax.interop.torch_reference import randomize_batch_norm
from lclsc_jax.models.backbones import convnext

from torch_helpers import assert_export_round_trip, assert_stages_match  # noqa: E402 - tests/ helper

pytestmark = [pytest.mark.torch, pytest.mark.slow]

ARCH = "convnext_tiny"
SIZE = 70  # not a multiple of 32: the stem and every downsample drop a remainder pixel as torch does
GRIDS = (17, 17, 8, 4, 2)  # stem, stage1..stage4 at 70 px


def _images(seed: int = 0) -> "torch.Tensor":
    """(2, 3, SIZE, SIZE) float32 torch images."""
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _nhwc(x: "torch.Tensor") -> jax.Array:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _randomize(net: "torch.nn.Module") -> None:
    """Non-trivial LayerNorm affines, biases and layer scales: timm's init (gamma 1e-6, LN 1/0, zero biases)
    would make every residual branch invisible and hide a wrong block."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.ndim == 1:  # LayerNorm weights
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.75)


@pytest.fixture(scope="module")
def ref():
    """(timm net with random affines, our model, variables, jitted eval forward), built once."""
    torch.manual_seed(0)
    net = reference_model(ARCH, num_classes=5)
    randomize_batch_norm(net)  # ConvNeXt has none; kept for the shared recipe
    _randomize(net)
    model, variables = interop.load_torch_model(net.state_dict(), ARCH)
    return net, model, variables, jax.jit(lambda v, im: model.apply(v, im))


def test_parity(ref):
    net, model, variables, fwd = ref
    x = _images()
    feats, logits = stage_outputs(net, ARCH, x)
    last = torch.from_numpy(feats["stage4"].transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():  # timm's head on its own stage4 output: pre-logits, and head.norm per location
        pre = net.forward_head(last, pre_logits=True).double().numpy()
        local = net.head.norm(last).double().numpy().transpose(0, 2, 3, 1)
    with jax.default_matmul_precision("float32"):
        out = fwd(variables, _nhwc(x))
    logits = logits.double().numpy()
    d_logits = float(np.abs(np.asarray(out["logits"], np.float64) - logits).max())
    d_pool = float(np.abs(np.asarray(out["pooled"], np.float64) - pre).max())
    d_local = float(np.abs(np.asarray(out["local_embedding"], np.float64) - local).max())
    assert d_logits <= 1e-4, d_logits  # measured ~1e-6
    assert d_pool <= 1e-4, d_pool
    assert d_local <= 1e-4, d_local
    assert set(out["features"]) == set(convnext.STAGE_NAMES)
    assert_stages_match(out, feats, models.BACKBONES[ARCH], GRIDS)


def test_export_round_trip(ref):
    net, _, variables, _ = ref
    assert_export_round_trip(net, variables, ARCH, _images(seed=2))


def test_drop_path_rates_match_timm():
    net = reference_model(ARCH, num_classes=5, drop_path_rate=0.3)
    theirs = [getattr(b.drop_path, "drop_prob", 0.0) for s in net.stages for b in s.blocks]
    ours = [r for stage in convnext.drop_path_rates(0.3) for r in stage]
    assert len(ours) == sum(convnext.DEPTHS) == 18 and ours[0] == 0.0
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-7)


def test_from_stage_reenters(ref):
    _, model, variables, fwd = ref
    x = _nhwc(_images(seed=3))
    full = fwd(variables, x)
    again = jax.jit(lambda v, f: model.apply(v, f, "stage2", method=models.Model.from_stage))(
        variables, full["features"]["stage2"])
    for key in ("logits", "pooled", "local_embedding"):
        np.testing.assert_allclose(np.asarray(again[key]), np.asarray(full[key]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(again["features"]["stage4"]), np.asarray(full["features"]["stage4"]),
                               rtol=0, atol=1e-5)


def test_train_drop_path_remat_grad(ref):
    """Train mode with stochastic depth and remat, re-entering at stage2 (stage3's 9 blocks, stage4's 3, head)."""
    _, _, variables, fwd = ref
    model = models.create(ARCH, num_classes=5, head="linear", projection=False, drop_path_rate=0.3, remat=True)
    feats = fwd(variables, _nhwc(_images(seed=4)))["features"]["stage2"]

    def loss(params, rng):
        out = model.apply({"params": params}, feats, "stage2", train=True, method=models.Model.from_stage,
                          rngs={"dropout": rng})
        return jnp.mean(out["logits"] ** 2), out["logits"]

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l0, logits0), grads = step(variables["params"], jax.random.PRNGKey(0))
    (_, logits1), _ = step(variables["params"], jax.random.PRNGKey(1))
    assert np.isfinite(float(l0)) and float(l0) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    block = grads["backbone"]["stages"]["2"]["blocks"]["0"]
    assert float(jnp.abs(block["conv_dw"]["kernel"]).sum()) > 0 and float(jnp.abs(block["gamma"]).sum()) > 0
    assert float(jnp.abs(grads["backbone"]["head"]["norm"]["scale"]).sum()) > 0
    assert not np.allclose(np.asarray(logits0), np.asarray(logits1))  # stochastic depth draws differ
    eval_logits = fwd(variables, _nhwc(_images(seed=4)))["logits"]
    assert not np.allclose(np.asarray(logits0), np.asarray(eval_logits))


def test_bfloat16_forward(ref):
    _, _, variables, fwd = ref
    model = models.create(ARCH, num_classes=5, head="linear", projection=False, dtype=jnp.bfloat16)
    x = _nhwc(_images(seed=5))
    out = jax.jit(lambda v, im: model.apply(v, im))(variables, x)
    assert out["logits"].dtype == jnp.float32 and out["pooled"].dtype == jnp.float32
    assert out["features"]["stage4"].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out["logits"])).all()
    ref_logits = np.asarray(fwd(variables, x)["logits"])
    assert np.abs(np.asarray(out["logits"]) - ref_logits).max() <= 0.1 * max(1.0, np.abs(ref_logits).max())
