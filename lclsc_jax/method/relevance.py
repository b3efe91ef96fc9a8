"""The optimal perturbation generator's pieces as pure JAX: perturbation, supervoxel pooling, loss.

Rajapaksa & Khalvati (Frontiers in Radiology 2022): a generator ``G`` (a 3D U-Net) maps a volume
``x`` to a mask ``m = G(x)`` in ``[0, 1]``; the perturbed volume ``x' = x (1 - m) + m b`` replaces
the masked voxels by a baseline ``b``; ``G`` is trained against a *frozen* classifier to make the
prediction on ``x'`` as different as possible from that on ``x`` while keeping ``m`` small, so
``m`` marks the region the classifier relies on (its relevance map). Masks may be pooled over
supervoxels (3D SLIC segments) so they are constant on each one, as in the paper.

Shapes: volumes ``x (B, *S, C)`` (3D: ``S = (D, H, W)``), masks ``m (B, *S)``, segments ``(B, *S)``
int, logits ``(B, K)``, targets ``(B,)`` int. Everything is jittable and differentiable in ``m``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

#: The scores whose drop :func:`perturbation_loss` maximises.
SCORES = ("prob", "log_prob", "logit", "prob_l1")

#: Baselines of :func:`baseline_values` besides a number.
BASELINES = ("mean", "blur")


def gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of ``x (B, *S, C)`` over the spatial axes (edge padding, radius ``ceil(3 sigma)``)."""
    if sigma <= 0:
        return x
    r = int(math.ceil(3 * sigma))
    w = jnp.exp(-0.5 * (jnp.arange(-r, r + 1, dtype=jnp.float32) / sigma) ** 2)
    w = w / jnp.sum(w)
    for ax in range(1, x.ndim - 1):
        n = x.shape[ax]
        pad = [(0, 0)] * x.ndim
        pad[ax] = (r, r)
        xp = jnp.pad(x, pad, mode="edge")
        x = sum(w[k] * jax.lax.slice_in_dim(xp, k, k + n, axis=ax) for k in range(2 * r + 1))
    return x


def baseline_values(x: jax.Array, baseline: float | str = 0.0, blur_sigma: float = 2.0) -> jax.Array:
    """What a perturbation fills in, broadcastable to ``x (B, *S, C)``.

    ``baseline``: a number (a constant volume; the default 0 is the background of a volume scaled
    to [0, 1], i.e. the region is deleted, as the ``fill=0`` of the ``superpixel``/``occlusion``
    methods), ``"mean"`` (each volume's per-channel mean, ``(B, 1.., C)``) or ``"blur"`` (a
    Gaussian-blurred copy with ``blur_sigma`` voxels, Fong & Vedaldi's "blur" perturbation; it
    removes detail but keeps a large region's mean intensity, so it hides texture, not presence).
    """
    if isinstance(baseline, str):
        if baseline == "mean":
            return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True)
        if baseline == "blur":
            return gaussian_blur(x, blur_sigma)
        raise ValueError(f"baseline must be a number or one of {BASELINES}, got {baseline!r}")
    return jnp.asarray(baseline, x.dtype)


def perturb(x: jax.Array, m: jax.Array, baseline: jax.Array | float) -> jax.Array:
    """``x (1 - m) + m baseline``: ``x (B, *S, C)``, mask ``m (B, *S)`` or ``(B, *S, 1)``, baseline broadcastable."""
    if m.ndim == x.ndim - 1:
        m = m[..., None]
    return x * (1.0 - m) + m * baseline


