"""Per-record NumPy augmentation (geometric ops move the mask too) and normalisation.

Normalisation (fixed, dataset-independent, used by every pipeline and by predict/explain):
``x = (u8 / 255 - 0.5) / 0.25``, i.e. [0, 255] -> [-2, 2]; ``denormalize_images`` inverts it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lclsc_jax.data.settings import AugmentConfig
from lclsc_jax.method.transforms import dihedral_np

NORM_MEAN = 0.5
NORM_STD = 0.25


def normalize_images(u8: np.ndarray) -> np.ndarray:
    """uint8 images (..., H, W, C) -> float32 ``(u8/255 - 0.5) / 0.25``."""
    x = np.asarray(u8, dtype=np.float32) * np.float32(1.0 / 255.0)
    return (x - np.float32(NORM_MEAN)) * np.float32(1.0 / NORM_STD)


def denormalize_images(x) -> np.ndarray:
    """Normalised float images (..., H, W, C) -> float32 in [0, 1] for display."""
    y = np.asarray(x, dtype=np.float32) * np.float32(NORM_STD) + np.float32(NORM_MEAN)
    return np.clip(y, 0.0, 1.0)


def _affine(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig):
    """Random rotation/scale/translation about the centre; image bilinear, mask nearest."""
    h, w = mask.shape
    ang = np.deg2rad(rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees))
    sc = rng.uniform(*cfg.scale)
    shift = rng.uniform(-cfg.translate, cfg.translate, size=2) * np.array([h, w])
    if ang == 0.0 and sc == 1.0 and not shift.any():
        return image, mask
    # Output pixel o samples input  A @ (o - c - shift) + c  (inverse map).
    cos, sin = np.cos(ang) / sc, np.sin(ang) / sc
    mat = np.array([[cos, -sin], [sin, cos]])
    c = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = c - mat @ (c + shift)
    out = np.empty_like(image)
    for ch in range(image.shape[-1]):
        out[..., ch] = ndimage.affine_transform(image[..., ch], mat, offset, order=1, mode="constant")
    m = ndimage.affine_transform(mask, mat, offset, order=0, mode="constant")
    return out, m


def augment_record(
    image_u8: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Augment one record: uint8 (H, W, C), uint8 (H, W) -> float32 [0,1] (H, W, C), uint8 (H, W).

    A volume (D, H, W, C) with mask (D, H, W) gets a random flip along each spatial axis
    (``flips``) and the intensity ops; rot90 and the affine are 2D-only and skipped.
    """
    x = image_u8.astype(np.float32) * np.float32(1.0 / 255.0)
    m = mask
    if not cfg.enabled:
        return x, m
    if m.ndim == 3:
        if cfg.flips:
            for axis in range(3):
                if rng.integers(0, 2):
                    x, m = np.flip(x, axis), np.flip(m, axis)
            x, m = np.ascontiguousarray(x), np.ascontiguousarray(m)
    elif cfg.rot90 or cfg.flips:
        k = int(rng.integers(0, 4)) if cfg.rot90 else 0
        f = int(rng.integers(0, 2)) if cfg.flips else 0
        t = k + 4 * f
        x, m = dihedral_np(x, t), dihedral_np(m, t)
    if m.ndim == 2 and cfg.affine and (cfg.rotation_degrees or cfg.translate or cfg.scale != (1.0, 1.0)):
        x, m = _affine(x, m, rng, cfg)
    if cfg.intensity and (cfg.brightness or cfg.contrast):
        c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        b = rng.uniform(-cfg.brightness, cfg.brightness)
        mu = x.mean()
        x = np.clip((x - mu) * np.float32(c) + np.float32(mu + b), 0.0, 1.0)
    return x.astype(np.float32, copy=False), m
