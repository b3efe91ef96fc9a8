"""Shortcut measurements: global image statistics and class-blind saliency baselines (NumPy/SciPy).

Two questions a dataset must answer before a classifier's accuracy or its saliency maps mean
anything:

* Can the class be read off **global statistics** of a frame (brightness, contrast,
  histogram shape, the power spectrum, mean gradient)? ``global_statistics`` computes such
  features inside the field of view; ``lclsc_jax.protocols.audit`` fits simple classifiers on
  them, patient-wise.
* How well does a **class-blind** map localise the evidence? ``blind_map`` gives maps that
  never see the label (local standard deviation, band-pass energy, a centre prior, noise);
  their Dice against the masks is the floor a saliency method has to beat.

Arrays in, numbers out: nothing here imports the data, training or protocol layers.
Images are ``(N, H, W)`` or ``(N, H, W, C)``, uint8/uint16 (scaled by the dtype's maximum) or
float (taken as [0, 1]); several channels are reduced to luminance (0.299 R + 0.587 G + 0.114 B).
``valid`` is an optional ``(H, W)`` boolean field of view (pCLE's circular disc).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from lclsc_jax.evaluate.localisation import normalize_maps

__all__ = [
    "BLIND_MAPS",
    "FEATURE_GROUPS",
    "HISTOGRAM_PERCENTILES",
    "N_SPECTRUM_BANDS",
    "blind_map",
    "centre_map",
    "corner_means",
    "detect_circular_fov",
    "dog_map",
    "estimate_fov", "fov_or_none",
    "feature_group",
    "feature_names",
    "global_statistics",
    "inscribed_disc",
    "local_std_map",
    "random_map",
    "spectrum_band_edges",
    "to_luminance",
]

#: Feature groups of ``global_statistics`` (the prefix of every feature name).
FEATURE_GROUPS: tuple[str, ...] = ("histogram", "spectrum", "gradient")
HISTOGRAM_PERCENTILES: tuple[int, ...] = (1, 5, 25, 50, 75, 95, 99)
N_SPECTRUM_BANDS = 8
#: Class-blind saliency baselines of ``blind_map``.
BLIND_MAPS: tuple[str, ...] = ("local_std", "dog", "centre", "random")
#: Local contrast below this (in luminance units, [0, 1]) is rounding noise of a flat region, not texture:
#: far below one grey level of an 8-bit (1/255) or 16-bit image.
_FLAT = 1e-7


# ------------------------------------------------------------------------------ inputs


def to_luminance(images: Any) -> np.ndarray:
    """``(N, H, W)`` float64 in [0, 1] from images ``(N, H, W)`` or ``(N, H, W, C)``; RGB(A) -> luminance."""
    x = np.asarray(images)
    if x.ndim == 4:
        c = x.shape[-1]
        if c >= 3:
            lum = 0.299 * x[..., 0].astype(np.float64) + 0.587 * x[..., 1] + 0.114 * x[..., 2]
        elif c in (1, 2):  # grey (+ alpha)
            lum = x[..., 0].astype(np.float64)
        else:
            raise ValueError(f"images have {c} channels; expected 1 to 4")
    elif x.ndim == 3:
        lum = x.astype(np.float64)
    else:
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C), got {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        lum = lum / float(np.iinfo(x.dtype).max)
    elif x.dtype == bool:
        lum = lum.astype(np.float64)
    if not np.all(np.isfinite(lum)):
        raise ValueError("images contain NaN or inf")
    return lum


def _valid(valid: Any, shape: tuple[int, int]) -> np.ndarray:
    """A boolean ``(H, W)`` field of view (all True when None); must not be empty."""
    if valid is None:
        return np.ones(shape, bool)
    v = np.asarray(valid).astype(bool)
    if v.shape != shape:
        raise ValueError(f"valid must have shape {shape}, got {v.shape}")
    if not v.any():
        raise ValueError("valid (the field of view) has no pixel")
    return v


def inscribed_disc(h: int, w: int) -> np.ndarray:
    """pCLE's circular field of view ``(H, W)`` bool: pixels (or feature cells) whose centre lies in the inscribed disc.

    The one copy of the disc: ``benchmark-cams`` scores inside it, the SC loss masks feature maps
    with it (``loss.fov_mask``). It is invariant under the dihedral group and never empty.
    """
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h - 0.5, (np.arange(w) + 0.5) / w - 0.5, indexing="ij")
    return (yy**2 + xx**2) <= 0.25


def corner_means(images: Any, margin: float = 1.1) -> np.ndarray:
    """Mean luminance ``(N,)`` of each frame's corners: pixels beyond ``margin`` x the inscribed disc's radius."""
    lum = to_luminance(images)
    h, w = lum.shape[1:]
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h - 0.5, (np.arange(w) + 0.5) / w - 0.5, indexing="ij")
    corners = np.sqrt(yy**2 + xx**2) > 0.5 * margin
    if not corners.any():
        raise ValueError(f"images of {h}x{w} px have no corner pixels beyond {margin} x the inscribed radius")
    return lum[:, corners].mean(axis=1)


def detect_circular_fov(images: Any, *, dark_level: float = 0.08, min_fraction: float = 0.95,
                        margin: float = 1.1) -> dict[str, Any]:
    """Whether frames ``(N, H, W[, C])`` have a circular field of view: corners dark in (almost) every frame.

    A frame's corners are dark when their mean luminance (``corner_means``) is at most
    ``dark_level`` (in [0, 1]); the field of view is circular when at least ``min_fraction`` of
    the frames have dark corners. Returns ``{circular, dark_fraction, n_frames, dark_level,
    min_fraction}``.
    """
    means = corner_means(images, margin)
    frac = float(np.mean(means <= dark_level)) if len(means) else 0.0
    return {"circular": bool(len(means) and frac >= min_fraction), "dark_fraction": frac,
            "n_frames": int(len(means)), "dark_level": float(dark_level), "min_fraction": float(min_fraction)}


def estimate_fov(images: Any, *, dark_level: float = 0.08, min_fraction: float = 0.95,
                 edge_px: float = 1.5) -> dict[str, Any]:
    """The field of view of frames ``(N, H, W[, C])``: ``detect_circular_fov`` plus the disc's measured radius.

    When the field of view is circular, its radius is where the median frame turns dark: the
    first 1-px ring around the centre in which fewer than half of the pixels exceed
    ``dark_level`` (at most the inscribed radius). ``valid (H, W)`` is the disc ``edge_px``
    inside that radius (the soft, dimmed edge left out), within the inscribed disc. A fibre
    bundle's field of view is often a little smaller than the inscribed disc; the dark rim in
    between would otherwise look like texture (an edge) to local filters. Returns
    ``{circular, dark_fraction, n_frames, dark_level, min_fraction, radius_px, valid}``;
    ``radius_px`` and ``valid`` are None when the field of view is not circular.
    """
    det = detect_circular_fov(images, dark_level=dark_level, min_fraction=min_fraction)
    out: dict[str, Any] = {**det, "radius_px": None, "valid": None}
    if not det["circular"]:
        return out
    lum = to_luminance(images)
    h, w = lum.shape[1:]
    lit = np.median(lum, axis=0) > dark_level
    yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    d = np.hypot(yy, xx)
    inscribed = min(h, w) / 2
    radius, disc = inscribed, inscribed_disc(h, w)
    valid = disc  # lit up to the inscribed radius: the inscribed disc itself
    for r0 in np.arange(0.0, inscribed, 1.0):
        ring = (d >= r0) & (d < r0 + 1)
        if ring.any() and lit[ring].mean() < 0.5:
            radius = float(r0)
            valid = (d <= radius - edge_px) & disc
            break
    if not valid.any():  # a tiny or dark field of view: fall back to the inscribed disc
        valid = disc
    out.update(radius_px=float(radius), valid=valid)
    return out


# ------------------------------------------------------------------- global statistics



def fov_or_none(images: Any) -> np.ndarray | None:
    """The measured field of view ``(H, W)`` of frames ``(N, H, W[, C])`` uint8, or None (not circular, too small)."""
    try:
        return estimate_fov(images)["valid"]
    except ValueError:  # frames too small to have corners
        return None

def spectrum_band_edges(h: int, w: int, n_bands: int = N_SPECTRUM_BANDS) -> np.ndarray:
    """``(n_bands + 1,)`` log-spaced radial frequency edges (cycles/px), lowest non-zero frequency to the corner."""
    return np.geomspace(1.0 / max(h, w), np.sqrt(0.5), n_bands + 1)


def feature_names(n_bands: int = N_SPECTRUM_BANDS) -> tuple[str, ...]:
    """Names of the ``global_statistics`` features, ``<group>.<statistic>``, in column order."""
    hist = ["mean", "std", "skewness", "kurtosis"] + [f"p{q:02d}" for q in HISTOGRAM_PERCENTILES]
    spec = [f"band{b + 1}" for b in range(n_bands)] + ["log_energy"]
    grad = ["magnitude_mean", "coherence"]
    return tuple([f"histogram.{n}" for n in hist] + [f"spectrum.{n}" for n in spec] + [f"gradient.{n}" for n in grad])


def feature_group(name: str) -> str:
    """The group (``histogram``, ``spectrum`` or ``gradient``) of a feature name."""
    group = name.split(".", 1)[0]
    if group not in FEATURE_GROUPS:
        raise ValueError(f"{name!r} is not a global_statistics feature (groups: {FEATURE_GROUPS})")
    return group


def _histogram_stats(vals: np.ndarray) -> np.ndarray:
    """Mean, std, skewness, kurtosis (Fisher; biased, as scipy.stats' defaults) and percentiles of ``vals (N, P)``."""
    mean = vals.mean(axis=1)
    d = vals - mean[:, None]
    m2 = (d**2).mean(axis=1)
    m3 = (d**3).mean(axis=1)
    m4 = (d**4).mean(axis=1)
    flat = m2 <= 1e-20  # a constant image: skewness and kurtosis are undefined; report 0
    safe = np.where(flat, 1.0, m2)
    skew = np.where(flat, 0.0, m3 / safe**1.5)
    kurt = np.where(flat, 0.0, m4 / safe**2 - 3.0)
    pct = np.percentile(vals, HISTOGRAM_PERCENTILES, axis=1).T
    return np.column_stack([mean, np.sqrt(m2), skew, kurt, pct])


def _spectrum_stats(lum: np.ndarray, v: np.ndarray, n_bands: int) -> np.ndarray:
    """Band energy fractions and total log-energy of the FOV-windowed, mean-removed power spectrum."""
    n, h, w = lum.shape
    mean = lum[:, v].mean(axis=1)
    xw = (lum - mean[:, None, None]) * v  # the FOV as the window; zero mean inside it
    power = np.abs(np.fft.fft2(xw, axes=(1, 2))) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    r = np.sqrt(fy**2 + fx**2)
    nz = r > 0
    edges = spectrum_band_edges(h, w, n_bands)
    band = np.clip(np.searchsorted(edges, r[nz], side="right") - 1, 0, n_bands - 1)
    p = power[:, nz]
    energy = np.stack([p[:, band == b].sum(axis=1) for b in range(n_bands)], axis=1)
    total = energy.sum(axis=1)
    frac = np.where(total[:, None] > 0, energy / np.where(total > 0, total, 1.0)[:, None], 0.0)
    # Parseval: sum |X|^2 = H W sum |x_w|^2, so this is the log of the variance inside the FOV.
    log_energy = np.log(total / (h * w * v.sum()) + 1e-12)
    return np.column_stack([frac, log_energy])


def _gradients(lum: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Central-difference gradients ``gy, gx (N, H, W)`` and the pixels ``(H, W)`` whose 3x3 neighbourhood is valid."""
    gy, gx = np.gradient(lum, axis=(1, 2))
    inner = ndimage.binary_erosion(v, structure=np.ones((3, 3), bool), border_value=0)
    if not inner.any():  # a tiny field of view: use it as it is
        inner = v
    return gy, gx, inner


def _gradient_stats(lum: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mean gradient magnitude and structure-tensor coherence of the whole frame, inside the eroded FOV."""
    gy, gx, inner = _gradients(lum, v)
    gy, gx = gy[:, inner], gx[:, inner]
    mag = np.sqrt(gy**2 + gx**2).mean(axis=1)
    jxx, jyy, jxy = (gx**2).sum(axis=1), (gy**2).sum(axis=1), (gx * gy).sum(axis=1)
    tr = jxx + jyy
    coh = np.where(tr > 0, np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / np.where(tr > 0, tr, 1.0), 0.0)
    return np.column_stack([mag, coh])


def global_statistics(images: Any, valid: Any = None, *, n_bands: int = N_SPECTRUM_BANDS,
                      chunk: int = 64) -> tuple[np.ndarray, tuple[str, ...]]:
    """Global statistics of images ``(N, H, W[, C])`` inside ``valid (H, W)``: ``(features (N, F) float64, names)``.

    Per frame (luminance in [0, 1], pixels of ``valid`` only):

    * ``histogram.*``: mean, std, skewness and kurtosis (Fisher; biased, as ``scipy.stats``;
      0 for a constant frame), percentiles 1, 5, 25, 50, 75, 95, 99 (``np.percentile``, linear);
    * ``spectrum.band1..band<n_bands>``: shares of the power spectrum's energy in ``n_bands``
      log-spaced radial frequency bands (``spectrum_band_edges``; band 1 the lowest), the
      spectrum taken of ``(x - mean) * valid`` (mean inside the FOV removed, the FOV as window,
      DC excluded); ``spectrum.log_energy``: log of the total energy per FOV pixel;
    * ``gradient.magnitude_mean``: mean central-difference gradient magnitude (``np.gradient``),
      ``gradient.coherence``: orientation anisotropy of the whole frame,
      ``sqrt((Jxx - Jyy)^2 + 4 Jxy^2) / (Jxx + Jyy)`` of the summed structure tensor (0 isotropic,
      1 one orientation); both over the FOV pixels whose 3x3 neighbourhood lies in the FOV (the
      FOV's own edge is not a gradient of the tissue).
    """
    lum = to_luminance(images)
    v = _valid(valid, lum.shape[1:])
    if lum.shape[0] == 0:
        return np.zeros((0, len(feature_names(n_bands)))), feature_names(n_bands)
    out = []
    for i in range(0, len(lum), chunk):
        x = lum[i:i + chunk]
        out.append(np.column_stack([_histogram_stats(x[:, v]), _spectrum_stats(x, v, n_bands),
                                    _gradient_stats(x, v)]))
    return np.concatenate(out).astype(np.float64), feature_names(n_bands)


# ------------------------------------------------------------------- class-blind maps


def _masked_filter(filt: Callable[[np.ndarray], np.ndarray], x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Normalised convolution ``filt(x v) / filt(v)``: a local average over valid pixels only (0 where none)."""
    vf = v.astype(np.float64)[None]
    num, den = filt(x * vf), filt(vf)
    return np.where(den > 1e-12, num / np.where(den > 1e-12, den, 1.0), 0.0)


def local_std_map(images: Any, valid: Any = None, *, size: int = 7) -> np.ndarray:
    """``(N, H, W)`` in [0, 1]: standard deviation in a ``size x size`` window (reflected borders).

    With ``valid`` only valid pixels enter each window (the dark corners outside pCLE's field of
    view do not make its edge "textured"); without it this equals
    ``scipy.ndimage.generic_filter(x, np.std, size, mode="reflect")``. Min-max normalised within ``valid``.
    """
    lum = to_luminance(images)
    v = _valid(valid, lum.shape[1:])

    def box(a: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(a, size=(1, size, size), mode="reflect")

    x = lum - lum[:, v].mean(axis=1)[:, None, None]  # centred: less cancellation in E[x^2] - E[x]^2
    mean = _masked_filter(box, x, v)
    sq = _masked_filter(box, x**2, v)
    std = np.sqrt(np.clip(sq - mean**2, 0.0, None))
    return normalize_maps(np.where(std > _FLAT, std, 0.0), v)


def dog_map(images: Any, valid: Any = None, *, sigma_low: float = 1.0, sigma_high: float = 3.0,
            smooth: float = 2.0) -> np.ndarray:
    """``(N, H, W)`` in [0, 1]: band-pass energy ``G_smooth * |G_low * x - G_high * x|`` (Gaussians, sigmas in px).

    Without ``valid`` the band-pass is ``skimage.filters.difference_of_gaussians(x, sigma_low,
    sigma_high)`` (nearest-edge borders); with ``valid`` every Gaussian average is taken over valid
    pixels only (normalised convolution). Min-max normalised within ``valid``.
    """
    if not 0 < sigma_low <= sigma_high:
        raise ValueError(f"need 0 < sigma_low <= sigma_high, got {sigma_low}, {sigma_high}")
    lum = to_luminance(images)
    v = _valid(valid, lum.shape[1:])

    def gauss(s: float) -> Callable[[np.ndarray], np.ndarray]:
        return lambda a: ndimage.gaussian_filter(a, sigma=(0, s, s), mode="nearest")

    band = np.abs(_masked_filter(gauss(sigma_low), lum, v) - _masked_filter(gauss(sigma_high), lum, v))
    energy = _masked_filter(gauss(smooth), band, v) if smooth > 0 else band
    return normalize_maps(np.where(energy > _FLAT, energy, 0.0), v)


def centre_map(images: Any, valid: Any = None, *, sigma: float = 0.25) -> np.ndarray:
    """``(N, H, W)`` in [0, 1]: a centred Gaussian ``exp(-d^2 / (2 (sigma min(H, W))^2))``, d in px from the centre."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    shape = np.shape(images)
    if len(shape) not in (3, 4):
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C), got {shape}")
    n, h, w = shape[:3]
    v = _valid(valid, (h, w))
    yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    g = np.exp(-(yy**2 + xx**2) / (2 * (sigma * min(h, w)) ** 2))
    return normalize_maps(np.broadcast_to(g, (n, h, w)), v)


def random_map(images: Any, valid: Any = None, *, seed: int = 0) -> np.ndarray:
    """``(N, H, W)`` in [0, 1]: i.i.d. uniform noise from ``numpy.random.default_rng(seed)``, scaled within ``valid``."""
    shape = np.shape(images)
    if len(shape) not in (3, 4):
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C), got {shape}")
    n, h, w = shape[:3]
    v = _valid(valid, (h, w))
    return normalize_maps(np.random.default_rng(seed).random((n, h, w)), v)


def blind_map(name: str, images: Any, valid: Any = None, *, seed: int = 0, **params: Any) -> np.ndarray:
    """Class-blind saliency maps ``(N, H, W)`` in [0, 1] (0 outside ``valid``) of images ``(N, H, W[, C])``.

    ``name`` in ``BLIND_MAPS``: ``local_std`` (``local_std_map``), ``dog`` (``dog_map``),
    ``centre`` (``centre_map``), ``random`` (``random_map``, seeded by ``seed``); ``params`` go to
    that function (e.g. ``size=9`` for ``local_std``).
    """
    if name == "local_std":
        return local_std_map(images, valid, **params)
    if name == "dog":
        return dog_map(images, valid, **params)
    if name == "centre":
        return centre_map(images, valid, **params)
    if name == "random":
        return random_map(images, valid, seed=seed, **params)
    raise ValueError(f"unknown class-blind map {name!r}; expected one of {BLIND_MAPS}")