def pool_to_segments(m: jax.Array, segments: jax.Array, n_segments: int) -> jax.Array:
    """Mean of ``m (B, *S)`` inside each segment, broadcast back: ``(B, *S)``, constant on every segment.

    ``segments (B, *S)`` int labels in ``[0, n_segments)`` (per volume; ``n_segments`` static,
    an upper bound is fine). Differentiable in ``m`` (``segment_sum``).
    """
    b = m.shape[0]
    seg = segments.astype(jnp.int32).reshape(b, -1) + n_segments * jnp.arange(b, dtype=jnp.int32)[:, None]
    flat = seg.reshape(-1)
    sums = jax.ops.segment_sum(m.reshape(-1), flat, num_segments=b * n_segments)
    counts = jax.ops.segment_sum(jnp.ones_like(flat, jnp.float32), flat, num_segments=b * n_segments)
    means = sums / jnp.maximum(counts, 1.0)
    return means[flat].reshape(m.shape)


def total_variation(m: jax.Array) -> jax.Array:
    """Anisotropic TV of masks ``m (B, *S)``: per axis the mean ``|m[i+1] - m[i]|``, summed over axes, mean over B."""
    tv = jnp.zeros((m.shape[0],), jnp.float32)
    for ax in range(1, m.ndim):
        d = jnp.abs(jnp.diff(m, axis=ax))
        tv = tv + jnp.mean(d, axis=tuple(range(1, m.ndim)))
    return jnp.mean(tv)


def prediction_drop(logits_clean: jax.Array, logits_perturbed: jax.Array, targets: jax.Array,
                    score: str = "prob") -> jax.Array:
    """Per-sample drop ``s(clean) - s(perturbed)`` of the target's score: ``(B,)``.

    ``score``: ``"prob"`` (softmax probability of the target class), ``"log_prob"`` (its log),
    ``"logit"`` (its logit), or ``"prob_l1"`` (target-free: half the L1 distance between the two
    probability vectors, i.e. their total-variation distance, in [0, 1]).
    """
    if score == "prob_l1":
        p, q = jax.nn.softmax(logits_clean, -1), jax.nn.softmax(logits_perturbed, -1)
        return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)
    if score == "prob":
        f = jax.nn.softmax
    elif score == "log_prob":
        f = jax.nn.log_softmax
    elif score == "logit":
        f = lambda v, axis: v  # noqa: E731
    else:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    t = targets.astype(jnp.int32)[:, None]
    s0 = jnp.take_along_axis(f(logits_clean.astype(jnp.float32), axis=-1), t, axis=-1)[:, 0]
    s1 = jnp.take_along_axis(f(logits_perturbed.astype(jnp.float32), axis=-1), t, axis=-1)[:, 0]
    return s0 - s1


def perturbation_loss(logits_clean: jax.Array, logits_perturbed: jax.Array, targets: jax.Array, m: jax.Array,
                      area_weight: float, tv_weight: float = 0.0, score: str = "prob",
                      drop_weight: float = 1.0) -> tuple[jax.Array, dict[str, Any]]:
    """The generator's loss and its terms: ``(scalar, {"loss", "drop", "area", "tv"})``.

    ``loss = -drop_weight * mean_b drop_b + area_weight * mean(m) + tv_weight * TV(m)``:

    - ``drop_b`` = :func:`prediction_drop` (``score``): how much the perturbation changes the
      prediction; maximised (the paper's perturbation loss). ``logits_clean (B, K)`` carry no
      gradient in training (frozen classifier, clean input), so only the perturbed term trains.
    - ``mean(m)`` over ``m (B, *S)``: the area (L1, ``m >= 0``) of the perturbation; keeps it
      small, so only what the classifier needs is masked. ``area_weight=0`` switches it off.
    - ``TV(m)`` = :func:`total_variation`: optional smoothness (0 = off).

    ``targets (B,)``: the explained class per sample (ignored by ``score="prob_l1"``).
    """
    drop = prediction_drop(logits_clean, logits_perturbed, targets, score)
    area = jnp.mean(m.astype(jnp.float32))
    tv = total_variation(m.astype(jnp.float32)) if tv_weight else jnp.zeros((), jnp.float32)
    loss = -drop_weight * jnp.mean(drop) + area_weight * area + tv_weight * tv
    return loss, {"loss": loss, "drop": jnp.mean(drop), "area": area, "tv": tv}
