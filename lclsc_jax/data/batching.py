"""Fixed-size batches: one padding rule for every prediction and saliency loop (one compilation per shape)."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from lclsc_jax.data.augment import normalize_images


def pad_rows(x: np.ndarray, size: int, fill: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``x (n, ...)`` with ``n <= size`` to ``(size, ...)``; returns ``(padded, valid (size,) bool)``.

    Padding rows repeat ``fill`` (one row, shape ``x.shape[1:]``), by default ``x[0]``: real data,
    so padded rows run through a model without NaNs and are dropped by ``valid``.
    """
    x = np.asarray(x)
    n = len(x)
    if n > size:
        raise ValueError(f"{n} rows do not fit a batch of {size}")
    if fill is None:
        if n == 0:
            raise ValueError("cannot pad an empty batch without a fill row")
        fill = x[0]
    fill = np.asarray(fill, x.dtype).reshape((1,) + x.shape[1:])
    padded = np.concatenate([x, np.repeat(fill, size - n, axis=0)]) if n < size else x
    return padded, np.arange(size) < n


def array_batches(images_u8: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Eval batches (the keys of ``eval_batches``) of in-memory uint8 images ``(N, H, W, C)``; one process.

    ``label`` is 0 and ``patient`` empty (the images are unlabelled); the last batch is padded by
    :func:`pad_rows` with ``valid=False`` rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images_u8 = np.asarray(images_u8)
    for i in range(0, len(images_u8), batch_size):
        image, valid = pad_rows(images_u8[i:i + batch_size], batch_size)
        yield {"image": normalize_images(image), "label": np.zeros(batch_size, np.int32),
               "index": np.arange(i, i + batch_size, dtype=np.int64), "patient": np.full(batch_size, "", dtype=str),
               "valid": valid}
