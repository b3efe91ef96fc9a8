"""DenseNet-121 (``densenet121``) against timm: weights, stages, logits, export, memory-efficient remat."""

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
from lclsc_jax.models.backbones import densenet

from torch_helpers import assert_export_round_trip, assert_stages_match  # noqa: E402 - tests/ helper

pytestmark = [pytest.mark.torch, pytest.mark.slow]

ARCH = "densenet121"
SIZE = 68  # the stem gives a 17x17 map: transition 1's 2x2 average pool drops its last row/column as torch
GRIDS = (17, 8, 4, 2, 2)  # stem, stage1..stage4 at 68 px


def _images(seed: int = 0) -> "torch.Tensor":
    """(2, 3, SIZE, SIZE) float32 torch images."""
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _nhwc(x: "torch.Tensor") -> jax.Array:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def ref():
    """(timm net with random BN stats, our model, variables, jitted eval forward), built once."""
    torch.manual_seed(0)
    net = reference_model(ARCH, num_classes=5)
    randomize_batch_norm(net)
    model, variables = interop.load_torch_model(net.state_dict(), ARCH)
    return net, model, variables, jax.jit(lambda v, im: model.apply(v, im))


def test_parity(ref):
    net, model, variables, fwd = ref
    x = _images()
    feats, logits = stage_outputs(net, ARCH, x)
    with torch.no_grad():  # timm's head on its own norm5 output (BN + ReLU inside BatchNormAct2d)
        last = torch.from_numpy(feats["stage4"].transpose(0, 3, 1, 2).astype(np.float32))
        pre = net.forward_head(last, pre_logits=True).double().numpy()
    assert feats["stage4"].min() >= 0  # norm5 includes the ReLU
    with jax.default_matmul_precision("float32"):
        out = fwd(variables, _nhwc(x))
    logits = logits.double().numpy()
    d_logits = float(np.abs(np.asarray(out["logits"], np.float64) - logits).max())
    d_pool = float(np.abs(np.asarray(out["pooled"], np.float64) - pre).max())
    assert d_logits <= 1e-4, d_logits  # measured ~4e-7
    assert d_pool <= 1e-4, d_pool
    np.testing.assert_array_equal(np.asarray(out["local_embedding"]), np.asarray(out["features"]["stage4"]))
    assert set(out["features"]) == set(densenet.STAGE_NAMES)
    assert_stages_match(out, feats, models.BACKBONES[ARCH], GRIDS)


def test_export_round_trip(ref):
    net, _, variables, _ = ref
    assert_export_round_trip(net, variables, ARCH, _images(seed=2))


def test_timm_has_no_stochastic_depth():
    """timm's densenet121 takes no drop_path_rate; its only regularisers are dropouts (0 by default)."""
    with pytest.raises(TypeError):
        reference_model(ARCH, num_classes=5, drop_path_rate=0.1)
    net = reference_model(ARCH, num_classes=5)
    assert net.head_drop.p == 0 and all(m.drop_rate == 0 for m in net.modules() if hasattr(m, "drop_rate"))


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


def test_train_remat_grad_equals_plain(ref):
    """Train mode (batch statistics) re-entering at stage3 (dense block 4 + norm5): the memory-efficient
    (remat) gradient equals the plain one; drop_path_rate is accepted and changes nothing (no stochastic depth)."""
    _, _, variables, fwd = ref
    feats = fwd(variables, _nhwc(_images(seed=4)))["features"]["stage3"]

    def grad_fn(model):
        def loss(params, rng):
            out, upd = model.apply({**variables, "params": params}, feats, "stage3", train=True,
                                   method=models.Model.from_stage, mutable=["batch_stats"], rngs={"dropout": rng})
            return jnp.mean(out["logits"] ** 2), (out["logits"], upd)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    kw = dict(num_classes=5, head="linear", projection=False)
    (l_r, (logits_r, upd)), g_r = grad_fn(models.create(ARCH, drop_path_rate=0.3, remat=True, **kw))(
        variables["params"], jax.random.PRNGKey(0))
    (l_p, (logits_p, _)), g_p = grad_fn(models.create(ARCH, **kw))(variables["params"], jax.random.PRNGKey(1))
    assert np.isfinite(float(l_r)) and float(l_r) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(g_r))
    assert float(jnp.abs(g_r["backbone"]["features"]["denseblock4"]["denselayer1"]["conv1"]["kernel"]).sum()) > 0
    np.testing.assert_allclose(np.asarray(logits_r), np.asarray(logits_p), rtol=0, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g_r), jax.tree_util.tree_leaves(g_p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    before, after = (v["batch_stats"]["backbone"]["features"]["norm5"]["mean"] for v in (variables, upd))
    assert not np.allclose(np.asarray(after), np.asarray(before))  # train mode updates the running statistics


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
