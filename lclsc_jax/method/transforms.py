"""The dihedral group D4 on images and maps: the "T" of the saliency equivariance term.

pCLE frames have no canonical orientation, so the eight rotations/flips of the square are
the natural transforms. Index convention, shared by the data pipeline (NumPy) and the
losses (JAX): ``t in 0..7``; rotate by ``t % 4`` quarter turns (``rot90`` on the two
spatial axes, counter-clockwise), then, if ``t >= 4``, flip the width axis.
Volumes (``(B, D, H, W, C)`` batches): the transforms act on the axial plane ``(H, W)`` of every
slice (:func:`transform_axes`), the depth axis stays in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_DIHEDRAL = 8


def dihedral_np(x: np.ndarray, t: int, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Apply dihedral transform ``t`` to one array (NumPy), spatial axes ``axes`` (H, W)."""
    t = int(t)
    if not 0 <= t < NUM_DIHEDRAL:
        raise ValueError(f"dihedral index must be in 0..7, got {t}")
    y = np.rot90(x, t % 4, axes=axes)
    if t >= 4:
        y = np.flip(y, axis=axes[1])
    return np.ascontiguousarray(y)


def dihedral(x: jax.Array, t: jax.Array | int, axes: tuple[int, int] = (0, 1)) -> jax.Array:
    """Apply dihedral transform ``t`` (traced int OK) to one array; square spatial axes if traced."""
    if isinstance(t, (int, np.integer)):
        y = jnp.rot90(x, int(t) % 4, axes=axes)
        return jnp.flip(y, axis=axes[1]) if int(t) >= 4 else y
    branches = [lambda v, k=k: dihedral(v, k, axes) for k in range(NUM_DIHEDRAL)]
    return jax.lax.switch(jnp.asarray(t, jnp.int32) % NUM_DIHEDRAL, branches, x)


def transform_axes(x: jax.Array | np.ndarray) -> tuple[int, int]:
    """The two axes D4 turns in a channels-last batch: ``(1, 2)`` for ``(B, H, W, C)`` (and lower
    ranks), the last two spatial axes ``(2, 3)`` for volumes ``(B, D, H, W, C)``."""
    return (1, 2) if x.ndim <= 4 else (x.ndim - 3, x.ndim - 2)


def dihedral_batch(x: jax.Array, t: jax.Array) -> jax.Array:
    """Per-sample dihedral transforms of ``x (B, H, W, ...)`` or volumes ``(B, D, H, W, C)`` with ``t (B,)``; H == W."""
    a, b = transform_axes(x)
    return jax.vmap(lambda xi, ti: dihedral(xi, ti, (a - 1, b - 1)))(x, t)
