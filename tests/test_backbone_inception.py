"""InceptionV3 (``inception_v3``, ``inception_v3_aux``) against timm: weights, stages, logits, aux head, export.

The reference nets get He-scaled conv weights (timm's init, N(0, 0.1) for every conv, makes the
activations grow to ~1e10 by ``Mixed_7c`` with random BatchNorm statistics, where a float32
comparison says nothing) and random BatchNorm statistics; the fc keeps timm's init (N(0, 0.1)), which
the auxiliary fc gets too (timm's N(0, 0.001) would make its logits too small to compare).
"""

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
try:
    from lclsc_jax.interop.timm_reference import require_timm

    timm = require_timm()
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"needs timm: {e}", allow_module_level=True)

import jax
import jax.numpy as jnp

from lclsc_jax import interop, models
from lclsc_jax.interop.timm_reference import reference_model, stage_outputs
from lclsc_jax.interop.torch_reference import randomize_batch_norm
from lclsc_jax.models.backbones import inception

pytestmark = [pytest.mark.torch, pytest.mark.slow]

SIZE = 107  # smallest size with a 2x2 Mixed_7c map (every 3x3 / 1x3 / 3x1 tap of Mixed_7b/7c is used)
AUX_SIZE = inception.AUX_MIN_IMAGE  # 299: the smallest image the auxiliary head accepts


