"""ONNX export (interop.onnx_export, lclsc export): ONNX Runtime against JAX on the same inputs."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from lclsc_jax import cli, models  # noqa: E402
from lclsc_jax.interop.onnx_export import UnsupportedPrimitiveError, jax_to_onnx  # noqa: E402
from lclsc_jax.protocols import runs  # noqa: E402
from lclsc_jax.train import config as C  # noqa: E402
from lclsc_jax.train import loop  # noqa: E402


def _run_onnx(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))


def test_primitives_against_jax():
    # One function through most of the translation table: reflect padding (slices, rev, concatenate), a
    # dilated grouped convolution, max pooling, dot_general with a batch dimension, reductions, argmax,
    # comparisons, select, clamp, integer powers, casts, iota.
    rng = np.random.default_rng(0)
    k = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    w = rng.normal(size=(4, 5)).astype(np.float32)

    def fn(x):
        y = jnp.pad(x, ((0, 0), (2, 2), (1, 1), (0, 0)), mode="reflect")
        y = jax.lax.conv_general_dilated(y, k, (1, 2), ((1, 1), (0, 2)), rhs_dilation=(2, 1),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
        y = jax.nn.relu(y) + 0.1 * jnp.tanh(y) ** 3
        y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                  ((0, 0), (1, 1), (1, 1), (0, 0)))
        z = jnp.einsum("bhwc,cd->bhd", y, w)
        s = jax.nn.softmax(z.mean(axis=1), axis=-1)
        cls = jnp.argmax(s, axis=-1)
        m = jnp.where(s > 0.2, jnp.clip(s, 0.25, 0.5), jnp.sqrt(s) * jax.lax.rsqrt(s + 1.0))
        idx = jnp.arange(5)[None, :] * (cls[:, None] + 1)
        return {"a": m, "b": cls, "c": (idx.astype(jnp.float32) / 3.0).astype(jnp.int32),
                "d": x[:, ::2, 1:, :].sum((1, 2))}

    x = rng.normal(size=(2, 9, 8, 4)).astype(np.float32)
    got = _run_onnx(jax_to_onnx(fn, x), x)
    want = jax.jit(fn)(x)
    assert sorted(got) == ["a", "b", "c", "d"]
    for name in got:
        np.testing.assert_allclose(got[name], np.asarray(want[name]), rtol=1e-5, atol=1e-5, err_msg=name)
        assert got[name].dtype == np.asarray(want[name]).dtype


def test_average_pooling_and_exact_gelu_against_jax():
    # DenseNet's / InceptionV3's average pools (reduce_window_sum, padding counted, odd sizes) and the
    # exact GELU of ViT / ConvNeXt (erfc).
    def fn(x):
        a = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 2, 1, 1), ((0, 0), (1, 1), (0, 2), (0, 0)))
        return {"a": a / 9.0, "g": jax.nn.gelu(x, approximate=False), "e": jax.lax.erfc(x)}

    x = np.random.default_rng(1).normal(size=(2, 7, 6, 3)).astype(np.float32)
    got, want = _run_onnx(jax_to_onnx(fn, x), x), jax.jit(fn)(x)
    for name in ("a", "g", "e"):
        np.testing.assert_allclose(got[name], np.asarray(want[name]), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("arch, padding", [("tiny", "reflect"), ("resnet18", "zeros")])
def test_models_with_both_heads(arch, padding):
    m = models.create(arch, 3, head="linear" if arch == "resnet18" else "gei", in_channels=1, embed_dim=8,
                      padding=padding)
    v = m.init(jax.random.key(0), jnp.zeros((1, 40, 40, 1)))
    rng = np.random.default_rng(1)
    v = jax.tree_util.tree_map(lambda a: a + 0.05 * rng.normal(size=a.shape).astype(a.dtype), v)  # non-trivial BN

    def fn(x):
        out = m.apply(v, x)
        return {"logits": out.get("logits", out["embedding"]), "local": out["local_embedding"]}

    x = rng.normal(size=(2, 40, 40, 1)).astype(np.float32)
    got = _run_onnx(jax_to_onnx(fn, x), x)
    want = jax.jit(fn)(x)
    for name in got:
        assert np.abs(got[name] - np.asarray(want[name])).max() <= 1e-4 * max(1.0, np.abs(want[name]).max()), name


def test_unsupported_primitive_is_named():
    with pytest.raises(UnsupportedPrimitiveError, match="'sort'"):
        jax_to_onnx(lambda x: jnp.sort(x, axis=-1), np.zeros((2, 3), np.float32))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = C.load("tiny", {"data.cache_dir": str(root / "cache"), "train.steps": 6, "train.eval_every": 6,
                          "train.checkpoint_every": 6})
    loop.train(cfg, str(root / "run"), progress=False)
    return str(root / "run")


def test_cli_export_onnx_checks_against_jax(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "model.onnx")
    assert cli.main(["export", "--workdir", tiny_run, "--out", out, "--batch-size", "4", "--check"]) == 0
    printed = capsys.readouterr().out
    assert "ONNX Runtime vs JAX" in printed and "same predictions: True" in printed
    # Independent of --check: raw uint8 test frames through ONNX Runtime vs runs.predict.
    run = runs.load_run(tiny_run)
    ds = loop.load_dataset(run.cfg)
    test_idx = json.load(open(os.path.join(tiny_run, "splits.json")))["indices"]["test"][:4]
    frames = np.stack([ds.source[int(i)]["image"] for i in test_idx]).astype(np.uint8)
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [4, *frames.shape[1:]] and sess.get_inputs()[0].type == "tensor(uint8)"
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": frames})))
    np.testing.assert_allclose(got["probs"], runs.predict(run, frames)["probs"], atol=1e-5)


def test_cli_export_safetensors_with_metadata(tiny_run, tmp_path):
    from lclsc_jax import interop

    out = str(tmp_path / "w.safetensors")
    assert cli.main(["export", "--workdir", tiny_run, "--format", "safetensors", "--out", out]) == 0
    meta = json.load(open(out + ".json"))
    run = runs.load_run(tiny_run)
    assert meta["class_names"] == list(run.class_names) and meta["head"] == "gei"
    np.testing.assert_allclose(np.asarray(meta["global_emb"]), np.asarray(run.global_emb), rtol=1e-6)
    back = interop.load_torch_weights(out, run.cfg.model.arch)  # the weights round-trip
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(jax.device_get(run.variables))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("argv, match", [
    (["--format", "safetensors", "--out", "w.onnx"], "writes a .safetensors file"),
    (["--out", "m.onnx", "--batch-size", "0"], "batch_size must be >= 1"),
])
def test_cli_export_bad_input(tiny_run, tmp_path, capsys, argv, match):
    argv = [a if not a.endswith((".onnx", ".safetensors")) else str(tmp_path / a) for a in argv]
    assert cli.main(["export", "--workdir", tiny_run, *argv]) != 0
    err = capsys.readouterr().err
    assert err.startswith("lclsc export: error:") and match in err
