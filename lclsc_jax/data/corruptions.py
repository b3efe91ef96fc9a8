"""Graded image corruptions of pCLE frames, in the manner of ImageNet-C (NumPy/SciPy, seeded, pure).

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019: every corruption has five severities; a model is scored on each
corruption x severity, and its *corruption error* is compared with a reference model's. Here the
corruptions are those a probe-based confocal endomicroscope produces (docs/robustness.md):

=================  =========================================================================
``noise``          Poisson-Gaussian detector noise: ``Poisson(photons x) / photons + N(0, read^2)``
``defocus``        a disc point-spread function (the probe a little off the tissue surface)
``motion_blur``    a line kernel along a random direction (the probe moving during the exposure)
``gamma``          ``x ** gamma`` (a non-linear detector response / display table)
``contrast``       ``m + c (x - m)`` about the frame's mean ``m`` inside the field of view
``gain``           ``g x`` with ``g < 1`` (laser power or detector gain too low: fewer grey levels)
``fibre_pattern``  the frame re-imaged through another, coarser, imperfectly calibrated fibre bundle
``dark``           out of contact: strongly defocused and dimmed (a non-diagnostic frame)
``saturated``      ``g x`` with ``g > 1``, clipped (a non-diagnostic frame)
``smeared``        a long motion streak, a large fraction of the field of view (a non-diagnostic frame)
=================  =========================================================================

Every function of the registry ``CORRUPTIONS`` has the signature
``fn(images (N, H, W, C) uint8, severity 0..5, rng, *, fov=None) -> (N, H, W, C) uint8``;
severity 0 returns the images unchanged. The parameters per severity are data
(``SEVERITY_SCHEDULE``); lengths are fractions of the image side (= the field-of-view diameter
of a pCLE frame), so a corruption means the same physical degradation at every image size.
Corruptions act inside the circular field of view only: pixels outside ``fov`` are returned
unchanged (the black corners stay black), and blurs are normalised convolutions over the field
of view (the dark outside does not bleed in). ``fov=None`` takes ``field_of_view(images)``:
the inscribed disc when the frames' corners are dark, else the whole frame. Intensities are
``x = u8 / 255`` in float64; results are clipped to [0, 1] and rounded to uint8.

Arrays in, arrays out. ``fibre_pattern`` re-images through the simulator's own fibre bundle
(``data.fibre_bundle``); nothing here imports the training or protocol layers.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from scipy import ndimage, signal

from lclsc_jax.data import fibre_bundle as fb
from lclsc_jax.evaluate.shortcuts import detect_circular_fov, inscribed_disc

__all__ = [
    "CORRUPTIONS",
    "CORRUPTION_FAMILIES",
    "CORRUPTION_NAMES",
    "MAX_SEVERITY",
    "SEVERITY_SCHEDULE",
    "check_names",
    "contrast",
    "corrupt",
    "corruption_rng",
    "dark",
    "defocus",
    "disc_kernel",
    "fibre_pattern",
    "field_of_view",
    "gain",
    "gamma",
    "mean_corruption_error",
    "motion_blur",
    "motion_kernel",
    "noise",
    "psnr",
    "saturated",
    "smeared",
]

MAX_SEVERITY = 5
_LEVELS = range(1, MAX_SEVERITY + 1)

#: Parameters of each corruption at severities 1..5 (index 0 = severity 1).
SEVERITY_SCHEDULE: dict[str, dict[str, tuple[float, ...]]] = {
    # photons at full-scale intensity per pixel; read noise std as a fraction of the full scale
    "noise": {"photons": (300.0, 120.0, 50.0, 20.0, 8.0), "read_noise": (0.004, 0.008, 0.012, 0.016, 0.02)},
    # disc radius, fraction of the image side (128 px: 2.6 ... 10.2 px; a 240 um field: 4.8 ... 19 um)
    "defocus": {"radius": (0.02, 0.03, 0.04, 0.06, 0.08)},
    # streak length, fraction of the image side (128 px: 3.8 ... 20 px)
    "motion_blur": {"length": (0.03, 0.05, 0.08, 0.12, 0.16)},
    "gamma": {"gamma": (1.4, 1.8, 2.2, 2.8, 3.5)},
    "contrast": {"factor": (0.75, 0.55, 0.4, 0.28, 0.18)},
    "gain": {"gain": (0.7, 0.5, 0.35, 0.25, 0.15)},
    # cores of the new bundle inside the field of view (the simulator's probes: 10 000 - 30 000) and the std of
    # its per-core transmission left uncalibrated (log-normal; a fixed pattern over the frame)
    "fibre_pattern": {"cores": (6000.0, 3000.0, 1500.0, 800.0, 400.0),
                      "transmission": (0.03, 0.05, 0.08, 0.12, 0.16)},
    # out of contact: Gaussian defocus (sigma, fraction of the side) and dimming (the simulator: 2 cells, x0.03-0.1)
    "dark": {"sigma": (0.01, 0.02, 0.04, 0.08, 0.14), "dim": (0.6, 0.4, 0.25, 0.12, 0.06)},
    # over-exposure (the simulator's saturated frames: x3-6)
    "saturated": {"gain": (1.3, 1.6, 2.0, 3.0, 5.0)},
    # a dragged probe: streak length, fraction of the field-of-view diameter (the simulator: 0.4-0.8)
    "smeared": {"length": (0.15, 0.25, 0.4, 0.55, 0.7)},
}

#: The group of each corruption (docs, tables).
CORRUPTION_FAMILIES: dict[str, str] = {
    "noise": "noise", "defocus": "blur", "motion_blur": "blur", "gamma": "intensity", "contrast": "intensity",
    "gain": "intensity", "fibre_pattern": "optics", "dark": "non-diagnostic", "saturated": "non-diagnostic",
    "smeared": "non-diagnostic",
}


# ----------------------------------------------------------------------------- helpers


def _check(images: Any, severity: int) -> np.ndarray:
    """Validate ``images (N, H, W, C)`` uint8 and ``severity`` in 0..5; return the images as an array."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {x.dtype} {x.shape}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be an integer 0..{MAX_SEVERITY}, got {severity!r}")
    return x


