"""FullGrad (Srinivas & Fleuret 2019) as pytorch-grad-cam computes it, for any Linen model.

Bias-gradients are obtained with :func:`flax.linen.intercept_methods`: every ``nn.BatchNorm``
and biased ``nn.Conv`` call gets a zero tensor added to its output, and the gradient of the
score w.r.t. that tensor is the gradient w.r.t. the layer's output. The model code is not
touched and no intermediate is stored beyond what the backward pass needs. The bias of a
BatchNorm in inference mode is its effective one, ``beta - mu * gamma / sqrt(var + eps)``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lclsc_jax.explain import core
from lclsc_jax.explain.core import Explainer


def _bias_layer(module: nn.Module) -> str | None:
    """``"bn"`` / ``"conv"`` if ``module`` is a BatchNorm / biased conv, else None."""
    if isinstance(module, nn.BatchNorm):
        return "bn"
    if isinstance(module, nn.Conv) and module.use_bias:
        return "conv"
    return None


def _forward_with_deltas(model: Any, variables: Any, x: jax.Array, deltas: dict | None, record: dict | None):
    """Forward pass adding ``deltas[key]`` to each bias layer's output; records layer info."""

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        kind = _bias_layer(context.module) if context.method_name == "__call__" else None
        if kind is None:
            return y
        path = tuple(context.module.scope.path)
        key = "/".join(path)
        if record is not None:
            eps = float(context.module.epsilon) if kind == "bn" else 0.0
            record[key] = (path, kind, eps)
        if deltas is not None:
            y = y + deltas[key].astype(y.dtype)
        return y

    with nn.intercept_methods(interceptor):
        return core.forward(model, variables, x)


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    """``tree[path[0]][path[1]]...``, or None if absent."""
    for p in path:
        if tree is None or p not in tree:
            return None
        tree = tree[p]
    return tree


def effective_bias(variables: Any, path: tuple[str, ...], kind: str, eps: float) -> jax.Array:
    """The additive bias ``(c,)`` of a layer's output (BatchNorm: running-stats folded in)."""
    params = _lookup(variables.get("params"), path) or {}
    if kind == "conv":
        return params["bias"].astype(jnp.float32)
    stats = _lookup(variables.get("batch_stats"), path)
    mean, var = stats["mean"].astype(jnp.float32), stats["var"].astype(jnp.float32)
    scale = params.get("scale", jnp.ones_like(mean)).astype(jnp.float32)
    beta = params.get("bias", jnp.zeros_like(mean)).astype(jnp.float32)
    return beta - mean * scale / jnp.sqrt(var + eps)


def bias_layers(model: Any, variables: Any, x: jax.Array) -> dict[str, tuple]:
    """``{key: (path, kind, eps, output ShapeDtypeStruct)}`` of every bias layer of ``model``."""
    record: dict = {}
    shapes: dict = {}

    def probe(x):
        def interceptor(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and _bias_layer(context.module):
                shapes["/".join(context.module.scope.path)] = jax.ShapeDtypeStruct(y.shape, jnp.float32)
            return y

        with nn.intercept_methods(interceptor):
            return _forward_with_deltas(model, variables, x, None, record)

    jax.eval_shape(probe, x)
    return {k: record[k] + (shapes[k],) for k in record}


def _channel_minmax_sum(m: jax.Array) -> jax.Array:
    """Min-max each channel of ``(B, *s, c)`` over space, then sum channels: ``(B, *s)``."""
    m = jnp.moveaxis(m, -1, 1)  # (B, c, *s)
    return jnp.sum(core.minmax(m, n_lead=2), axis=1)


def fullgrad(ex: Explainer, x: jax.Array, targets: jax.Array | None) -> jax.Array:
    """FullGrad raw map ``(B, *S)`` (non-negative, un-normalised sum of all terms).

    ``sum_channels norm|x * dS/dx| + sum_layers upsample(sum_channels norm|b * dS/dy_layer|)``
    with ``norm`` a per-channel min-max, as pytorch-grad-cam's ``FullGrad``.
    """
    model, variables = ex.model, ex.variables
    layers = bias_layers(model, variables, x)
    batch = x.shape[0]
    size = x.shape[1:-1]
    tgt = ex.targets(ex.forward(x), targets, batch)
    deltas0 = {k: jnp.zeros(v[3].shape, jnp.float32) for k, v in layers.items()}

    def total(xx: jax.Array, deltas: dict) -> jax.Array:
        return jnp.sum(ex.score(_forward_with_deltas(model, variables, xx, deltas, None), (batch,), tgt))

    gx, gd = jax.grad(total, argnums=(0, 1))(x, deltas0)
    result = _channel_minmax_sum(jnp.abs(x.astype(jnp.float32) * gx.astype(jnp.float32)))
    for key, (path, kind, eps, _) in layers.items():
        b = effective_bias(variables, path, kind, eps)
        result = result + core.resize(_channel_minmax_sum(jnp.abs(b * gd[key])), size)
    return result
