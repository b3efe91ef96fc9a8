"""Label contrastive learning (LCL): prototype term against ``G`` plus supervised contrastive."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from lclsc_jax.method.common import PRECISION, check_labels, check_positive, normalize, unshard
from lclsc_jax.method.global_embeddings import gei_logits
from lclsc_jax.method.losses import cross_entropy_loss

# Finite stand-in for -inf on the self-similarity: exp() of it underflows to exactly 0, yet
# nothing downstream ever computes inf - inf or 0 * inf (which would be NaN in the gradient).
_SELF_LOGIT = -1e9


def supervised_contrastive_loss(z: jax.Array, labels: jax.Array, tau: float = 0.1) -> jax.Array:
    """SupCon ``L_out`` (Khosla et al. 2020) of ``z (B, D)`` with int ``labels (B,)``: f32 scalar.

    With ``s_ij = cos(z_i, z_j) / tau`` and ``P(i) = {p != i : y_p = y_i}``:
    ``l_i = -1/|P(i)| sum_{p in P(i)} [s_ip - log sum_{a != i} exp(s_ia)]``; the loss is the mean
    of ``l_i`` over anchors with ``|P(i)| > 0``, and exactly 0 (finite gradient) if there are none.
    """
    chex.assert_rank(z, 2)
    chex.assert_type(z, float)
    check_labels(labels, z.shape[0])
    check_positive("tau", tau)
    batch = z.shape[0]
    # The (B, B) pairing needs the whole batch on each device (see common.unshard).
    zn, labels = normalize(unshard(z)), unshard(labels)
    sim = jnp.einsum("id,jd->ij", zn, zn, precision=PRECISION) / tau  # (B, B)
    self_mask = jnp.eye(batch, dtype=bool)
    log_denom = jax.nn.logsumexp(jnp.where(self_mask, _SELF_LOGIT, sim), axis=1, keepdims=True)
    log_prob = sim - log_denom
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    num_pos = jnp.sum(positives, axis=1).astype(sim.dtype)
    sum_pos = jnp.sum(jnp.where(positives, log_prob, 0.0), axis=1)
    per_anchor = -sum_pos / jnp.maximum(num_pos, 1.0)
    has_pos = num_pos > 0
    num_anchors = jnp.sum(has_pos).astype(sim.dtype)
    return jnp.sum(jnp.where(has_pos, per_anchor, 0.0)) / jnp.maximum(num_anchors, 1.0)


def prototype_contrastive_loss(
    z: jax.Array, labels: jax.Array, global_emb: jax.Array, tau: float = 0.1
) -> jax.Array:
    """``L_proto``: mean CE of ``softmax(cos(z, sg(G)) / tau)`` vs ``labels``; ``z (B, D), G (C, D)``."""
    logits = gei_logits(z, jax.lax.stop_gradient(global_emb), tau)
    return cross_entropy_loss(logits, labels)


def label_contrastive_loss(
    z: jax.Array,
    labels: jax.Array,
    global_emb: jax.Array,
    tau: float = 0.1,
    w_ss: float = 1.0,
) -> jax.Array:
    """``L_LCL = L_proto + w_ss * L_ss`` for ``z (B, D)``, ``labels (B,)``, ``G (C, D)``: f32 scalar."""
    proto = prototype_contrastive_loss(z, labels, global_emb, tau)
    if isinstance(w_ss, (int, float)) and w_ss == 0:
        return proto  # skip the (B, B) similarity matrix entirely
    return proto + w_ss * supervised_contrastive_loss(z, labels, tau)
