"""The class-activation-map family on a feature map, plus CRM and the SC maps of LCL-SC.

Every function here returns the *raw* map of one stage at feature resolution ``(B, *s)``;
upsampling, ReLU and normalisation are applied by :func:`lclsc_jax.explain.core.finish_cams`.
Weightings follow pytorch-grad-cam 1.5.7 exactly (see docs/explain.md for the formulas).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lclsc_jax.explain import core
from lclsc_jax.method import class_saliency_maps

GRADIENT_CAMS = ("gradcam", "hirescam", "gradcam++", "xgradcam", "layercam", "gradcam_elementwise")


def stage_gradients(
    model: Any, variables: Any, scorer: core.Scorer, x: jax.Array, targets: jax.Array | None, stage: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(activations (B, *s, c), d score / d activations (B, *s, c), targets (B,))`` of one stage."""
    feats, out = core.stage_features(model, variables, x, (stage,))
    acts = feats[stage]
    batch = x.shape[0]
    tgt = core.resolve_targets(scorer.outputs(out, (batch,)), targets)

    def total(a: jax.Array) -> jax.Array:
        # Inference mode: every sample's score depends only on its own activations.
        return jnp.sum(core.select(scorer.outputs(core.run_from(model, variables, a, stage), (batch,)), tgt))

    return acts, jax.grad(total)(acts), tgt


def gradient_cam(method: str, acts: jax.Array, grads: jax.Array) -> jax.Array:
    """Raw map ``(B, *s)`` of a gradient-weighted CAM from ``acts, grads (B, *s, c)``."""
    acts = acts.astype(jnp.float32)
    grads = grads.astype(jnp.float32)
    ax = core.spatial_axes(acts)
    if method == "gradcam":
        w = jnp.mean(grads, axis=ax, keepdims=True)
        return jnp.sum(w * acts, axis=-1)
    if method == "hirescam":
        return jnp.sum(grads * acts, axis=-1)
    if method == "gradcam_elementwise":
        return jnp.sum(jnp.maximum(grads * acts, 0.0), axis=-1)
    if method == "layercam":
        return jnp.sum(jnp.maximum(grads, 0.0) * acts, axis=-1)
    if method == "xgradcam":
        s = jnp.sum(acts, axis=ax, keepdims=True)
        w = jnp.sum(grads * acts / (s + 1e-7), axis=ax, keepdims=True)
        return jnp.sum(w * acts, axis=-1)
    if method == "gradcam++":
        g2 = grads * grads
        g3 = g2 * grads
        s = jnp.sum(acts, axis=ax, keepdims=True)
        alpha = g2 / (2.0 * g2 + s * g3 + 1e-6)
        alpha = jnp.where(grads != 0, alpha, 0.0)
        w = jnp.sum(jnp.maximum(grads, 0.0) * alpha, axis=ax, keepdims=True)
        return jnp.sum(w * acts, axis=-1)
    raise ValueError(f"unknown gradient CAM {method!r}; expected one of {GRADIENT_CAMS}")


def eigen_cam(acts: jax.Array) -> jax.Array:
    """Eigen-CAM: projection on the first principal component, ``(B, *s, c) -> (B, *s)``.

    The activations are centred per channel over space (as pytorch-grad-cam); the sign of the
    component is fixed so the map correlates positively with the channel-mean activation.
    """
    acts = acts.astype(jnp.float32)
    spatial = acts.shape[1:-1]
    flat = acts.reshape(acts.shape[0], -1, acts.shape[-1])  # (B, n, c)
    centred = flat - jnp.mean(flat, axis=1, keepdims=True)
    _, _, vt = jnp.linalg.svd(centred, full_matrices=False)
    proj = jnp.einsum("bnc,bc->bn", centred, vt[:, 0, :], precision=core.PRECISION)
    mean_act = jnp.mean(flat, axis=-1)
    mean_act = mean_act - jnp.mean(mean_act, axis=1, keepdims=True)
    sign = jnp.where(jnp.sum(proj * mean_act, axis=1, keepdims=True) < 0, -1.0, 1.0)
    return (sign * proj).reshape((acts.shape[0],) + spatial)


def score_cam(
    model: Any,
    variables: Any,
    scorer: core.Scorer,
    x: jax.Array,
    targets: jax.Array | None,
    stage: str,
    chunk_size: int = 64,
) -> jax.Array:
    """Score-CAM raw map ``(B, *s)``: softmax over channels of the target score of ``x * mask_k``.

    ``mask_k`` = channel ``k`` upsampled to the input size (bilinear, align_corners as torch's
    ``UpsamplingBilinear2d``), min-max scaled to [0, 1]. Evaluated in chunks of channels.
    """
    feats, out = core.stage_features(model, variables, x, (stage,))
    acts = jax.lax.stop_gradient(feats[stage]).astype(jnp.float32)
    batch, num_ch = acts.shape[0], acts.shape[-1]
    size = x.shape[1:-1]
    tgt = core.resolve_targets(scorer.outputs(out, (batch,)), targets)
    acts_cf = jnp.moveaxis(acts, -1, 1)  # (B, c, *s)
    k = core.per_chunk(chunk_size, batch)

    def scores(idx: jax.Array) -> jax.Array:
        a = jnp.take(acts_cf, idx, axis=1)  # (B, k, *s)
        m = core.resize(a, size, align_corners=True)
        ax = tuple(range(2, m.ndim))
        lo = jnp.min(m, axis=ax, keepdims=True)
        hi = jnp.max(m, axis=ax, keepdims=True)
        m = (m - lo) / (hi - lo + 1e-8)
        xs = x[:, None] * m[..., None]  # (B, k, *S, C)
        o = core.forward(model, variables, xs.reshape((-1,) + xs.shape[2:]))
        s = core.select(scorer.outputs(o, (batch, idx.shape[0])), tgt)  # (B, k)
        return s.T

    s = core.chunked(scores, num_ch, k).T  # (B, c)
    w = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("b...c,bc->b...", acts, w, precision=core.PRECISION)


