"""The class-activation-map family on a feature map, plus CRM and the SC maps of LCL-SC.

Every function here returns the *raw* map of one stage at feature resolution ``(B, *s)``;
upsampling, ReLU and normalisation are applied by :func:`lclsc_jax.explain.core.finish_cams`.
Weightings follow pytorch-grad-cam 1.5.7 exactly (see docs/explain.md for the formulas).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lclsc_jax.explain import core, registry
from lclsc_jax.explain.core import Explainer
from lclsc_jax.method import class_saliency_maps, decomposed_saliency_maps

GRADIENT_CAMS = registry.GRADIENT_CAMS
CamWeights = Callable[[jax.Array, jax.Array], jax.Array]  # (acts, grads) (B, *s, c) -> weights


# ----------------------------------------------------------------------------- gradient CAMs


def gradients_at(
    ex: Explainer, x: jax.Array, targets: jax.Array | None, stage: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(activations (B, *s, c), d score / d activations (B, *s, c), targets (B,))`` of one stage."""
    acts, out = ex.stage(x, stage)
    batch = x.shape[0]
    tgt = ex.targets(out, targets, batch)

    def total(a: jax.Array) -> jax.Array:
        # Inference mode: every sample's score depends only on its own activations.
        return jnp.sum(ex.score(ex.run_from(a, stage), (batch,), tgt))

    return acts, jax.grad(total)(acts), tgt


