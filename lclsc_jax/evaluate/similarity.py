"""Similarity of two stacks of saliency maps, per image (NumPy/SciPy/scikit-image).

The measures of Adebayo et al. 2018, "Sanity Checks for Saliency Maps" (NeurIPS): the Spearman
rank correlation of the maps (signed, and of their absolute values), SSIM, and the Pearson
correlation of their HOG descriptors. ``lclsc_jax.protocols.sanity`` compares the maps of a
trained model with those of the same model with parameters re-initialised; pure scoring here.

Maps are ``(N, H, W)`` float arrays, compared image by image: every function returns ``(N,)``.

Conventions where a correlation is undefined (a constant map has no ranking and a zero HOG
descriptor): two constant maps count as 1 (the same, empty, ranking), a constant map against a
varying one as 0 (they share no ranking). A flat map is what our CAM normalisation returns for
an all-negative raw map, so a randomised model often produces one: 0 is "no longer similar".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage, stats
from skimage.feature import hog

__all__ = [
    "SIMILARITIES",
    "hog_descriptors",
    "hog_similarity",
    "map_similarities",
    "pearson_rows",
    "spearman",
    "ssim",
    "summarize",
]

#: The measures of ``map_similarities``, in table order.
SIMILARITIES: tuple[str, ...] = ("spearman_abs", "spearman_signed", "ssim", "hog")


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a, b`` as float64 ``(N, H, W)`` of the same shape; ``ValueError`` otherwise."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim == 2 and b.ndim == 2:  # one map each
        a, b = a[None], b[None]
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"maps must be two (N, H, W) arrays of the same shape, got {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("maps contain NaN or inf")
    return a, b


def pearson_rows(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``u, v (N, K)``: ``(N,)``; constant rows as in the module docstring."""
    u = np.asarray(u, np.float64).reshape(len(u), -1)
    v = np.asarray(v, np.float64).reshape(len(v), -1)
    uc = u - u.mean(axis=1, keepdims=True)
    vc = v - v.mean(axis=1, keepdims=True)
    nu = np.sqrt((uc * uc).sum(axis=1))
    nv = np.sqrt((vc * vc).sum(axis=1))
    flat_u = np.ptp(u, axis=1) == 0
    flat_v = np.ptp(v, axis=1) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (uc * vc).sum(axis=1) / (nu * nv)
    r = np.where(flat_u | flat_v, np.where(flat_u & flat_v, 1.0, 0.0), r)
    return np.clip(r, -1.0, 1.0)


def spearman(a: np.ndarray, b: np.ndarray, absolute: bool = False) -> np.ndarray:
    """Spearman rank correlation (average ranks for ties) of maps ``a, b (N, H, W)`` per image: ``(N,)``.

    ``absolute=True`` ranks ``|a|`` and ``|b|`` (the paper's "absolute value" variant).
    """
    a, b = _pair(a, b)
    if absolute:
        a, b = np.abs(a), np.abs(b)
    ra = stats.rankdata(a.reshape(len(a), -1), axis=1)
    rb = stats.rankdata(b.reshape(len(b), -1), axis=1)
    return pearson_rows(ra, rb)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, win_size: int = 7) -> np.ndarray:
    """Mean structural similarity of maps ``a, b (N, H, W)`` per image: ``(N,)``.

    Wang et al. 2004 with scikit-image's defaults: a ``win_size`` x ``win_size`` uniform window,
    sample covariances, ``K1 = 0.01``, ``K2 = 0.03``, the mean over the interior (the border of
    ``(win_size - 1) // 2`` pixels cropped). ``data_range``: 1 for maps in [0, 1].
    """
    a, b = _pair(a, b)
    if win_size < 3 or win_size % 2 == 0 or min(a.shape[1:]) < win_size:
        raise ValueError(f"win_size must be odd, >= 3 and <= the map size {a.shape[1:]}, got {win_size}")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    size = (1, win_size, win_size)
    mean = lambda z: ndimage.uniform_filter(z, size=size)  # noqa: E731 - local shorthand
    cov_norm = win_size**2 / (win_size**2 - 1.0)
    ua, ub = mean(a), mean(b)
    va = cov_norm * (mean(a * a) - ua * ua)
    vb = cov_norm * (mean(b * b) - ub * ub)
    vab = cov_norm * (mean(a * b) - ua * ub)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    p = (win_size - 1) // 2
    return s[:, p:s.shape[1] - p, p:s.shape[2] - p].mean(axis=(1, 2))


def _cell(shape: Sequence[int], pixels_per_cell: int | None) -> int:
    """HOG cell size: ``pixels_per_cell``, or an eighth of the smaller side (at least 2 pixels)."""
    cell = pixels_per_cell if pixels_per_cell is not None else max(2, min(shape) // 8)
    if cell < 1 or 2 * cell > min(shape):
        raise ValueError(f"pixels_per_cell={cell} leaves fewer than 2x2 cells in maps of size {tuple(shape)}")
    return int(cell)


def hog_descriptors(maps: np.ndarray, pixels_per_cell: int | None = None, orientations: int = 9) -> np.ndarray:
    """HOG descriptors ``(N, K)`` of maps ``(N, H, W)`` (``skimage.feature.hog``, 2x2-cell blocks, L2-Hys).

    ``pixels_per_cell=None``: an eighth of the smaller side, so a map has 8 x 8 cells at any size.
    """
    maps = np.asarray(maps, np.float64)
    cell = _cell(maps.shape[1:], pixels_per_cell)
    return np.stack([hog(m, orientations=orientations, pixels_per_cell=(cell, cell), cells_per_block=(2, 2),
                         block_norm="L2-Hys", feature_vector=True) for m in maps])


def hog_similarity(a: np.ndarray, b: np.ndarray, pixels_per_cell: int | None = None) -> np.ndarray:
    """Pearson correlation of the HOG descriptors of maps ``a, b (N, H, W)`` per image: ``(N,)``."""
    a, b = _pair(a, b)
    return pearson_rows(hog_descriptors(a, pixels_per_cell), hog_descriptors(b, pixels_per_cell))


def map_similarities(maps_a: np.ndarray, maps_b: np.ndarray, raw_a: np.ndarray | None = None,
                     raw_b: np.ndarray | None = None, data_range: float = 1.0) -> dict[str, np.ndarray]:
    """Every measure of ``SIMILARITIES`` per image, each ``(N,)``.

    ``maps_a, maps_b (N, H, W)``: the maps as shown (in [0, 1]), scored by SSIM and HOG.
    ``raw_a, raw_b``: the raw, signed maps (default: the shown ones), scored by the Spearman
    correlation of their absolute values (``spearman_abs``) and of their signed values.
    """
    raw_a = maps_a if raw_a is None else raw_a
    raw_b = maps_b if raw_b is None else raw_b
    return {"spearman_abs": spearman(raw_a, raw_b, absolute=True),
            "spearman_signed": spearman(raw_a, raw_b, absolute=False),
            "ssim": ssim(maps_a, maps_b, data_range=data_range),
            "hog": hog_similarity(maps_a, maps_b)}


def summarize(values: np.ndarray) -> dict[str, float | int]:
    """``{"mean", "sd", "n"}`` of per-image values ``(N,)``; ``sd`` with ddof=1 (0 for one value)."""
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("no values to summarise")
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}
