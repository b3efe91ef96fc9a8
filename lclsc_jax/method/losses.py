"""Plain cross-entropy: the baseline classifier loss and the building block of the others."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

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
    logits = logits.astype(compute_dtype(logits))
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))
