"""EfficientNetV2-S (``tf_efficientnetv2_s``, ``efficientnetv2_s``) against timm: weights, stages, logits, export."""

import copy

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
from lclsc_jax.models.backbones import efficientnet

pytestmark = [pytest.mark.torch, pytest.mark.slow]

ARCHS = ("tf_efficientnetv2_s", "efficientnetv2_s")
TF = "tf_efficientnetv2_s"


def _images(size: int, seed: int = 0) -> "torch.Tensor":
    """(2, 3, size, size) float32 torch images."""
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _nhwc(x: "torch.Tensor") -> jax.Array:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def built():
    """arch -> (arch, timm net with random BN stats, our model, variables, jitted eval forward), built once."""
    cache = {}

    def get(arch):
        if arch not in cache:
            torch.manual_seed(0)
            net = reference_model(arch, num_classes=5)
            randomize_batch_norm(net)
            model, variables = interop.load_torch_model(net.state_dict(), arch)
            cache[arch] = (arch, net, model, variables, jax.jit(lambda v, im: model.apply(v, im)))
        return cache[arch]

    return get


@pytest.fixture(scope="module", params=ARCHS)
def ref(request, built):
    return built(request.param)


@pytest.fixture(scope="module")
def tf_ref(built):
    """The ``tf_efficientnetv2_s`` reference (checks done on one arch only)."""
    return built(TF)


def _tol(ref: np.ndarray) -> float:
    """max(1e-4, 2e-5 * max|ref|): this 40-block net with random BN stats reaches |x| ~ 100, where float32
    rounding alone (timm in float32 vs float64) is ~1e-4 absolute, ~5e-6 relative."""
    return max(1e-4, 2e-5 * float(np.abs(ref).max()))


