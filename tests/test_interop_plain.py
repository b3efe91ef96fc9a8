"""Plain torchvision/timm classifiers (only ``fc``, no projection head ``head.*``), issue 13.

Such a file must give a plain classifier model (``projection=False``) that ``model.apply``,
``explain.saliency`` and ``lclsc explain --torch-weights`` run, checked against the same weights
in PyTorch (``lclsc_jax.interop.torch_reference``); variables that do not fit a model raise one
``models.VariablesMismatchError`` naming the leaves.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax import cli, explain, interop, models
from lclsc_jax.interop import torch_reference

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

import torch_helpers  # noqa: E402 - tests/ helper (needs torch): imported plainly

ARCH = "resnet18"
K = 3  # classes of the fc layer
SIZE = 64  # small images keep the test fast (stage4 is 2x2)
# ImageNet statistics written out here (not imported), so a wrong constant in the library fails.
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(torch net, saved .pth path, state_dict, model, variables, images NHWC, torch logits)."""
    torch.manual_seed(0)
    net = torch_reference.torch_resnet(ARCH, num_classes=K)  # torchvision layout: fc only
    torch_reference.randomize_batch_norm(net, 0)
    net.eval()
    path = tmp_path_factory.mktemp("plain") / "resnet18_fc_only.pth"
    torch.save(net.state_dict(), path)
    sd = interop.read_state_dict(path)
    assert not any(k.startswith("head.") for k in sd) and "fc.weight" in sd
    # Exactly as docs/interop.md documents it.
    variables = interop.load_torch_weights(path, ARCH)
    model = models.create(ARCH, **interop.model_config_from_state_dict(sd, ARCH))
    x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    return net, path, sd, model, variables, x, ref["logits"].numpy()


@pytest.fixture(scope="module")
def jax_out(plain):
    _, _, _, model, variables, x, _ = plain
    return jax.jit(lambda v, im: model.apply(v, im, train=False))(variables, jnp.asarray(x))


