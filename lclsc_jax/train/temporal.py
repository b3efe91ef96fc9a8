"""Fitting the temporal model (models.temporal.TemporalHead) on frozen embeddings of whole sequences (optax).

Sequences of different lengths are padded to one batch ``(S, T_max, D)``; the loss is the cross-entropy
at every kept, real position (padding and rejected frames carry no loss). Full-batch Adam, a jitted step,
an explicit PRNG key: the same inputs and seed give the same parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from lclsc_jax.models.temporal import TemporalHead

__all__ = ["fit_temporal", "load_params", "pad_sequences", "predict_temporal", "save_params"]


def pad_sequences(z_seqs: Sequence[np.ndarray], keep_seqs: Sequence[np.ndarray] | None = None,
                  label_seqs: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Lists of (T_s, D) embeddings, (T_s,) keep flags and labels -> ``z (S, T, D)``, ``keep (S, T)``,
    ``valid (S, T)`` (real positions), ``labels (S, T)`` (0 where padded)."""
    if not z_seqs:
        raise ValueError("no sequences to pad")
    t_max = max(len(z) for z in z_seqs)
    d = np.asarray(z_seqs[0]).shape[1]
    s = len(z_seqs)
    z = np.zeros((s, t_max, d), np.float32)
    keep = np.zeros((s, t_max), bool)
    valid = np.zeros((s, t_max), bool)
    labels = np.zeros((s, t_max), np.int32)
    for i, zi in enumerate(z_seqs):
        n = len(zi)
        z[i, :n] = zi
        valid[i, :n] = True
        keep[i, :n] = True if keep_seqs is None else np.asarray(keep_seqs[i], bool)
        if label_seqs is not None:
            labels[i, :n] = label_seqs[i]
    return {"z": z, "keep": keep, "valid": valid, "labels": labels}


def fit_temporal(model: TemporalHead, z_seqs: Sequence[np.ndarray], label_seqs: Sequence[np.ndarray],
                 keep_seqs: Sequence[np.ndarray] | None = None, *, steps: int = 300, learning_rate: float = 3e-3,
                 weight_decay: float = 1e-4, seed: int = 0) -> tuple[dict[str, Any], list[float]]:
    """Train ``model`` on sequences of (T_s, D) embeddings with (T_s,) labels and keep flags -> (params, losses)."""
    b = pad_sequences(z_seqs, keep_seqs, label_seqs)
    weight = jnp.asarray(b["keep"] & b["valid"], jnp.float32)
    if float(weight.sum()) == 0:
        raise ValueError("no kept frame to train the temporal model on")
    z, keep, labels = jnp.asarray(b["z"]), jnp.asarray(b["keep"]), jnp.asarray(b["labels"])
    params = model.init(jax.random.PRNGKey(seed), z[:1], keep[:1])["params"]
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)
    opt_state = tx.init(params)

    def loss_fn(p):
        logits = model.apply({"params": p}, z, keep)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(ce * weight) / jnp.sum(weight)

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    losses = []
    for _ in range(int(steps)):
        params, opt_state, loss = step(params, opt_state)
        losses.append(loss)
    return params, [float(x) for x in jax.device_get(losses)]


def predict_temporal(model: TemporalHead, params: dict[str, Any], z_seqs: Sequence[np.ndarray],
                     keep_seqs: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """Per-frame class probabilities, one (T_s, C) array per sequence."""
    b = pad_sequences(z_seqs, keep_seqs)
    logits = model.apply({"params": params}, jnp.asarray(b["z"]), jnp.asarray(b["keep"]))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    return [probs[i, : len(zi)] for i, zi in enumerate(z_seqs)]


def save_params(path: str, params: dict[str, Any]) -> None:
    """Write ``params`` as flax msgpack bytes to ``path``."""
    with open(path, "wb") as f:
        f.write(serialization.to_bytes(jax.device_get(params)))


def load_params(path: str, template: dict[str, Any]) -> dict[str, Any]:
    """Read msgpack ``params`` written by :func:`save_params` into the structure of ``template``."""
    with open(path, "rb") as f:
        return serialization.from_bytes(template, f.read())
