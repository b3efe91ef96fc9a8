"""Views for pretraining, drawn on the device: pure JAX, jitted, vmapped over the batch, explicit keys.

    views = make_views(key, images, cfg, image_size)   # [(B, Sg, Sg, C)] * n_global + [(B, Sl, Sl, C)] * n_local

One view of one image (:func:`augment_view`): random resized crop (bilinear, torchvision's box
sampling), one of the 8 flips/quarter turns, gain/gamma/contrast, Gaussian blur, re-imaging
through another fibre bundle, Poisson-Gaussian noise, a circular field of view - in that order,
each but the crop switched on with its probability (``ViewsConfig``). Images come and go in the
pipeline's normalised space ``(x01 - 0.5) * 4``; the intensity ops act on ``x01`` clipped to [0, 1].
Every op is a pure function of its arguments, tested against NumPy/SciPy references.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lclsc_jax.data.settings import ViewsConfig

_CROP_TRIES = 10  # torchvision's RandomResizedCrop attempts before its fallback
FIBRE_BLUR = 0.25  # sigma of the blur after re-imaging through a fibre bundle, in core pitches


def to_unit(x: jax.Array) -> jax.Array:
    """Normalised pipeline images -> ``[0, 1]`` intensities (``x / 4 + 0.5``)."""
    return x * 0.25 + 0.5


def from_unit(x01: jax.Array) -> jax.Array:
    """``[0, 1]`` intensities -> the pipeline's normalised space (``(x01 - 0.5) * 4``)."""
    return (x01 - 0.5) * 4.0


def resolve_sizes(cfg: ViewsConfig, image_size: int) -> tuple[int, int]:
    """``(global, local)`` view sides in pixels: 0 means the image size, and 3/7 of the global side (>= 8)."""
    g = cfg.global_size or int(image_size)
    return g, cfg.local_size or max(8, int(round(g * 3 / 7)))


def crop_resize(image: jax.Array, box: jax.Array, size: int, d4: jax.Array | None = None) -> jax.Array:
    """Bilinear resample of the box ``(y0, x0, h, w)`` (pixels, floats) of ``image (H, W, C)`` to ``(size, size, C)``.

    Output pixel ``i`` samples the input at ``y0 + (i + 0.5) * h / size - 0.5`` (pixel centres, as
    ``align_corners=False``); outside the image the nearest edge pixel is used. ``d4`` (3 bools:
    transpose, flip rows, flip columns) permutes the sampling grid: one of the 8 flips/quarter turns
    of the output at no extra cost (a select after the gather would recompute it under XLA fusion).
    """
    y0, x0, h, w = box[0], box[1], box[2], box[3]
    t = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
    ys, xs = y0 + t * h - 0.5, x0 + t * w - 0.5
    i, j = jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing="ij")
    if d4 is not None:
        i, j = jnp.where(d4[0], j, i), jnp.where(d4[0], i, j)
        i, j = jnp.where(d4[1], size - 1 - i, i), jnp.where(d4[2], size - 1 - j, j)
    yy, xx = ys[i], xs[j]

    def channel(c: jax.Array) -> jax.Array:
        return jax.scipy.ndimage.map_coordinates(c, [yy, xx], order=1, mode="nearest")

    return jax.vmap(channel, in_axes=2, out_axes=2)(image.astype(jnp.float32))


