"""MONAI 3D ResNet-18/34 state_dicts imported into resnet18_3d / resnet34_3d: same logits and pooled features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax import interop
from lclsc_jax.interop import monai3d
from lclsc_jax.interop.verify import verify_monai
from lclsc_jax.interop.weights import WeightsMismatchError

pytestmark = pytest.mark.torch


def _monai_net(name, seed, **kw):
    """A MONAI 3D ResNet (conv1_t_stride=2) with random BN affine and running statistics, eval mode."""
    torch = pytest.importorskip("torch")
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(seed)
    net = getattr(nets, name)(spatial_dims=3, n_input_channels=1, num_classes=3, conv1_t_stride=2, **kw)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _torch_logits_pooled(net, x_ncdhw):
    """MONAI's own logits, and the avgpool output (the pooled features) from a forward hook."""
    torch = pytest.importorskip("torch")
    got = {}
    h = net.avgpool.register_forward_hook(lambda m, i, o: got.__setitem__("p", o.flatten(1).numpy()))
    with torch.no_grad():
        logits = net(torch.from_numpy(x_ncdhw)).numpy()
    h.remove()
    return logits, got["p"]


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_monai_resnet_import_matches_logits_and_pooled(name):
    net = _monai_net(name, seed=1)
    sd = net.state_dict()  # torch tensors (bias_downsample=True: downsample.0.bias folded on import)
    assert any(k.endswith("downsample.0.bias") for k in sd)
    model, variables = monai3d.monai_state_dict_to_variables(sd, f"{name}_3d")
    assert (model.arch, model.num_classes, model.in_channels, model.projection) == (f"{name}_3d", 3, 1, False)
    x = np.random.default_rng(0).normal(size=(2, 1, 32, 32, 32)).astype(np.float32)
    ref_logits, ref_pooled = _torch_logits_pooled(net, x)
    with jax.default_matmul_precision("float32"):
        out = jax.jit(lambda v, im: model.apply(v, im, train=False))(
            variables, jnp.asarray(np.transpose(x, (0, 2, 3, 4, 1))))
    assert np.max(np.abs(np.asarray(out["logits"]) - ref_logits)) <= 1e-4
    assert np.max(np.abs(np.asarray(out["pooled"]) - ref_pooled)) <= 1e-4


def test_numpy_state_dict_without_downsample_bias_and_verify_report():
    net = _monai_net("resnet18", seed=2, bias_downsample=False)
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    assert not any(k.endswith("downsample.0.bias") for k in sd)
    report = interop.verify(sd, "resnet18_3d", image_size=32, batch_size=2)
    assert report.passed, report.format()
    names = {d.name for d in report.diffs}
    assert {"features/stem", "features/stage4", "pooled", "logits"} <= names
    assert max(d.max_abs for d in report.diffs if d.name == "logits") <= 1e-4
    # No weights: a random MONAI model with randomised BN statistics (what `lclsc verify` runs without a file).
    rand = verify_monai("resnet18_3d", None, in_channels=2, num_classes=4, image_size=16, batch_size=1)
    assert rand.passed, rand.format()
    assert next(d for d in rand.diffs if d.name == "logits").shape == (1, 4)


def test_unsupported_layouts_are_clear_errors():
    net = _monai_net("resnet18", seed=3)
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="conv1_t_stride=1"):
        monai3d.monai_state_dict_to_variables(sd, conv1_t_stride=1)
    with pytest.raises(ValueError, match="no_max_pool"):
        monai3d.monai_state_dict_to_variables(sd, no_max_pool=True)
    no_ds = {k: v for k, v in sd.items() if ".downsample." not in k}  # shortcut_type "A": no downsample weights
    with pytest.raises(WeightsMismatchError, match=r"layer2\.0\.downsample\.0\.weight.*shortcut_type='A'"):
        monai3d.monai_state_dict_to_variables(no_ds)
    bad = dict(sd, **{"layer3.1.conv2.weight": np.zeros((256, 256, 3, 3, 1), np.float32)})
    with pytest.raises(WeightsMismatchError, match=r"'layer3\.1\.conv2\.weight' has shape"):
        monai3d.monai_state_dict_to_variables(bad)
    with pytest.raises(WeightsMismatchError, match="conv1_t_size"):
        monai3d.monai_state_dict_to_variables(dict(sd, **{"conv1.weight": np.zeros((64, 1, 3, 3, 3), np.float32)}))
    with pytest.raises(WeightsMismatchError, match=r"missing \[.*layer3\.2"):
        monai3d.monai_state_dict_to_variables(sd, "resnet34_3d")


def test_export_of_resnet18_3d_loads_into_monai_and_back():
    """Our variables -> torch-named state_dict (OIDHW kernels) -> MONAI strict load: same logits; and back."""
    torch = pytest.importorskip("torch")
    nets = pytest.importorskip("monai.networks.nets")
    net = _monai_net("resnet18", seed=4)
    model, variables = monai3d.monai_state_dict_to_variables(net.state_dict())
    sd = interop.variables_to_state_dict(variables, "resnet18_3d")
    assert sd["conv1.weight"].shape == (64, 1, 7, 7, 7)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1, 1)
    ref = nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=3, conv1_t_stride=2, bias_downsample=False)
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    x = np.random.default_rng(5).normal(size=(1, 1, 24, 24, 24)).astype(np.float32)
    logits_exported, _ = _torch_logits_pooled(ref.eval(), x)
    logits_orig, _ = _torch_logits_pooled(net, x)  # the downsample bias, folded into BN, gives the same function
    np.testing.assert_allclose(logits_exported, logits_orig, rtol=1e-4, atol=1e-5)
    model2, variables2 = interop.load_torch_model(sd, "resnet18_3d")
    assert model2.arch == "resnet18_3d" and model2.in_channels == 1
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(variables2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