def _reference_gradcam(net, x_nhwc: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's Grad-CAM of ``net``'s logits at layer4: ``(B, H, W)`` in [0, 1] (skips without it)."""
    grad_cam = torch_helpers.import_pytorch_grad_cam()
    cam = grad_cam.pgc.GradCAM(model=torch_helpers.Logits(net).eval(), target_layers=[net.layer4])
    return cam(input_tensor=torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()),
               targets=[grad_cam.ClassifierOutputTarget(int(t)) for t in targets])


# ------------------------------------------------------------------ the plain model


def test_config_is_a_plain_classifier(plain):
    _, _, sd, model, variables, _, _ = plain
    cfg = interop.model_config_from_state_dict(sd, ARCH)
    assert cfg == {"in_channels": 3, "head": "linear", "num_classes": K, "projection": False}
    assert model.projection is False and model.head_type == "linear"
    assert "head" not in variables["params"] and "fc" in variables["params"]
    models.check_variables(model, variables)  # no error: the tree is exactly the model's


def test_logits_match_torch(plain, jax_out):
    _, _, _, _, _, x, ref_logits = plain
    assert jax_out["logits"].shape == (2, K)
    assert float(np.max(np.abs(np.asarray(jax_out["logits"]) - ref_logits))) <= 1e-4
    # The embedding of a plain classifier is the pooled backbone features (float32).
    np.testing.assert_array_equal(np.asarray(jax_out["embedding"]), np.asarray(jax_out["pooled"]))
    assert jax_out["local_embedding"].shape == (2, 2, 2, 512) and jax_out["local_embedding"].dtype == jnp.float32


def test_load_torch_model_gives_the_same_pair(plain, jax_out):
    _, path, _, model, variables, x, _ = plain
    model2, variables2 = interop.load_torch_model(path, ARCH)
    assert model2 == model
    assert jax.tree_util.tree_structure(variables2) == jax.tree_util.tree_structure(variables)


def test_gradcam_matches_pytorch_grad_cam(plain, jax_out):
    net, _, _, model, variables, x, ref_logits = plain
    targets = ref_logits.argmax(-1)
    ours = np.asarray(explain.saliency("gradcam", model, variables, jnp.asarray(x), jnp.asarray(targets)))
    assert ours.shape == (2, SIZE, SIZE) and np.isfinite(ours).all()
    ref = _reference_gradcam(net, x, targets)
    np.testing.assert_allclose(ours, ref, atol=1e-4)  # measured: ~1e-6


@pytest.mark.parametrize("method, stage, kw", [
    ("ablationcam", "last", {}),  # re-runs the network from stage4 (from_stage)
    ("crm", "last", {}),  # from_stage, every location zeroed
    ("scorecam", "stage1", {"chunk_size": 64}),  # full forwards of masked images
    ("gradcam", "last", {"target_embedding": "pooled"}),  # the embedding (= pooled features) as target
], ids=["ablationcam", "crm", "scorecam", "embedding-target"])
def test_other_methods_run_on_the_plain_model(plain, jax_out, method, stage, kw):
    _, _, _, model, variables, x, _ = plain
    kw = dict(kw)
    if kw.get("target_embedding") == "pooled":  # similarity to the other image's embedding
        kw["target_embedding"] = jnp.asarray(jax_out["embedding"])[::-1]
    m = np.asarray(explain.saliency(method, model, variables, jnp.asarray(x[:1]), None, stage,
                                    **{k: (v[:1] if k == "target_embedding" else v) for k, v in kw.items()}))
    assert m.shape == (1, SIZE, SIZE) and np.isfinite(m).all()
    assert m.min() >= 0 and m.max() <= 1 and m.max() > 0  # a normalised, non-empty map


def test_sc_on_a_plain_model_is_a_clear_error(plain):
    _, _, _, model, variables, x, _ = plain
    g = np.ones((K, 512), np.float32)
    with pytest.raises(ValueError, match="'sc' needs a model with a projection head.*projection=False"):
        explain.saliency("sc", model, variables, jnp.asarray(x), global_emb=g)


def test_verify_compares_the_plain_model(plain):
    _, path, _, _, _, _, _ = plain
    report = interop.verify(path, ARCH, batch_size=1, image_size=SIZE)
    names = {d.name for d in report.diffs}
    assert report.passed and {"logits", "pooled", "features/stage4"} <= names
    assert "embedding" not in names  # nothing was added to the file's model


# ------------------------------------------------------------------ the CLI


def _lclsc(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, like a user's laptop
    return subprocess.run([sys.executable, "-m", "lclsc_jax.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
def test_cli_explain_with_torch_weights(plain, tmp_path):
    from PIL import Image
    from skimage import data as skdata

    from lclsc_jax import data

    net, path, _, model, variables, _, _ = plain
    png = tmp_path / "camera.png"
    Image.fromarray(skdata.camera()[100:228, 180:308]).save(png)  # a real grayscale photo crop
    out = tmp_path / "maps"
    r = _lclsc("explain", "--torch-weights", str(path), "--arch", ARCH, "--classes", "a,b,c",
               "--image-size", str(SIZE), "--method", "gradcam", str(png), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    m = np.load(out / "camera_gradcam.npy")
    assert m.shape == (SIZE, SIZE) and np.isfinite(m).all() and 0 <= m.min() and m.max() <= 1
    assert (out / "camera_gradcam.png").stat().st_size > 1000
    # The same image, ImageNet-normalised here from the written-out constants, through PyTorch.
    u8 = data.load_image_file(png, SIZE, 3)[None]
    x = (u8.astype(np.float32) / 255.0 - MEAN) / STD
    with torch.no_grad():
        target = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))["logits"].numpy().argmax(-1)
    try:
        ref = _reference_gradcam(net, x, target)[0]
    except pytest.skip.Exception:  # no pytorch-grad-cam: our own (parity-tested) Grad-CAM
        ref = np.asarray(explain.saliency("gradcam", model, variables, jnp.asarray(x), jnp.asarray(target)))[0]
    np.testing.assert_allclose(m, ref, atol=1e-4)


def test_cli_explain_argument_errors(plain, tmp_path, capsys):
    _, path, _, _, _, _, _ = plain
    img = str(tmp_path / "none.png")
    base = ["explain", "--torch-weights", str(path), "--out", str(tmp_path / "o"), img]
    assert cli.main(base) == 2 and "--torch-weights needs --arch" in capsys.readouterr().err
    assert cli.main(base + ["--arch", ARCH, "--classes", "a,b"]) == 2
    assert "--classes names 2 classes" in capsys.readouterr().err
    assert cli.main(base + ["--arch", ARCH]) == 2 and "none.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --workdir and --torch-weights are mutually exclusive
        cli.main(base + ["--workdir", str(tmp_path)])
    assert "not allowed with" in capsys.readouterr().err


# ------------------------------------------------------------------ mismatched variables


def test_mismatched_variables_name_missing_and_unexpected_keys(plain, tmp_path):
    _, _, _, model, variables, x, _ = plain
    with_head = models.create(ARCH, K, head="linear")  # projection=True: expects params/head/*
    bad = jax.tree_util.tree_map(lambda a: a, variables)  # a copy of the plain variables
    bad["params"]["extra"] = {"kernel": jnp.zeros((2, 2))}
    bad["params"]["fc"]["kernel"] = jnp.zeros((512, K + 1))
    with pytest.raises(models.VariablesMismatchError) as e:
        models.check_variables(with_head, bad)
    msg = str(e.value)
    assert "params/head/hidden/kernel" in msg and "params/head/proj/bias" in msg  # missing
    assert "params/extra/kernel" in msg  # unexpected
    assert f"params/fc/kernel (given (512, {K + 1}), expected (512, {K}))" in msg  # mis-shaped
    assert "projection=False" in msg  # the hint
    assert "params/head/hidden/kernel" in e.value.missing and e.value.unexpected == ("params/extra/kernel",)
    # Every entry point that applies external variables reports it the same way (no Flax scope error).
    with pytest.raises(models.VariablesMismatchError, match="params/head/hidden/kernel"):
        explain.saliency("gradcam", with_head, variables, jnp.asarray(x))
    with pytest.raises(models.VariablesMismatchError, match="params/extra/kernel"):
        explain.write_explanations(model, bad, x, ["a", "b"], str(tmp_path), "gradcam")
    with pytest.raises(models.VariablesMismatchError, match="params/head"):
        interop.load_torch_model(plain[1], ARCH, projection=True)


def test_state_dict_with_projection_head_loads_as_before():
    torch.manual_seed(1)
    net = torch_reference.torch_resnet(ARCH, num_classes=K, embed_dim=16, head_hidden=32)
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    cfg = interop.model_config_from_state_dict(sd, ARCH)
    assert cfg == {"in_channels": 3, "head": "linear", "num_classes": K, "projection": True,
                   "embed_dim": 16, "head_hidden": 32}
    model, variables = interop.load_torch_model(sd, ARCH)
    assert model.projection and model.embedding_dim == 16
    np.testing.assert_array_equal(variables["params"]["head"]["proj"]["bias"], sd["head.2.bias"])
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, SIZE, SIZE, 3)), train=False), variables)
    assert out["embedding"].shape == (1, 16) and out["logits"].shape == (1, K)
    # A backbone-only file (neither fc nor head) gives a feature extractor: embedding = pooled.
    backbone = {k: v for k, v in sd.items() if not k.startswith(("fc.", "head."))}
    bmodel, bvars = interop.load_torch_model(backbone, ARCH)
    assert (bmodel.head_type, bmodel.projection) == ("gei", False)
    out = jax.eval_shape(lambda v: bmodel.apply(v, jnp.zeros((1, SIZE, SIZE, 3)), train=False), bvars)
    assert out["embedding"].shape == (1, 512) and "logits" not in out


def test_imagenet_normalize_is_torchvision_normalize():
    u8 = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    want = (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0 - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    np.testing.assert_allclose(interop.imagenet_normalize(u8), want.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="RGB"):
        interop.imagenet_normalize(u8[..., :1])
