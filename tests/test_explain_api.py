"""explain.saliency as an API: batched/jitted vs single-image paths, stages, normalisation, errors, files."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.transform import resize as sk_resize

from lclsc_jax import explain, models
from lclsc_jax.explain import cam, core
from test_explain_closed_form import AffineCAMNet, H, K, W_IMG, _init

D = 5


@pytest.fixture(scope="module")
def affine():
    model = AffineCAMNet()
    v = _init(model, 11)
    x = jax.random.normal(jax.random.key(12), (2, H, W_IMG, 3))
    g = jax.random.normal(jax.random.key(13), (K, D))
    return model, v, x, g


@pytest.fixture(scope="module")
def tiny():
    model = models.create("tiny", 3, head="gei", embed_dim=8)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    v = model.init(jax.random.key(1), x, train=False)
    g = jax.random.normal(jax.random.key(2), (3, 8))
    return model, v, x, g


SMALL_OPTS = {"scorecam": {"chunk_size": 4}, "occlusion": {"patch_size": 4, "stride": 4},
              "smoothgrad": {"num_samples": 3, "noise_level": 0.0}, "integrated_gradients": {"steps": 4},
              "superpixel": {"segments": np.stack([np.kron(np.arange(16).reshape(4, 4), np.ones((4, 4), int))] * 2)}}


def _small_generator() -> dict:
    """A one-level U-Net with random weights: the perturbation generator's options (its maps need no training here)."""
    from lclsc_jax.models.unet3d import UNet3D

    g = UNet3D(base_width=2, depth=1, blocks_per_level=1, norm_groups=1)
    return {"generator": g, "generator_variables": g.init(jax.random.PRNGKey(0), jnp.zeros((1, H, W_IMG, 3)))}


@pytest.mark.parametrize("method", explain.METHODS)
def test_batched_jit_equals_single_image_eager(affine, method):
    model, v, x, g = affine
    opts = _small_generator() if method == "perturbation_generator" else dict(SMALL_OPTS.get(method, {}))
    batched = np.asarray(explain.saliency(method, model, v, x, None, global_emb=g, **opts))
    assert batched.shape == (2, H, W_IMG) and batched.dtype == np.float32
    assert np.isfinite(batched).all() and batched.min() >= 0 and batched.max() <= 1
    for b in range(2):
        o = dict(opts)
        if "segments" in o:
            o["segments"] = o["segments"][b:b + 1]
        single = np.asarray(explain.saliency(method, model, v, x[b:b + 1], None, global_emb=g, jit=False, **o))
        np.testing.assert_allclose(single[0], batched[b], atol=2e-5)


@pytest.mark.parametrize("method", ["gradcam", "ablationcam", "crm", "fullgrad", "scorecam"])
def test_tiny_model_batched_equals_single(tiny, method):
    model, v, x, g = tiny
    opts = {"chunk_size": 32} if method == "scorecam" else {}
    batched = np.asarray(explain.saliency(method, model, v, x, None, "stage3", global_emb=g, **opts))
    single = np.asarray(explain.saliency(method, model, v, x[1:], None, "stage3", global_emb=g, jit=False, **opts))
    np.testing.assert_allclose(single[0], batched[1], atol=2e-5)


def test_chunk_size_does_not_change_results(tiny):
    model, v, x, g = tiny
    a = explain.saliency("ablationcam", model, v, x, None, "stage3", global_emb=g, normalize=False, chunk_size=2)
    b = explain.saliency("ablationcam", model, v, x, None, "stage3", global_emb=g, normalize=False, chunk_size=500)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_several_stages_are_averaged_after_upsampling(tiny):
    model, v, x, g = tiny
    raws = [np.asarray(explain.saliency("gradcam", model, v, x, None, s, global_emb=g, normalize=False))
            for s in ("stage2", "stage3")]
    # raw maps come back upsampled; recover the feature-resolution maps from the model to redo the pipeline
    feats = model.apply(v, x, train=False)["features"]
    per_stage = []
    for s in ("stage2", "stage3"):
        acts, grads, _ = cam.stage_gradients(model, v, core.make_scorer(model, 2, global_emb=g), x, None, s)
        m = np.maximum(np.asarray(cam.gradient_cam("gradcam", acts, grads)), 0)
        assert m.shape[1:] == feats[s].shape[1:3]
        m = (m - m.min((1, 2), keepdims=True))
        m = m / m.max((1, 2), keepdims=True)
        per_stage.append(np.stack([sk_resize(a, (32, 32), order=1, mode="edge") for a in m]))
    want = np.mean(per_stage, axis=0)
    want = (want - want.min((1, 2), keepdims=True)) / np.ptp(want, axis=(1, 2), keepdims=True)
    got = np.asarray(explain.saliency("gradcam", model, v, x, None, ("stage2", "stage3"), global_emb=g))
    np.testing.assert_allclose(got, want, atol=1e-5)
    raw_both = np.asarray(explain.saliency("gradcam", model, v, x, None, ["stage2", "stage3"], global_emb=g,
                                           normalize=False))
    np.testing.assert_allclose(raw_both, (raws[0] + raws[1]) / 2, rtol=1e-5, atol=1e-6)


