"""Saliency consistency (SC): class saliency maps, TK-MMP pooling and the SC loss.

Volumes. Every function takes 2D maps ``(B, h, w, ...)`` or 3D (voxel) maps ``(B, d, h, w, ...)``
alike (local embeddings ``(B, *spatial, D)``, maps ``(B, *spatial, C)``, masks ``spatial`` or
``(B, *spatial)``); the D4 transforms of the equivariance term act on the last two spatial axes
(the axial plane of a volume: flips and quarter turns of every slice).

Masks. pCLE frames have a circular field of view; ``mask`` (``(h, w)`` or ``(B, h, w)``, bool
or {0, 1}; ``(d, h, w)`` or ``(B, d, h, w)`` for volumes) marks the valid locations. Invalid
locations never enter either pool. With ``n`` valid locations in a sample, a pool of size ``k``
averages the ``min(k, n)`` most extreme valid values (so a mask leaving fewer than ``k`` valid
locations gives the mean of those); a sample with no valid location pools to 0.

Settings. ``k_max``, ``k_min`` (fractions in ``(0, 1]`` of the map's locations) and ``alpha``
have no defaults here: ``train.config.LossConfig`` is their single source (``k = 0.1``,
``alpha = -1``, top minus bottom); pass them explicitly when calling these functions directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from lclsc_jax.method.common import (
    PRECISION,
    check_labels,
    check_positive,
    compute_dtype,
    cosine_similarity,
    inv_norm,
    normalize,
)
from lclsc_jax.method.losses import cross_entropy_loss
from lclsc_jax.method.transforms import NUM_DIHEDRAL, dihedral, transform_axes

Transform = Callable[[jax.Array], jax.Array] | jax.Array


def class_saliency_maps(local_z: jax.Array, global_emb: jax.Array) -> jax.Array:
    """Cosine of each location of ``local_z (B, h, w, D)`` with each ``G_c (C, D)``: ``(B, h, w, C)``.

    Volumes: ``(B, d, h, w, D) -> (B, d, h, w, C)``. ``G`` is treated as a constant (stop-gradient),
    as everywhere in the method.
    """
    chex.assert_rank([local_z, global_emb], [{4, 5}, 2])
    return cosine_similarity(local_z, jax.lax.stop_gradient(global_emb))


def decomposed_saliency_maps(local_z: jax.Array, z: jax.Array, global_emb: jax.Array) -> jax.Array:
    """Maps whose spatial mean *is* the GEI cosine: ``<local_z(u), G_c / |G_c|> / |z|``, ``(B, h, w, C)`` f32.

    ``local_z (B, h, w, D)`` is the projection applied per location, ``z (B, D)`` the embedding
    of the pooled features. With a linear projection head (``model.projection_layers=1``) and
    global average pooling, ``z = mean_u local_z(u)``, so ``mean_u maps_c(u) = cos(z, G_c)``
    exactly: the map decomposes the classifier's decision instead of explaining an auxiliary
    branch (:func:`class_saliency_maps`). ``G`` is a constant (stop-gradient). Volumes:
    ``local_z (B, d, h, w, D) -> (B, d, h, w, C)``.
    """
    chex.assert_rank([local_z, z, global_emb], [{4, 5}, 2, 2])
    g = normalize(jax.lax.stop_gradient(global_emb))
    ct = compute_dtype(local_z, z)
    dots = jnp.einsum("b...d,cd->b...c", local_z.astype(ct), g.astype(ct), precision=PRECISION)
    inv = inv_norm(z.astype(ct), -1, 1e-6)  # (B, 1)
    return dots * inv.reshape((inv.shape[0],) + (1,) * (local_z.ndim - 2) + (1,))


def prediction_consistency_loss(sc_logits: jax.Array, gei_logits: jax.Array) -> jax.Array:
    """Mean ``KL(softmax(sg(gei_logits)) || softmax(sc_logits))`` over the batch: ``(B, C), (B, C)`` -> f32.

    Ties the saliency branch's pooled prediction to the GEI decision (the decision is the
    teacher: no gradient flows into it from this term), so a map that scores a class high is a
    map of what the classifier decides.
    """
    chex.assert_rank([sc_logits, gei_logits], 2)
    chex.assert_equal_shape([sc_logits, gei_logits])
    ct = compute_dtype(sc_logits, gei_logits)
    target = jax.nn.log_softmax(jax.lax.stop_gradient(gei_logits).astype(ct), axis=-1)
    pred = jax.nn.log_softmax(sc_logits.astype(ct), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(target) * (target - pred), axis=-1))


def resolve_k(k: float, n: int, name: str = "k") -> int:
    """Pool size from a fraction ``k`` in ``(0, 1]`` of ``n`` locations: ``round(k * n)``, at least 1.

    ``k`` is always a fraction (``1.0`` = all ``n``), in the API as in the config; an int is
    refused, so ``1`` can never mean "one location" in one place and "all" in another. ``k``
    locations of ``n`` is the fraction ``k / n``.
    """
    if isinstance(k, (bool, int)) or (hasattr(k, "dtype") and not jnp.issubdtype(k.dtype, jnp.floating)):
        raise TypeError(f"{name} must be a float fraction in (0, 1] of the {n} locations, got {k!r} "
                        f"(for a count c of locations pass c / {n})")
    k = float(k)
    if not 0.0 < k <= 1.0:
        raise ValueError(f"{name}={k} must be a fraction in (0, 1] of the {n} locations")
    return max(1, min(n, int(k * n + 0.5)))


def _batch_mask(mask: jax.Array, batch: int, *spatial: int) -> jax.Array:
    """Validity mask ``spatial`` or ``(B, *spatial)`` (bool or {0, 1}) as bool ``(B, *spatial)``."""
    spatial = tuple(spatial)
    if tuple(mask.shape) not in (spatial, (batch, *spatial)):
        raise ValueError(f"mask must have shape {spatial} or {(batch, *spatial)}, got {mask.shape}")
    return jnp.broadcast_to(mask.astype(bool), (batch, *spatial))


def _flat_mask(mask: jax.Array | None, batch: int, *spatial: int) -> jax.Array | None:
    """Validity mask ``spatial`` or ``(B, *spatial)`` as bool ``(B, 1, prod(spatial))`` (``None`` stays None)."""
    if mask is None:
        return None
    # Merge, then add the axis: a single reshape that also inserts it is rejected by
    # Explicit-mode sharding when the batch axis is sharded.
    return _batch_mask(mask, batch, *spatial).reshape(batch, math.prod(spatial))[:, None, :]


def _top_mean(x: jax.Array, k: int, valid: jax.Array | None) -> jax.Array:
    """Mean of the ``min(k, n_valid)`` largest valid entries along the last axis of ``x (..., n)``."""
    if valid is None:
        return jnp.mean(jax.lax.top_k(x, k)[0], axis=-1)
    vals = jax.lax.top_k(jnp.where(valid, x, -jnp.inf), k)[0]  # valid ones first, then -inf
    k_eff = jnp.minimum(jnp.sum(valid, axis=-1, keepdims=True), k)  # (B, 1, 1)
    take = jnp.arange(k) < k_eff  # rank-based weights (B, 1, k), no 0 * inf
    total = jnp.sum(jnp.where(take, vals, 0.0), axis=-1)
    return total / jnp.maximum(k_eff[..., 0], 1).astype(x.dtype)


def tk_mmp(
    maps: jax.Array,
    k_max: float,
    k_min: float,
    alpha: float,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Top-K max-min pooling of ``maps (B, h, w, C)`` (or voxels ``(B, d, h, w, C)``) over space: ``(B, C)`` f32.

    ``s_c = mean(k_max largest of S_c) + alpha * mean(k_min smallest of S_c)``; ``k`` is a
    fraction of the ``n = h*w`` (``d*h*w``) locations (see :func:`resolve_k`).
    ``mask (h, w) | (B, h, w)`` (``(d, h, w) | (B, d, h, w)``) excludes locations from both
    pools (see the module docstring for the rule).
    """
    chex.assert_rank(maps, {4, 5})
    chex.assert_type(maps, float)
    batch, *spatial, num_classes = maps.shape
    n = math.prod(spatial)
    kx, kn = resolve_k(k_max, n, "k_max"), resolve_k(k_min, n, "k_min")
    x = maps.astype(compute_dtype(maps)).reshape(batch, n, num_classes)
    x = jnp.swapaxes(x, 1, 2)  # (B, C, n): top_k works on the last axis
    valid = _flat_mask(mask, batch, *spatial)
    top = _top_mean(x, kx, valid)
    bottom = -_top_mean(-x, kn, valid)
    return top + alpha * bottom


