"""Self-supervised objectives as pure JAX functions: SimCLR's NT-Xent, DINO's loss, centre, teacher EMA, schedules.

Inside a jitted step every array is a global ``jax.Array`` sharded over the mesh: these losses
contract or pair the batch axis with itself in plain ``jnp``, so SimCLR's negatives and DINO's
centre come from the **global** batch across all devices and hosts (XLA inserts the all-gather;
``common.unshard`` does it explicitly under Explicit mesh axes). Every reduction runs in at
least float32 (``common.compute_dtype``): bfloat16 activations give float32 losses.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from lclsc_jax.method.common import PRECISION, check_positive, compute_dtype, normalize, unshard

_SELF_LOGIT = -1e9  # excludes a view from its own softmax denominator


def nt_xent_loss(z1: jax.Array, z2: jax.Array, tau: float = 0.2) -> jax.Array:
    """SimCLR's NT-Xent (Chen et al. 2020) of two views ``z1, z2 (B, D)``: f32 scalar.

    The 2B views are L2-normalised; with ``s_ij = cos(u_i, u_j) / tau`` over ``u = [z1; z2]``,
    each anchor's positive is its other view and its negatives the other ``2B - 2`` views:
    ``l_i = -s_{i,pos(i)} + log sum_{j != i} exp(s_ij)``, averaged over the 2B anchors.
    """
    chex.assert_rank([z1, z2], 2)
    chex.assert_equal_shape([z1, z2])
    chex.assert_type([z1, z2], float)
    check_positive("tau", tau)
    b = z1.shape[0]
    u = normalize(unshard(jnp.concatenate([z1, z2])))  # (2B, D)
    sim = jnp.einsum("id,jd->ij", u, u, precision=PRECISION) / tau  # (2B, 2B)
    sim = jnp.where(jnp.eye(2 * b, dtype=bool), _SELF_LOGIT, sim)
    pos = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(b)])  # the other view of each anchor
    log_prob = sim[jnp.arange(2 * b), pos] - jax.nn.logsumexp(sim, axis=1)
    return -jnp.mean(log_prob)


def dino_loss(student: jax.Array, teacher: jax.Array, center: jax.Array, student_temp: float = 0.1,
              teacher_temp: float | jax.Array = 0.04) -> jax.Array:
    """DINO's loss (Caron et al. 2021, ``DINOLoss``) of student ``(Vs, B, K)`` and teacher ``(Vt, B, K)`` outputs.

    Teacher targets ``softmax((t - center) / teacher_temp)`` (centred and sharpened, no gradient);
    student ``log_softmax(s / student_temp)``; the cross-entropy averaged over the batch, then over
    every pair (teacher view ``i``, student view ``v``) with ``v != i`` (the first ``Vt`` student
    views are the teacher's global views, in the same order). f32 scalar.
    """
    chex.assert_rank([student, teacher], 3)
    chex.assert_rank(center, 1)
    check_positive("student_temp", student_temp)
    vs, vt = student.shape[0], teacher.shape[0]
    if vt > vs or student.shape[1:] != teacher.shape[1:] or center.shape[0] != student.shape[-1]:
        raise ValueError(f"dino_loss: student {student.shape}, teacher {teacher.shape}, center {center.shape} "
                         "do not match (Vt <= Vs views of (B, K), center (K,))")
    ct = compute_dtype(student, teacher)
    t = jax.lax.stop_gradient(jax.nn.softmax((teacher.astype(ct) - center.astype(ct)) / teacher_temp, axis=-1))
    log_s = jax.nn.log_softmax(student.astype(ct) / student_temp, axis=-1)
    ce = -jnp.einsum("ibk,vbk->iv", t, log_s, precision=PRECISION) / student.shape[1]  # (Vt, Vs) mean over B
    pairs = jnp.arange(vt)[:, None] != jnp.arange(vs)[None, :]
    return jnp.sum(jnp.where(pairs, ce, 0.0)) / jnp.sum(pairs)


def dino_center_update(center: jax.Array, teacher: jax.Array, momentum: float = 0.9) -> jax.Array:
    """DINO's centre ``(K,)``: ``m * center + (1 - m) * mean`` of the teacher outputs ``(Vt, B, K)`` over views, batch."""
    chex.assert_rank(teacher, 3)
    mean = jnp.mean(jax.lax.stop_gradient(teacher).astype(jnp.float32), axis=(0, 1))
    return momentum * center.astype(jnp.float32) + (1.0 - momentum) * mean


def ema_params(teacher: Any, student: Any, momentum: float | jax.Array) -> Any:
    """The teacher's EMA update ``m * teacher + (1 - m) * student`` leaf by leaf (float32 leaves, no gradient)."""
    return jax.tree_util.tree_map(
        lambda t, s: (momentum * t.astype(jnp.float32)
                      + (1.0 - momentum) * jax.lax.stop_gradient(s).astype(jnp.float32)).astype(t.dtype),
        teacher, student)


def cosine_schedule(step: jax.Array | int, total_steps: int, start: float, end: float) -> jax.Array:
    """``end - (end - start) * (1 + cos(pi * step / total)) / 2``, clipped at ``total``: DINO's teacher momentum."""
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(total_steps), 1), 0.0, 1.0)
    return end - (end - start) * (1.0 + jnp.cos(jnp.pi * frac)) / 2.0


def teacher_temperature(step: jax.Array | int, warmup_steps: int, warmup_temp: float, temp: float) -> jax.Array:
    """DINO's teacher temperature: linear from ``warmup_temp`` to ``temp`` over ``warmup_steps``, then ``temp``."""
    if warmup_steps <= 0:
        return jnp.asarray(temp, jnp.float32)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
    return warmup_temp + (temp - warmup_temp) * frac
