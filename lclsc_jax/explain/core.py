"""Shared machinery of the saliency methods: scorers, model entry points, resizing, normalisation.

Conventions. Images are ``(B, *spatial, C)`` (2D: ``(B, H, W, C)``); feature maps are
``(B, *spatial, c)``; maps are ``(B, *spatial)``. Every reduction runs over *all* spatial axes,
so the same code serves 3D feature maps. Models follow the :mod:`lclsc_jax.models` contract:
``apply(variables, x, train=False)`` returns ``{"features": {stage: ...}, "embedding", ...,
"logits"?}`` and ``apply(..., stage=s, method=model.from_stage)`` resumes after stage ``s``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lclsc_jax.method import gei_logits, normalize

INPUT = "input"
SCORE_KINDS = ("auto", "logits", "gei", "embedding")
PRECISION = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- scorer


@struct.dataclass
class Scorer:
    """What a map explains: a class score of the model output, or a cosine to a reference.

    ``kind``: ``"logits"`` (linear head, ``logits[:, c]``), ``"gei"`` (``cos(z, G_c) / tau`` with
    ``global_emb (C, D)``) or ``"embedding"`` (``cos(z, reference)`` with ``reference (B, D)``;
    a single output, target index 0). Arrays are pytree leaves, ``kind``/``tau`` are static.
    """

    global_emb: jax.Array | None = None
    reference: jax.Array | None = None
    kind: str = struct.field(pytree_node=False, default="logits")
    tau: float = struct.field(pytree_node=False, default=0.1)

    def outputs(self, out: dict[str, Any], lead: tuple[int, ...]) -> jax.Array:
        """All output scores of a model output dict of ``prod(lead)`` samples: ``lead + (K,)`` f32."""
        if self.kind == "logits":
            logits = out["logits"].astype(jnp.float32)
            return logits.reshape(lead + logits.shape[-1:])
        z = out["embedding"]
        if self.kind == "gei":
            return gei_logits(z.reshape(-1, z.shape[-1]), self.global_emb, self.tau).reshape(
                lead + (self.global_emb.shape[0],)
            )
        zn = normalize(z.reshape(lead + z.shape[-1:]))
        ref = normalize(self.reference).reshape(self.reference.shape[:1] + (1,) * (len(lead) - 1) + (-1,))
        return jnp.sum(zn * ref, axis=-1, keepdims=True)


def make_scorer(
    model: Any,
    batch: int,
    *,
    score: str = "auto",
    global_emb: jax.Array | None = None,
    target_embedding: jax.Array | None = None,
    tau: float = 0.1,
) -> Scorer:
    """Build the :class:`Scorer` for ``model``; ``score="auto"`` picks embedding > linear > gei."""
    if score not in SCORE_KINDS:
        raise ValueError(f"score must be one of {SCORE_KINDS}, got {score!r}")
    head = getattr(model, "head_type", None)
    if score == "auto":
        if target_embedding is not None:
            score = "embedding"
        elif head == "linear":
            score = "logits"
        else:
            score = "gei"
    if score == "logits":
        if head != "linear":
            raise ValueError(
                f"score='logits' needs a model with a linear head, this one has head={head!r}; "
                "pass global_emb= (GEI score) or target_embedding= (embedding-similarity target)"
            )
        return Scorer(kind="logits", tau=tau)
    if score == "gei":
        if global_emb is None:
            raise ValueError(
                "explaining a GEI-head model needs the global class embeddings: pass "
                "global_emb=(C, D) (the EMA embeddings of the train state), or "
                "target_embedding=(D,)|(B, D) for an embedding-similarity target"
            )
        g = jnp.asarray(global_emb)
        if g.ndim != 2:
            raise ValueError(f"global_emb must have shape (C, D), got {g.shape}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        return Scorer(global_emb=g.astype(jnp.float32), kind="gei", tau=float(tau))
    if target_embedding is None:
        raise ValueError("score='embedding' needs target_embedding=(D,) or (B, D)")
    ref = jnp.asarray(target_embedding, jnp.float32)
    if ref.ndim == 1:
        ref = jnp.broadcast_to(ref, (batch, ref.shape[0]))
    if ref.ndim != 2 or ref.shape[0] != batch:
        raise ValueError(f"target_embedding must have shape (D,) or ({batch}, D), got {ref.shape}")
    return Scorer(reference=ref, kind="embedding", tau=float(tau))


def select(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Pick each sample's target score: ``outputs (B, *P, K), targets (B,) -> (B, *P)``."""
    idx = targets.reshape(targets.shape + (1,) * (outputs.ndim - 1))
    return jnp.take_along_axis(outputs, idx.astype(jnp.int32), axis=-1)[..., 0]


def resolve_targets(outputs: jax.Array, targets: jax.Array | None) -> jax.Array:
    """``targets`` as int32 ``(B,)``, or the argmax class of ``outputs (B, K)`` when None."""
    if targets is None:
        return jax.lax.stop_gradient(jnp.argmax(outputs, axis=-1)).astype(jnp.int32)
    return targets.astype(jnp.int32)


