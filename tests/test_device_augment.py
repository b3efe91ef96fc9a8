"""On-device views against NumPy/SciPy references, their statistics, determinism and sharding."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from lclsc_jax.data import device_augment as da
from lclsc_jax.data.settings import ViewsConfig

#: Every random op off: a view is then the crop (and D4) alone.
OFF = ViewsConfig(d4=False, jitter_prob=0.0, blur_prob=0.0, noise_prob=0.0, fibre_prob=0.0, fov_prob=0.0)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).random((24, 20, 2)).astype(np.float32)


def test_crop_resize_is_scipy_bilinear_at_the_pixel_centres(image):
    box = np.array([3.5, 2.25, 12.0, 9.0], np.float32)
    got = np.asarray(da.crop_resize(jnp.asarray(image), jnp.asarray(box), 16))
    t = (np.arange(16) + 0.5) / 16
    yy, xx = np.meshgrid(box[0] + t * box[2] - 0.5, box[1] + t * box[3] - 0.5, indexing="ij")
    want = np.stack([ndimage.map_coordinates(image[..., c], [yy, xx], order=1, mode="nearest") for c in range(2)], -1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_crop_boxes_follow_torchvisions_rules():
    keys = jax.random.split(jax.random.PRNGKey(1), 400)
    boxes = np.asarray(jax.vmap(lambda k: da.sample_box(k, 40, 30, (0.2, 0.6), (0.75, 4 / 3)))(keys))
    y0, x0, h, w = boxes.T
    assert np.all(y0 >= 0) and np.all(x0 >= 0) and np.all(y0 + h <= 40 + 1e-4) and np.all(x0 + w <= 30 + 1e-4)
    area = h * w / (40 * 30)
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 0.6 + 1e-4
    assert np.all((w / h >= 0.75 - 1e-4) & (w / h <= 4 / 3 + 1e-4))
    # An impossible area (more than the image) falls back to the whole image, clipped to the ratio range.
    fb = np.asarray(da.sample_box(jax.random.PRNGKey(0), 40, 30, (2.0, 3.0), (0.75, 4 / 3)))
    np.testing.assert_allclose(fb, [0.0, 0.0, 40.0, 30.0], atol=1e-4)


def test_blur_is_scipys_gaussian_filter(image):
    got = np.asarray(da.gaussian_blur(jnp.asarray(image), jnp.float32(1.3), radius=4))
    want = np.stack([ndimage.gaussian_filter(image[..., c], 1.3, mode="reflect", truncate=4 / 1.3)
                     for c in range(2)], -1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_intensity_jitter_closed_form(image):
    got = np.asarray(da.adjust_intensity(jnp.asarray(image), 1.2, 0.8, 1.5))
    v = np.clip(image * 1.2, 0, 1) ** 0.8
    np.testing.assert_allclose(got, np.clip(v.mean() + 1.5 * (v - v.mean()), 0, 1), atol=1e-5)


def test_noise_has_the_poisson_gaussian_mean_and_variance():
    x = jnp.full((200, 200, 1), 0.4, jnp.float32)
    y = np.asarray(da.poisson_gaussian(jax.random.PRNGKey(2), x, jnp.float32(50.0), jnp.float32(0.02)))
    assert abs(y.mean() - 0.4) < 3 * math.sqrt(0.4 / 50 / y.size) + 1e-4
    np.testing.assert_allclose(y.var(), 0.4 / 50 + 0.02**2, rtol=0.03)


def test_fibre_bundle_is_piecewise_constant_on_one_cell_per_core():
    img = jnp.asarray(np.random.default_rng(3).random((60, 60, 1)), jnp.float32)
    pitch = 4.0
    out = np.asarray(da.fibre_reimage(img, jnp.float32(pitch), jnp.float32(0.4), jnp.int32(7)))[..., 0]
    ci, cj = (np.asarray(a) for a in da.nearest_core(*jnp.meshgrid(jnp.arange(60.0) - 29.5, jnp.arange(60.0) - 29.5,
                                                                    indexing="ij"), pitch, 0.4))
    cells = ci * 1000 + cj
    for c in np.unique(cells)[:50]:
        assert np.ptp(out[cells == c]) == 0.0  # one value per core
    expected = 60 * 60 / (pitch**2 * math.sqrt(3) / 2)  # cells of a hexagonal lattice in the image
    assert 0.9 * expected <= len(np.unique(cells)) <= 1.3 * expected
    # Brute force: each pixel's core is the nearest lattice point.
    i, j = np.meshgrid(np.arange(-20, 21), np.arange(-20, 21), indexing="ij")
    u, v = (i + 0.5 * j) * pitch, j * math.sqrt(3) / 2 * pitch
    px, py = math.cos(0.4) * u - math.sin(0.4) * v, math.sin(0.4) * u + math.cos(0.4) * v
    for (yy, xx) in ((0, 0), (13, 41), (59, 7), (30, 30)):
        d = (py - (yy - 29.5)) ** 2 + (px - (xx - 29.5)) ** 2
        k = np.unravel_index(np.argmin(d), d.shape)
        assert (ci[yy, xx], cj[yy, xx]) == (i[k], j[k])


def test_the_field_of_view_blacks_out_the_outside_only(image):
    cfg = dataclasses.replace(OFF, fov_prob=1.0, fov_radius=(0.5, 0.5), global_scale=(1.0, 1.0), ratio=(1.0, 1.0))
    x01 = image[:20, :20]  # intensities in [0, 1]; the whole-image crop at the same size is the identity
    out = np.asarray(da.augment_view(jax.random.PRNGKey(0), jnp.asarray((x01 - 0.5) * 4), cfg, 20, (1.0, 1.0)))
    yy, xx = np.mgrid[:20, :20] - 9.5
    inside = yy**2 + xx**2 <= 5.0**2  # radius 0.5 x half the side
    np.testing.assert_allclose(out[~inside], -2.0, atol=1e-6)  # x01 = 0, normalised
    np.testing.assert_allclose(out[inside] / 4 + 0.5, x01[inside], atol=1e-5)
    assert 50 < inside.sum() < 120  # the disc is neither empty nor the whole view


def test_d4_views_are_numpys_rotations_and_flips(image):
    cfg = dataclasses.replace(OFF, d4=True, global_scale=(1.0, 1.0), ratio=(1.0, 1.0))
    x01 = image[:16, :16]
    refs = [np.rot90(x01, k, axes=(0, 1)) for k in range(4)]
    refs += [np.flip(r, axis=1) for r in refs]
    keys = jax.random.split(jax.random.PRNGKey(5), 32)
    views = np.asarray(jax.jit(jax.vmap(lambda k: da.augment_view(k, jnp.asarray((x01 - 0.5) * 4), cfg, 16,
                                                                    (1.0, 1.0))))(keys)) / 4 + 0.5
    seen = set()
    for v in views:
        match = [t for t, r in enumerate(refs) if np.allclose(v, r, atol=1e-5)]
        assert len(match) == 1, "each view is exactly one of the 8 dihedral transforms"
        seen.add(match[0])
    assert len(seen) >= 6  # 32 uniform draws miss 3 of 8 with probability < 1e-3


def test_augment_batch_is_augment_view_per_example_under_jit():
    cfg = ViewsConfig(fibre_prob=0.5, fov_prob=0.5)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(3, 20, 20, 1)), jnp.float32)
    key = jax.random.PRNGKey(9)
    batch = np.asarray(jax.jit(lambda k, im: da.augment_batch(k, im, cfg, 12, (0.3, 1.0)))(key, x))
    assert batch.shape == (3, 12, 12, 1) and batch.dtype == np.float32
    one = jax.jit(lambda k, im: da.augment_view(k, im, cfg, 12, (0.3, 1.0)))
    for k, im, b in zip(jax.random.split(key, 3), x, batch):
        np.testing.assert_allclose(b, np.asarray(one(k, im)), atol=1e-5)
    assert not np.allclose(batch[0], batch[1])


def test_views_are_deterministic_shaped_and_differ_between_keys():
    cfg = ViewsConfig(n_global=2, n_local=4)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 32, 32, 1)), jnp.float32)
    f = jax.jit(lambda k, im: da.make_views(k, im, cfg, 32))
    a, b, c = f(jax.random.PRNGKey(0), x), f(jax.random.PRNGKey(0), x), f(jax.random.PRNGKey(1), x)
    assert [v.shape for v in a] == [(4, 32, 32, 1)] * 2 + [(4, 14, 14, 1)] * 4
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.allclose(a[0], c[0]) and not np.allclose(a[0], a[1])
    assert all(float(v.min()) >= -2.0 - 1e-6 and float(v.max()) <= 2.0 + 1e-6 for v in a)  # x01 in [0, 1]


def test_views_of_a_batch_sharded_over_8_devices_equal_the_unsharded_ones():
    cfg = ViewsConfig()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # as train.sharding's
    x = np.random.default_rng(5).normal(size=(16, 24, 24, 1)).astype(np.float32)
    f = jax.jit(lambda k, im: da.make_views(k, im, cfg, 24))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = f(jax.random.PRNGKey(3), jax.device_put(x, rows))
    for u, v in zip(sharded, f(jax.random.PRNGKey(3), x)):
        np.testing.assert_allclose(u, v, atol=1e-5)  # the same draws; XLA may fuse differently per shard


def test_views_config_refuses_bad_values():
    with pytest.raises(ValueError, match="probability"):
        ViewsConfig(blur_prob=1.5)
    with pytest.raises(ValueError, match="fractions"):
        ViewsConfig(global_scale=(0.5, 1.5))
    assert da.resolve_sizes(ViewsConfig(), 224) == (224, 96)
