"""The backbone registry as a whole: every arch's stages, names and front doors, without running a network.

Shapes come from ``jax.eval_shape`` (nothing computed); the torch names are checked against the
reference model's own ``state_dict`` (timm, or the project's torch module), so a renamed module on
either side fails here before any parity test runs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax import cli, interop, models


def _shapes(arch: str, size: int, **kw):
    model = models.create(arch, 3, head="linear", embed_dim=16, **kw)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
    out = jax.eval_shape(lambda v, im: model.apply(v, im, train=False), variables, x)
    return model, variables, out


@pytest.mark.parametrize("arch", list(models.BACKBONES))
def test_stage_shapes_follow_the_spec(arch):
    spec = models.BACKBONES[arch]
    size = max(spec.min_image_size, 64)
    model, _, out = _shapes(arch, size)
    assert set(out["features"]) == set(spec.stage_names) and model.stage_names == spec.stage_names
    for stage, c, s in zip(spec.stage_names, spec.stage_channels, spec.stage_strides):
        b, h, w, ch = out["features"][stage].shape
        assert ch == c, (stage, ch, c)
        # every stage's grid is the image over its stride, up to the pixels unpadded convs lose (InceptionV3: 3.75)
        assert abs(h - size / s) <= 4 and h >= 1, (stage, h, size, s)
    assert out["pooled"].shape == (2, spec.stage_channels[-1]) or out["pooled"].shape[0] == 2
    assert out["logits"].shape == (2, 3)
    assert out["local_embedding"].shape[:1] == (2,) and out["local_embedding"].shape[-1] == 16


def test_cli_help_names_every_arch():
    named = {a.strip() for part in cli.ARCH_HELP.split(":") for a in part.replace(" or ", ",").split(",")}
    assert set(models.ARCHS) <= {a.strip() for a in named}, set(models.ARCHS) - named


def test_unknown_arch_and_resnet_only_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown arch"):
        models.create("efficientnet_b9", 2)
    arch = next(iter(models.BACKBONES))
    with pytest.raises(ValueError, match="padding"):
        models.create(arch, 2, padding="reflect")
    with pytest.raises(ValueError, match="drop_path_rate"):
        models.create("resnet18", 2, drop_path_rate=0.1)
    with pytest.raises(ValueError, match="drop_path_rate"):
        models.create(arch, 2, drop_path_rate=1.5)


torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def reference_model():
    try:
        from lclsc_jax.interop.timm_reference import reference_model, require_timm

        require_timm()
    except ImportError:
        pytest.skip("timm is not installed")
    return reference_model


@pytest.mark.torch
@pytest.mark.parametrize("arch", list(models.BACKBONES))
def test_flax_names_are_the_references_names(arch, reference_model):
    """variables_to_state_dict of our (abstract) variables has exactly the reference's keys and shapes."""
    net = reference_model(arch, num_classes=3)
    ref = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    cfg = interop.model_config_from_state_dict({k: np.zeros(s, np.float32) for k, s in ref.items()}, arch)
    assert cfg["head"] == "linear" and cfg["num_classes"] == 3 and cfg["projection"] is False
    assert cfg["in_channels"] == 3
    model = models.create(arch, **cfg)
    abstract = models.abstract_variables(model)
    sd = interop.variables_to_state_dict(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract),
                                         arch)
    ours = {k: tuple(np.shape(v)) for k, v in sd.items()}
    assert set(ours) == set(ref), (sorted(set(ref) - set(ours))[:10], sorted(set(ours) - set(ref))[:10])
    assert ours == ref
    assert models.num_params(abstract) == sum(p.numel() for p in net.parameters())
    assert math.isclose(sum(np.prod(s) for k, s in ref.items() if not k.endswith("num_batches_tracked")),
                        sum(x.size for x in jax.tree_util.tree_leaves(abstract)))