def _param(name: str, key: str, severity: int) -> float:
    """The schedule's ``key`` of corruption ``name`` at ``severity`` (1..5)."""
    return float(SEVERITY_SCHEDULE[name][key][severity - 1])


def field_of_view(images: Any) -> np.ndarray:
    """``(H, W)`` bool: the inscribed disc if the corners of frames ``(N, H, W, C)`` are dark (pCLE), else all True."""
    x = np.asarray(images)
    h, w = x.shape[1:3]
    try:
        circular = detect_circular_fov(x)["circular"]
    except ValueError:  # too small to have corners
        circular = False
    return inscribed_disc(h, w) if circular else np.ones((h, w), bool)


def _fov(images: np.ndarray, fov: Any) -> np.ndarray:
    """The ``(H, W)`` bool field of view to use: ``fov`` checked, or ``field_of_view(images)``."""
    if fov is None:
        return field_of_view(images)
    v = np.asarray(fov).astype(bool)
    if v.shape != images.shape[1:3]:
        raise ValueError(f"fov must have shape {images.shape[1:3]}, got {v.shape}")
    if not v.any():
        raise ValueError("fov (the field of view) has no pixel")
    return v


def _to_float(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` -> float64 in [0, 1]."""
    return images.astype(np.float64) / 255.0


def _finish(images: np.ndarray, out: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Clip ``out`` to [0, 1], round to uint8, keep ``images`` outside ``fov (H, W)``."""
    u8 = np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.where(fov[None, :, :, None], u8, images)


def _normalised_filter(x: np.ndarray, fov: np.ndarray, filt: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``filt(x v) / filt(v)`` of one channel ``x (H, W)`` over the field of view ``v``: the outside does not count."""
    v = fov.astype(np.float64)
    num = filt(x * v)
    den = filt(v)
    return np.where(den > 1e-9, num / np.maximum(den, 1e-12), x)


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``x (H, W)`` convolved with an odd-sized ``kernel``, zero outside, same size (= ``ndimage.convolve``, by FFT)."""
    return signal.fftconvolve(x, kernel, mode="same")


def _filter_images(x: np.ndarray, fov: np.ndarray, filters: list[Callable[[np.ndarray], np.ndarray]]) -> np.ndarray:
    """Apply ``filters[i]`` (normalised over ``fov``) to every channel of image ``i`` of ``x (N, H, W, C)``."""
    out = np.empty_like(x)
    for i in range(len(x)):
        for c in range(x.shape[-1]):
            out[i, ..., c] = _normalised_filter(x[i, ..., c], fov, filters[i])
    return out


def psnr(a: Any, b: Any, valid: Any = None) -> float:
    """PSNR (dB) of uint8 images ``b`` against ``a`` ``(N, H, W, C)`` inside ``valid (H, W)``; inf if equal."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if valid is not None:
        v = np.asarray(valid, bool)
        a64, b64 = a64[:, v], b64[:, v]
    mse = float(np.mean((a64 - b64) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


# ----------------------------------------------------------------------------- kernels


def disc_kernel(radius: float, subsamples: int = 64) -> np.ndarray:
    """``(2R+1, 2R+1)`` float64 summing to 1: the area of each pixel covered by a disc of ``radius`` px at the centre.

    Pixel coverage is measured on a ``subsamples`` x ``subsamples`` grid per pixel (an
    anti-aliased disc: a radius below half a pixel is the identity kernel).
    """
    if radius <= 0:
        return np.ones((1, 1))
    half = max(0, int(np.ceil(radius + 0.5)) - 1)  # pixel k spans [k - 1/2, k + 1/2]
    offs = (np.arange(subsamples) + 0.5) / subsamples - 0.5
    centres = np.arange(-half, half + 1, dtype=np.float64)
    sub = (centres[:, None] + offs[None, :]).ravel()  # (K * S,) sub-pixel coordinates along one axis
    inside = (sub[:, None] ** 2 + sub[None, :] ** 2) <= radius**2
    k = inside.reshape(len(centres), subsamples, len(centres), subsamples).sum(axis=(1, 3)).astype(np.float64)
    return k / k.sum()


def motion_kernel(length: float, angle: float) -> np.ndarray:
    """``(K, K)`` float64 summing to 1: a straight streak of ``length`` px at ``angle`` (0 = along x, pi/2 = along y).

    The segment is cut into ``n`` equal pieces (at most half a pixel long) and the midpoint of each
    is splatted bilinearly (the midpoint rule of a continuous exposure); the streak is centred, so
    the kernel does not shift the image.
    """
    if length <= 0:
        return np.ones((1, 1))
    n = int(np.ceil(2.0 * length)) + 1
    t = ((np.arange(n) + 0.5) / n - 0.5) * length
    pts = np.stack([t * np.sin(angle), t * np.cos(angle)], 1)
    half = int(np.ceil(length / 2.0)) + 1
    size = 2 * half + 1
    k = np.zeros((size, size))
    pos = pts + half
    y0, x0 = np.floor(pos[:, 0]).astype(int), np.floor(pos[:, 1]).astype(int)
    fy, fx = pos[:, 0] - y0, pos[:, 1] - x0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            np.add.at(k, (y0 + dy, x0 + dx), wy * wx)
    return k / k.sum()


# ----------------------------------------------------------------------------- corruptions


def noise(images: np.ndarray, severity: int, rng: np.random.Generator, *, fov: Any = None) -> np.ndarray:
    """Poisson-Gaussian noise of uint8 ``images (N, H, W, C)``: ``Poisson(p x) / p + N(0, r^2)`` inside the FOV."""
    images = _check(images, severity)
    if severity == 0:
        return images.copy()
    v = _fov(images, fov)
    p, r = _param("noise", "photons", severity), _param("noise", "read_noise", severity)
    x = _to_float(images)
    out = rng.poisson(p * x) / p + rng.normal(0.0, r, x.shape)
    return _finish(images, out, v)


def defocus(images: np.ndarray, severity: int, rng: np.random.Generator, *, fov: Any = None) -> np.ndarray:
    """Defocus blur of ``images (N, H, W, C)`` uint8: normalised convolution with ``disc_kernel`` inside the FOV."""
    images = _check(images, severity)
    if severity == 0:
        return images.copy()
    v = _fov(images, fov)
    k = disc_kernel(_param("defocus", "radius", severity) * min(images.shape[1:3]))

    def filt(a: np.ndarray) -> np.ndarray:
        return _convolve(a, k)

    return _finish(images, _filter_images(_to_float(images), v, [filt] * len(images)), v)


def _streak(name: str, images: np.ndarray, severity: int, rng: np.random.Generator, fov: Any,
            angles: Any) -> np.ndarray:
    """A line blur of schedule ``name`` along one direction per image (``angles (N,)`` or drawn uniform in [0, pi))."""
    images = _check(images, severity)
    if severity == 0:
        return images.copy()
    v = _fov(images, fov)
    n = len(images)
    a = rng.uniform(0.0, np.pi, n) if angles is None else np.broadcast_to(np.asarray(angles, np.float64), (n,))
    length = _param(name, "length", severity) * min(images.shape[1:3])
    filters = []
    for ang in a:
        k = motion_kernel(length, float(ang))
        filters.append(lambda x, k=k: _convolve(x, k))
    return _finish(images, _filter_images(_to_float(images), v, filters), v)


def motion_blur(images: np.ndarray, severity: int, rng: np.random.Generator, *, fov: Any = None,
                angles: Any = None) -> np.ndarray:
    """Motion blur of ``images (N, H, W, C)`` uint8 along a random direction per image (``angles (N,)`` to fix it)."""
    return _streak("motion_blur", images, severity, rng, fov, angles)


def smeared(images: np.ndarray, severity: int, rng: np.random.Generator, *, fov: Any = None,
            angles: Any = None) -> np.ndarray:
    """A dragged probe: a streak of a large fraction of the field of view over ``images (N, H, W, C)`` uint8."""
    return _streak("smeared", images, severity, rng, fov, angles)


def gamma(images: np.ndarray, severity: int, rng: np.random.Generator, *, fov: Any = None) -> np.ndarray:
    """``x ** gamma`` of ``images (N, H, W, C)`` uint8 inside the field of view (gamma > 1 darkens mid-tones)."""
    images = _check(images, severity)
    if severity == 0:
        return images.copy()
    v = _fov(images, fov)
    return _finish(images, _to_float(images) ** _param("gamma", "gamma", severity), v)


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator, *, fov: Any = None) -> np.ndarray:
    """``m + c (x - m)`` of ``images (N, H, W, C)`` uint8, ``m`` each frame's (and channel's) mean inside the FOV."""
    images = _check(images, severity)
    if severity == 0:
        return images.copy()
    v = _fov(images, fov)
    x = _to_float(images)
    m = x[:, v].mean(axis=1)[:, None, None, :]
    return _finish(images, m + _param("contrast", "factor", severity) * (x - m), v)


def _scaled(name: str, images: np.ndarray, severity: int, fov: Any) -> np.ndarray:
    """``g x`` with the ``gain`` of corruption ``name`` at ``severity``, inside the field of view, clipped."""
    images = _check(images, severity)
    if severity == 0:
        return images.copy()
    return _finish(images, _to_float(images) * _param(name, "gain", severity), _fov(images, fov))


def gain(images: np.ndarray, severity: int, rng: np.random.Generator, *, fov: Any = None) -> np.ndarray:
    """``g x`` with ``g < 1`` (under-exposure: fewer grey levels) of ``images (N, H, W, C)`` uint8."""
    return _scaled("gain", images, severity, fov)


def saturated(images: np.ndarray, severity: int, rng: np.random.Generator, *, fov: Any = None) -> np.ndarray:
    """``g x`` with ``g > 1``, clipped at white: an over-exposed (non-diagnostic) frame; ``(N, H, W, C)`` uint8."""
    return _scaled("saturated", images, severity, fov)


def dark(images: np.ndarray, severity: int, rng: np.random.Generator, *, fov: Any = None) -> np.ndarray:
    """Out of contact: Gaussian defocus (normalised over the field of view), then dimmed; ``(N, H, W, C)`` uint8."""
    images = _check(images, severity)
    if severity == 0:
        return images.copy()
    v = _fov(images, fov)
    sigma = _param("dark", "sigma", severity) * min(images.shape[1:3])

    def filt(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma, mode="constant", cval=0.0)

    blurred = _filter_images(_to_float(images), v, [filt] * len(images))
    return _finish(images, blurred * _param("dark", "dim", severity), v)


def fibre_pattern(images: np.ndarray, severity: int, rng: np.random.Generator, *, fov: Any = None) -> np.ndarray:
    """Square ``images (N, H, H, C)`` uint8 re-imaged through a new, coarser fibre bundle, one per call.

    The bundle is the simulator's (``data.fibre_bundle.make_bundle``: a jittered hexagonal lattice
    at a random angle) with per-core transmissions ``exp(N(0, transmission^2))`` left
    uncalibrated, no cross-talk, vignetting or dead cores: each core samples the frame bilinearly
    at its centre, times its transmission, and ``fibre_bundle.reconstruct`` interpolates the core
    values back onto the pixel grid; the same fixed pattern on every frame.
    """
    images = _check(images, severity)
    if severity == 0:
        return images.copy()
    h, w = images.shape[1:3]
    if h != w:
        raise ValueError(f"fibre_pattern re-images square pCLE frames, got {h}x{w}")
    v = _fov(images, fov)
    bundle = fb.make_bundle(rng, int(_param("fibre_pattern", "cores", severity)), h / 2.0, crosstalk=0.0,
                            transmission_std=_param("fibre_pattern", "transmission", severity), vignetting=0.0,
                            dead_fraction=0.0, calibration_error=0.0)
    bundle = dataclasses.replace(bundle, calibration=np.ones_like(bundle.calibration))  # uncalibrated
    pos = (bundle.yx + (h - 1) / 2.0).T
    x = _to_float(images)
    out = np.empty_like(x)
    for i in range(len(x)):
        for c in range(x.shape[-1]):
            values = ndimage.map_coordinates(x[i, ..., c], pos, order=1, mode="nearest") * bundle.transmission
            out[i, ..., c] = fb.reconstruct(bundle, values.astype(np.float32), h)
    return _finish(images, out, v)


#: name -> ``fn(images (N, H, W, C) uint8, severity 0..5, rng, *, fov=None) -> uint8``.
CORRUPTIONS: Mapping[str, Callable[..., np.ndarray]] = {
    "noise": noise, "defocus": defocus, "motion_blur": motion_blur, "gamma": gamma, "contrast": contrast,
    "gain": gain, "fibre_pattern": fibre_pattern, "dark": dark, "saturated": saturated, "smeared": smeared,
}
CORRUPTION_NAMES: tuple[str, ...] = tuple(CORRUPTIONS)


def check_names(names: Any) -> list[str]:
    """``names`` (None: all) as a list of known corruption names; an unknown name is a ``ValueError`` listing them."""
    if names is None:
        return list(CORRUPTION_NAMES)
    names = list(dict.fromkeys(names))
    bad = [n for n in names if n not in CORRUPTIONS]
    if bad:
        raise ValueError(f"unknown corruption(s) {', '.join(map(repr, bad))}; "
                         f"choose from {', '.join(CORRUPTION_NAMES)}")
    if not names:
        raise ValueError("no corruption given")
    return names


def corruption_rng(seed: int, name: str, severity: int) -> np.random.Generator:
    """The generator of corruption ``name`` at ``severity`` under ``seed``: independent of which others are run."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(severity)])


def corrupt(name: str, images: Any, severity: int, rng: np.random.Generator | int = 0, *,
            fov: Any = None) -> np.ndarray:
    """``CORRUPTIONS[name]`` of uint8 ``images (N, H, W, C)`` at ``severity`` 0..5; an int ``rng`` is a seed."""
    check_names([name])
    gen = rng if isinstance(rng, np.random.Generator) else corruption_rng(int(rng), name, int(severity))
    return CORRUPTIONS[name](images, severity, gen, fov=fov)


# ----------------------------------------------------------------------------- scoring


def _ratio(num: float, den: float) -> float | None:
    """``num / den``, or None when ``den <= 0`` (undefined)."""
    return float(num / den) if den > 0 else None


def mean_corruption_error(errors: Mapping[str, Any], reference: Mapping[str, Any], clean: float | None = None,
                          reference_clean: float | None = None) -> dict[str, Any]:
    """ImageNet-C's corruption errors of a model against a reference: ``CE_c``, ``mCE`` (and relative ones).

    ``errors[c]`` and ``reference[c]``: the top-1 errors ``(S,)`` at the same severities (1..5) of
    corruption ``c``. ``CE_c = sum_s E_c,s / sum_s E^ref_c,s`` and ``mCE = mean_c CE_c``
    (Hendrycks & Dietterich 2019); with the clean errors also ``relative CE_c = sum_s (E_c,s - E_clean)
    / sum_s (E^ref_c,s - E^ref_clean)`` and its mean ``relative_mce``. A ratio whose denominator
    is not positive is None and left out of the mean (``n`` counts the corruptions used).
    Returns ``{ce, mce, n, relative_ce, relative_mce, relative_n}`` (plain floats / None).
    """
    missing = sorted(set(errors) - set(reference))
    if missing:
        raise ValueError(f"the reference has no errors for corruption(s) {missing}")
    ce: dict[str, float | None] = {}
    rel: dict[str, float | None] = {}
    for c, e in errors.items():
        e, r = np.asarray(e, np.float64), np.asarray(reference[c], np.float64)
        if e.shape != r.shape or e.ndim != 1:
            raise ValueError(f"corruption {c!r}: errors {e.shape} and reference {r.shape} must be the same severities")
        ce[c] = _ratio(float(e.sum()), float(r.sum()))
        if clean is not None and reference_clean is not None:
            rel[c] = _ratio(float((e - clean).sum()), float((r - reference_clean).sum()))
    used = [v for v in ce.values() if v is not None]
    rel_used = [v for v in rel.values() if v is not None]
    return {"ce": ce, "mce": float(np.mean(used)) if used else None, "n": len(used),
            "relative_ce": rel or None, "relative_mce": float(np.mean(rel_used)) if rel_used else None,
            "relative_n": len(rel_used)}