def test_flat_and_negative_maps_normalise_to_zero():
    flat = jnp.full((2, 5, 5), 3.0)
    neg = -jnp.abs(jax.random.normal(jax.random.key(0), (2, 5, 5))) - 0.1
    for m in (flat, neg, jnp.zeros((1, 4, 4))):
        out = explain.normalize_map(m)
        assert not np.isnan(np.asarray(out)).any()
        np.testing.assert_array_equal(np.asarray(out), 0.0)
    out = explain.finish_cams([neg], (10, 10), True)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    # gradient of the normalisation is finite at a flat map
    gr = jax.grad(lambda m: jnp.sum(explain.normalize_map(m) ** 2))(flat)
    assert np.isfinite(np.asarray(gr)).all()


def test_raw_maps_are_differentiable(affine):
    """d/dx of a raw Grad-CAM loss, checked against central finite differences (a smooth model)."""
    model = AffineCAMNet(use_relu=False)
    v = _init(model, 3)
    x = jax.random.normal(jax.random.key(4), (1, H, W_IMG, 3))
    t = jnp.array([1])
    mask = jax.random.uniform(jax.random.key(5), (1, H, W_IMG))

    def loss(xx):
        return jnp.sum(mask * explain.saliency("gradcam", model, v, xx, t, normalize=False) ** 2)

    gr = np.asarray(jax.grad(loss)(x))
    d = np.asarray(jax.random.normal(jax.random.key(6), x.shape))
    eps = 1e-2
    fd = (float(loss(x + eps * d)) - float(loss(x - eps * d))) / (2 * eps)
    np.testing.assert_allclose(np.sum(gr * d), fd, rtol=2e-2)


def test_feature_reductions_serve_3d_maps():
    rs = np.random.RandomState(0)
    acts = rs.rand(2, 3, 4, 5, 6).astype(np.float32)
    grads = rs.randn(2, 3, 4, 5, 6).astype(np.float32)
    got = np.asarray(cam.gradient_cam("gradcam", jnp.asarray(acts), jnp.asarray(grads)))
    np.testing.assert_allclose(got, np.einsum("bdhwc,bc->bdhw", acts, grads.mean((1, 2, 3))), rtol=1e-5)
    ev = np.asarray(cam.eigen_cam(jnp.asarray(acts)))
    assert ev.shape == (2, 3, 4, 5)
    up = np.asarray(explain.resize(jnp.asarray(acts[..., 0]), (6, 8, 10)))
    np.testing.assert_allclose(up, np.stack([sk_resize(a, (6, 8, 10), order=1, mode="edge") for a in acts[..., 0]]),
                               atol=1e-5)