def stage_gradients(
    model: Any, variables: Any, scorer: core.Scorer, x: jax.Array, targets: jax.Array | None, stage: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`gradients_at` of ``Explainer(model, variables, scorer)``: ``(acts, grads, targets)``."""
    return gradients_at(Explainer(model, variables, scorer), x, targets, stage)


def weighted_sum(cam_weights: CamWeights, acts: jax.Array, grads: jax.Array) -> jax.Array:
    """Raw map ``(B, *s)`` = ``sum_c cam_weights(acts, grads) * acts`` for ``acts, grads (B, *s, c)``."""
    acts = acts.astype(jnp.float32)
    return jnp.sum(cam_weights(acts, grads.astype(jnp.float32)) * acts, axis=-1)


def gradient_cam_map(
    ex: Explainer, x: jax.Array, targets: jax.Array | None, stage: str, cam_weights: CamWeights
) -> jax.Array:
    """Raw map ``(B, *s)`` of the gradient CAM with weights ``cam_weights`` at ``stage``."""
    acts, grads, _ = gradients_at(ex, x, targets, stage)
    return weighted_sum(cam_weights, acts, grads)


def gradient_cam(method: str, acts: jax.Array, grads: jax.Array) -> jax.Array:
    """Raw map ``(B, *s)`` of the gradient CAM named ``method`` from ``acts, grads (B, *s, c)``."""
    spec = registry.get(method)
    if spec.level != "gradient_cam":
        raise ValueError(f"unknown gradient CAM {method!r}; expected one of {GRADIENT_CAMS}")
    return weighted_sum(spec.resolve(), acts, grads)


def gradcam_weights(acts: jax.Array, grads: jax.Array) -> jax.Array:
    """Grad-CAM: spatial mean of the gradients, ``(B, *s, c) -> (B, 1.., c)``."""
    return jnp.mean(grads, axis=core.spatial_axes(acts), keepdims=True)


def hirescam_weights(acts: jax.Array, grads: jax.Array) -> jax.Array:
    """HiResCAM: the gradients themselves, element-wise, ``(B, *s, c)``."""
    return grads


def elementwise_weights(acts: jax.Array, grads: jax.Array) -> jax.Array:
    """Grad-CAM element-wise: gradients where ``g * A > 0`` (so ``w * A = relu(g * A)``), ``(B, *s, c)``."""
    return jnp.where(grads * acts > 0, grads, 0.0)


def layercam_weights(acts: jax.Array, grads: jax.Array) -> jax.Array:
    """LayerCAM: the positive gradients, element-wise, ``(B, *s, c)``."""
    return jnp.maximum(grads, 0.0)


def xgradcam_weights(acts: jax.Array, grads: jax.Array) -> jax.Array:
    """XGrad-CAM: ``sum_s g A / (sum_s A + 1e-7)``, ``(B, *s, c) -> (B, 1.., c)``."""
    ax = core.spatial_axes(acts)
    s = jnp.sum(acts, axis=ax, keepdims=True)
    return jnp.sum(grads * acts / (s + 1e-7), axis=ax, keepdims=True)


def gradcam_plus_plus_weights(acts: jax.Array, grads: jax.Array) -> jax.Array:
    """Grad-CAM++: ``sum_s relu(g) g^2 / (2 g^2 + sum_s(A) g^3 + 1e-6)``, ``(B, *s, c) -> (B, 1.., c)``."""
    ax = core.spatial_axes(acts)
    g2 = grads * grads
    g3 = g2 * grads
    s = jnp.sum(acts, axis=ax, keepdims=True)
    alpha = g2 / (2.0 * g2 + s * g3 + 1e-6)
    alpha = jnp.where(grads != 0, alpha, 0.0)
    return jnp.sum(jnp.maximum(grads, 0.0) * alpha, axis=ax, keepdims=True)


# ----------------------------------------------------------------------------- other stage methods


def eigen_cam_map(ex: Explainer, x: jax.Array, targets: jax.Array | None, stage: str) -> jax.Array:
    """Eigen-CAM raw map ``(B, *s)`` of ``stage`` (class-agnostic: ``targets`` unused)."""
    acts, _ = ex.stage(x, stage)
    return eigen_cam(acts)


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
    ex: Explainer,
    x: jax.Array,
    targets: jax.Array | None,
    stage: str,
    chunk_size: int = 64,
) -> jax.Array:
    """Score-CAM raw map ``(B, *s)``: softmax over channels of the target score of ``x * mask_k``.

    ``mask_k`` = channel ``k`` upsampled to the input size (bilinear, align_corners as torch's
    ``UpsamplingBilinear2d``), min-max scaled to [0, 1]. Evaluated in chunks of channels.
    """
    acts, out = ex.stage(x, stage)
    acts = jax.lax.stop_gradient(acts).astype(jnp.float32)
    batch, num_ch = acts.shape[0], acts.shape[-1]
    size = x.shape[1:-1]
    tgt = ex.targets(out, targets, batch)
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
        o = ex.forward(xs.reshape((-1,) + xs.shape[2:]))
        s = ex.score(o, (batch, idx.shape[0]), tgt)  # (B, k)
        return s.T

    s = core.chunked(scores, num_ch, k).T  # (B, c)
    w = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("b...c,bc->b...", acts, w, precision=core.PRECISION)


def ablation_cam(
    ex: Explainer,
    x: jax.Array,
    targets: jax.Array | None,
    stage: str,
    chunk_size: int = 256,
) -> jax.Array:
    """Ablation-CAM raw map ``(B, *s)``: weights ``(y - y_k) / y``, ``y_k`` with channel ``k`` zeroed.

    Only the network after ``stage`` is re-run, from the cached activations, in chunks.
    """
    acts, out = ex.stage(x, stage)
    acts = jax.lax.stop_gradient(acts)
    batch, num_ch = acts.shape[0], acts.shape[-1]
    outputs = ex.outputs(out, (batch,))
    tgt = core.resolve_targets(outputs, targets)
    y = core.select(outputs, tgt)  # (B,)
    k = core.per_chunk(chunk_size, batch)

    def scores(idx: jax.Array) -> jax.Array:
        keep = (jnp.arange(num_ch)[None, :] != idx[:, None]).astype(acts.dtype)  # (k, c)
        a = acts[:, None] * keep.reshape((1, idx.shape[0]) + (1,) * (acts.ndim - 2) + (num_ch,))
        o = ex.run_from(a.reshape((-1,) + acts.shape[1:]), stage)
        return ex.score(o, (batch, idx.shape[0]), tgt).T  # (k, B)

    y_k = core.chunked(scores, num_ch, k).T  # (B, c)
    w = (y[:, None] - y_k) / y[:, None]
    return jnp.einsum("b...c,bc->b...", acts.astype(jnp.float32), w, precision=core.PRECISION)


def crm(
    ex: Explainer,
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
    acts, out = ex.stage(x, stage)
    acts = jax.lax.stop_gradient(acts)
    batch = acts.shape[0]
    spatial = acts.shape[1:-1]
    n_loc = 1
    for v in spatial:
        n_loc *= v

    def outs(o: dict, lead: tuple[int, ...]) -> jax.Array:
        y = ex.outputs(o, lead)
        if crm_output == "probs" and y.shape[-1] > 1:
            y = jax.nn.softmax(y, axis=-1)
        return y

    y0 = outs(out, (batch,))  # (B, K)
    tgt = ex.targets(out, targets, batch)
    d = jax.nn.one_hot(tgt, y0.shape[-1], dtype=y0.dtype)  # (B, K)
    err0 = jnp.sum(jnp.square(d - y0), axis=-1)  # (B,)
    k = core.per_chunk(chunk_size, batch)

    def errors(idx: jax.Array) -> jax.Array:
        keep = (jnp.arange(n_loc)[None, :] != idx[:, None]).astype(acts.dtype)  # (k, n)
        keep = keep.reshape((1, idx.shape[0]) + spatial + (1,))
        a = acts[:, None] * keep  # (B, k, *s, c)
        o = ex.run_from(a.reshape((-1,) + acts.shape[1:]), stage)
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


def sc_map(ex: Explainer, x: jax.Array, targets: jax.Array | None, maps: str = "cosine") -> jax.Array:
    """LCL-SC saliency map of the target class per location of the last stage, ``(B, h, w)``.

    ``maps="cosine"``: ``cos(g(F_l), G_c)`` (the paper's); ``"decomposed"``: the maps whose mean
    is the GEI cosine (``method.decomposed_saliency_maps``), for runs trained with
    ``loss.sc_maps=decomposed``.
    """
    if maps not in ("cosine", "decomposed"):
        raise ValueError(f"sc maps must be 'cosine' or 'decomposed', got {maps!r}")
    require_projection(ex.model)
    if ex.scorer.global_emb is None:
        raise ValueError("the SC maps need the global class embeddings: pass global_emb=(C, D)")
    out = ex.forward(x)
    tgt = ex.targets(out, targets, x.shape[0])
    if maps == "decomposed":
        per_class = decomposed_saliency_maps(out["local_embedding"], out["embedding"], ex.scorer.global_emb)
    else:
        per_class = class_saliency_maps(out["local_embedding"], ex.scorer.global_emb)  # (B, h, w, C)
    return core.select(per_class, tgt)
