"""Self-supervised objectives as pure JAX functions: SimCLR's NT-Xent, DINO's loss, centre, teacher EMA, schedules.

References: SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", the NT-Xent loss); DINO (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers", facebookresearch/dino: ``DINOLoss``, ``utils.cosine_scheduler``).

Inside a jitted step every array is a global ``jax.Array`` sharded over the mesh: these losses
contract or pair the batch axis with itself in plain ``jnp``, so SimCLR's negatives and DINO's
centre and batch means come from the **global** batch across all devices and hosts (XLA inserts the
collectives under Auto mesh axes; ``common.unshard`` all-gathers the small (B, D) embeddings under
Explicit axes). No ``psum``/``all_gather`` by hand, and no per-device result. Every reduction runs
in at least float32 (``common.compute_dtype``): bfloat16 activations give float32 losses.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from lclsc_jax.method.common import PRECISION, check_positive, compute_dtype, normalize, unshard

_SELF_LOGIT = -1e9  # excludes a view from its own softmax denominator (exp underflows to exactly 0)


def nt_xent_loss(z1: jax.Array, z2: jax.Array, tau: float = 0.2) -> jax.Array:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1) of two views ``z1, z2 (B, D)`` of the same B images: f32 scalar.

    The 2B views ``u = [z1; z2]`` are L2-normalised here; with ``s_ij = u_i . u_j / tau``, each
    anchor's positive is its other view and its negatives the other ``2B - 2`` views:
    ``l_i = -s_{i,pos(i)} + log sum_{j != i} exp(s_ij)``, averaged over the 2B anchors (the paper's
    ``1/2N sum_k [l(2k-1, 2k) + l(2k, 2k-1)]``). On a batch sharded over devices the negatives are
    the whole global batch. Float32 maths for any float input.
    """
    chex.assert_rank([z1, z2], 2)
    chex.assert_equal_shape([z1, z2])
    chex.assert_type([z1, z2], float)
    check_positive("tau", tau)
    b = z1.shape[0]
    u = normalize(unshard(jnp.concatenate([z1, z2])))  # (2B, D), >= f32
    sim = jnp.einsum("id,jd->ij", u, u, precision=PRECISION) / tau  # (2B, 2B)
    sim = jnp.where(jnp.eye(2 * b, dtype=bool), _SELF_LOGIT, sim)
    pos = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(b)])  # the other view of each anchor
    log_prob = sim[jnp.arange(2 * b), pos] - jax.nn.logsumexp(sim, axis=1)
    return -jnp.mean(log_prob)


def dino_loss(student: jax.Array, teacher: jax.Array, center: jax.Array, student_temp: float = 0.1,
              teacher_temp: float | jax.Array = 0.04) -> jax.Array:
    """DINO's loss (Caron et al. 2021, ``DINOLoss.forward``) of student ``(Vs, B, K)`` and teacher ``(Vt, B, K)``.

    Teacher targets ``softmax((t - center) / teacher_temp)`` (centring and sharpening, stop-gradient);
    student ``log_softmax(s / student_temp)``; per sample the cross-entropy ``-sum_k t log s``, its
    mean over the (global) batch, then the mean over every pair (teacher view ``iq``, student view
    ``v``) with ``v != iq``: the first ``Vt`` student views must be the teacher's global views, in
    the same order, the rest the local crops. ``teacher_temp`` may be traced (a schedule). f32 scalar.
    """
    chex.assert_rank([student, teacher], 3)
    chex.assert_rank(center, 1)
    chex.assert_type([student, teacher, center], float)
    check_positive("student_temp", student_temp)
    check_positive("teacher_temp", teacher_temp)
    vs, vt = student.shape[0], teacher.shape[0]
    if vt > vs or student.shape[1:] != teacher.shape[1:] or center.shape[0] != student.shape[-1]:
        raise ValueError(f"dino_loss: student {student.shape}, teacher {teacher.shape}, center {center.shape} "
                         "do not match (Vt <= Vs views of (B, K), center (K,))")
    ct = compute_dtype(student, teacher)
    t = jax.lax.stop_gradient(jax.nn.softmax((teacher.astype(ct) - center.astype(ct)) / teacher_temp, axis=-1))
    log_s = jax.nn.log_softmax(student.astype(ct) / student_temp, axis=-1)
    # Per-sample cross-entropies (Vt, Vs, B), then the mean over the global batch: contracting K only
    # keeps B sharded as it comes (no all-gather of the (V, B, K) outputs, fine under Explicit axes).
    ce = -jnp.mean(jnp.einsum("ibk,vbk->ivb", t, log_s, precision=PRECISION), axis=-1)  # (Vt, Vs)
    pairs = jnp.arange(vt)[:, None] != jnp.arange(vs)[None, :]
    return jnp.sum(jnp.where(pairs, ce, 0.0)) / jnp.sum(pairs)


