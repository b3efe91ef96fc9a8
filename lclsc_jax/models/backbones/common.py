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
    """torch ``AdaptiveAvgPool2d(out_hw)`` exactly (overlapping bins when sizes do not divide).

    (B, H, W, C) -> (B, oh, ow, C).

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


def timm_dense(features: int, dtype: object) -> nn.Dense:
    """torch ``nn.Linear`` with timm's ViT/ConvNeXt init (normal std .02, zero bias): (..., in) -> (..., features)."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=nn.initializers.normal(0.02),
                    bias_init=nn.initializers.zeros)


class Mlp(nn.Module):
    """timm ``Mlp`` (``use_conv=False``): ``fc1`` - exact GELU - ``fc2``: (..., C) -> (..., C)."""

    dim: int
    hidden: int
    dtype: object = jnp.float32

    def setup(self) -> None:
        self.fc1 = timm_dense(self.hidden, self.dtype)
        self.fc2 = timm_dense(self.dim, self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., C) -> (..., C)."""
        return self.fc2(nn.gelu(self.fc1(x), approximate=False))


class MapCarry:
    """Mixin of the CNN backbones whose carry is the feature map and whose head pools it globally.

    ``to_map`` / ``from_map`` are the identity (re-entry casts to ``self.dtype``), ``pool`` is timm's
    ``forward_head(pre_logits=True)`` for a global-average head: (B, h, w, c) -> (B, c) float32, and
    ``local`` the map itself in float32.
    """

    dtype: object

    def to_map(self, name: str, carry: jax.Array) -> jax.Array:
        """The stage's output as a map (B, h, w, c): the carry itself."""
        return carry

    def from_map(self, name: str, fmap: jax.Array) -> jax.Array:
        """Re-entry carry from a map (B, h, w, c): the map itself in ``dtype``."""
        return fmap.astype(self.dtype)

    def pool(self, carry: jax.Array, train: bool = False) -> jax.Array:
        """Global average: (B, h, w, c) -> (B, c) float32."""
        return jnp.mean(carry.astype(jnp.float32), axis=(1, 2))

    def local(self, carry: jax.Array, train: bool = False) -> jax.Array:
        """Per-location pre-logits: the last map (B, h, w, c) as float32."""
        return carry.astype(jnp.float32)
