"""Imaging through a coherent fibre bundle, as in probe-based confocal endomicroscopy.

A pCLE probe images the tissue through a bundle of ~10-30 thousand fibre cores packed in a
jittered hexagonal lattice. Each core collects the fluorescence at its tip (one sample of the
tissue per core per frame), with its own transmission and some cross-talk from its
neighbours; the detector adds shot noise (Poisson) and read noise (Gaussian); the device
software divides by the calibrated transmission and interpolates the core values onto the
pixel grid. This module does each of those steps on arrays:

    bundle = make_bundle(rng, n_cores=20_000, fov_radius=60.0)          # per probe (per patient)
    signal = crosstalk(bundle, tissue_at_cores)                          # (n,) optical signal
    counts = detect(rng, bundle, signal, photons=50.0, read_noise=2.0)   # (n,) calibrated values
    image = reconstruct(bundle, counts, size=128)                        # (128, 128) float32

The reconstruction is a normalised Gaussian convolution (each pixel is the Gaussian-weighted
mean of the cores near it), the common way to remove the honeycomb; with ``interpolate=False``
it shows the raw honeycomb instead (bright cores, dark cladding).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from lclsc_jax.data.tissue import splat


@dataclasses.dataclass(frozen=True)
class FibreBundle:
    """Core positions ``xy (n, 2)`` (y, x; px, relative to the field centre), transmissions and neighbours."""

    yx: np.ndarray  # (n, 2) float32, core centres relative to the centre of the field of view
    transmission: np.ndarray  # (n,) float32, true per-core transmission (vignetting included)
    calibration: np.ndarray  # (n,) float32, the device's estimate of it (small error)
    neighbours: np.ndarray  # (n, 6) int64, the six nearest cores
    crosstalk: float  # fraction of a core's signal that leaks from its neighbours
    pitch: float  # mean core spacing (px)
    fov_radius: float  # px


def core_pitch(n_cores: int, fov_radius: float) -> float:
    """Spacing (px) of a hexagonal lattice that puts ``n_cores`` in a disc of ``fov_radius`` px."""
    return float(np.sqrt(2.0 * np.pi * fov_radius**2 / (np.sqrt(3.0) * n_cores)))


def hex_lattice(pitch: float, radius: float, angle: float, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """Jittered hexagonal lattice points ``(n, 2)`` (y, x) inside a disc of ``radius``, rotated by ``angle``."""
    m = int(np.ceil(2.0 * radius / pitch)) + 2  # the rhombus i, j in [-m, m] must cover the disc
    i, j = np.meshgrid(np.arange(-m, m + 1), np.arange(-m, m + 1), indexing="ij")
    x = pitch * (i + 0.5 * j)
    y = pitch * (np.sqrt(3.0) / 2.0) * j
    ca, sa = np.cos(angle), np.sin(angle)
    pts = np.stack([sa * x + ca * y, ca * x - sa * y], -1).reshape(-1, 2)
    pts = pts + rng.normal(0.0, jitter * pitch, pts.shape)
    return pts[np.hypot(pts[:, 0], pts[:, 1]) <= radius].astype(np.float32)


def make_bundle(rng: np.random.Generator, n_cores: int, fov_radius: float, *, crosstalk: float = 0.05,
                transmission_std: float = 0.15, vignetting: float = 0.15, dead_fraction: float = 0.003,
                calibration_error: float = 0.02, jitter: float = 0.08) -> FibreBundle:
    """A probe: ~``n_cores`` cores in a field of ``fov_radius`` px, random lattice angle and transmissions."""
    pitch = core_pitch(n_cores, fov_radius)
    yx = hex_lattice(pitch, fov_radius, rng.uniform(0, np.pi / 3), jitter, rng)
    r = np.hypot(yx[:, 0], yx[:, 1]) / fov_radius
    t = np.exp(rng.normal(0.0, transmission_std, len(yx))) * (1.0 - vignetting * r**2)
    t[rng.uniform(size=len(yx)) < dead_fraction] = 0.0
    cal = t * np.exp(rng.normal(0.0, calibration_error, len(yx)))
    _, nb = cKDTree(yx).query(yx, k=7)
    return FibreBundle(yx=yx, transmission=t.astype(np.float32), calibration=cal.astype(np.float32),
                       neighbours=nb[:, 1:].astype(np.int64), crosstalk=float(crosstalk), pitch=pitch,
                       fov_radius=float(fov_radius))


def crosstalk(bundle: FibreBundle, signal: np.ndarray) -> np.ndarray:
    """Light leaking between neighbouring cores: ``(1 - c) s_k + c mean(s_neighbours)``; (n,)."""
    c = bundle.crosstalk
    return (1.0 - c) * signal + c * signal[bundle.neighbours].mean(axis=1)


def detect(rng: np.random.Generator | None, bundle: FibreBundle, signal: np.ndarray, photons: float,
           read_noise: float, noise: bool = True) -> np.ndarray:
    """Calibrated core values (n,): Poisson(photons * t * s) + N(0, read_noise), divided by photons * t_cal.

    ``noise=False`` (or ``rng=None``) gives the noise-free expectation; with an ``rng`` the noise is
    still drawn, so the random stream (and every later draw) is the same with and without noise.
    Dead cores (calibration 0) return 0.
    """
    lam = np.maximum(photons * bundle.transmission * signal, 0.0)
    counts = lam
    if rng is not None:
        drawn = rng.poisson(lam) + rng.normal(0.0, read_noise, lam.shape)
        counts = drawn if noise else lam
    cal = photons * bundle.calibration
    return np.where(cal > 0, counts / np.maximum(cal, 1e-12), 0.0).astype(np.float32)


def reconstruct(bundle: FibreBundle, values: np.ndarray, size: int, *, interpolate: bool = True,
                sigma: float | None = None) -> np.ndarray:
    """Core values (n,) -> image (size, size) float32 inside the field of view, 0 outside.

    ``interpolate=True``: normalised Gaussian convolution of width ``sigma`` (default 0.5 pitch,
    at least 0.6 px) over the live cores. ``interpolate=False``: the raw bundle image, each core a
    Gaussian spot of 0.3 pitch on dark cladding.
    """
    centre = (size - 1) / 2.0
    pos = bundle.yx + centre
    live = bundle.calibration > 0
    if not interpolate:
        s = max(0.3 * bundle.pitch, 0.35)
        img = ndimage.gaussian_filter(splat((size, size), pos, values), s) * np.float32(2 * np.pi * s * s)
        return img * fov_mask(size, bundle.fov_radius)
    s = sigma if sigma is not None else max(0.5 * bundle.pitch, 0.6)
    num = ndimage.gaussian_filter(splat((size, size), pos[live], values[live]), s)
    den = ndimage.gaussian_filter(splat((size, size), pos[live], np.ones(live.sum(), np.float32)), s)
    img = np.where(den > 1e-3, num / np.maximum(den, 1e-6), 0.0)
    return (img * fov_mask(size, bundle.fov_radius)).astype(np.float32)


def fov_mask(size: int, radius: float, soft: float = 1.0) -> np.ndarray:
    """The circular field of view (size, size) in [0, 1], with a ``soft``-px edge."""
    c = (size - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    return np.clip((radius - np.hypot(yy, xx)) / soft + 0.5, 0.0, 1.0).astype(np.float32)
