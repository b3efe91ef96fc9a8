"""Gradient accumulation that equals one large batch, also for losses that couple the batch (contrastive).

A contrastive loss (SimCLR's NT-Xent, SupCon, DINO's centring) pairs every example with every other,
so averaging the gradients of micro-batches is *not* the gradient of the large batch. Gradient
caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup") is: (1) forward every micro-batch without keeping activations and collect the outputs
(embeddings: small); (2) the loss on the whole batch's outputs and its gradient with respect to
them; (3) per micro-batch, the forward again under ``jax.vjp`` with that gradient's slice as the
cotangent, accumulating the parameter gradients. Memory is that of one micro-batch plus the
outputs; compute is one extra forward.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def split_micro(batch: Any, num_micro: int) -> Any:
    """``(B, ...)`` leaves -> ``(num_micro, B / num_micro, ...)``; micro-batch ``i`` holds rows ``i, i + n, ...``.

    Strided, so a batch sharded over devices stays spread over all of them in every micro-batch.
    """
    def one(x):
        if x.shape[0] % num_micro:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {num_micro} micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)
    return jax.tree_util.tree_map(one, batch)


def merge_micro(stacked: Any) -> Any:
    """Inverse of :func:`split_micro`: ``(n, b, ...)`` -> ``(n * b, ...)`` in the original row order."""
    return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), stacked)


def accumulated_grads(loss_fn: Callable[[Any, Any], tuple[jax.Array, Any]], params: Any, batch: Any,
                      num_micro: int) -> tuple[jax.Array, Any, Any]:
    """``(loss, grads, aux)`` of a loss that is a mean over examples, over ``num_micro`` micro-batches.

    ``loss_fn(params, micro_batch) -> (loss, aux)``; the mean of the micro-batches' losses and
    gradients equals the whole batch's for such a loss (e.g. cross-entropy). ``aux`` is stacked
    ``(num_micro, ...)``.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (loss, aux), grads = grad_fn(params, batch)
        return loss, grads, jax.tree_util.tree_map(lambda a: a[None], aux)

    def body(acc, mb):
        (loss, aux), g = grad_fn(params, mb)
        return jax.tree_util.tree_map(jnp.add, acc, (loss, g)), aux

    micro = split_micro(batch, num_micro)
    (loss_shape, _), grad_shapes = jax.eval_shape(grad_fn, params, jax.tree_util.tree_map(lambda x: x[0], micro))
    zero = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, grad_shapes))
    (loss, grads), aux = jax.lax.scan(body, zero, micro)
    scale = 1.0 / num_micro
    return loss * scale, jax.tree_util.tree_map(lambda g: g * scale, grads), aux


def cached_grads(encode: Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]],
                 loss_on_outputs: Callable[[Any], tuple[jax.Array, dict]], params: Any, model_state: Any,
                 batch: Any, num_micro: int, rng: jax.Array) -> tuple[jax.Array, Any, Any, dict]:
    """``(loss, grads, new_model_state, metrics)`` of a batch-coupled loss by gradient caching.

    ``encode(params, model_state, micro_batch, rng) -> (outputs, new_model_state)``: outputs a pytree
    of floating-point leaves with the micro-batch as leading axis; ``loss_on_outputs(outputs of the
    whole batch, rows in the batch's order) -> (loss, metrics)`` (labels and other integer inputs
    reach it by closure). ``model_state`` (BatchNorm statistics) is threaded through the micro-batches
    in order; the backward pass recomputes each micro-batch with the state its forward saw, so the
    values match. Micro-batch ``i`` draws with ``fold_in(rng, i)``. With a model whose forward is
    per-example (no BatchNorm in training mode) the gradient equals ``jax.grad`` on the whole batch;
    ``num_micro = 1`` *is* that gradient.
    """
    if num_micro == 1:
        def whole(p):
            out, new_state = encode(p, model_state, batch, jax.random.fold_in(rng, 0))
            loss, metrics = loss_on_outputs(out)
            return loss, (new_state, metrics)
        (loss, (new_state, metrics)), grads = jax.value_and_grad(whole, has_aux=True)(params)
        return loss, grads, new_state, metrics

    micro = split_micro(batch, num_micro)
    index = jnp.arange(num_micro)

    def forward(state, xs):  # phase 1: outputs only, no activations kept
        i, mb = xs
        out, new_state = encode(params, state, mb, jax.random.fold_in(rng, i))
        return new_state, (jax.lax.stop_gradient(out), state)

    final_state, (outs, states) = jax.lax.scan(forward, model_state, (index, micro))
    (loss, metrics), d_out = jax.value_and_grad(loss_on_outputs, has_aux=True)(merge_micro(outs))  # phase 2
    d_micro = split_micro(d_out, num_micro)

    def backward(acc, xs):  # phase 3: each micro-batch's parameter gradient for its slice of d_out
        i, mb, state, cot = xs
        _, vjp = jax.vjp(lambda p: encode(p, state, mb, jax.random.fold_in(rng, i))[0], params)
        return jax.tree_util.tree_map(jnp.add, acc, vjp(cot)[0]), None

    grads, _ = jax.lax.scan(backward, jax.tree_util.tree_map(jnp.zeros_like, params), (index, micro, states, d_micro))
    return loss, grads, final_state, metrics
