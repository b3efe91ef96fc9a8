"""Pieces several registry backbones share: torch-exact adaptive pooling, TF "same" padding, stochastic depth."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """torch ``AdaptiveAvgPool`` bins of one axis: ``[floor(i*size/out), ceil((i+1)*size/out))``."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """torch ``AdaptiveAvgPool2d(out_hw)`` exactly (overlapping bins when sizes do not divide): (B, H, W, C) -> (B, oh, ow, C).

    Written as two averaging matrices, so it is one pair of matmuls on any size and differentiable.
    """
    mats = []
    for size, out in zip(x.shape[1:3], out_hw):
        m = np.zeros((out, size), np.float32)
        for i, (a, b) in enumerate(adaptive_bins(size, out)):
            m[i, a:b] = 1.0 / (b - a)
        mats.append(jnp.asarray(m, x.dtype))
    return jnp.einsum("ph,bhwc,qw->bpqc", mats[0], x, mats[1])


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow ``padding="SAME"`` for one axis: (before, after), the odd pixel after (timm's ``pad_same``)."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class DropPath(nn.Module):
    """Stochastic depth (timm ``DropPath``): drop each sample's residual branch with probability ``rate``.

    Kept samples are scaled by ``1 / (1 - rate)``; identity when ``deterministic`` or ``rate == 0``.
    Draws from the ``"dropout"`` rng. (B, ...) -> (B, ...).
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))
