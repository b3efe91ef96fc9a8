"""``saliency(method, model, variables, images, targets, stage, **options) -> (B, H, W)``.

One entry point for every method; compiled once per (method, model, stages, static options)
and cached, so repeated calls on same-shaped batches do not retrace.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lclsc_jax import models
from lclsc_jax.data import pad_rows
from lclsc_jax.explain import cam, core, registry
from lclsc_jax.explain.registry import INPUT_METHODS, METHODS, STAGE_METHODS, MethodSpec

__all__ = ["INPUT_METHODS", "METHODS", "STAGE_METHODS", "saliency"]


def _stage_map(spec: MethodSpec, ex: core.Explainer, x: jax.Array, targets: jax.Array | None, stage: str,
               opts: dict[str, Any]) -> jax.Array:
    """Raw map ``(B, *s)`` of a stage method at ``stage``."""
    if spec.level == "gradient_cam":
        return cam.gradient_cam_map(ex, x, targets, stage, spec.resolve())
    return spec.resolve()(ex, x, targets, stage, **opts)


def _raw(
    spec: MethodSpec,
    ex: core.Explainer,
    stages: tuple[str, ...],
    opts: dict[str, Any],
    x: jax.Array,
    targets: jax.Array | None,
    normalize: bool,
) -> jax.Array:
    """The map of ``spec``'s method for images ``x (B, *S, C)``: ``(B, *S)``."""
    size = x.shape[1:-1]
    if spec.level == "last_stage":
        return core.finish_cams([spec.resolve()(ex, x, targets)], size, normalize)
    if spec.is_cam:
        return core.finish_cams([_stage_map(spec, ex, x, targets, s, opts) for s in stages], size, normalize)
    m = spec.resolve()(ex, x, targets, **opts).astype(jnp.float32)
    return core.normalize_map(m, spec.input_norm) if normalize else m


@functools.lru_cache(maxsize=128)
def _compiled(
    method: str, model: Any, stages: tuple[str, ...], static: tuple, normalize: bool, use_jit: bool
) -> Callable[..., jax.Array]:
    """The (jitted) map function ``(variables, x, targets, scorer, dynamic) -> (B, *S)`` of one static configuration, cached."""
    spec = registry.get(method)

    def fn(variables: Any, x: jax.Array, targets: jax.Array | None, scorer: core.Scorer,
           dynamic: dict[str, Any]) -> jax.Array:
        ex = core.Explainer(model, variables, scorer)
        return _raw(spec, ex, stages, {**dict(static), **dynamic}, x, targets, normalize)

    return jax.jit(fn) if use_jit else fn