def ablation_cam(
    model: Any,
    variables: Any,
    scorer: core.Scorer,
    x: jax.Array,
    targets: jax.Array | None,
    stage: str,
    chunk_size: int = 256,
) -> jax.Array:
    """Ablation-CAM raw map ``(B, *s)``: weights ``(y - y_k) / y``, ``y_k`` with channel ``k`` zeroed.

    Only the network after ``stage`` is re-run, from the cached activations, in chunks.
    """
    feats, out = core.stage_features(model, variables, x, (stage,))
    acts = jax.lax.stop_gradient(feats[stage])
    batch, num_ch = acts.shape[0], acts.shape[-1]
    outputs = scorer.outputs(out, (batch,))
    tgt = core.resolve_targets(outputs, targets)
    y = core.select(outputs, tgt)  # (B,)
    k = core.per_chunk(chunk_size, batch)

    def scores(idx: jax.Array) -> jax.Array:
        keep = (jnp.arange(num_ch)[None, :] != idx[:, None]).astype(acts.dtype)  # (k, c)
        a = acts[:, None] * keep.reshape((1, idx.shape[0]) + (1,) * (acts.ndim - 2) + (num_ch,))
        o = core.run_from(model, variables, a.reshape((-1,) + acts.shape[1:]), stage)
        return core.select(scorer.outputs(o, (batch, idx.shape[0])), tgt).T  # (k, B)

    y_k = core.chunked(scores, num_ch, k).T  # (B, c)
    w = (y[:, None] - y_k) / y[:, None]
    return jnp.einsum("b...c,bc->b...", acts.astype(jnp.float32), w, precision=core.PRECISION)


def crm(
    model: Any,
    variables: Any,
    scorer: core.Scorer,
    x: jax.Array,
    targets: jax.Array | None,
    stage: str,
    chunk_size: int = 256,
    crm_output: str = "probs",
) -> jax.Array:
    """Class-selective relevance map (Kim et al. 2019) ``(B, *s)``, signed.

    For each location ``l`` of the stage's map, zero all channels there, re-run the rest of the
    network and sum over output nodes ``k`` the increase of the squared error to the one-hot
    target ``d``: ``R(l) = sum_k (d_k - y_k(l))^2 - (d_k - y_k)^2``. ``crm_output``: ``probs``
    (softmax of the class scores; the single output of an embedding target stays raw) or ``scores``.
    """
    if crm_output not in ("probs", "scores"):
        raise ValueError(f"crm_output must be 'probs' or 'scores', got {crm_output!r}")
    feats, out = core.stage_features(model, variables, x, (stage,))
    acts = jax.lax.stop_gradient(feats[stage])
    batch = acts.shape[0]
    spatial = acts.shape[1:-1]
    n_loc = 1
    for v in spatial:
        n_loc *= v

    def outs(o: dict, lead: tuple[int, ...]) -> jax.Array:
        y = scorer.outputs(o, lead)
        if crm_output == "probs" and y.shape[-1] > 1:
            y = jax.nn.softmax(y, axis=-1)
        return y

    y0 = outs(out, (batch,))  # (B, K)
    tgt = core.resolve_targets(scorer.outputs(out, (batch,)), targets)
    d = jax.nn.one_hot(tgt, y0.shape[-1], dtype=y0.dtype)  # (B, K)
    err0 = jnp.sum(jnp.square(d - y0), axis=-1)  # (B,)
    k = core.per_chunk(chunk_size, batch)

    def errors(idx: jax.Array) -> jax.Array:
        keep = (jnp.arange(n_loc)[None, :] != idx[:, None]).astype(acts.dtype)  # (k, n)
        keep = keep.reshape((1, idx.shape[0]) + spatial + (1,))
        a = acts[:, None] * keep  # (B, k, *s, c)
        o = core.run_from(model, variables, a.reshape((-1,) + acts.shape[1:]), stage)
        y = outs(o, (batch, idx.shape[0]))  # (B, k, K)
        return jnp.sum(jnp.square(d[:, None] - y), axis=-1).T  # (k, B)

    err = core.chunked(errors, n_loc, k).T  # (B, n)
    return (err - err0[:, None]).reshape((batch,) + spatial)


def require_projection(model: Any) -> None:
    """Raise ``ValueError`` if ``model`` has no projection head (``projection=False``), which the
    SC maps ``cos(g(F_hw), G_c)`` need."""
    if getattr(model, "projection", True) is False:
        raise ValueError(
            "method 'sc' needs a model with a projection head g and global class embeddings G "
            "(its maps are cos(g(F_hw), G_c)): this model is a plain classifier (projection=False), "
            "e.g. imported torchvision/timm weights. Use a CAM method instead (gradcam, scorecam, "
            "ablationcam, crm, ...)"
        )


def sc_map(
    model: Any, variables: Any, scorer: core.Scorer, x: jax.Array, targets: jax.Array | None
) -> jax.Array:
    """LCL-SC saliency map of the target class: ``cos(g(F_l), G_c)`` per location, ``(B, h, w)``."""
    require_projection(model)
    if scorer.global_emb is None:
        raise ValueError("the SC maps need the global class embeddings: pass global_emb=(C, D)")
    out = core.forward(model, variables, x)
    batch = x.shape[0]
    tgt = core.resolve_targets(scorer.outputs(out, (batch,)), targets)
    maps = class_saliency_maps(out["local_embedding"], scorer.global_emb)  # (B, h, w, C)
    return core.select(maps, tgt)