# ----------------------------------------------------------------------------- model calls


def forward(model: Any, variables: Any, x: jax.Array) -> dict[str, Any]:
    """Inference forward ``x (B, *spatial, C)`` -> the model's output dict."""
    return model.apply(variables, x, train=False)


def probabilities(model: Any, variables: Any, x: jax.Array, scorer: "Scorer") -> jax.Array:
    """Softmax of the scorer's outputs ``(B, K)`` for ``x (B, *spatial, C)`` (what a run predicts)."""
    return jax.nn.softmax(scorer.outputs(forward(model, variables, x), (x.shape[0],)), axis=-1)


def run_from(model: Any, variables: Any, feats: jax.Array, stage: str) -> dict[str, Any]:
    """Resume the network after ``stage`` from its output ``feats``; ``"input"`` = full forward."""
    if stage == INPUT:
        return forward(model, variables, feats)
    return model.apply(variables, feats, stage=stage, train=False, method=model.from_stage)


def stage_features(model: Any, variables: Any, x: jax.Array, stages: Sequence[str]) -> tuple[dict, dict]:
    """``({stage: (B, *s, c)}, full output dict)`` of one forward (XLA prunes unused parts under jit)."""
    out = forward(model, variables, x)
    feats = {s: (x if s == INPUT else out["features"][s]) for s in stages}
    return feats, out


@dataclasses.dataclass(frozen=True)
class Explainer:
    """What every method needs: the model, its variables and the :class:`Scorer` of what is explained."""

    model: Any
    variables: Any
    scorer: Scorer

    def forward(self, x: jax.Array) -> dict[str, Any]:
        """Inference forward ``x (B, *S, C)`` -> the model's output dict."""
        return forward(self.model, self.variables, x)

    def run_from(self, feats: jax.Array, stage: str) -> dict[str, Any]:
        """Resume the network after ``stage`` from ``feats (N, *s, c)`` -> output dict."""
        return run_from(self.model, self.variables, feats, stage)

    def stage(self, x: jax.Array, stage: str) -> tuple[jax.Array, dict[str, Any]]:
        """``(activations (B, *s, c) of stage, full output dict)`` of one forward."""
        feats, out = stage_features(self.model, self.variables, x, (stage,))
        return feats[stage], out

    def outputs(self, out: dict[str, Any], lead: tuple[int, ...]) -> jax.Array:
        """All output scores ``lead + (K,)`` of an output dict of ``prod(lead)`` samples."""
        return self.scorer.outputs(out, lead)

    def score(self, out: dict[str, Any], lead: tuple[int, ...], tgt: jax.Array) -> jax.Array:
        """The target score ``lead`` (batch-major, ``tgt (B,)``) of an output dict."""
        return select(self.scorer.outputs(out, lead), tgt)

    def targets(self, out: dict[str, Any], targets: jax.Array | None, batch: int) -> jax.Array:
        """``targets (B,)`` int32, or the predicted class of the output dict ``out`` of ``B`` samples."""
        return resolve_targets(self.scorer.outputs(out, (batch,)), targets)