def dino_center_update(center: jax.Array, teacher: jax.Array, momentum: float | jax.Array = 0.9) -> jax.Array:
    """DINO's centre ``(K,)``: ``m * center + (1 - m) * mean`` of teacher outputs ``(Vt, B, K)`` over views and batch.

    The mean runs over the global batch (DINO all-reduces ``batch_center`` and divides by the world
    size; here the sharded mean does it). No gradient flows; float32 result.
    """
    chex.assert_rank([center, teacher], [1, 3])
    chex.assert_type([center, teacher], float)
    if center.shape[0] != teacher.shape[-1]:
        raise ValueError(f"dino_center_update: center {center.shape} vs teacher {teacher.shape} (K differs)")
    mean = jnp.mean(jax.lax.stop_gradient(teacher).astype(jnp.float32), axis=(0, 1))
    return momentum * center.astype(jnp.float32) + (1.0 - momentum) * mean


def ema_params(teacher: Any, student: Any, momentum: float | jax.Array) -> Any:
    """Teacher EMA ``m * teacher + (1 - m) * student`` leaf by leaf over two same-structure trees: float32 leaves.

    DINO's momentum encoder (Caron et al. 2021, ``param_k.data.mul_(m).add_((1 - m) * param_q)``);
    no gradient reaches the student. Named ``ema_params`` because ``method.ema_update`` is the EMA
    of the global class embeddings. The result is float32 whatever the leaves' dtype, so momenta
    close to 1 are not rounded away (bf16 cannot represent ``0.004 * (s - t)`` next to ``t``).
    """
    def one(t: jax.Array, s: jax.Array) -> jax.Array:
        t32 = jnp.asarray(t).astype(jnp.float32)
        return momentum * t32 + (1.0 - momentum) * jax.lax.stop_gradient(jnp.asarray(s)).astype(jnp.float32)

    return jax.tree_util.tree_map(one, teacher, student)


def cosine_schedule(step: jax.Array | int, total_steps: int, start: float, end: float) -> jax.Array:
    """Cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (then held): f32 scalar, ``step`` may be traced.

    ``end + (start - end) * (1 + cos(pi * step / total_steps)) / 2``, DINO's ``utils.cosine_scheduler``
    without warm-up (its value at iteration ``step`` of ``total_steps``): the teacher momentum
    0.996 -> 1, or a weight-decay schedule (0.04 -> 0.4).
    """
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(total_steps), 1), 0.0, 1.0)
    return end + (start - end) * (1.0 + jnp.cos(jnp.pi * frac)) / 2.0


def teacher_temperature(step: jax.Array | int, warmup_steps: int, warmup_temp: float, temp: float) -> jax.Array:
    """DINO's teacher temperature at ``step`` (may be traced): linear warm-up, then ``temp``. f32 scalar.

    Exactly DINO's ``concatenate(linspace(warmup_temp, temp, warmup_steps), full(temp))`` indexed by
    step: ``warmup_temp`` at step 0, ``temp`` from step ``max(warmup_steps - 1, 1)`` on (DINO steps it per
    epoch; here per step). ``warmup_steps <= 0``: ``temp`` throughout.
    """
    if warmup_steps <= 0:
        return jnp.asarray(temp, jnp.float32)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(warmup_steps) - 1, 1), 0.0, 1.0)
    return jnp.asarray(warmup_temp, jnp.float32) + (temp - warmup_temp) * frac
