"""Perturbation relevance at input resolution: sliding-patch occlusion and superpixel removal.

Relevance of a region = drop of the target score when the region is replaced by ``fill``
(Zeiler & Fergus 2014; the 2D form of Rajapaksa & Khalvati 2022). All perturbed inputs are
evaluated as batched forward passes in chunks of at most ``chunk_size`` images.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from skimage.segmentation import slic

from lclsc_jax.explain import core
from lclsc_jax.explain.core import Explainer


def _fill_values(x: jax.Array, fill: float | str) -> jax.Array:
    """Replacement values broadcastable to ``x (B, *S, C)``: a constant or the per-image channel mean."""
    if isinstance(fill, str):
        if fill != "mean":
            raise ValueError(f"fill must be a number or 'mean', got {fill!r}")
        return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True)
    return jnp.asarray(fill, x.dtype)


def window_starts(n: int, patch: int, stride: int) -> np.ndarray:
    """Start offsets of windows of size ``patch`` along an axis of length ``n``; the last one ends at ``n``."""
    if not 1 <= patch <= n:
        raise ValueError(f"patch size {patch} must be in [1, {n}]")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    starts = list(range(0, n - patch + 1, stride))
    if starts[-1] != n - patch:
        starts.append(n - patch)
    return np.asarray(starts, np.int32)


def occlusion_windows(spatial: Sequence[int], patch: int | Sequence[int], stride: int | Sequence[int]) -> np.ndarray:
    """Boolean masks ``(P, *S)`` of all sliding windows (row-major order over the window grid)."""
    nd = len(spatial)
    patch = (patch,) * nd if isinstance(patch, int) else tuple(patch)
    stride = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    per_axis = []
    for n, p, s in zip(spatial, patch, stride):
        st = window_starts(n, p, s)
        ar = np.arange(n)
        per_axis.append((ar[None, :] >= st[:, None]) & (ar[None, :] < st[:, None] + p))  # (n_w, n)
    masks = []
    for combo in itertools.product(*[range(len(a)) for a in per_axis]):
        m = np.ones(tuple(spatial), bool)
        for ax, (a, i) in enumerate(zip(per_axis, combo)):
            shape = [1] * nd
            shape[ax] = spatial[ax]
            m = m & a[i].reshape(shape)
        masks.append(m)
    return np.stack(masks)


def _region_drops(
    ex: Explainer,
    x: jax.Array,
    targets: jax.Array | None,
    mask_fn: Callable[[jax.Array], jax.Array],
    n: int,
    fill: float | str,
    chunk_size: int,
) -> jax.Array:
    """``sum_r drop_r * mask_r``: ``(B, *S)`` over ``n`` regions; ``mask_fn(idx (k,)) -> (k, B, *S)`` bool."""
    batch = x.shape[0]
    outputs = ex.outputs(ex.forward(x), (batch,))
    tgt = core.resolve_targets(outputs, targets)
    s0 = core.select(outputs, tgt)  # (B,)
    fillv = _fill_values(x, fill)

    def contrib(idx: jax.Array) -> jax.Array:
        k = idx.shape[0]
        m = jnp.swapaxes(mask_fn(idx), 0, 1)  # (B, k, *S): batch-major, as the scorer expects
        xs = jnp.where(m[..., None], fillv[:, None] if fillv.ndim else fillv, x[:, None])  # (B, k, *S, C)
        o = ex.forward(xs.reshape((batch * k,) + x.shape[1:]))
        drop = s0[:, None] - ex.score(o, (batch, k), tgt)  # (B, k)
        contrib = drop.reshape((batch, k) + (1,) * (x.ndim - 2)) * m.astype(jnp.float32)
        return jnp.swapaxes(contrib, 0, 1)  # (k, B, *S)

    return core.chunked_sum(contrib, n, core.per_chunk(chunk_size, batch))


def _window_grid(spatial: Sequence[int], patch: int | Sequence[int], stride: int | Sequence[int]
                 ) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """``(patch per axis, [window starts (n_i,) per axis])`` of the sliding windows over ``spatial``."""
    nd = len(spatial)
    patch = (patch,) * nd if isinstance(patch, int) else tuple(int(p) for p in patch)
    stride = (stride,) * nd if isinstance(stride, int) else tuple(int(s) for s in stride)
    if len(patch) != nd or len(stride) != nd:
        raise ValueError(f"patch_size and stride need one value or {nd} (one per spatial axis), got {patch}, {stride}")
    return patch, [window_starts(n, p, s) for n, p, s in zip(spatial, patch, stride)]


def window_counts(spatial: Sequence[int], patch: int | Sequence[int], stride: int | Sequence[int]) -> np.ndarray:
    """How many sliding windows cover each pixel/voxel, ``(*S)`` float32 (separable: product of per-axis counts)."""
    patch, starts = _window_grid(spatial, patch, stride)
    count = np.ones((), np.float32)
    for n, p, st in zip(spatial, patch, starts):
        ar = np.arange(n)
        per_axis = ((ar[None, :] >= st[:, None]) & (ar[None, :] < st[:, None] + p)).sum(axis=0)
        count = np.multiply.outer(count, per_axis.astype(np.float32))
    return count


def occlusion(
    ex: Explainer,
    x: jax.Array,
    targets: jax.Array | None,
    patch_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    fill: float | str = 0.0,
    chunk_size: int = 64,
) -> jax.Array:
    """Occlusion map ``(B, *S)`` (2D or 3D windows): per pixel, the mean score drop over the windows covering it.

    Defaults: ``patch_size = max(1, min(S) // 8)``, ``stride = max(1, patch_size // 2)``. Window
    masks are built per chunk from the per-axis window starts (never all ``(n_windows, *S)`` at
    once), so memory is bounded by ``chunk_size`` perturbed inputs whatever the volume size.
    """
    spatial = x.shape[1:-1]
    if patch_size is None:
        patch_size = max(1, min(spatial) // 8)
    if stride is None:
        p = patch_size if isinstance(patch_size, int) else min(patch_size)
        stride = max(1, p // 2)
    patch, starts = _window_grid(spatial, patch_size, stride)
    grid = tuple(len(st) for st in starts)
    n_windows = int(np.prod(grid))
    count = window_counts(spatial, patch, stride)
    starts_j = [jnp.asarray(st) for st in starts]
    batch, nd = x.shape[0], len(spatial)

    def mask_fn(idx: jax.Array) -> jax.Array:
        cells = jnp.unravel_index(idx, grid)  # row-major over the window grid, as occlusion_windows
        m = jnp.ones((idx.shape[0],) + (1,) * nd, bool)
        for ax, (n, p, st, c) in enumerate(zip(spatial, patch, starts_j, cells)):
            lo = st[c].reshape((-1,) + (1,) * nd)
            ar = jnp.arange(n).reshape((1,) + tuple(n if a == ax else 1 for a in range(nd)))
            m = m & (ar >= lo) & (ar < lo + p)
        return jnp.broadcast_to(m[:, None], (idx.shape[0], batch) + tuple(spatial))

    total = _region_drops(ex, x, targets, mask_fn, n_windows, fill, chunk_size)
    return total / jnp.asarray(np.maximum(count, 1.0))


def slic_segments(
    images: np.ndarray, n_segments: int = 50, compactness: float = 10.0, sigma: float = 1.0
) -> np.ndarray:
    """SLIC superpixels (supervoxels for volumes) of ``images (B, *S, C)`` -> int32 labels ``(B, *S)`` from 0.

    2D images and 3D volumes alike (scikit-image's ``slic`` segments a ``(D, H, W)`` array in 3D).
    Each image is min-max scaled to [0, 1] first, so ``compactness`` means the same for any
    input normalisation. Runs on the host (NumPy), not under ``jit``.
    """
    images = np.asarray(images, np.float32)
    out = []
    for img in images:
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        if img.shape[-1] == 1:
            seg = slic(img[..., 0], n_segments=n_segments, compactness=compactness, sigma=sigma,
                       start_label=0, channel_axis=None)
        else:
            seg = slic(img, n_segments=n_segments, compactness=compactness, sigma=sigma,
                       start_label=0, channel_axis=-1)
        out.append(seg.astype(np.int32))
    return np.stack(out)


def prepare_superpixel(x: jax.Array, opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """SLIC ``segments (B, *S)`` on the host unless given: ``(options + num_segments, {"segments": ...})``."""
    segments = opts.pop("segments")
    n_seg, comp, sig = opts.pop("n_segments"), opts.pop("compactness"), opts.pop("slic_sigma")
    if segments is None:
        try:
            host = np.asarray(x)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            raise ValueError(
                "superpixel under jit/grad needs precomputed segments= (SLIC runs on the host); "
                "see explain.slic_segments"
            ) from None
        segments = slic_segments(host, n_seg, comp, sig)
    seg = np.asarray(segments)
    if seg.shape != x.shape[:-1] or not np.issubdtype(seg.dtype, np.integer) or seg.min() < 0:
        raise ValueError(f"segments must be non-negative integer labels of shape {x.shape[:-1]}, "
                         f"got {seg.dtype} {seg.shape}")
    return {**opts, "num_segments": int(seg.max()) + 1}, {"segments": jnp.asarray(seg, jnp.int32)}


def superpixel(
    ex: Explainer,
    x: jax.Array,
    targets: jax.Array | None,
    segments: jax.Array,
    num_segments: int,
    fill: float | str = 0.0,
    chunk_size: int = 64,
) -> jax.Array:
    """Superpixel relevance ``(B, *S)``: each pixel gets the score drop of removing its segment.

    ``segments (B, *S)`` int labels in ``[0, num_segments)`` (e.g. :func:`slic_segments`).
    """
    segments = segments.astype(jnp.int32)

    def mask_fn(idx: jax.Array) -> jax.Array:
        return segments[None] == idx.reshape((-1,) + (1,) * segments.ndim)

    return _region_drops(ex, x, targets, mask_fn, num_segments, fill, chunk_size)
