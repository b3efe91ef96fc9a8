"""Numerical building blocks shared by the method: dtype policy, L2 normalisation, cosines.

Dtype policy: inputs may be bfloat16, float32 (or float64 under ``jax.enable_x64``); every
reduction, softmax and loss runs in ``compute_dtype(x)`` = the wider of the input dtype and
float32, so bf16 activations give float32 results and f64 gradient checks stay in f64.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Matmul precision for the (small) similarity products of the method: these are
# (B, D) x (D, C)-sized, so full f32 precision costs nothing, and it keeps GPUs from
# silently using TF32 for the cosines the losses and the EMA depend on.
PRECISION = jax.lax.Precision.HIGHEST


def compute_dtype(*xs: jax.Array) -> jnp.dtype:
    """The dtype reductions run in: ``result_type(*xs)`` promoted to at least float32."""
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def inv_norm(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """``1 / max(||x||, eps)`` along ``axis`` (kept), in ``compute_dtype(x)``: ``(..., D) -> (..., 1)``."""
    x = x.astype(compute_dtype(x))
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    # max() before rsqrt: at x = 0 both the value (1/eps) and its gradient (0) are finite.
    return jax.lax.rsqrt(jnp.maximum(sq, jnp.asarray(eps * eps, sq.dtype)))


def normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """L2-normalise ``x (..., D)`` along ``axis`` in at least float32; zero stays zero, finite grads."""
    chex.assert_type(x, float)
    return x.astype(compute_dtype(x)) * inv_norm(x, axis, eps)


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Cosine of every row of ``a (..., D)`` with every row of ``b (C, D)``: ``(..., C)``, >= float32.

    The dot product runs on the raw inputs (bf16 products are exact) with an f32 (or wider)
    accumulator and is then scaled by the two inverse norms, so no f32 copy of a large
    ``a`` (e.g. a feature map) is materialised.
    """
    chex.assert_type([a, b], float)
    chex.assert_rank(b, 2)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"embedding sizes differ: a has D={a.shape[-1]} (shape {a.shape}), "
            f"b has D={b.shape[-1]} (shape {b.shape})"
        )
    ct = compute_dtype(a, b)
    dots = jnp.einsum("...d,cd->...c", a, b, precision=PRECISION, preferred_element_type=ct)
    return dots * inv_norm(a, -1, eps) * jnp.swapaxes(inv_norm(b, -1, eps), 0, 1)


def unshard(x: jax.Array) -> jax.Array:
    """Replicate ``x`` if its type is sharded over Explicit mesh axes; identity otherwise.

    Global-batch ops (class sums, the (B, B) similarity matrix) contract or pair the batch axis
    with itself. Under Auto axes (or no mesh) XLA inserts the collectives by itself; under
    Explicit axes the sharding is part of the type and such products are rejected, so the
    batch is all-gathered first (cheap: a (B, D) embedding, not a feature map).
    """
    spec = jax.typeof(x).sharding.spec
    if all(s is None for s in spec):
        return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def check_positive(name: str, value: float | jax.Array) -> None:
    """Raise ``ValueError`` if a concrete (non-traced) scalar ``value`` is not > 0."""
    try:
        concrete = np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced (e.g. a schedule under jit): cannot be checked here
    if not np.all(concrete > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_labels(labels: jax.Array, batch: int, name: str = "labels") -> None:
    """Check that ``labels`` is an integer array of shape ``(batch,)``."""
    chex.assert_type(labels, int)
    if labels.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got {labels.shape}")
