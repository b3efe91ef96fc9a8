"""Input-gradient baselines: vanilla gradient, SmoothGrad, Integrated Gradients.

Raw maps are signed channel sums of the attribution ``(B, *S, C) -> (B, *S)``; the normalised
maps take their absolute value and min-max them (see docs/explain.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lclsc_jax.explain import core
from lclsc_jax.explain.core import Explainer


def _grad_fn(ex: Explainer, tgt: jax.Array, k: int = 1) -> Callable[[jax.Array], jax.Array]:
    """``x (B * k, *S, C)`` (batch-major: ``k`` variants of each image) ``-> dS_target/dx``.

    Samples are independent in inference mode, so the gradient of the summed scores is the
    per-sample gradient.
    """
    batch = tgt.shape[0]
    lead = (batch,) if k == 1 else (batch, k)

    def total(x: jax.Array) -> jax.Array:
        return jnp.sum(ex.score(ex.forward(x), lead, tgt))

    return jax.grad(total)


def _targets(ex: Explainer, x: jax.Array, targets: jax.Array | None) -> jax.Array:
    """``targets (B,)``, or the predicted classes of ``x (B, *S, C)``."""
    return ex.targets(ex.forward(x), targets, x.shape[0])


#: How ``gradient`` reduces the channels of ``dS/dx``: Simonyan's ``max_c |dS/dx_c|`` or the signed sum.
GRADIENT_CHANNELS: tuple[str, ...] = ("max_abs", "sum")


def gradient(ex: Explainer, x: jax.Array, targets: jax.Array | None, channels: str = "max_abs") -> jax.Array:
    """Vanilla gradient ``(B, *S)``: ``max_c |dS/dx_c|`` (Simonyan et al. 2014) or ``sum_c dS/dx_c`` (``channels="sum"``).

    The two agree on one-channel frames up to sign; on RGB they differ (the normalised maps
    ``|sum_c|`` and ``max_c |.|`` correlated 0.75 on a ResNet-18). ``"sum"`` is the channel sum the
    other input-gradient maps (SmoothGrad, Integrated Gradients) keep.
    """
    if channels not in GRADIENT_CHANNELS:
        raise ValueError(f"channels must be one of {GRADIENT_CHANNELS}, got {channels!r}")
    tgt = _targets(ex, x, targets)
    g = _grad_fn(ex, tgt)(x).astype(jnp.float32)
    return jnp.max(jnp.abs(g), axis=-1) if channels == "max_abs" else jnp.sum(g, axis=-1)


def prepare_smoothgrad(x: jax.Array, opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``rng`` (default ``key(0)``) becomes the dynamic ``key``: ``(static options, {"key": key})``."""
    rng = opts.pop("rng")
    return opts, {"key": jax.random.key(0) if rng is None else rng}


def smoothgrad(
    ex: Explainer,
    x: jax.Array,
    targets: jax.Array | None,
    key: jax.Array,
    num_samples: int = 16,
    noise_level: float = 0.15,
    chunk_size: int = 64,
) -> jax.Array:
    """SmoothGrad (Smilkov et al. 2017): channel sum of the mean gradient at ``x + N(0, sigma^2)``.

    ``sigma = noise_level * (max(x_b) - min(x_b))`` per image; noise from ``key`` (deterministic).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    tgt = _targets(ex, x, targets)
    batch = x.shape[0]
    ax = tuple(range(1, x.ndim))
    sigma = noise_level * (jnp.max(x, axis=ax, keepdims=True) - jnp.min(x, axis=ax, keepdims=True))
    keys = jax.random.split(key, num_samples)

    def grads(idx: jax.Array) -> jax.Array:
        k = idx.shape[0]
        noise = jax.vmap(lambda kk: jax.random.normal(kk, x.shape, jnp.float32))(keys[idx])  # (k, B, ...)
        xs = (x[:, None] + sigma[:, None] * jnp.swapaxes(noise, 0, 1)).astype(x.dtype)  # (B, k, ...)
        g = _grad_fn(ex, tgt, k)(xs.reshape((batch * k,) + x.shape[1:]))
        return jnp.swapaxes(g.reshape((batch, k) + x.shape[1:]), 0, 1).astype(jnp.float32)

    total = core.chunked_sum(grads, num_samples, core.per_chunk(chunk_size, batch))
    return jnp.sum(total, axis=-1) / num_samples


def prepare_integrated_gradients(x: jax.Array, opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``baseline`` (a number or an array broadcastable to ``x``) becomes a dynamic array of ``x``'s dtype."""
    return opts, {"baseline": jnp.asarray(opts.pop("baseline"), x.dtype)}


def integrated_gradients(
    ex: Explainer,
    x: jax.Array,
    targets: jax.Array | None,
    baseline: jax.Array | float = 0.0,
    steps: int = 32,
    chunk_size: int = 64,
) -> jax.Array:
    """Integrated Gradients (Sundararajan et al. 2017), midpoint rule with ``steps`` points.

    Channel sum of ``(x - x0) * mean_k dS/dx (x0 + a_k (x - x0))``, ``a_k = (k + 1/2) / steps``;
    summed over the image it approximates ``S(x) - S(x0)`` (completeness).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    tgt = _targets(ex, x, targets)
    batch = x.shape[0]
    x0 = jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)
    diff = x - x0

    def grads(idx: jax.Array) -> jax.Array:
        k = idx.shape[0]
        alpha = ((idx.astype(jnp.float32) + 0.5) / steps).reshape((1, k) + (1,) * (x.ndim - 1))
        xs = (x0[:, None] + alpha * diff[:, None]).astype(x.dtype)  # (B, k, ...)
        g = _grad_fn(ex, tgt, k)(xs.reshape((batch * k,) + x.shape[1:]))
        return jnp.swapaxes(g.reshape((batch, k) + x.shape[1:]), 0, 1).astype(jnp.float32)

    mean_grad = core.chunked_sum(grads, steps, core.per_chunk(chunk_size, batch)) / steps
    return jnp.sum(diff.astype(jnp.float32) * mean_grad, axis=-1)
