"""3D archs (tiny3d, resnet18_3d, resnet34_3d) and LCL-SC over voxels, checked against NumPy / PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax import method as M
from lclsc_jax import models
from lclsc_jax.models.layers import conv, global_avg_pool, max_pool_3x3_s2
from lclsc_jax.train import config as C
from lclsc_jax.train import sharding as shd
from lclsc_jax.train import steps as S
from lclsc_jax.train.state import TrainState, create_state, make_optimizer

NC = 3


@pytest.fixture(scope="module")
def tiny3d():
    model = models.create("tiny3d", NC, head="linear", in_channels=1)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x))
    apply = jax.jit(lambda v, im: model.apply(v, im, train=False))
    return model, variables, x, apply(variables, jnp.asarray(x))


def test_specs_and_spatial_ndim():
    for arch in ("tiny3d", "resnet18_3d", "resnet34_3d"):
        assert models.arch_spec(arch).ndim == 3
        assert models.create(arch, 2).spatial_ndim == 3
    for arch in ("tiny", "resnet18"):
        assert models.arch_spec(arch).ndim == 2 and models.create(arch, 2).spatial_ndim == 2
    # The ResNet-3D layout: same widths and blocks as the 2D ResNets (MONAI's resnet18/34).
    assert models.arch_spec("resnet34_3d").blocks == (3, 4, 6, 3)
    assert models.stage_channels("resnet18_3d")["stage4"] == 512


def test_tiny3d_output_dict_shapes_and_strides(tiny3d):
    model, _, x, out = tiny3d
    strides = models.stage_strides("tiny3d")
    for stage, ch in models.stage_channels("tiny3d").items():
        s = 16 // strides[stage]
        assert out["features"][stage].shape == (2, s, s, s, ch), stage
    assert out["pooled"].shape == (2, 128) and out["logits"].shape == (2, NC)
    assert out["embedding"].shape == (2, 128)  # projection head, embed_dim 128
    assert out["local_embedding"].shape == (2, 2, 2, 2, 128)
    # pooled = mean over all three spatial axes (NumPy)
    np.testing.assert_allclose(out["pooled"], np.asarray(out["features"]["stage4"]).mean(axis=(1, 2, 3)),
                               rtol=1e-5, atol=1e-6)


def test_tiny3d_from_stage_resumes_forward(tiny3d):
    model, variables, _, out = tiny3d
    again = model.apply(variables, out["features"]["stage2"], "stage2", method=model.from_stage)
    np.testing.assert_allclose(again["logits"], out["logits"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, d, h, w, 64\)"):
        model.apply(variables, out["features"]["stage2"][:, 0], "stage2", method=model.from_stage)


def test_input_checks(tiny3d):
    model, variables, x, _ = tiny3d
    with pytest.raises(ValueError, match=r"volumes of shape \(B, D, H, W, 1\)"):
        model.apply(variables, jnp.asarray(x[:, 0]))
    with pytest.raises(ValueError, match="zeros"):
        models.create("resnet18_3d", 2, padding="reflect")
    m2 = models.create("tiny", 2, in_channels=1)
    with pytest.raises(ValueError, match=r"images of shape \(B, H, W, 1\)"):
        m2.init(jax.random.PRNGKey(0), jnp.asarray(x))


def test_resnet18_3d_init_is_kaiming_fan_out():
    model = models.create("resnet18_3d", 2, head="linear", projection=False, in_channels=1)
    shapes = models.abstract_variables(model)
    assert shapes["params"]["conv1"]["kernel"].shape == (7, 7, 7, 1, 64)
    assert shapes["params"]["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 1, 64, 128)
    assert shapes["batch_stats"]["layer4_1"]["bn2"]["var"].shape == (512,)
    # torch kaiming_normal_(mode="fan_out"): std = sqrt(2 / (k^3 * C_out))
    w = np.asarray(conv(64, 7, 2, ndim=3).init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 8, 2)))["params"]["kernel"])
    np.testing.assert_allclose(w.std(), np.sqrt(2.0 / (7**3 * 64)), rtol=0.03)


@pytest.mark.torch
def test_conv_pool_match_torch_3d():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 9, 11, 10, 3)).astype(np.float32)  # odd, non-cubic sizes
    layer = conv(5, 3, 2, ndim=3)
    v = layer.init(jax.random.PRNGKey(0), jnp.asarray(x))
    with jax.default_matmul_precision("float32"):
        got = np.asarray(layer.apply(v, jnp.asarray(x)))
    xt = torch.from_numpy(np.transpose(x, (0, 4, 1, 2, 3)).copy())
    wt = torch.from_numpy(np.transpose(np.asarray(v["params"]["kernel"]), (4, 3, 0, 1, 2)).copy())
    ref = torch.nn.functional.conv3d(xt, wt, stride=2, padding=1).numpy()
    np.testing.assert_allclose(got, np.transpose(ref, (0, 2, 3, 4, 1)), rtol=1e-4, atol=1e-5)
    ref_pool = torch.nn.functional.max_pool3d(xt, 3, stride=2, padding=1).numpy()
    np.testing.assert_allclose(np.asarray(max_pool_3x3_s2(jnp.asarray(x))), np.transpose(ref_pool, (0, 2, 3, 4, 1)))
    np.testing.assert_allclose(np.asarray(global_avg_pool(jnp.asarray(x))), x.mean(axis=(1, 2, 3)), rtol=1e-5)


# ---------------------------------------------------------------- LCL-SC over voxels


def _np_tk_mmp(maps, kx, kn, alpha, mask=None):
    """NumPy reference: per sample and class sort the (valid) voxels; mean top kx + alpha * mean bottom kn."""
    b, *sp, c = maps.shape
    out = np.zeros((b, c))
    for i in range(b):
        valid = np.ones(sp, bool) if mask is None else np.broadcast_to(mask, (b, *sp))[i]
        for j in range(c):
            v = np.sort(maps[i][..., j][valid])
            n = len(v)
            out[i, j] = v[::-1][:min(kx, n)].mean() + alpha * v[:min(kn, n)].mean()
    return out


def test_tk_mmp_over_voxels_matches_numpy():
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(2, 3, 4, 5, 2)).astype(np.float32)  # 60 voxels
    n = 60
    got = np.asarray(M.tk_mmp(jnp.asarray(maps), 0.1, 0.2, -1.0))
    np.testing.assert_allclose(got, _np_tk_mmp(maps, round(0.1 * n), round(0.2 * n), -1.0), rtol=1e-5, atol=1e-6)
    mask = rng.random((3, 4, 5)) < 0.5  # ~30 valid voxels
    got = np.asarray(M.tk_mmp(jnp.asarray(maps), 0.1, 0.2, -0.5, mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got, _np_tk_mmp(maps, 6, 12, -0.5, mask), rtol=1e-5, atol=1e-6)
    bmask = rng.random((2, 3, 4, 5)) < 0.1  # per-sample masks with fewer valid voxels than k
    got = np.asarray(M.tk_mmp(jnp.asarray(maps), 0.3, 0.3, 1.0, mask=jnp.asarray(bmask)))
    np.testing.assert_allclose(got, _np_tk_mmp(maps, 18, 18, 1.0, bmask), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mask must have shape"):
        M.tk_mmp(jnp.asarray(maps), 0.1, 0.1, -1.0, mask=jnp.ones((4, 5), bool))


def test_saliency_maps_over_voxels_match_numpy():
    rng = np.random.default_rng(4)
    lz = rng.normal(size=(2, 2, 3, 3, 6)).astype(np.float32)
    g = rng.normal(size=(NC, 6)).astype(np.float32)
    got = np.asarray(M.class_saliency_maps(jnp.asarray(lz), jnp.asarray(g)))
    ref = np.einsum("bdhwk,ck->bdhwc", lz / np.linalg.norm(lz, axis=-1, keepdims=True),
                    g / np.linalg.norm(g, axis=-1, keepdims=True))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    z = lz.mean(axis=(1, 2, 3))  # a linear head commutes with pooling: the decomposed maps average to cos(z, G)
    dec = np.asarray(M.decomposed_saliency_maps(jnp.asarray(lz), jnp.asarray(z), jnp.asarray(g)))
    cos = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    np.testing.assert_allclose(dec.mean(axis=(1, 2, 3)), cos, rtol=1e-5, atol=1e-6)


def _np_d4(v, t):
    """D4 index t on the axial plane (H, W) of one (D, H, W, C) volume, NumPy."""
    y = np.rot90(v, t % 4, axes=(1, 2))
    return np.flip(y, axis=2) if t >= 4 else y


def test_equivariance_over_voxels_acts_on_axial_plane():
    rng = np.random.default_rng(5)
    maps = rng.normal(size=(8, 3, 4, 4, 2)).astype(np.float32)
    maps_t = rng.normal(size=maps.shape).astype(np.float32)
    t = np.arange(8)
    tx = np.asarray(M.apply_transform(jnp.asarray(maps), jnp.asarray(t)))
    for i in range(8):
        np.testing.assert_array_equal(tx[i], _np_d4(maps[i], i))
    np.testing.assert_array_equal(np.asarray(M.dihedral_batch(jnp.asarray(maps), jnp.asarray(t))), tx)
    target = np.stack([_np_d4(maps[i], i) for i in range(8)])
    got = float(M.equivariance_loss(jnp.asarray(maps), jnp.asarray(maps_t), jnp.asarray(t)))
    np.testing.assert_allclose(got, np.mean((maps_t - target) ** 2), rtol=1e-5)
    mask = rng.random((3, 4, 4)) < 0.6
    tmask = np.stack([_np_d4(mask[..., None], i)[..., 0] for i in range(8)])
    sq = (maps_t - target) ** 2
    ref = sq[tmask].sum() / (tmask.sum() * 2)
    got = float(M.equivariance_loss(jnp.asarray(maps), jnp.asarray(maps_t), jnp.asarray(t), mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


# ---------------------------------------------------------------- train / eval steps on 5D batches


@pytest.fixture(scope="module")
def tiny3d_step():
    cfg = C.load("tiny", ["loss.name=lcl_sc", "loss.eq_stride=2", "loss.w_consistency=1.0"])
    assert cfg.loss.lambda_sc > 0 and cfg.loss.w_eq > 0
    model = models.create("tiny3d", NC, head="gei", embed_dim=cfg.model.embed_dim, in_channels=1)
    tx = make_optimizer(cfg)
    mesh = shd.make_mesh(2)  # the 5D batch sharded over 2 (simulated) devices, as in training
    state = create_state(model, tx, NC, cfg.model.embed_dim, (16, 16, 16, 1), jax.random.PRNGKey(0))
    state = jax.device_put(state, shd.replicated(mesh))
    step = S.jit_train_step(S.make_train_step(model, tx, cfg), mesh, donate=False)
    return cfg, model, state, step, S.jit_eval_step(S.make_eval_step(model, cfg), mesh), mesh


def test_lcl_sc_train_step_on_volumes(tiny3d_step):
    cfg, model, state, step, eval_step, mesh = tiny3d_step
    rng = np.random.default_rng(6)
    batch = shd.to_global({"image": rng.random((4, 16, 16, 16, 1), np.float32),
                           "label": np.array([0, 1, 2, 1], np.int32)}, mesh, S.TRAIN_KEYS)
    new, m = step(state, batch)
    new, m2 = step(new, batch)  # second step: global embeddings are now set, the SC terms are non-trivial
    for mm in (m, m2):
        assert mm["nonfinite"] == 0 and np.isfinite(mm["loss"])
        assert np.isfinite(mm["loss_sc"]) and np.isfinite(mm["loss_eq"]) and np.isfinite(mm["loss_consistency"])
    assert m2["loss_eq"] > 0 and m2["loss_sc"] > 0
    assert int(new.step) == 2
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                   jax.tree_util.tree_leaves(new.params))]
    assert any(moved)
    assert isinstance(new, TrainState) and np.all(np.asarray(new.seen))
    # The EMA class anchors are unit vectors built from the 5D batch's embeddings.
    np.testing.assert_allclose(np.linalg.norm(np.asarray(new.global_emb), axis=1), 1.0, rtol=1e-5)
    out = eval_step(new, batch)
    assert out["probs"].shape == (4, NC) and out["embedding"].shape == (4, cfg.model.embed_dim)
    np.testing.assert_allclose(np.asarray(out["probs"]).sum(-1), 1.0, rtol=1e-5)
