"""Plain cross-entropy: the baseline classifier loss and the building block of the others."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from lclsc_jax.method.common import check_labels, compute_dtype


def cross_entropy_loss(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Mean softmax cross-entropy of ``logits (B, C)`` against int ``labels (B,)``; f32 scalar.

    With ``label_smoothing = s`` the target is ``(1 - s) * onehot(y) + s / C``.
    """
    chex.assert_rank(logits, 2)
    chex.assert_type(logits, float)
    check_labels(labels, logits.shape[0])
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logp = jax.nn.log_softmax(logits.astype(compute_dtype(logits)), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if label_smoothing:
        # -sum_c (s / C) log p_c  +  (1 - s) * nll
        nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    return jnp.mean(nll)