def _hashable(value: Any) -> Any:
    """Options as hashable static values (lists -> tuples)."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def saliency(
    method: str,
    model: Any,
    variables: Any,
    images: jax.Array,
    targets: jax.Array | Sequence[int] | int | None = None,
    stage: str | Sequence[str] = "last",
    *,
    normalize: bool = True,
    global_emb: jax.Array | None = None,
    target_embedding: jax.Array | None = None,
    tau: float = 0.1,
    score: str = "auto",
    jit: bool = True,
    **options: Any,
) -> jax.Array:
    """Saliency maps ``(B, H, W)`` float32 of ``images (B, H, W, C)`` for ``targets (B,)``; volumes alike.

    Volumes ``(B, D, H, W, C)`` give maps ``(B, D, H, W)`` (trilinear upsampling, 3D occlusion
    windows, SLIC supervoxels) for the methods of ``registry.VOLUME_METHODS``.

    ``targets=None`` explains the predicted class. ``stage``: a stage name, ``"last"``, or several
    (maps averaged after upsampling); input-level methods (``fullgrad``, ``occlusion``,
    ``superpixel``, gradients) ignore it and ``sc`` always uses the last stage. What is explained
    (``score``): ``"logits"`` (linear head), ``"gei"`` (``cos(z, G_c) / tau``, needs
    ``global_emb (C, D)``), ``"embedding"`` (``cos(z, target_embedding)``, ``(D,)`` or ``(B, D)``),
    ``"auto"`` (embedding if given, else the model's head). ``normalize=False`` returns the raw,
    signed, differentiable maps. Method options: see ``docs/explain.md``.

    For a :class:`lclsc_jax.models.Model` the variables are checked first
    (``models.check_variables``: one error naming missing / unexpected / mis-shaped leaves). A
    plain classifier (``projection=False``) runs every method but ``sc``, whose maps need the
    projection head; its embedding is the pooled features ``(B, c)``.
    """
    spec = registry.get(method)
    if spec.needs_projection:
        cam.require_projection(model)
    if isinstance(model, models.Model):
        models.check_variables(model, variables)
    x = _images(images)
    registry.check_volumes(spec, x.ndim - 2)
    targets = _targets(targets, x.shape[0])
    if spec.needs_projection and score == "auto" and target_embedding is None:
        score = "gei"
    scorer = core.make_scorer(model, x.shape[0], score=score, global_emb=global_emb,
                              target_embedding=target_embedding, tau=tau)
    if scorer.kind == "embedding" and targets is not None and bool(jnp.any(targets != 0)):
        raise ValueError("an embedding-similarity target has a single output: targets must be None or 0")
    stages = _stages(spec, model, stage, scorer)
    static, dynamic = _options(spec, x, options)
    fn = _compiled(method, model, stages, static, bool(normalize), bool(jit))
    return fn(variables, x, targets, scorer, dynamic)


def saliency_batched(method: str, model: Any, variables: Any, images: Any, targets: Any, *, batch_size: int = 16,
                     **kwargs: Any) -> np.ndarray:
    """:func:`saliency` of ``images (N, H, W, C)`` for ``targets (N,)`` in padded batches of ``batch_size``: ``(N, H, W)``.

    Every batch has one shape (``data.pad_rows``), so a method compiles once whatever ``N``;
    ``kwargs`` go to :func:`saliency`. Returns host float32 maps; non-finite maps raise
    ``FloatingPointError`` naming the method.
    """
    x = np.asarray(images)
    t = np.asarray(targets, np.int32).reshape(-1)
    if len(t) != len(x):
        raise ValueError(f"got {len(x)} images but {len(t)} targets")
    out = []
    for i in range(0, len(x), batch_size):
        xb, valid = pad_rows(x[i:i + batch_size], batch_size)
        tb, _ = pad_rows(t[i:i + batch_size], batch_size)
        out.append(np.asarray(saliency(method, model, variables, xb, tb, **kwargs), np.float32)[valid])
    maps = np.concatenate(out)
    if not np.all(np.isfinite(maps)):
        raise FloatingPointError(f"{method} at {kwargs.get('stage', 'last')} produced NaN/inf maps")
    return maps


def _images(images: Any) -> jax.Array:
    """``images`` as a float array ``(B, *S, C)`` with ``B >= 1``; ``ValueError`` otherwise."""
    x = jnp.asarray(images)
    if x.ndim < 3:
        raise ValueError(f"images must have shape (B, H, W, C) or (B, D, H, W, C), got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"images must be float model inputs (normalised), got dtype {x.dtype}")
    if x.shape[0] < 1:
        raise ValueError("images is an empty batch")
    return x


def _targets(targets: jax.Array | Sequence[int] | int | None, batch: int) -> jax.Array | None:
    """``targets`` as int32 ``(B,)`` (a scalar is broadcast), or None."""
    if targets is None:
        return None
    t = jnp.asarray(targets)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,) or not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"targets must be integer class indices of shape ({batch},), got {t.dtype} {t.shape}")
    return t.astype(jnp.int32)


def _stages(spec: MethodSpec, model: Any, stage: str | Sequence[str], scorer: core.Scorer) -> tuple[str, ...]:
    """The resolved stages; a last-stage method (``sc``) refuses other stages and embedding targets."""
    stages = core.resolve_stages(model, stage)
    if spec.level != "last_stage":
        return stages
    last = core.resolve_stages(model, "last")
    if stage not in ("last", None) and stages != last:
        raise ValueError(f"the SC maps exist only at the last stage {last[0]!r}, got stage={stage!r}")
    if scorer.kind == "embedding":
        raise ValueError(f"method {spec.name!r} explains classes via global_emb; an embedding target is not supported")
    return stages


def _options(spec: MethodSpec, x: jax.Array, options: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """``(static options as sorted hashable pairs, dynamic arrays)`` of a call; ``TypeError`` on unknown ones."""
    unknown = set(options) - set(spec.options)
    if unknown:
        raise TypeError(f"method {spec.name!r} got unknown options {sorted(unknown)}; "
                        f"it accepts {sorted(spec.options) or 'none'}")
    opts = {**spec.options, **options}
    dynamic: dict[str, Any] = {}
    if spec.prepare is not None:
        opts, dynamic = spec.resolve(spec.prepare)(x, opts)
    return tuple(sorted((k, _hashable(v)) for k, v in opts.items())), dynamic
