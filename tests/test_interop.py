"""Interop: torchvision-named weights <-> Flax, parity against an independent PyTorch ResNet.

The PyTorch side is lclsc_jax.interop.torch_reference (plain torch.nn, torchvision keys), with
random weights and non-trivial batch-norm statistics.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax import interop, models
from lclsc_jax.interop import torch_reference

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref|."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


# ------------------------------------------------------------------ parity with PyTorch


@pytest.fixture(scope="module")
def saved_reference(tmp_path_factory):
    """Factory: arch -> (path of a saved torch state_dict, the torch net); built once per arch."""
    torch = pytest.importorskip("torch")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            torch.manual_seed(0)
            net = torch_reference.torch_resnet(arch, num_classes=7, embed_dim=16)
            torch_reference.randomize_batch_norm(net, seed=1)
            net.eval()
            path = tmp_path_factory.mktemp(arch) / "weights.pt"
            torch.save(net.state_dict(), path)
            cache[arch] = (path, net)
        return cache[arch]

    return get


@pytest.fixture(scope="module", params=[("resnet18", (2, 65, 63)), ("resnet50", (2, 64, 64))], ids=["resnet18", "resnet50"])
def parity_case(request, saved_reference):
    torch = pytest.importorskip("torch")
    arch, (b, h, w) = request.param
    path, net = saved_reference(arch)
    x = np.random.default_rng(0).standard_normal((b, h, w, 3)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    ref = {
        "features": {k: v.numpy().transpose(0, 2, 3, 1) for k, v in ref["features"].items()},
        **{k: v.numpy() for k, v in ref.items() if k != "features"},
    }
    variables = interop.load_torch_weights(path, arch)
    model = models.create(arch, num_classes=7, head="linear", embed_dim=16)
    out = jax.jit(lambda v, im: model.apply(v, im, train=False))(variables, jnp.asarray(x))
    return arch, net, ref, out


@pytest.mark.torch
def test_logits_and_heads_match_torch(parity_case):
    _, _, ref, out = parity_case
    for key in ("logits", "pooled", "embedding"):
        assert out[key].shape == ref[key].shape
        assert rel_err(out[key], ref[key]) <= 1e-4, key


@pytest.mark.torch
def test_every_stage_matches_torch(parity_case):
    _, _, ref, out = parity_case
    assert set(ref["features"]) == set(out["features"])
    for stage, r in ref["features"].items():
        assert out["features"][stage].shape == r.shape, stage
        assert rel_err(out["features"][stage], r) <= 1e-4, stage


@pytest.mark.torch
def test_state_dict_keys_are_torchvision(parity_case):
    """Spot-check the reference uses torchvision's names (so real torchvision files load)."""
    arch, net, _, _ = parity_case
    keys = set(net.state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "bn1.num_batches_tracked", "layer2.0.downsample.0.weight",
              "layer2.0.downsample.1.running_var", "layer4.1.conv2.weight", "fc.weight", "fc.bias",
              "head.0.weight", "head.2.bias"):
        assert k in keys, k
    assert ("layer1.0.conv3.weight" in keys) == (arch == "resnet50")


@pytest.mark.torch
def test_verify_report(saved_reference):
    arch = "resnet18"
    path, _ = saved_reference(arch)
    report = interop.verify(path, arch, batch_size=2, image_size=33)
    assert report.passed
    names = {d.name for d in report.diffs}
    assert {"logits", "embedding", "pooled"} <= names
    assert {f"features/{s}" for s in ("stem", "stage1", "stage2", "stage3", "stage4")} <= names
    text = report.format()
    assert "PASS" in text and "features/stage3" in text
    with pytest.raises(ValueError, match="in_channels"):
        interop.verify(path, arch, image_size=33, in_channels=1)


@pytest.mark.torch
def test_export_loads_into_torch_strict(tmp_path, saved_reference):
    torch = pytest.importorskip("torch")
    arch = "resnet18"
    path, net = saved_reference(arch)
    variables = interop.load_torch_weights(path, arch)
    out_path = interop.export_torch_weights(variables, arch, tmp_path / "w.safetensors")
    from safetensors.torch import load_file

    fresh = torch_reference.torch_resnet(arch, num_classes=7, embed_dim=16)
    fresh.load_state_dict(load_file(str(out_path)), strict=True)  # names, shapes, dtypes all accepted
    for k, v in net.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(fresh.state_dict()[k], v), k


# ------------------------------------------------------------------ round trips (no torch needed)