def test_predicted_class_is_explained_by_default(tiny):
    model, v, x, g = tiny
    from lclsc_jax.method import gei_logits

    pred = np.asarray(jnp.argmax(gei_logits(model.apply(v, x, train=False)["embedding"], g), -1))
    a = explain.saliency("gradcam", model, v, x, None, global_emb=g)
    b = explain.saliency("gradcam", model, v, x, pred, global_emb=g)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_clear_errors(tiny, affine):
    model, v, x, g = tiny
    with pytest.raises(ValueError, match="unknown saliency method 'grad-cam'.*gradcam"):
        explain.saliency("grad-cam", model, v, x)
    with pytest.raises(ValueError, match="global_emb"):
        explain.saliency("gradcam", model, v, x)
    with pytest.raises(ValueError, match="targets must be integer class indices of shape \\(2,\\)"):
        explain.saliency("gradcam", model, v, x, jnp.array([0, 1, 2]), global_emb=g)
    with pytest.raises(ValueError, match="unknown stage 'stage9'"):
        explain.saliency("gradcam", model, v, x, stage="stage9", global_emb=g)
    with pytest.raises(TypeError, match="unknown options \\['patch'\\]"):
        explain.saliency("occlusion", model, v, x, global_emb=g, patch=3)
    with pytest.raises(ValueError, match="last stage"):
        explain.saliency("sc", model, v, x, stage="stage2", global_emb=g)
    with pytest.raises(ValueError, match="float model inputs"):
        explain.saliency("gradcam", model, v, np.zeros((2, 32, 32, 3), np.uint8), global_emb=g)
    with pytest.raises(ValueError, match="linear head"):
        explain.saliency("gradcam", model, v, x, score="logits")
    with pytest.raises(ValueError, match="segments must be"):
        explain.saliency("superpixel", model, v, x, global_emb=g, segments=np.zeros((2, 5, 5), int))


@pytest.mark.slow
def test_write_explanations_single_method_and_grid(affine, tmp_path, capfd):
    model, v, x, g = affine
    u8 = (np.random.RandomState(0).rand(2, H, W_IMG, 3) * 255).astype(np.uint8)
    names = ["a/frame1.png", "frame2.tif"]
    paths = explain.write_explanations(model, v, u8, names, str(tmp_path / "one"), "gradcam", "last",
                                       global_emb=g, class_names=["x", "y", "z"])
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        ["frame1_gradcam.npy", "frame1_gradcam.png", "frame2_gradcam.npy", "frame2_gradcam.png"])
    from lclsc_jax.data import normalize_images

    want = np.asarray(explain.saliency("gradcam", model, v, jnp.asarray(normalize_images(u8))))
    np.testing.assert_allclose(np.load(tmp_path / "one" / "frame1_gradcam.npy"), want[0], atol=1e-6)
    paths = explain.write_explanations(model, v, u8[:1], names[:1], str(tmp_path / "all"), "all", "last",
                                       global_emb=g, class_names=["x", "y", "z"],)
    base = {os.path.basename(p) for p in paths}
    assert "frame1_all.png" in base
    # Every method but the perturbation generator, which needs a trained generator (skipped without one).
    assert {f"frame1_{m}.npy" for m in explain.METHODS if m != "perturbation_generator"} <= base
    assert "frame1_perturbation_generator.npy" not in base
    err = capfd.readouterr().err  # "all" is slow: one progress line per method
    assert all(f"/{len(explain.METHODS)} {m} " in err for m in explain.METHODS), err
    with pytest.raises(ValueError, match="unknown method"):
        explain.write_explanations(model, v, u8, names, str(tmp_path), "nope")


def test_maps_of_fibre_bundle_frames_are_restricted_to_the_field_of_view(affine, tmp_path):
    from lclsc_jax.evaluate import shortcuts

    model, v, _, g = affine
    rs = np.random.RandomState(1)
    u8 = (rs.rand(2, H, W_IMG, 3) * 200 + 55).astype(np.uint8)
    disc = shortcuts.inscribed_disc(H, W_IMG)
    u8[:, ~disc] = 0  # a pCLE frame: black outside the circular field of view
    raw = explain.write_explanations(model, v, u8, ["f0.png", "f1.png"], str(tmp_path / "raw"), "gradcam",
                                     global_emb=g, fov=False)
    inside = explain.write_explanations(model, v, u8, ["f0.png", "f1.png"], str(tmp_path / "fov"), "gradcam",
                                        global_emb=g)
    assert len(raw) == len(inside) == 4
    for stem in ("f0", "f1"):
        r = np.load(tmp_path / "raw" / f"{stem}_gradcam.npy")
        m = np.load(tmp_path / "fov" / f"{stem}_gradcam.npy")
        assert (r[~disc] > 0).any()  # the unrestricted map does put weight on the black corners
        assert (m[~disc] == 0).all() and m.max() == pytest.approx(1.0)
        # inside, the same map up to one scale factor (rescaled to its maximum there)
        valid = m > 0
        ratio = m[valid] / r[valid]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
