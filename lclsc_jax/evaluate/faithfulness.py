"""Perturbation faithfulness of saliency maps: deletion/insertion, ROAD, confidence drop.

The model is any jittable ``score_fn(images (B, H, W, C)) -> scores (B, K)``; ``targets (B,)``
names the class that is tracked, and ``score`` says what of it (``target_scores``):
``"prob"`` (default) the column itself (pass class probabilities, e.g. ``softmax`` of the
logits), ``"margin"`` the column minus the largest other column (pass logits: the logit margin,
unchanged by any shift of the logits), ``"rank"`` the share of the other classes the target
still beats (ties count 1/2; unchanged by any monotone map of the scores, so softmax
probabilities and logits give the same curve). Probabilities depend on a head's calibration
(a GEI head's ``cos / tau`` vs a linear head's logits); margin and rank make heads comparable.
Saliency maps are ``(B, h, w)``; when ``(h, w)`` differs from the image size they are
resized bilinearly (``jax.image.resize``), as CAMs are upsampled in the papers. Pixels are
ranked by saliency, most salient first, ties broken in raster order.

All forward passes run under ``jax.jit`` in fixed-size chunks of ``max_batch`` images
(``jax.lax.map`` over chunks), so memory is bounded by ``max_batch`` perturbed images
whatever the number of images or steps. ``score_fn`` is a static argument of the jitted
evaluators: pass the *same* function object across calls to reuse the compilation.

ROAD's noisy linear imputation is a sparse linear solve per image on the host
(``scipy.sparse.linalg.spsolve``), exactly the system of Rong et al. (2022); the model
evaluations of the imputed images are batched and jitted like the rest.
Formulas and references: ``docs/evaluate.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import sparse
from scipy.integrate import trapezoid
from scipy.sparse.linalg import spsolve

__all__ = [
    "ROAD_NEIGHBOUR_WEIGHTS",
    "SCORE_KINDS",
    "confidence_change",
    "curve_auc",
    "deletion_curve",
    "gaussian_blur",
    "insertion_curve",
    "noisy_linear_impute",
    "road",
    "saliency_ranks",
    "target_scores",
]

ScoreFn = Callable[[jax.Array], jax.Array]

#: What a perturbation curve tracks of the target class (``target_scores``).
SCORE_KINDS = ("prob", "margin", "rank")

#: (row offset, col offset) -> weight of the ROAD imputation (direct 1/6, diagonal 1/12).
ROAD_NEIGHBOUR_WEIGHTS: tuple[tuple[tuple[int, int], float], ...] = (
    ((-1, 0), 1 / 6),
    ((1, 0), 1 / 6),
    ((0, -1), 1 / 6),
    ((0, 1), 1 / 6),
    ((-1, -1), 1 / 12),
    ((-1, 1), 1 / 12),
    ((1, -1), 1 / 12),
    ((1, 1), 1 / 12),
)


# ----------------------------------------------------------------------------- checks


def _check_inputs(images: Any, saliency: Any, targets: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Validate shapes; return images (B,H,W,C) f32, saliency resized to (B,H,W) f32, targets (B,) i32."""
    x = jnp.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must have shape (B, H, W, C), got {x.shape}")
    x = x.astype(jnp.float32) if not jnp.issubdtype(x.dtype, jnp.floating) else x
    b, h, w, _ = x.shape
    s = jnp.asarray(saliency, dtype=jnp.float32)
    if s.ndim == 4 and s.shape[-1] == 1:
        s = s[..., 0]
    if s.ndim != 3 or s.shape[0] != b:
        raise ValueError(f"saliency must have shape ({b}, h, w) to match images {x.shape}, got {s.shape}")
    if not bool(jnp.all(jnp.isfinite(s))):
        raise ValueError("saliency contains NaN or inf")
    if s.shape[1:] != (h, w):
        s = jax.image.resize(s, (b, h, w), method="bilinear")
    t = np.asarray(targets)
    if t.shape != (b,) or t.dtype.kind not in "iu":
        raise ValueError(f"targets must be integer class indices of shape ({b},), got {t.shape} {t.dtype}")
    return x, s, jnp.asarray(t, dtype=jnp.int32)


def _check_targets_range(probs_shape: tuple[int, ...], targets: jax.Array) -> None:
    """Every target must index a column of the model's probabilities."""
    k = probs_shape[-1]
    if int(targets.min()) < 0 or int(targets.max()) >= k:
        raise ValueError(f"targets must lie in 0..{k - 1} (the model returns {k} classes)")


# ----------------------------------------------------------------------- small pieces


