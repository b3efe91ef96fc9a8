"""Reading, writing, resampling and normalising 3D volumes (NIfTI via nibabel, NumPy ``.npy``).

Conventions (the project's 3D contract):
  * a volume is channels-last ``(D, H, W, C)`` float32; its axes are the NIfTI's voxel axes
    ``(i, j, k)`` as nibabel returns them, so an array written back with the same affine lines
    up with the input in 3D Slicer / ITK-SNAP; a 4D NIfTI's 4th axis is the channel axis;
  * ``.npy`` files have no geometry: affine = identity, spacing = 1 (an ``(D, H, W)`` or
    ``(D, H, W, C)`` array);
  * several single-channel files make one multi-channel volume when a manifest's ``path`` cell
    lists them separated by ``;`` (e.g. ``s1/t1c.nii.gz;s1/flair.nii.gz``); they must share
    their voxel grid (shape); the first file's affine is the volume's;
  * :func:`resample` maps a volume to the model's grid and returns the new affine, so that a map
    computed at the model's resolution and written with it lies on the input in world coordinates;
  * :func:`normalize_intensity` scales each channel to [0, 1] by its 1st and 99th percentiles.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from scipy import ndimage

from lclsc_jax.data.io import VOLUME_EXTENSIONS, DataError

PATH_SEPARATOR = ";"  # a manifest's `path` cell: several files = several channels
MIN_VOLUME_SIZE = 4  # voxels per side


@dataclasses.dataclass(frozen=True)
class Volume:
    """A volume read from disk: array float32 (D, H, W, C), affine float64 (4, 4), spacing float64 (3,)."""

    array: np.ndarray
    affine: np.ndarray
    spacing: np.ndarray
    path: str = ""


def is_volume_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` (or every ``;``-separated part of it) ends in a volume extension."""
    parts = str(path).split(PATH_SEPARATOR)
    return all(p.strip().lower().endswith(VOLUME_EXTENSIONS) for p in parts)


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (3,): the lengths of the affine's first three columns."""
    return np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))


def _read_one(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One file -> (array float32 (D, H, W, C), affine (4, 4)); ``DataError`` naming the file otherwise."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file does not exist")
    low = path.lower()
    try:
        if low.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
            affine = np.eye(4)
        elif low.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(path)
            arr = np.asarray(img.dataobj)
            affine = np.asarray(img.affine, np.float64)
        else:
            raise DataError(f"{path}: not a volume file (expected one of {list(VOLUME_EXTENSIONS)})")
    except DataError:
        raise
    except Exception as e:  # nibabel/numpy raise many types for broken files
        raise DataError(f"{path}: unreadable or truncated volume ({type(e).__name__}: {e})") from e
    if arr.dtype != bool and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{path}: unsupported voxel type {arr.dtype}")
    if arr.ndim == 5 and arr.shape[3] == 1:  # NIfTI (X, Y, Z, 1, C) vector images
        arr = arr[:, :, :, 0, :]
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise DataError(f"{path}: volume has shape {arr.shape}; expected 3D (D, H, W) or 4D (D, H, W, C)")
    if min(arr.shape[:3]) < MIN_VOLUME_SIZE:
        raise DataError(f"{path}: volume is {arr.shape[:3]} voxels, below the minimum of {MIN_VOLUME_SIZE} per side")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: singular or non-finite affine {affine.tolist()}")
    return arr.astype(np.float32), affine