def sc_logits(
    maps: jax.Array,
    k_max: float,
    k_min: float,
    alpha: float,
    tau: float = 0.1,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Saliency-consistency logits ``tk_mmp(maps) / tau``: ``(B, h, w, C)`` or ``(B, d, h, w, C) -> (B, C)`` f32."""
    check_positive("tau", tau)
    return tk_mmp(maps, k_max, k_min, alpha, mask) / tau


def apply_transform(x: jax.Array, transform: Transform) -> jax.Array:
    """Apply ``transform`` (callable, or int D4 indices ``(B,)``) to ``x (B, h, w, ...)`` or ``(B, d, h, w, C)``.

    D4 indices turn the axes of :func:`transform_axes`: for volumes the axial plane ``(h, w)``
    of every slice.
    """
    if callable(transform):
        return transform(x)
    t = jnp.asarray(transform)
    if not jnp.issubdtype(t.dtype, jnp.integer) or t.shape != (x.shape[0],):
        raise ValueError(
            f"transform must be a callable or int D4 indices of shape ({x.shape[0]},), "
            f"got {t.dtype} {t.shape}"
        )
    a, b = transform_axes(x)
    if x.shape[a] != x.shape[b]:
        raise ValueError(f"D4 indices need square maps, got h, w = {x.shape[a]}, {x.shape[b]}")
    return _dihedral_select(x, t)


def _dihedral_select(x: jax.Array, t: jax.Array) -> jax.Array:
    """Same as ``dihedral_batch(x (B, h, h, ...), t (B,))``, as a chain of selects over the 8 cases.

    ``vmap`` of ``lax.switch`` lowers to the same selects, but needs every batched input to
    share one batch sharding under Explicit mesh axes; plain ``where`` broadcasting does not.
    Volumes ``(B, d, h, h, C)``: the transforms act on ``(h, h)`` (:func:`transform_axes`).
    """
    t = t.reshape((-1,) + (1,) * (x.ndim - 1)) % NUM_DIHEDRAL
    axes = transform_axes(x)
    out = x
    for k in range(1, NUM_DIHEDRAL):
        out = jnp.where(t == k, dihedral(x, k, axes=axes), out)
    return out


def equivariance_loss(
    maps: jax.Array,
    maps_transformed: jax.Array,
    transform: Transform,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Mean of ``(S(Tx) - T S(x))**2`` over (valid) locations and classes; ``(B, h, w, C)``: f32.

    ``maps = S(x)``, ``maps_transformed = S(Tx)``; the valid locations are ``T(mask)``, so a
    callable ``transform`` must be channel-agnostic (it also sees the ``(B, h, w, 1)`` mask).
    Volumes: ``(B, d, h, w, C)`` maps, ``(d, h, w) | (B, d, h, w)`` mask.
    """
    chex.assert_rank([maps, maps_transformed], {4, 5})
    ct = compute_dtype(maps, maps_transformed)
    target = apply_transform(maps.astype(ct), transform)
    if target.shape != maps_transformed.shape:
        raise ValueError(
            f"transform(maps) has shape {target.shape} but maps_transformed has "
            f"{maps_transformed.shape}"
        )
    sq = jnp.square(maps_transformed.astype(ct) - target)
    if mask is None:
        return jnp.mean(sq)
    batch, *spatial, num_classes = maps.shape
    valid = _batch_mask(mask, batch, *spatial)[..., None].astype(ct)  # (B, *spatial, 1)
    m = apply_transform(valid, transform) > 0.5
    total = jnp.sum(jnp.where(m, sq, 0.0))
    return total / jnp.maximum(jnp.sum(m).astype(ct) * num_classes, 1.0)


def saliency_consistency_loss(
    maps: jax.Array,
    labels: jax.Array,
    *,
    k_max: float,
    k_min: float,
    alpha: float,
    tau: float = 0.1,
    maps_transformed: jax.Array | None = None,
    transform: Transform | None = None,
    w_eq: float = 1.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """``L_SC = CE(softmax(tk_mmp(S)/tau), y) + w_eq * mean (S(Tx) - T S(x))**2``: f32 scalar.

    ``maps (B, h, w, C)`` (or ``(B, d, h, w, C)``) = S(x), ``labels (B,)``; the equivariance term is added only when
    ``maps_transformed`` (= S(Tx), same shape) is given, and then ``transform`` (a callable on
    ``(B, h, w, C)`` maps, or int D4 indices ``(B,)``) is required.
    """
    chex.assert_rank(maps, {4, 5})
    check_labels(labels, maps.shape[0])
    loss = cross_entropy_loss(sc_logits(maps, k_max, k_min, alpha, tau, mask), labels)
    if maps_transformed is None:
        if transform is not None:
            raise ValueError("transform was given without maps_transformed (the maps of T x)")
        return loss
    if transform is None:
        raise ValueError("maps_transformed was given without the transform T that produced it")
    return loss + w_eq * equivariance_loss(maps, maps_transformed, transform, mask)