def _check_score(kind: str) -> str:
    """``kind`` if it is one of :data:`SCORE_KINDS`."""
    if kind not in SCORE_KINDS:
        raise ValueError(f"score must be one of {SCORE_KINDS}, got {kind!r}")
    return kind


def target_scores(outputs: Any, targets: Any, kind: str = "prob") -> Any:
    """Tracked score ``(...)`` of class ``targets (...)`` in ``outputs (..., K)``: ``prob``, ``margin`` or ``rank``.

    ``prob``: ``outputs[t]``; ``margin``: ``outputs[t] - max_{c != t} outputs[c]``; ``rank``:
    ``(#{c != t: outputs[c] < outputs[t]} + #{c != t: outputs[c] = outputs[t]} / 2) / (K - 1)``, in
    [0, 1], 1 = the target is on top. NumPy in, NumPy out (float64); JAX in, JAX out (for jit).
    """
    _check_score(kind)
    xp = jnp if isinstance(outputs, jax.Array) else np
    o = outputs if xp is jnp else np.asarray(outputs, np.float64)
    t = (targets if xp is jnp else np.asarray(targets)).astype(xp.int32 if xp is jnp else np.int64)
    own = xp.take_along_axis(o, t[..., None], axis=-1)
    if kind == "prob":
        return own[..., 0]
    k = o.shape[-1]
    is_t = xp.arange(k) == t[..., None]
    if kind == "margin":
        return own[..., 0] - xp.max(xp.where(is_t, -xp.inf, o), axis=-1)
    below = xp.sum((o < own) & ~is_t, axis=-1)
    tied = xp.sum((o == own) & ~is_t, axis=-1)
    return (below + 0.5 * tied) / max(k - 1, 1)


def saliency_ranks(saliency: jax.Array) -> jax.Array:
    """Rank (B, H*W) int32 of every pixel of ``saliency (B, H, W)``: 0 = most salient, ties by raster order."""
    flat = saliency.reshape(saliency.shape[0], -1)
    order = jnp.argsort(-flat, axis=1, stable=True)
    n = flat.shape[1]
    return jax.vmap(lambda o: jnp.zeros(n, jnp.int32).at[o].set(jnp.arange(n, dtype=jnp.int32)))(order)


@functools.partial(jax.jit, static_argnames=("sigma", "truncate"))
def gaussian_blur(images: jax.Array, sigma: float, truncate: float = 4.0) -> jax.Array:
    """Separable Gaussian blur of ``images (B, H, W, C)`` per channel; edge-replicated borders.

    Matches ``scipy.ndimage.gaussian_filter(x, (0, sigma, sigma, 0), mode="nearest",
    truncate=truncate)``: kernel radius ``int(truncate * sigma + 0.5)``.
    """
    radius = int(truncate * sigma + 0.5)
    if sigma <= 0 or radius == 0:
        return images
    c = images.shape[-1]
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k = jnp.asarray(k / k.sum(), images.dtype)
    xp = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    dn = ("NHWC", "HWIO", "NHWC")
    conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=dn,
        feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )
    y = conv(xp, jnp.tile(k[:, None, None, None], (1, 1, 1, c)))
    return conv(y, jnp.tile(k[None, :, None, None], (1, 1, 1, c)))


def curve_auc(curves: Any) -> np.ndarray:
    """Trapezoidal area (B,) under ``curves (B, K)`` sampled at K evenly spaced x in [0, 1]."""
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < 2:
        raise ValueError(f"curves must have shape (B, K) with K >= 2, got {c.shape}")
    return trapezoid(c, axis=1) / (c.shape[1] - 1)  # unit spacing, then x step 1 / (K - 1)


def _baseline(kind: str | Any, images: jax.Array, blur_sigma: float) -> jax.Array:
    """The fill image (B, H, W, C): "zero", "blur", "mean" (per image and channel) or an array."""
    if isinstance(kind, str):
        if kind == "zero":
            return jnp.zeros_like(images)
        if kind == "blur":
            return gaussian_blur(images, float(blur_sigma))
        if kind == "mean":
            return jnp.broadcast_to(images.mean(axis=(1, 2), keepdims=True), images.shape)
        raise ValueError(f"baseline must be 'zero', 'blur', 'mean' or an array, got {kind!r}")
    arr = jnp.asarray(kind, images.dtype)
    try:
        return jnp.broadcast_to(arr, images.shape)
    except ValueError as e:
        raise ValueError(f"baseline array {arr.shape} does not broadcast to images {images.shape}") from e


# ----------------------------------------------------------------- jitted evaluators


