"""Global class embeddings: GEI inference (cosine to each class) and their EMA update.

The global embeddings ``G (C, D)`` live in the train state, one unit vector per class. They
receive no gradient; they change only through :func:`ema_update`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from lclsc_jax.method.common import (
    PRECISION,
    check_labels,
    check_positive,
    compute_dtype,
    cosine_similarity,
    normalize,
    unshard,
)


def gei_logits(z: jax.Array, global_emb: jax.Array, tau: float = 0.1) -> jax.Array:
    """Global-embedding-inference logits ``cos(z_i, G_c) / tau``: ``(B, D), (C, D) -> (B, C)`` f32.

    Neither input needs unit norm (both are normalised inside, with an epsilon).
    """
    chex.assert_rank([z, global_emb], 2)
    check_positive("tau", tau)
    return cosine_similarity(z, global_emb) / tau


def gei_predict(
    z: jax.Array, global_emb: jax.Array, tau: float = 0.1
) -> tuple[jax.Array, jax.Array]:
    """GEI prediction: ``(probs (B, C) f32, labels (B,) int32)`` = softmax / argmax of the logits."""
    logits = gei_logits(z, global_emb, tau)
    return jax.nn.softmax(logits, axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def class_means(z: jax.Array, labels: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Per-class mean of normalised ``z (B, D)``: ``(means (C, D), counts (C,))``, f32.

    Implemented with a one-hot matmul (no segment ops, no Python loop), so with the batch
    sharded over devices the means are those of the global batch (Auto mesh axes: XLA
    all-reduces the class sums; Explicit axes: the (B, D) batch is all-gathered first).
    Labels outside ``[0, C)`` (e.g. ``-1`` for padding) contribute to no class.
    """
    chex.assert_rank(z, 2)
    check_labels(labels, z.shape[0])
    zn = normalize(unshard(z))
    onehot = jax.nn.one_hot(unshard(labels), num_classes, dtype=zn.dtype)  # (B, C)
    sums = jnp.einsum("bc,bd->cd", onehot, zn, precision=PRECISION)
    counts = jnp.sum(onehot, axis=0)
    return sums / jnp.maximum(counts, 1.0)[:, None], counts


def ema_update(
    global_emb: jax.Array,
    seen: jax.Array,
    z: jax.Array,
    labels: jax.Array,
    momentum: float | jax.Array = 0.99,
) -> tuple[jax.Array, jax.Array]:
    """EMA step of the class embeddings: ``G (C, D), seen (C,), z (B, D), labels (B,) -> (G, seen)``.

    For each class ``c`` present in the batch, with ``mu_c`` the mean of the normalised ``z_i``
    with ``y_i = c``: ``G_c <- normalize(m * G_c + (1 - m) * mu_c)`` if ``seen[c]``, else
    ``G_c <- normalize(mu_c)``. Absent classes keep ``G_c``; ``seen |= present``. Labels
    outside ``[0, C)`` are ignored (padding). No gradient flows through; ``G`` keeps its dtype.
    """
    chex.assert_rank([global_emb, seen, z], [2, 1, 2])
    chex.assert_type([global_emb, z], float)
    num_classes, dim = global_emb.shape
    if seen.shape != (num_classes,):
        raise ValueError(f"seen must have shape ({num_classes},) to match global_emb, got {seen.shape}")
    if z.shape[-1] != dim:
        raise ValueError(f"z has D={z.shape[-1]} but global_emb has D={dim}")
    check_labels(labels, z.shape[0])
    try:
        m = float(momentum)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        m = None
    if m is not None and not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")

    z = jax.lax.stop_gradient(z)
    g = jax.lax.stop_gradient(global_emb)
    means, counts = class_means(z, labels, num_classes)
    ct = compute_dtype(g, means)
    g32 = g.astype(ct)
    momentum = jnp.asarray(momentum, ct)
    seen = seen.astype(bool)
    present = counts > 0
    blended = jnp.where(seen[:, None], momentum * g32 + (1.0 - momentum) * means, means)
    new_g = jnp.where(present[:, None], normalize(blended), g32)
    return new_g.astype(global_emb.dtype), seen | present


def init_global_embeddings(
    num_classes: int, dim: int, dtype: jnp.dtype = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """Empty state for :func:`ema_update`: ``(zeros (C, D), seen all False (C,))``."""
    if num_classes < 1 or dim < 1:
        raise ValueError(f"need num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")
    return jnp.zeros((num_classes, dim), dtype), jnp.zeros((num_classes,), bool)


__all__ = ["gei_logits", "gei_predict", "class_means", "ema_update", "init_global_embeddings"]