def random_state_dict(arch: str, num_classes: int = 5, embed_dim: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """A torchvision-named state_dict with random float32 tensors, built from shapes alone."""
    model = models.create(arch, num_classes, head="linear", embed_dim=embed_dim)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    sd = interop.variables_to_state_dict(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract))
    rng = np.random.default_rng(seed)
    return {
        k: (v if v.dtype == np.int64 else rng.standard_normal(v.shape).astype(np.float32)) for k, v in sd.items()
    }


@pytest.mark.parametrize("arch", ["tiny", "resnet18"])
def test_export_then_import_is_bit_exact(tmp_path, arch):
    model = models.create(arch, num_classes=3, head="linear", embed_dim=8)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), abstract)
    path = interop.export_torch_weights(variables, arch, tmp_path / "v.safetensors")
    back = interop.load_torch_weights(path, arch)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(variables)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(back)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_import_then_export_is_bit_exact(tmp_path):
    sd = random_state_dict("resnet50")
    src = tmp_path / "in.safetensors"
    safetensors_numpy.save_file(sd, str(src))
    out = interop.export_torch_weights(interop.load_torch_weights(src, "resnet50"), "resnet50", tmp_path / "out.safetensors")
    back = safetensors_numpy.load_file(str(out))
    assert set(back) == set(sd)
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            assert back[k].dtype == np.int64 and back[k].shape == ()
        else:
            assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k


def test_layout_conversion_against_explicit_indices():
    """conv OIHW -> HWIO and Linear (out, in) -> (in, out), checked element by element."""
    sd = random_state_dict("resnet18", num_classes=4)
    v = interop.load_torch_weights(sd, "resnet18")
    w = sd["layer3.0.conv1.weight"]  # (O, I, H, W)
    k = np.asarray(v["params"]["layer3_0"]["conv1"]["kernel"])  # (H, W, I, O)
    o, i, y, x = 5, 7, 2, 1
    assert k[y, x, i, o] == w[o, i, y, x]
    assert np.asarray(v["params"]["fc"]["kernel"])[10, 3] == sd["fc.weight"][3, 10]
    np.testing.assert_array_equal(v["batch_stats"]["layer2_0"]["downsample_bn"]["var"], sd["layer2.0.downsample.1.running_var"])
    np.testing.assert_array_equal(v["params"]["bn1"]["scale"], sd["bn1.weight"])
    np.testing.assert_array_equal(v["params"]["head"]["proj"]["bias"], sd["head.2.bias"])


def test_optional_heads_are_omitted_when_absent():
    sd = {k: v for k, v in random_state_dict("resnet18").items() if not k.startswith(("fc.", "head."))}
    v = interop.load_torch_weights(sd, "resnet18")
    assert "fc" not in v["params"] and "head" not in v["params"]
    assert "layer4_1" in v["params"]
    # The documented model is exactly the one these variables fill (no projection head, no fc).
    cfg = interop.model_config_from_state_dict(sd, "resnet18")
    assert cfg["projection"] is False and cfg["head"] == "gei"
    models.check_variables(models.create("resnet18", **cfg), v)


def test_fc_only_file_gives_a_plain_classifier():
    """torchvision/timm layout (fc, no head.*): the documented recipe builds a model that runs."""
    sd = {k: v for k, v in random_state_dict("resnet18", num_classes=6).items() if not k.startswith("head.")}
    cfg = interop.model_config_from_state_dict(sd, "resnet18")
    assert cfg == {"in_channels": 3, "head": "linear", "num_classes": 6, "projection": False}
    model = models.create("resnet18", **cfg)
    v = interop.load_torch_weights(sd, "resnet18")
    models.check_variables(model, v)
    out = jax.eval_shape(lambda vv: model.apply(vv, jnp.zeros((1, 40, 40, 3)), train=False), v)
    assert out["logits"].shape == (1, 6) and out["embedding"].shape == (1, 512)
    with pytest.raises(models.VariablesMismatchError, match="params/head/hidden/kernel"):
        models.check_variables(models.create("resnet18", 6, head="linear"), v)  # the old, head-ful model


def test_incomplete_projection_head_is_reported_by_name():
    sd = random_state_dict("resnet18")
    del sd["head.2.weight"]
    with pytest.raises(interop.WeightsMismatchError, match="head.2.weight"):
        interop.load_torch_weights(sd, "resnet18")


# ------------------------------------------------------------------ errors