def _images(size: int, seed: int = 0) -> "torch.Tensor":
    """(2, 3, size, size) float32 torch images."""
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _nhwc(x: "torch.Tensor") -> jax.Array:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _net(arch: str):
    """timm's model with He-scaled conv weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    net = reference_model(arch, num_classes=5)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0.0, math.sqrt(2.0 / m.weight[0].numel()), generator=gen)
        if getattr(net, "AuxLogits", None) is not None:  # timm's N(0, 0.001) gives aux logits ~0.05: use fc's 0.1
            net.AuxLogits.fc.weight.normal_(0.0, 0.1, generator=gen)
    randomize_batch_norm(net)
    return net


@pytest.fixture(scope="module")
def v3():
    """inception_v3: timm net, our model and variables, and the jitted eval forward."""
    net = _net("inception_v3")
    model, variables = interop.load_torch_model(net.state_dict(), "inception_v3")
    fwd = jax.jit(lambda v, im: model.apply(v, im))
    return net, model, variables, fwd


@pytest.fixture(scope="module")
def aux():
    """inception_v3_aux: timm net (with AuxLogits), our model and variables."""
    net = _net("inception_v3_aux")
    model, variables = interop.load_torch_model(net.state_dict(), "inception_v3_aux")
    return net, model, variables


def test_parity(v3):
    net, model, variables, fwd = v3
    x = _images(SIZE)
    feats, logits = stage_outputs(net, "inception_v3", x)
    with torch.no_grad():
        pre = net.forward_head(net.forward_features(x), pre_logits=True).double().numpy()
    with jax.default_matmul_precision("float32"):
        out = fwd(variables, _nhwc(x))
    d_logits = float(np.abs(np.asarray(out["logits"], np.float64) - logits.double().numpy()).max())
    d_pool = float(np.abs(np.asarray(out["pooled"], np.float64) - pre).max())
    assert d_logits <= 1e-4, d_logits
    assert d_pool <= 1e-4, d_pool
    assert float(logits.abs().max()) > 0.1  # a meaningful scale
    assert tuple(out["features"]) == inception.STAGE_NAMES
    sizes = [out["features"][k].shape[1] for k in inception.STAGE_NAMES]
    assert sizes == [51, 23, 11, 5, 2]
    for name, c in zip(model.stage_names, inception.STAGE_CHANNELS):
        got = np.asarray(out["features"][name], np.float64)
        assert got.shape == feats[name].shape and got.shape[-1] == c, name
        scale = max(1.0, float(np.abs(feats[name]).max()))
        assert np.abs(got - feats[name]).max() <= 1e-5 * scale, (name, np.abs(got - feats[name]).max(), scale)
    np.testing.assert_array_equal(np.asarray(out["local_embedding"]), np.asarray(out["features"]["stage5"]))


def test_export_round_trip(v3, aux):
    # both archs export exactly the reference's keys and tensors (num_batches_tracked: 0), so timm's
    # strict load takes them; checked for inception_v3 with a fresh model and its logits
    for arch, (net, _, variables, *_) in (("inception_v3", v3), ("inception_v3_aux", aux)):
        sd = interop.variables_to_state_dict(variables, arch)
        ref = net.state_dict()
        assert set(sd) == set(ref)
        assert all(np.array_equal(np.asarray(sd[k]), v.numpy()) for k, v in ref.items() if "num_batches" not in k)
    net, _, variables, _ = v3
    fresh = reference_model("inception_v3", num_classes=5)
    sd = interop.variables_to_state_dict(variables, "inception_v3")
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    x = _images(SIZE, seed=2)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


def test_aux_file_loads_into_inception_v3_without_its_head(aux):
    net, _, aux_variables = aux
    sd = net.state_dict()
    model, variables = interop.load_torch_model(sd, "inception_v3")  # AuxLogits skipped, not an error
    assert "AuxLogits" not in variables["params"]["backbone"]
    _, report = interop.state_dict_to_variables(interop.read_state_dict(sd), models.abstract_variables(model),
                                                arch="inception_v3")
    assert report.skipped and all(k.startswith("AuxLogits.") for k in report.skipped)
    assert len(report.skipped) == sum(k.startswith("AuxLogits.") for k in sd)
    no_aux = {c: {**t, "backbone": {k: v for k, v in t["backbone"].items() if k != "AuxLogits"}}
              for c, t in aux_variables.items()}
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                                          variables, no_aux))
    # the other way round, the aux arch needs its head
    plain = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
    with pytest.raises(interop.WeightsMismatchError, match="AuxLogits"):
        interop.load_torch_model(plain, "inception_v3_aux")


def test_aux_head_alone_eval_and_train(aux):
    """``backbone.aux`` vs timm's ``AuxLogits`` on the same 17x17 Mixed_6e-sized map: eval (running
    statistics) in float32, and train (BatchNorm on batch statistics on both sides) in float64, where the
    1x1 map's two-sample statistics cannot amplify rounding (the logits are float32 by contract)."""
    net, model, variables = aux
    fmap = torch.rand(2, 768, 17, 17, generator=torch.Generator().manual_seed(3)) * 2.0
    head = copy.deepcopy(net.AuxLogits)

    def ours(m, v, f, train):
        return m.apply(v, f, train, method=lambda m, f, t: m.backbone.aux(f, t),
                       mutable=["batch_stats"] if train else False)

    with jax.default_matmul_precision("float32"):
        got_eval = ours(model, variables, _nhwc(fmap), False)
    with jax.enable_x64(True):
        model64 = models.create("inception_v3_aux", num_classes=5, head="linear", projection=False, dtype=jnp.float64)
        got_train, new_stats = ours(model64, variables, _nhwc(fmap.double()), True)
        got_train = np.asarray(got_train, np.float64)
        mean = np.asarray(new_stats["batch_stats"]["backbone"]["AuxLogits"]["conv0"]["bn"]["mean"])
    with torch.no_grad():
        want_eval = head.eval()(fmap).double().numpy()
        want_train = head.double().train()(fmap.double()).numpy()
    assert got_eval.shape == (2, 5) and got_eval.dtype == jnp.float32
    d_eval = float(np.abs(np.asarray(got_eval, np.float64) - want_eval).max())
    d_train = float(np.abs(got_train - want_train).max())
    assert d_eval <= 1e-4 * max(1.0, np.abs(want_eval).max()), d_eval
    assert d_train <= 1e-6 * max(1.0, np.abs(want_train).max()), d_train
    # the running means move as torch's (momentum 0.1)
    np.testing.assert_allclose(mean, head.conv0.bn.running_mean.numpy(), rtol=1e-6, atol=1e-6)