def resolve_stages(model: Any, stage: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise ``stage`` (a name, ``"last"``, or several) to a tuple of valid stage names."""
    names = tuple(getattr(model, "stage_names", ()))
    last = getattr(model, "last_stage", names[-1] if names else None)
    if stage is None:
        stage = "last"
    stages = (stage,) if isinstance(stage, str) else tuple(stage)
    if not stages:
        raise ValueError("stage must name at least one stage")
    out = []
    for s in stages:
        s = last if s == "last" else s
        if s not in names:
            raise ValueError(f"unknown stage {s!r}; this model has {names} (or 'last')")
        out.append(s)
    return tuple(dict.fromkeys(out))


# ----------------------------------------------------------------------------- resizing


@functools.lru_cache(maxsize=256)
def interp_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """Linear-interpolation matrix ``(n_out, n_in)`` for one axis.

    ``align_corners=False``: half-pixel centres with edge clamping (OpenCV ``INTER_LINEAR``,
    ``jax.image.resize("linear")`` when upsampling). ``True``: corner pixels map onto each other
    (``torch.nn.UpsamplingBilinear2d``).
    """
    out = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = out * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(out)
    else:
        src = (out + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), np.float64)
    m[np.arange(n_out), lo] += 1.0 - frac
    m[np.arange(n_out), hi] += frac
    return m.astype(np.float32)


def resize(maps: jax.Array, size: Sequence[int], align_corners: bool = False) -> jax.Array:
    """Multilinear resize of the trailing spatial axes: ``(..., *s_in) -> (..., *size)``."""
    size = tuple(int(v) for v in size)
    nd = len(size)
    x = maps
    for i, n_out in enumerate(size):
        axis = x.ndim - nd + i
        n_in = x.shape[axis]
        if n_in == n_out:
            continue
        m = jnp.asarray(interp_matrix(n_in, n_out, align_corners), dtype=jnp.promote_types(x.dtype, jnp.float32))
        x = jnp.moveaxis(jnp.tensordot(x, m, axes=((axis,), (1,)), precision=PRECISION), -1, axis)
    return x


# ----------------------------------------------------------------------------- normalisation


def spatial_axes(x: jax.Array, channels_last: bool = True) -> tuple[int, ...]:
    """The spatial axes of ``(B, *spatial, c)`` (or of a map ``(B, *spatial)``)."""
    return tuple(range(1, x.ndim - 1)) if channels_last else tuple(range(1, x.ndim))


def minmax(maps: jax.Array, n_lead: int = 1) -> jax.Array:
    """Scale each map of ``(*lead, *spatial)`` to [0, 1]; a flat map becomes all zeros (never NaN)."""
    axes = tuple(range(n_lead, maps.ndim))
    lo = jnp.min(maps, axis=axes, keepdims=True)
    x = maps - lo
    hi = jnp.max(x, axis=axes, keepdims=True)
    ok = hi > jnp.finfo(x.dtype).tiny * 1e3
    return jnp.where(ok, x / jnp.where(ok, hi, 1.0), 0.0)


def normalize_map(maps: jax.Array, mode: str = "relu") -> jax.Array:
    """Post-process raw maps ``(B, *spatial)`` to [0, 1]: ``relu`` / ``abs`` / ``none``, then min-max.

    ``relu`` is pytorch-grad-cam's rule (negative evidence dropped); an all-negative map gives zeros.
    """
    if mode == "relu":
        maps = jnp.maximum(maps, 0.0)
    elif mode == "abs":
        maps = jnp.abs(maps)
    elif mode != "none":
        raise ValueError(f"unknown normalisation mode {mode!r}")
    return minmax(maps)


def finish_cams(raw: Sequence[jax.Array], size: Sequence[int], normalize_maps: bool) -> jax.Array:
    """Combine per-stage raw maps ``[(B, *s_i)]`` into ``(B, *size)`` as pytorch-grad-cam does.

    Normalised: each map ReLU + min-max, bilinear upsampling, mean over stages, ReLU + min-max.
    Raw: bilinear upsampling of the signed maps and their mean (differentiable, no ReLU).
    """
    ups = []
    for m in raw:
        m = m.astype(jnp.float32)
        if normalize_maps:
            m = normalize_map(m, "relu")
        ups.append(resize(m, size))
    out = sum(ups[1:], ups[0]) / len(ups) if len(ups) > 1 else ups[0]
    return normalize_map(out, "relu") if normalize_maps else out


# ----------------------------------------------------------------------------- chunking


def chunked(fn: Callable[[jax.Array], Any], n: int, chunk: int) -> Any:
    """Evaluate ``fn(idx (k,)) -> pytree with leading k`` for ``idx = 0..n-1`` in chunks of ``k``.

    Chunks run sequentially (``lax.map``), so only one chunk's perturbed inputs and activations
    are alive at a time; the last chunk is padded (with index ``n - 1``) and the padding dropped.
    Returns the pytree with leading axis ``n``.
    """
    chunk = max(1, min(int(chunk), n))
    n_chunks = -(-n // chunk)
    idx = jnp.minimum(jnp.arange(n_chunks * chunk, dtype=jnp.int32), n - 1).reshape(n_chunks, chunk)
    if n_chunks == 1:
        res = jax.tree_util.tree_map(lambda a: a[None], fn(idx[0]))
    else:
        res = jax.lax.map(fn, idx)
    return jax.tree_util.tree_map(lambda a: a.reshape((n_chunks * chunk,) + a.shape[2:])[:n], res)


def per_chunk(chunk_size: int, batch: int) -> int:
    """Perturbations per chunk so that one forward pass sees at most ``chunk_size`` inputs."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return max(1, chunk_size // max(batch, 1))


def chunked_sum(fn: Callable[[jax.Array], jax.Array], n: int, chunk: int) -> jax.Array:
    """``sum_{i < n} fn(idx)[j]`` over chunks of ``k`` indices, accumulated in a ``lax.scan`` carry.

    Like :func:`chunked` but only the running sum (not every result) stays alive.
    """
    chunk = max(1, min(int(chunk), n))
    n_chunks = -(-n // chunk)
    ids = jnp.arange(n_chunks * chunk, dtype=jnp.int32).reshape(n_chunks, chunk)

    def masked(idx: jax.Array) -> jax.Array:
        vals = fn(jnp.minimum(idx, n - 1))
        valid = (idx < n).astype(vals.dtype).reshape((-1,) + (1,) * (vals.ndim - 1))
        return jnp.sum(vals * valid, axis=0)

    if n_chunks == 1:
        return masked(ids[0])
    first = masked(ids[0])
    total, _ = jax.lax.scan(lambda acc, idx: (acc + masked(idx), None), first, ids[1:])
    return total