@functools.partial(jax.jit, static_argnames=("score_fn", "max_batch"))
def _batched_probs(score_fn: ScoreFn, x: jax.Array, *, max_batch: int) -> jax.Array:
    """``score_fn`` on ``x (M, H, W, C)`` in chunks of ``max_batch``; returns probs (M, K)."""
    m = x.shape[0]
    mb = min(max_batch, m)
    n_chunks = -(-m // mb)
    xp = jnp.pad(x, ((0, n_chunks * mb - m),) + ((0, 0),) * (x.ndim - 1))
    probs = jax.lax.map(score_fn, xp.reshape((n_chunks, mb) + x.shape[1:]))
    return probs.reshape((n_chunks * mb,) + probs.shape[2:])[:m]


@functools.partial(jax.jit, static_argnames=("score_fn", "max_batch", "score"))
def _perturbation_curves(
    score_fn: ScoreFn,
    unselected: jax.Array,
    selected: jax.Array,
    ranks: jax.Array,
    targets: jax.Array,
    counts: jax.Array,
    *,
    max_batch: int,
    score: str = "prob",
) -> jax.Array:
    """Target score (B, K) of images showing ``selected`` at the ``counts[k]`` top-ranked pixels.

    Image ``b`` at step ``k`` is ``where(ranks[b] < counts[k], selected[b], unselected[b])``;
    the ``B*K`` images are built and scored ``max_batch`` at a time.
    """
    b, h, w, c = unselected.shape
    k = counts.shape[0]
    total = b * k
    mb = min(max_batch, total)
    n_chunks = -(-total // mb)
    pair = jnp.arange(n_chunks * mb) % total  # padding repeats real pairs; dropped below
    img_idx, step_idx = pair // k, pair % k

    def chunk(idx: jax.Array) -> jax.Array:
        bi = img_idx[idx]
        sel = (ranks[bi] < counts[step_idx[idx]][:, None]).reshape(mb, h, w, 1)
        x = jnp.where(sel, selected[bi], unselected[bi])
        return target_scores(score_fn(x), targets[bi], score)

    out = jax.lax.map(chunk, jnp.arange(n_chunks * mb).reshape(n_chunks, mb))
    return out.reshape(-1)[:total].reshape(b, k)


# ------------------------------------------------------------ deletion and insertion


def _curve(
    score_fn: ScoreFn,
    images: Any,
    saliency: Any,
    targets: Any,
    n_steps: int,
    baseline: str | Any,
    blur_sigma: float,
    max_batch: int,
    insertion: bool,
    score: str = "prob",
) -> dict[str, Any]:
    """Shared body of deletion_curve / insertion_curve."""
    _check_score(score)
    if int(n_steps) < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if int(max_batch) < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    x, s, t = _check_inputs(images, saliency, targets)
    _check_targets_range(jax.eval_shape(score_fn, x[:1]).shape, t)
    base = _baseline(baseline, x, blur_sigma)
    hw = x.shape[1] * x.shape[2]
    counts = jnp.asarray([(i * hw) // n_steps for i in range(n_steps + 1)], jnp.int32)
    ranks = saliency_ranks(s)
    unselected, selected = (base, x) if insertion else (x, base)
    curves = np.asarray(
        _perturbation_curves(score_fn, unselected, selected, ranks, t, counts, max_batch=int(max_batch), score=score),
        dtype=np.float64,
    )
    auc = curve_auc(curves)
    return {
        "x": np.asarray(counts, np.float64) / hw,
        "curves": curves,
        "auc": auc,
        "mean_curve": curves.mean(axis=0),
        "mean_auc": float(auc.mean()),
    }


def deletion_curve(
    score_fn: ScoreFn,
    images: Any,
    saliency: Any,
    targets: Any,
    n_steps: int = 32,
    baseline: str | Any = "zero",
    blur_sigma: float = 5.0,
    max_batch: int = 64,
    score: str = "prob",
) -> dict[str, Any]:
    """Deletion curve (Petsiuk et al. 2018) of ``images (B,H,W,C)``, ``saliency (B,h,w)``, ``targets (B,)``.

    Step ``i = 0..n_steps`` replaces the ``floor(i*H*W/n_steps)`` most salient pixels
    by the baseline ("zero", "blur", "mean" or an array) and records the target's
    ``score`` (``target_scores``: probability, margin or rank). Returns ``x (S+1,)``
    (fraction of pixels removed), ``curves (B, S+1)``, ``auc (B,)`` (trapezoid over x in
    [0, 1]; lower is better), ``mean_curve``, ``mean_auc``.
    """
    return _curve(score_fn, images, saliency, targets, n_steps, baseline, blur_sigma, max_batch, False, score)


def insertion_curve(
    score_fn: ScoreFn,
    images: Any,
    saliency: Any,
    targets: Any,
    n_steps: int = 32,
    baseline: str | Any = "blur",
    blur_sigma: float = 5.0,
    max_batch: int = 64,
    score: str = "prob",
) -> dict[str, Any]:
    """Insertion curve (Petsiuk et al. 2018): from the baseline (default: blurred), insert top pixels first.

    Same shapes and keys as ``deletion_curve``; ``x`` is the fraction of pixels
    inserted and a higher AUC is better.
    """
    return _curve(score_fn, images, saliency, targets, n_steps, baseline, blur_sigma, max_batch, True, score)


# --------------------------------------------------------------------------------- ROAD


def noisy_linear_impute(
    image: Any, removed: Any, noise_std: float = 0.01, key: jax.Array | None = None
) -> np.ndarray:
    """ROAD noisy linear imputation of ``image (H, W, C)`` at ``removed (H, W)`` pixels; returns (H, W, C).

    Each removed pixel is set to the weighted mean of its in-image 8-neighbours
    (direct 1/6, diagonal 1/12, renormalised at the border), removed neighbours being
    unknowns too: one sparse linear system per image, solved exactly with ``spsolve``.
    Gaussian noise of std ``noise_std`` (drawn from ``key``; none without a key) is
    added to the imputed pixels only, as in the reference implementation.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3:
        raise ValueError(f"image must have shape (H, W, C), got {img.shape}")
    h, w, c = img.shape
    rem = np.asarray(removed).astype(bool)
    if rem.shape != (h, w):
        raise ValueError(f"removed must have shape {(h, w)}, got {rem.shape}")
    idx = np.flatnonzero(rem.ravel())
    n = idx.size
    if n == 0:
        return img.copy()
    if n == h * w:
        raise ValueError("cannot impute an image with every pixel removed (no known neighbour)")
    flat = img.reshape(-1, c)
    rem_flat = rem.ravel()
    var_of = np.full(h * w, -1, dtype=np.int64)
    var_of[idx] = np.arange(n)
    r, col = np.divmod(idx, w)
    eq = np.arange(n)
    diag = np.zeros(n)
    rhs = np.zeros((n, c))
    rows, cols, vals = [], [], []
    for (dr, dc), wt in ROAD_NEIGHBOUR_WEIGHTS:
        rr, cc = r + dr, col + dc
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        e, nb = eq[inside], rr[inside] * w + cc[inside]
        diag[e] += wt
        unknown = rem_flat[nb]
        rows.append(e[unknown])
        cols.append(var_of[nb[unknown]])
        vals.append(np.full(int(unknown.sum()), -wt))
        np.add.at(rhs, e[~unknown], wt * flat[nb[~unknown]])
    a = sparse.csc_matrix(
        (np.concatenate(vals + [diag]), (np.concatenate(rows + [eq]), np.concatenate(cols + [eq]))), shape=(n, n)
    )
    sol = np.asarray(spsolve(a, rhs)).reshape(n, c)
    if key is not None and noise_std > 0:
        sol = sol + noise_std * np.asarray(jax.random.normal(key, (n, c)), dtype=np.float64)
    out = flat.copy()
    out[idx] = sol
    return out.reshape(h, w, c)


def road(
    score_fn: ScoreFn,
    images: Any,
    saliency: Any,
    targets: Any,
    percentages: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
    noise_std: float = 0.01,
    key: jax.Array | None = None,
    max_batch: int = 64,
    score: str = "prob",
) -> dict[str, Any]:
    """ROAD (Rong et al. 2022): remove p% of pixels (MoRF / LeRF), impute, re-score; per image and mean.

    For each percentage ``p`` the ``round(p/100*H*W)`` most (MoRF) or least (LeRF)
    salient pixels are replaced by ``noisy_linear_impute``. Returns ``percentages``,
    ``score``, ``outputs`` (B, 2, P, K) the raw ``score_fn`` outputs (MoRF, LeRF),
    ``morf``/``lerf`` (B, P) the target's ``score`` (``target_scores``: ``"prob"``,
    ``"margin"`` on logits, ``"rank"``), ``morf_correct``/``lerf_correct``
    (B, P) whether the argmax is still the target, ``morf_mean``/``lerf_mean`` (B,)
    means over percentages, the curves averaged over images (``*_curve``, ``*_accuracy``)
    and the scalars ``mean_morf``, ``mean_lerf`` and ``gap = mean_lerf - mean_morf``
    (higher is more faithful). ``key`` drives the imputation noise (none without one).
    """
    if int(max_batch) < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    _check_score(score)
    ps = [float(p) for p in percentages]
    if not ps or any(not 0 <= p < 100 for p in ps):
        raise ValueError(f"percentages must be a non-empty list in [0, 100), got {list(percentages)}")
    x, s, t = _check_inputs(images, saliency, targets)
    _check_targets_range(jax.eval_shape(score_fn, x[:1]).shape, t)
    b, h, w, _ = x.shape
    hw = h * w
    ranks = np.asarray(saliency_ranks(s)).reshape(b, h, w)
    x_np = np.asarray(x, dtype=np.float64)
    t_np = np.asarray(t)
    counts = [int(round(p / 100 * hw)) for p in ps]
    keys = None if key is None else jax.random.split(key, b * 2 * len(ps))
    probs_all = []
    for i in range(b):
        imputed = []
        for o, order in enumerate(("morf", "lerf")):
            for j, k in enumerate(counts):
                removed = ranks[i] < k if order == "morf" else ranks[i] >= hw - k
                kij = None if keys is None else keys[(i * 2 + o) * len(ps) + j]
                imputed.append(noisy_linear_impute(x_np[i], removed, noise_std, kij))
        batch = jnp.asarray(np.stack(imputed), dtype=x.dtype)
        probs_all.append(np.asarray(_batched_probs(score_fn, batch, max_batch=int(max_batch)), np.float64))
    probs = np.stack(probs_all).reshape(b, 2, len(ps), -1)  # (B, order, P, K)
    target_p = target_scores(probs, np.broadcast_to(t_np[:, None, None], probs.shape[:-1]), score)
    correct = probs.argmax(-1) == t_np[:, None, None]
    morf, lerf = target_p[:, 0], target_p[:, 1]
    return {
        "percentages": ps,
        "score": score,
        "outputs": probs,
        "morf": morf,
        "lerf": lerf,
        "morf_correct": correct[:, 0],
        "lerf_correct": correct[:, 1],
        "morf_mean": morf.mean(axis=1),
        "lerf_mean": lerf.mean(axis=1),
        "morf_curve": morf.mean(axis=0),
        "lerf_curve": lerf.mean(axis=0),
        "morf_accuracy": correct[:, 0].mean(axis=0),
        "lerf_accuracy": correct[:, 1].mean(axis=0),
        "mean_morf": float(morf.mean()),
        "mean_lerf": float(lerf.mean()),
        "gap": float(lerf.mean() - morf.mean()),
    }


# ------------------------------------------------------------------ confidence change


def confidence_change(
    score_fn: ScoreFn,
    images: Any,
    saliency: Any,
    targets: Any,
    max_batch: int = 64,
    eps: float = 1e-12,
) -> dict[str, Any]:
    """Average Drop and Increase in Confidence (Chattopadhay et al. 2018) of maps in [0, 1].

    ``Y`` = target probability of ``images (B,H,W,C)``, ``O`` = that of
    ``images * saliency[..., None]``. Returns per image ``full`` (Y), ``masked`` (O),
    ``drop = 100 * max(0, Y - O) / max(Y, eps)``, ``increase = O > Y``, and the means
    ``average_drop`` (percent, lower is better) and ``increase_in_confidence``
    (percent of images, higher is better).
    """
    if int(max_batch) < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    x, s, t = _check_inputs(images, saliency, targets)
    if float(s.min()) < -1e-4 or float(s.max()) > 1 + 1e-4:
        raise ValueError("saliency must lie in [0, 1] for confidence_change (it multiplies the image)")
    _check_targets_range(jax.eval_shape(score_fn, x[:1]).shape, t)
    masked = x * jnp.clip(s, 0.0, 1.0)[..., None].astype(x.dtype)
    probs = _batched_probs(score_fn, jnp.concatenate([x, masked]), max_batch=int(max_batch))
    tp = np.asarray(jnp.take_along_axis(probs, jnp.concatenate([t, t])[:, None], axis=1)[:, 0], np.float64)
    y, o = tp[: x.shape[0]], tp[x.shape[0] :]
    drop = 100.0 * np.maximum(0.0, y - o) / np.maximum(y, eps)
    increase = o > y
    return {
        "full": y,
        "masked": o,
        "drop": drop,
        "increase": increase,
        "average_drop": float(drop.mean()),
        "increase_in_confidence": float(100.0 * increase.mean()),
    }