def read_volume(path: str | os.PathLike) -> Volume:
    """Read ``.nii``/``.nii.gz``/``.npy`` (or ``a;b;...`` files as channels) -> :class:`Volume` (D, H, W, C)."""
    parts = [p.strip() for p in str(path).split(PATH_SEPARATOR) if p.strip()]
    if not parts:
        raise DataError(f"{path!r}: empty volume path")
    arrays, affine = [], None
    for p in parts:
        arr, aff = _read_one(p)
        if affine is None:
            affine = aff
        elif arr.shape[:3] != arrays[0].shape[:3]:
            raise DataError(f"{p}: shape {arr.shape[:3]} differs from {parts[0]}'s {arrays[0].shape[:3]}; the "
                            "channel files of one volume must share their voxel grid")
        arrays.append(arr)
    arr = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-1)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{path}: volume contains NaN or infinite values")
    return Volume(array=arr, affine=affine, spacing=spacing_of(affine), path=str(path))


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    """Write (D, H, W) or (D, H, W, C) ``array`` with ``affine`` (default identity) as NIfTI-1; returns the path."""
    import nibabel as nib

    arr = np.asarray(array)
    if arr.ndim not in (3, 4):
        raise ValueError(f"write_nifti: array must be (D, H, W) or (D, H, W, C), got {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    aff = np.eye(4) if affine is None else np.asarray(affine, np.float64)
    img = nib.Nifti1Image(arr, aff)
    img.header.set_xyzt_units("mm")
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    nib.save(img, str(path))
    return str(path)


def _scale_affine(ratio: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Voxel map (4, 4): new index o -> old index ``ratio * o + offset``."""
    t = np.eye(4)
    t[:3, :3] = np.diag(ratio)
    t[:3, 3] = offset
    return t


def _rescale(x: np.ndarray, ratio: np.ndarray, out_shape: tuple[int, ...], order: int) -> np.ndarray:
    """Sample (D, H, W[, C]) ``x`` at old index ``ratio * o + (ratio - 1) / 2`` for o in ``out_shape`` (3,)."""
    offset = (ratio - 1.0) / 2.0
    if tuple(out_shape) == x.shape[:3] and np.allclose(ratio, 1.0):
        return x
    planes = x[..., None] if x.ndim == 3 else x
    out = np.stack([ndimage.affine_transform(planes[..., c], ratio, offset, output_shape=tuple(out_shape),
                                             order=order, mode="nearest") for c in range(planes.shape[-1])], -1)
    return out[..., 0] if x.ndim == 3 else out


def crop_or_pad(x: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Centre crop/zero-pad (D, H, W[, C]) to ``shape``; returns (array, start (3,)): new index o = old o + start."""
    cur = np.array(x.shape[:3])
    tgt = np.array(shape)
    start = (cur - tgt) // 2  # negative: padding before
    out = np.zeros(tuple(tgt) + x.shape[3:], x.dtype)
    src = [slice(max(s, 0), max(s, 0) + min(c - max(s, 0), t - max(-s, 0))) for s, c, t in zip(start, cur, tgt)]
    dst = [slice(max(-s, 0), max(-s, 0) + (sl.stop - sl.start)) for s, sl in zip(start, src)]
    out[tuple(dst)] = x[tuple(src)]
    return out, start.astype(np.float64)


def resample(array: np.ndarray, affine: np.ndarray, shape: int | tuple[int, int, int],
             spacing: float | tuple[float, float, float] | None = None, *, order: int = 1
             ) -> tuple[np.ndarray, np.ndarray]:
    """Resample (D, H, W[, C]) to ``shape``; returns (array, new affine (4, 4)).

    With ``spacing`` (mm): first to that voxel spacing (linear, ``order=0`` for masks), then a
    centre crop/zero-pad to ``shape`` (MONAI's ``Spacing`` + ``ResizeWithPadOrCrop``); without: a
    straight zoom to ``shape``. Voxel centres are mapped so the volume's centre stays in place
    (scipy's ``zoom(..., grid_mode=True)``); ``new_affine @ [o, 1] == affine @ [ratio o + offset, 1]``.
    """
    x = np.asarray(array)
    if x.ndim not in (3, 4):
        raise ValueError(f"resample: array must be (D, H, W) or (D, H, W, C), got {x.shape}")
    shape = (shape,) * 3 if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    affine = np.asarray(affine, np.float64)
    cur = np.array(x.shape[:3], np.float64)
    if spacing is None:
        ratio = cur / np.array(shape, np.float64)
        out = _rescale(x, ratio, shape, order)
        return out, affine @ _scale_affine(ratio, (ratio - 1.0) / 2.0)
    sp = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    ratio = sp / spacing_of(affine)  # old voxels per new voxel
    mid_shape = tuple(int(max(1, round(c / r))) for c, r in zip(cur, ratio))
    # centre-preserving: old centre (cur-1)/2 = ratio * (mid-1)/2 + offset
    offset = (cur - 1.0) / 2.0 - ratio * (np.array(mid_shape) - 1.0) / 2.0
    planes = x[..., None] if x.ndim == 3 else x
    mid = np.stack([ndimage.affine_transform(planes[..., c], ratio, offset, output_shape=mid_shape, order=order,
                                             mode="nearest") for c in range(planes.shape[-1])], -1)
    mid = mid[..., 0] if x.ndim == 3 else mid
    out, start = crop_or_pad(mid, shape)
    return out, affine @ _scale_affine(ratio, offset) @ _scale_affine(np.ones(3), start)


def normalize_intensity(x: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Per channel, ``(x - p_low) / (p_high - p_low)`` clipped to [0, 1] (D, H, W, C) float32 (0 if flat)."""
    x = np.asarray(x, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    flat = x.reshape(-1, x.shape[-1])
    lo, hi = np.percentile(flat, [low, high], axis=0)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    y = (x - lo.astype(np.float32)) / span.astype(np.float32)
    y = np.where((hi - lo > 1e-12)[None, None, None], y, 0.0)
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def to_uint8(x01: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 by ``rint(255 x)`` (the storage format of the caches, as for 2D frames)."""
    return np.clip(np.rint(np.asarray(x01, np.float32) * 255.0), 0, 255).astype(np.uint8)


def prepare_volume(path: str | os.PathLike, image_size: int, channels: int | None = None,
                   spacing: float | tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read, resample to ``image_size``^3, normalise and quantise: (uint8 (S, S, S, C), affine (4, 4)).

    ``channels``: the expected channel count (``DataError`` naming the file when different).
    """
    vol = read_volume(path)
    if channels is not None and vol.array.shape[-1] != channels:
        raise DataError(f"{path}: volume has {vol.array.shape[-1]} channel(s), expected {channels}")
    arr, affine = resample(vol.array, vol.affine, image_size, spacing, order=1)
    return to_uint8(normalize_intensity(arr)), affine


def prepare_mask(path: str | os.PathLike, image_size: int, image_shape: tuple[int, ...] | None = None,
                 spacing: float | tuple[float, float, float] | None = None) -> np.ndarray:
    """Read a mask volume (nonzero = lesion), nearest-resample: uint8 {0, 1} (S, S, S)."""
    vol = read_volume(path)
    if image_shape is not None and vol.array.shape[:3] != tuple(image_shape)[:3]:
        raise DataError(f"{path}: mask shape {vol.array.shape[:3]} differs from its volume's {tuple(image_shape)[:3]}")
    m = (vol.array.max(axis=-1) > 0).astype(np.float32)
    out, _ = resample(m, vol.affine, image_size, spacing, order=0)
    return (out > 0.5).astype(np.uint8)


def volume_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """Spatial shape (3,) of a volume file (the first file of ``a;b``) from its header."""
    first = str(path).split(PATH_SEPARATOR)[0].strip()
    if first.lower().endswith(".npy"):
        return tuple(np.load(first, mmap_mode="r").shape[:3])  # type: ignore[return-value]
    import nibabel as nib

    try:
        return tuple(int(s) for s in nib.load(first).shape[:3])  # type: ignore[return-value]
    except Exception as e:
        raise DataError(f"{first}: unreadable volume ({type(e).__name__}: {e})") from e
