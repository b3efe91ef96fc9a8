"""``saliency(method, model, variables, images, targets, stage, **options) -> (B, H, W)``.

One entry point for every method; compiled once per (method, model, stages, static options)
and cached, so repeated calls on same-shaped batches do not retrace.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lclsc_jax import models
from lclsc_jax.explain import cam, core, fullgrad as fullgrad_mod, gradients, perturbation

METHODS: tuple[str, ...] = (
    "sc",
    "gradcam",
    "hirescam",
    "gradcam++",
    "xgradcam",
    "layercam",
    "gradcam_elementwise",
    "eigencam",
    "scorecam",
    "ablationcam",
    "fullgrad",
    "crm",
    "occlusion",
    "superpixel",
    "gradient",
    "smoothgrad",
    "integrated_gradients",
)
STAGE_METHODS = cam.GRADIENT_CAMS + ("eigencam", "scorecam", "ablationcam", "crm")
INPUT_METHODS = ("fullgrad", "occlusion", "superpixel", "gradient", "smoothgrad", "integrated_gradients")

# Options each method accepts (beyond the common ones), with their defaults.
_OPTIONS: dict[str, dict[str, Any]] = {
    "scorecam": {"chunk_size": 64},
    "ablationcam": {"chunk_size": 256},
    "crm": {"chunk_size": 256, "crm_output": "probs"},
    "occlusion": {"patch_size": None, "stride": None, "fill": 0.0, "chunk_size": 64},
    "superpixel": {"segments": None, "n_segments": 50, "compactness": 10.0, "slic_sigma": 1.0,
                   "fill": 0.0, "chunk_size": 64},
    "smoothgrad": {"num_samples": 16, "noise_level": 0.15, "rng": None, "chunk_size": 64},
    "integrated_gradients": {"steps": 32, "baseline": 0.0, "chunk_size": 64},
}
# Post-processing of raw input-resolution maps when normalised.
_INPUT_NORM = {"fullgrad": "none", "occlusion": "relu", "superpixel": "relu", "gradient": "abs",
               "smoothgrad": "abs", "integrated_gradients": "abs"}


def _check_method(method: str) -> None:
    if method not in METHODS:
        close = [m for m in METHODS if m.replace("_", "").replace("+", "") in method.replace("_", "").replace("-", "")
                 or method.replace("-", "_") == m]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown saliency method {method!r}{hint}; expected one of {METHODS}")


def _raw(
    method: str,
    model: Any,
    stages: tuple[str, ...],
    static: tuple[tuple[str, Any], ...],
    variables: Any,
    x: jax.Array,
    targets: jax.Array | None,
    scorer: core.Scorer,
    dynamic: dict[str, Any],
    normalize: bool,
) -> jax.Array:
    """The map of ``method`` for images ``x (B, *S, C)``: ``(B, *S)``."""
    opts = dict(static)
    size = x.shape[1:-1]
    if method == "sc":
        return core.finish_cams([cam.sc_map(model, variables, scorer, x, targets)], size, normalize)
    if method in STAGE_METHODS:
        raws = []
        for stage in stages:
            if method in cam.GRADIENT_CAMS:
                acts, grads, _ = cam.stage_gradients(model, variables, scorer, x, targets, stage)
                raws.append(cam.gradient_cam(method, acts, grads))
            elif method == "eigencam":
                feats, _ = core.stage_features(model, variables, x, (stage,))
                raws.append(cam.eigen_cam(feats[stage]))
            elif method == "scorecam":
                raws.append(cam.score_cam(model, variables, scorer, x, targets, stage, **opts))
            elif method == "ablationcam":
                raws.append(cam.ablation_cam(model, variables, scorer, x, targets, stage, **opts))
            else:
                raws.append(cam.crm(model, variables, scorer, x, targets, stage, **opts))
        return core.finish_cams(raws, size, normalize)
    if method == "fullgrad":
        m = fullgrad_mod.fullgrad(model, variables, scorer, x, targets)
    elif method == "occlusion":
        m = perturbation.occlusion(model, variables, scorer, x, targets, **opts)
    elif method == "superpixel":
        m = perturbation.superpixel(model, variables, scorer, x, targets, dynamic["segments"], **opts)
    elif method == "gradient":
        m = gradients.gradient(model, variables, scorer, x, targets)
    elif method == "smoothgrad":
        m = gradients.smoothgrad(model, variables, scorer, x, targets, dynamic["rng"], **opts)
    else:
        m = gradients.integrated_gradients(model, variables, scorer, x, targets, dynamic["baseline"], **opts)
    m = m.astype(jnp.float32)
    if not normalize:
        return m
    return core.normalize_map(m, _INPUT_NORM[method]) if method != "fullgrad" else core.minmax(m)


@functools.lru_cache(maxsize=128)
def _compiled(method: str, model: Any, stages: tuple[str, ...], static: tuple, normalize: bool, use_jit: bool):
    """The (jitted) map function for one static configuration, cached."""

    def fn(variables, x, targets, scorer, dynamic):
        return _raw(method, model, stages, static, variables, x, targets, scorer, dynamic, normalize)

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
    """Saliency maps ``(B, H, W)`` float32 of ``images (B, H, W, C)`` for ``targets (B,)``.

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
    _check_method(method)
    if method == "sc":
        cam.require_projection(model)
    if isinstance(model, models.Model):
        models.check_variables(model, variables)
    x = jnp.asarray(images)
    if x.ndim < 3:
        raise ValueError(f"images must have shape (B, H, W, C), got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"images must be float model inputs (normalised), got dtype {x.dtype}")
    batch = x.shape[0]
    if batch < 1:
        raise ValueError("images is an empty batch")
    if targets is not None:
        t = jnp.asarray(targets)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (batch,))
        if t.shape != (batch,) or not jnp.issubdtype(t.dtype, jnp.integer):
            raise ValueError(f"targets must be integer class indices of shape ({batch},), got {t.dtype} {t.shape}")
        targets = t.astype(jnp.int32)
    scorer = core.make_scorer(model, batch, score=("gei" if method == "sc" and score == "auto"
                                                   and target_embedding is None else score),
                              global_emb=global_emb, target_embedding=target_embedding, tau=tau)
    if scorer.kind == "embedding" and targets is not None and bool(jnp.any(targets != 0)):
        raise ValueError("an embedding-similarity target has a single output: targets must be None or 0")
    stages = core.resolve_stages(model, stage)
    if method == "sc":
        last = core.resolve_stages(model, "last")
        if stage not in ("last", None) and stages != last:
            raise ValueError(f"the SC maps exist only at the last stage {last[0]!r}, got stage={stage!r}")
        if scorer.kind == "embedding":
            raise ValueError("method 'sc' explains classes via global_emb; an embedding target is not supported")

    allowed = _OPTIONS.get(method, {})
    unknown = set(options) - set(allowed)
    if unknown:
        raise TypeError(f"method {method!r} got unknown options {sorted(unknown)}; it accepts {sorted(allowed) or 'none'}")
    opts = {**allowed, **options}
    dynamic: dict[str, Any] = {}
    if method == "superpixel":
        segments = opts.pop("segments")
        n_seg, comp, sig = opts.pop("n_segments"), opts.pop("compactness"), opts.pop("slic_sigma")
        if segments is None:
            try:
                host = np.asarray(x)
            except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
                raise ValueError(
                    "superpixel under jit/grad needs precomputed segments= (SLIC runs on the host); "
                    "see explain.slic_segments"
                ) from None
            segments = perturbation.slic_segments(host, n_seg, comp, sig)
        seg = np.asarray(segments)
        if seg.shape != x.shape[:-1] or not np.issubdtype(seg.dtype, np.integer) or seg.min() < 0:
            raise ValueError(f"segments must be non-negative integer labels of shape {x.shape[:-1]}, got {seg.dtype} {seg.shape}")
        opts["num_segments"] = int(seg.max()) + 1
        dynamic["segments"] = jnp.asarray(seg, jnp.int32)
    elif method == "smoothgrad":
        rng = opts.pop("rng")
        dynamic["rng"] = jax.random.key(0) if rng is None else rng
    elif method == "integrated_gradients":
        dynamic["baseline"] = jnp.asarray(opts.pop("baseline"), x.dtype)
    static = tuple(sorted((k, _hashable(v)) for k, v in opts.items()))
    fn = _compiled(method, model, stages, static, bool(normalize), bool(jit))
    return fn(variables, x, targets, scorer, dynamic)