def test_parity_64px(ref):
    arch, net, model, variables, fwd = ref
    x = _images(64)
    feats, logits = stage_outputs(net, arch, x)
    with torch.no_grad():  # timm's head on its own conv_head output (exact: float32 values held as float64)
        head_in = torch.from_numpy(feats["conv_head"].transpose(0, 3, 1, 2).astype(np.float32))
        pre = net.forward_head(head_in, pre_logits=True).double().numpy()
    with jax.default_matmul_precision("float32"):
        out = fwd(variables, _nhwc(x))
    logits = logits.double().numpy()
    d_logits = float(np.abs(np.asarray(out["logits"], np.float64) - logits).max())
    d_pool = float(np.abs(np.asarray(out["pooled"], np.float64) - pre).max())
    assert d_logits <= _tol(logits), (d_logits, np.abs(logits).max())
    assert d_pool <= _tol(pre), (d_pool, np.abs(pre).max())
    assert set(out["features"]) == set(efficientnet.STAGE_NAMES)
    for name, c, s in zip(model.stage_names, models.stage_channels(arch).values(), models.stage_strides(arch).values()):
        got = np.asarray(out["features"][name], np.float64)
        assert got.shape == feats[name].shape == (2, 64 // s, 64 // s, c), name
        d = float(np.abs(got - feats[name]).max())
        assert d <= _tol(feats[name]), (name, d, np.abs(feats[name]).max())


def test_tf_same_padding_odd_size_float64(tf_ref):
    """65 px: every strided conv pads asymmetrically (TF "SAME"); in float64 we equal timm to rounding."""
    arch, net, _, variables, _ = tf_ref
    x = _images(65, seed=1).double()
    feats, logits = stage_outputs(copy.deepcopy(net).double(), arch, x)
    with jax.enable_x64(True):
        model64 = models.create(arch, num_classes=5, head="linear", projection=False, dtype=jnp.float64)
        v64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)  # BN's rsqrt in float64 too
        out = jax.jit(lambda v, im: model64.apply(v, im))(v64, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
        got = {k: np.asarray(v) for k, v in out["features"].items()}
        got_logits = np.asarray(out["logits"], np.float64)
    assert [got[k].shape[1] for k in efficientnet.STAGE_NAMES] == [33, 33, 17, 9, 5, 5, 3, 3]
    for name in efficientnet.STAGE_NAMES:
        assert got[name].dtype == np.float64 and got[name].shape == feats[name].shape, name
        scale = max(1.0, float(np.abs(feats[name]).max()))
        assert np.abs(got[name] - feats[name]).max() <= 1e-10 * scale, name
    # pool() returns float32 by contract, so the logits agree to float32 rounding only
    assert np.abs(got_logits - logits.numpy()).max() <= 1e-6 * max(1.0, float(logits.abs().max()))


def test_export_round_trip(ref):
    arch, net, _, variables, _ = ref
    sd = interop.variables_to_state_dict(variables, arch)
    fresh = reference_model(arch, num_classes=5)
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    x = _images(64, seed=2)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


def test_drop_path_rates_match_timm():
    net = reference_model(TF, num_classes=5, drop_path_rate=0.2)
    theirs = [b.drop_path.drop_prob if b.has_skip and hasattr(b.drop_path, "drop_prob") else 0.0
              for stage in net.blocks for b in stage]
    ours = [b.drop_path if b.stride == 1 and b.in_chs == b.out_chs and (b.kind != "cn" or b.skip) else 0.0
            for stage in efficientnet.efficientnetv2_s_blocks(0.2) for b in stage]
    assert len(ours) == 40
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_from_stage_reenters(tf_ref):
    arch, _, model, variables, fwd = tf_ref
    x = _nhwc(_images(64, seed=3))
    full = fwd(variables, x)
    again = jax.jit(lambda v, f: model.apply(v, f, "stage5", method=models.Model.from_stage))(
        variables, full["features"]["stage5"])
    np.testing.assert_allclose(np.asarray(again["logits"]), np.asarray(full["logits"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(again["features"]["conv_head"]), np.asarray(full["features"]["conv_head"]),
                               rtol=0, atol=1e-5)


def test_train_drop_path_remat_grad(tf_ref):
    """Train mode with stochastic depth and remat, re-entering at stage5 (stage6's 15 blocks + head).

    (The gradient of the whole 40-block net takes ~35 s to compile on a CPU.)
    """
    arch, _, _, variables, fwd = tf_ref
    model = models.create(arch, num_classes=5, head="linear", projection=False, drop_path_rate=0.3, remat=True)
    feats = fwd(variables, _nhwc(_images(64, seed=4)))["features"]["stage5"]

    def loss(params, rng):
        out, _ = model.apply({**variables, "params": params}, feats, "stage5", train=True,
                             method=models.Model.from_stage, mutable=["batch_stats"], rngs={"dropout": rng})
        return jnp.mean(out["logits"] ** 2), out["logits"]

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l0, logits0), grads = step(variables["params"], jax.random.PRNGKey(0))
    (_, logits1), _ = step(variables["params"], jax.random.PRNGKey(1))
    assert np.isfinite(float(l0)) and float(l0) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["backbone"]["blocks"]["5"]["0"]["conv_dw"]["kernel"]).sum()) > 0
    assert not np.allclose(np.asarray(logits0), np.asarray(logits1))  # stochastic depth draws differ


def test_bfloat16_forward(tf_ref):
    arch, _, _, variables, fwd = tf_ref
    model = models.create(arch, num_classes=5, head="linear", projection=False, dtype=jnp.bfloat16)
    x = _nhwc(_images(64, seed=5))
    out = jax.jit(lambda v, im: model.apply(v, im))(variables, x)
    assert out["logits"].dtype == jnp.float32 and out["features"]["stage6"].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out["logits"])).all()
    ref_logits = np.asarray(fwd(variables, x)["logits"])
    assert np.abs(np.asarray(out["logits"]) - ref_logits).max() <= 0.1 * max(1.0, np.abs(ref_logits).max())