def test_train_forward_with_aux_matches_timm_and_grads(aux):
    """The whole Model in training at 299 px: logits and aux_logits equal timm's training-mode forward
    (BatchNorm on batch statistics in both), gradients finite, also through the auxiliary head;
    ``drop_path_rate`` is accepted (InceptionV3 has no stochastic depth)."""
    net, _, variables = aux
    model = models.create("inception_v3_aux", num_classes=5, head="linear", projection=False, drop_path_rate=0.2)
    x = _images(AUX_SIZE, seed=4)

    def loss(params, rng):
        out, _ = model.apply({**variables, "params": params}, _nhwc(x), train=True, mutable=["batch_stats"],
                             rngs={"dropout": rng})
        return jnp.mean(out["logits"] ** 2) + 0.4 * jnp.mean(out["aux_logits"] ** 2), out

    with jax.default_matmul_precision("float32"):
        (l0, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"], jax.random.key(0))
    with torch.no_grad():
        logits, aux_logits = copy.deepcopy(net).train()(x)
    # Training-mode BatchNorm divides by batch standard deviations, some tiny (a channel nearly constant
    # over the batch, e.g. AuxLogits.conv1's 1x1 map over 2 images): float32 rounding is amplified, up to
    # 1/sqrt(eps) ~ 30x. Measured: logits 6e-5, aux_logits 5e-4 (scales 3.5, 2.1); in float64 on both
    # sides both agree to 2e-7 (the float32 output rounding), so the tolerance here is 1e-3 relative.
    for name, want in (("logits", logits), ("aux_logits", aux_logits)):
        want = want.double().numpy()
        d = float(np.abs(np.asarray(out[name], np.float64) - want).max())
        assert d <= 1e-3 * max(1.0, np.abs(want).max()), (name, d)
    assert np.isfinite(float(l0))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    bb = grads["backbone"]
    assert float(jnp.abs(bb["Conv2d_1a_3x3"]["conv"]["kernel"]).sum()) > 0
    assert float(jnp.abs(bb["AuxLogits"]["fc"]["kernel"]).sum()) > 0


def test_remat_traces_with_the_same_variables(v3):
    """``remat=True`` (each Mixed block rematerialised) keeps the variable tree and differentiates (traced only)."""
    _, _, variables, _ = v3
    model = models.create("inception_v3", num_classes=5, head="linear", projection=False, remat=True,
                          drop_path_rate=0.1)
    x = jax.ShapeDtypeStruct((2, 75, 75, 3), jnp.float32)

    def loss(params, im):
        out, _ = model.apply({**variables, "params": params}, im, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.key(0)})
        return jnp.mean(out["logits"] ** 2)

    grads = jax.eval_shape(jax.grad(loss), variables["params"], x)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(variables["params"])


def test_aux_needs_299px_and_eval_needs_none(aux):
    _, model, variables = aux
    small = jax.ShapeDtypeStruct((2, 96, 96, 3), jnp.float32)
    out = jax.eval_shape(lambda v, im: model.apply(v, im), variables, small)  # eval: no auxiliary head
    assert "aux_logits" not in out and out["logits"].shape == (2, 5)
    with pytest.raises(ValueError, match="299"):
        jax.eval_shape(lambda v, im: model.apply(v, im, train=True, mutable=["batch_stats"]), variables, small)
    with pytest.raises(ValueError, match="75"):
        jax.eval_shape(lambda v, im: model.apply(v, im), variables, jax.ShapeDtypeStruct((1, 74, 74, 3), jnp.float32))
    # init at the smallest image still creates the auxiliary head's variables
    fresh = models.create("inception_v3_aux", num_classes=5, head="linear", projection=False)
    init = jax.eval_shape(lambda: fresh.init(jax.random.key(0), jnp.zeros((1, 75, 75, 3)), train=False))
    assert init["params"]["backbone"]["AuxLogits"]["fc"]["kernel"].shape == (768, 5)
    assert "AuxLogits" in init["batch_stats"]["backbone"]


def test_from_stage_reenters(v3):
    net, model, variables, fwd = v3
    x = _nhwc(_images(SIZE, seed=5))
    full = fwd(variables, x)
    again = jax.jit(lambda v, f: model.apply(v, f, "stage4", method=models.Model.from_stage))(
        variables, full["features"]["stage4"])
    np.testing.assert_allclose(np.asarray(again["logits"]), np.asarray(full["logits"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(again["features"]["stage5"]), np.asarray(full["features"]["stage5"]),
                               rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(again["features"]["stage4"]), np.asarray(full["features"]["stage4"]))


def test_bfloat16_forward(v3):
    net, _, variables, fwd = v3
    model = models.create("inception_v3", num_classes=5, head="linear", projection=False, dtype=jnp.bfloat16)
    x = _nhwc(_images(SIZE, seed=6))
    out = jax.jit(lambda v, im: model.apply(v, im))(variables, x)
    assert out["logits"].dtype == jnp.float32 and out["features"]["stage5"].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out["logits"])).all()
    ref_logits = np.asarray(fwd(variables, x)["logits"])
    assert np.abs(np.asarray(out["logits"]) - ref_logits).max() <= 0.1 * max(1.0, np.abs(ref_logits).max())