def sample_box(key: jax.Array, height: int, width: int, scale: tuple[float, float],
               ratio: tuple[float, float]) -> jax.Array:
    """A crop box ``(y0, x0, h, w)`` as torchvision's ``RandomResizedCrop.get_params``, without rounding.

    Up to 10 tries of an area fraction ``U(scale)`` and a log-uniform aspect ratio; the first box that
    fits is taken, else the whole image clipped to the ratio range (torchvision's fallback).
    """
    ka, kr, ky, kx = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(ka, (_CROP_TRIES,), minval=scale[0], maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(kr, (_CROP_TRIES,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
    w, h = jnp.sqrt(area * aspect), jnp.sqrt(area / aspect)
    ok = (w <= width) & (h <= height)
    first = jnp.argmax(ok)
    in_ratio = width / height
    fw = jnp.where(in_ratio < ratio[0], width, jnp.where(in_ratio > ratio[1], height * ratio[1], width))
    fh = jnp.where(in_ratio < ratio[0], width / ratio[0], height)
    hh, ww = jnp.where(ok.any(), h[first], fh), jnp.where(ok.any(), w[first], fw)
    y0 = jax.random.uniform(ky) * (height - hh)
    x0 = jax.random.uniform(kx) * (width - ww)
    return jnp.stack([y0, x0, hh, ww]).astype(jnp.float32)


def adjust_intensity(x01: jax.Array, gain: jax.Array, gamma: jax.Array, contrast: jax.Array) -> jax.Array:
    """``clip(contrast * (v - mean(v)) + mean(v))`` of ``v = clip(gain * x01) ** gamma``; ``(H, W, C)`` in [0, 1]."""
    v = jnp.clip(x01 * gain, 0.0, 1.0) ** gamma
    m = jnp.mean(v)
    return jnp.clip(m + contrast * (v - m), 0.0, 1.0)


def gaussian_blur(x: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """Separable Gaussian blur of ``x (H, W, C)`` with a traced ``sigma`` and a static kernel ``radius``.

    Borders by symmetric reflection (SciPy's ``mode="reflect"``); the kernel is normalised to 1.
    """
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (t / jnp.maximum(sigma, 1e-3)) ** 2)
    k = k / jnp.sum(k)
    pad = jnp.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="symmetric")
    n = 2 * radius + 1
    rows = sum(k[i] * pad[i:i + x.shape[0]] for i in range(n))  # along H
    return sum(k[i] * rows[:, i:i + x.shape[1]] for i in range(n))  # along W


def _hash01(i: jax.Array, j: jax.Array, seed: jax.Array) -> jax.Array:
    """A uniform pseudo-random value in [0, 1) per integer lattice point (a stateless integer hash)."""
    h = (i.astype(jnp.uint32) * jnp.uint32(73856093)) ^ (j.astype(jnp.uint32) * jnp.uint32(19349663)) \
        ^ seed.astype(jnp.uint32)
    h = (h ^ (h >> 13)) * jnp.uint32(1274126177)
    h = h ^ (h >> 16)
    return (h & jnp.uint32(0xFFFFFF)).astype(jnp.float32) / float(0x1000000)


def nearest_core(y: jax.Array, x: jax.Array, pitch: jax.Array, angle: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Integer coordinates ``(i, j)`` of the hexagonal-lattice core nearest to points ``(y, x)``.

    The lattice has basis ``pitch * (cos a, sin a)`` and ``pitch * (cos(a + 60 deg), sin(a + 60 deg))``
    (``(x, y)`` order); the nearest point of a hexagonal lattice is a vertex of the rhombus cell
    holding the point, so the four vertices are compared.
    """
    ca, sa = jnp.cos(angle), jnp.sin(angle)
    u, v = (ca * x + sa * y) / pitch, (-sa * x + ca * y) / pitch  # rotate into the lattice frame
    j = v / (math.sqrt(3.0) / 2.0)
    i = u - 0.5 * j
    fi, fj = jnp.floor(i), jnp.floor(j)
    best_i, best_j, best_d = fi, fj, jnp.full(u.shape, jnp.inf)
    for di in (0.0, 1.0):
        for dj in (0.0, 1.0):
            ci, cj = fi + di, fj + dj
            d = (u - (ci + 0.5 * cj)) ** 2 + (v - cj * math.sqrt(3.0) / 2.0) ** 2
            better = d < best_d
            best_i, best_j = jnp.where(better, ci, best_i), jnp.where(better, cj, best_j)
            best_d = jnp.minimum(d, best_d)
    return best_i.astype(jnp.int32), best_j.astype(jnp.int32)


def fibre_reimage(x01: jax.Array, pitch: jax.Array, angle: jax.Array, seed: jax.Array,
                  transmission_sd: float = 0.1) -> jax.Array:
    """Re-image ``x01 (H, W, C)`` through a fibre bundle: every pixel shows the value at its nearest core's centre.

    The cores form a hexagonal lattice of ``pitch`` px rotated by ``angle`` about the image centre;
    each core samples the image (bilinear) at its centre and has a transmission ``1 + sd * U(-1, 1)*sqrt(3)``
    from a hash of its lattice index and ``seed``. The result is piecewise constant on the cores'
    cells; :func:`augment_view` then blurs it lightly (sigma ``FIBRE_BLUR * pitch``).
    """
    hgt, wid = x01.shape[:2]
    yy, xx = jnp.meshgrid(jnp.arange(hgt, dtype=jnp.float32) - (hgt - 1) / 2,
                          jnp.arange(wid, dtype=jnp.float32) - (wid - 1) / 2, indexing="ij")
    ci, cj = nearest_core(yy, xx, pitch, angle)
    ca, sa = jnp.cos(angle), jnp.sin(angle)
    u, v = (ci + 0.5 * cj) * pitch, cj * (math.sqrt(3.0) / 2.0) * pitch
    cy, cx = sa * u + ca * v + (hgt - 1) / 2, ca * u - sa * v + (wid - 1) / 2  # core centre, pixel coords
    trans = 1.0 + transmission_sd * math.sqrt(3.0) * (2.0 * _hash01(ci, cj, seed) - 1.0)

    def channel(c: jax.Array) -> jax.Array:
        return jax.scipy.ndimage.map_coordinates(c, [cy, cx], order=1, mode="nearest")

    sampled = jax.vmap(channel, in_axes=2, out_axes=2)(x01)
    return jnp.clip(sampled * trans[..., None], 0.0, 1.0)


def poisson_gaussian(key: jax.Array, x01: jax.Array, photons: jax.Array, read: jax.Array) -> jax.Array:
    """Shot and read noise: ``x + sqrt(x / photons) * n1 + read * n2`` with standard normals ``n1, n2``.

    The Gaussian approximation of ``Poisson(photons * x) / photons`` (same mean ``x`` and variance
    ``x / photons``; close for ``photons * x`` above ~10), which is cheap on every accelerator.
    """
    k1, k2 = jax.random.split(key)
    shot = jnp.sqrt(jnp.maximum(x01, 0.0) / photons) * jax.random.normal(k1, x01.shape)
    return x01 + shot + read * jax.random.normal(k2, x01.shape)


def disc_mask(size: int, radius: jax.Array) -> jax.Array:
    """``(size, size)`` bool: pixel centres within ``radius`` px of the image centre."""
    c = (size - 1) / 2
    yy, xx = jnp.meshgrid(jnp.arange(size) - c, jnp.arange(size) - c, indexing="ij")
    return yy**2 + xx**2 <= radius**2


def _uniform(key: jax.Array, lohi: tuple[float, float]) -> jax.Array:
    return jax.random.uniform(key, minval=float(lohi[0]), maxval=float(lohi[1]))


def _maybe(key: jax.Array, prob: float, op: Callable[[], jax.Array], x: jax.Array) -> jax.Array:
    """``op()`` with probability ``prob``, else ``x``; a static 0 or 1 skips the draw (and 0 the op's compute)."""
    if prob <= 0.0:
        return x
    if prob >= 1.0:
        return op()
    return jnp.where(jax.random.bernoulli(key, float(prob)), op(), x)


def augment_view(key: jax.Array, image: jax.Array, cfg: ViewsConfig, size: int,
                 scale: tuple[float, float]) -> jax.Array:
    """One view ``(size, size, C)`` of a normalised ``image (H, W, C)``: crop, D4, jitter, blur, fibre, noise, FOV."""
    keys = jax.random.split(key, 16)
    hgt, wid = image.shape[:2]
    d4 = jax.random.bernoulli(keys[1], 0.5, (3,)) if cfg.d4 else None  # uniform over the 8 transforms
    x = to_unit(crop_resize(image, sample_box(keys[0], hgt, wid, scale, cfg.ratio), size, d4))
    x = _maybe(keys[5], cfg.jitter_prob, lambda: adjust_intensity(
        x, _uniform(keys[2], cfg.gain), _uniform(keys[3], cfg.gamma), _uniform(keys[4], cfg.contrast)),
        jnp.clip(x, 0.0, 1.0))
    x = _maybe(keys[6], cfg.blur_prob, lambda: gaussian_blur(
        x, _uniform(keys[7], cfg.blur_sigma), int(math.ceil(3 * cfg.blur_sigma[1]))), x)

    def fibre() -> jax.Array:
        pitch = _uniform(keys[8], cfg.fibre_spacing)
        y = fibre_reimage(x, pitch, jax.random.uniform(keys[9]) * (math.pi / 3),
                          jax.random.randint(keys[10], (), 0, 2**31 - 1))
        # The device's interpolation between cores: a light blur of a quarter pitch (radius for the largest pitch).
        return gaussian_blur(y, FIBRE_BLUR * pitch, int(math.ceil(3 * FIBRE_BLUR * cfg.fibre_spacing[1])))

    x = _maybe(keys[11], cfg.fibre_prob, fibre, x)
    x = _maybe(keys[15], cfg.noise_prob, lambda: poisson_gaussian(
        keys[12], x, _uniform(keys[13], cfg.noise_photons), _uniform(keys[14], cfg.noise_read)), x)
    kf1, kf2 = jax.random.split(jax.random.fold_in(key, 1))
    x = _maybe(kf2, cfg.fov_prob, lambda: jnp.where(
        disc_mask(size, _uniform(kf1, cfg.fov_radius) * size / 2)[..., None], x, 0.0), x)
    return from_unit(jnp.clip(x, 0.0, 1.0)).astype(jnp.float32)


def augment_batch(key: jax.Array, images: jax.Array, cfg: ViewsConfig, size: int,
                  scale: tuple[float, float]) -> jax.Array:
    """One view of every image: ``(B, H, W, C) -> (B, size, size, C)``, an independent key per example."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, im: augment_view(k, im, cfg, size, scale))(keys, images)


def make_views(key: jax.Array, images: jax.Array, cfg: ViewsConfig, image_size: int) -> list[jax.Array]:
    """The ``n_global`` global views ``(B, Sg, Sg, C)`` then the ``n_local`` local ones ``(B, Sl, Sl, C)``."""
    g, loc = resolve_sizes(cfg, image_size)
    keys = jax.random.split(key, cfg.n_global + cfg.n_local)
    views = [augment_batch(keys[i], images, cfg, g, cfg.global_scale) for i in range(cfg.n_global)]
    views += [augment_batch(keys[cfg.n_global + i], images, cfg, loc, cfg.local_scale) for i in range(cfg.n_local)]
    return views