def test_mismatches_are_reported_all_at_once():
    sd = random_state_dict("resnet18")
    del sd["layer2.1.bn2.running_var"]
    del sd["layer4.0.conv1.weight"]
    sd["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    sd["layer1.0.conv2.weight"] = np.zeros((64, 64, 5, 5), np.float32)
    with pytest.raises(interop.WeightsMismatchError) as e:
        interop.load_torch_weights(sd, "resnet18")
    msg = str(e.value)
    for name in ("layer2.1.bn2.running_var", "layer4.0.conv1.weight", "layer5.0.conv1.weight", "layer1.0.conv2.weight"):
        assert name in msg, name
    assert "(64, 64, 5, 5)" in msg and "(64, 64, 3, 3)" in msg

    with pytest.warns(UserWarning, match="layer5.0.conv1.weight"):
        v = interop.load_torch_weights(sd, "resnet18", strict=False)
    assert "conv2" not in v["params"]["layer1_0"]  # mis-shaped: skipped
    assert "conv1" not in v["params"]["layer4_0"]  # missing: left out
    np.testing.assert_array_equal(v["params"]["layer1_0"]["conv1"]["kernel"], sd["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))


def test_wrong_arch_is_reported():
    sd = random_state_dict("resnet18")
    with pytest.raises(interop.WeightsMismatchError, match="layer1.0.conv3.weight"):
        interop.load_torch_weights(sd, "resnet50")


def test_unsupported_suffix_and_missing_file(tmp_path):
    p = tmp_path / "w.npz"
    p.write_bytes(b"0")
    with pytest.raises(ValueError, match="unsupported weights format"):
        interop.load_torch_weights(p, "resnet18")
    with pytest.raises(FileNotFoundError):
        interop.load_torch_weights(tmp_path / "nope.pt", "resnet18")


class _Payload:
    """Unpickling this object would create ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.torch
def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    torch = pytest.importorskip("torch")
    for i, save in enumerate(("torch", "pickle")):
        marker = tmp_path / f"marker{i}"
        path = tmp_path / f"evil{i}.pt"
        payload = {"conv1.weight": torch.zeros(64, 3, 7, 7), "evil": _Payload(marker)}
        if save == "torch":
            torch.save(payload, path)
        else:
            with open(path, "wb") as f:
                pickle.dump(payload, f, protocol=2)
        with pytest.raises(interop.UnsafeCheckpointError, match="refusing to load"):
            interop.load_torch_weights(path, "resnet18")
        assert not marker.exists()
    # Sanity check of the test itself: plain unpickling *does* run the payload.
    with open(tmp_path / "evil1.pt", "rb") as f:
        pickle.load(f)
    assert (tmp_path / "marker1").exists()


@pytest.mark.torch
def test_checkpoint_containers_are_unwrapped(tmp_path):
    torch = pytest.importorskip("torch")
    sd = random_state_dict("resnet18")
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    v = interop.load_torch_weights(tmp_path / "ckpt.pth", "resnet18")
    np.testing.assert_array_equal(v["params"]["fc"]["bias"], sd["fc.bias"])


# ------------------------------------------------------------------ init_backbone_from


def test_init_backbone_from_keeps_heads(tmp_path):
    sd = random_state_dict("resnet18", num_classes=1000)
    path = tmp_path / "tv.safetensors"
    safetensors_numpy.save_file(sd, str(path))
    model = models.create("resnet18", num_classes=2, head="linear", embed_dim=32)
    init = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    init = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.5, s.dtype), init)
    new, report = interop.init_backbone_from(init, path, "resnet18", return_report=True)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(init)
    np.testing.assert_array_equal(new["params"]["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(new["batch_stats"]["layer3_1"]["bn2"]["mean"], sd["layer3.1.bn2.running_mean"])
    for group in ("fc", "head"):
        for leaf in jax.tree_util.tree_leaves(new["params"][group]):
            assert np.all(np.asarray(leaf) == 0.5)
    assert "fc.weight" in report.skipped and "head.0.weight" in report.skipped
    assert report.ok and "layer4.1.bn2.weight" in report.loaded

    gray = models.create("resnet18", num_classes=2, in_channels=1)
    init_gray = jax.eval_shape(lambda: gray.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False))
    init_gray = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), init_gray)
    with pytest.raises(interop.WeightsMismatchError, match="conv1.weight"):
        interop.init_backbone_from(init_gray, path, "resnet18")
    with pytest.warns(UserWarning, match="conv1.weight"):
        new_gray = interop.init_backbone_from(init_gray, path, "resnet18", strict=False)
    assert np.all(np.asarray(new_gray["params"]["conv1"]["kernel"]) == 0)  # kept
    np.testing.assert_array_equal(new_gray["params"]["layer1_0"]["conv1"]["kernel"], sd["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))
