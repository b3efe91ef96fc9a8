"""Building blocks shared by the backbones: PyTorch-faithful conv / batch-norm / pooling.

Every convolution uses explicit symmetric padding (as ``torch.nn.Conv2d(padding=p)``), never
``'SAME'``, so output sizes and values match PyTorch for odd input sizes as well.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"), untruncated.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

BN_MOMENTUM = 0.9  # Flax convention: running = m * running + (1 - m) * batch (= torch momentum 0.1)
BN_EPSILON = 1e-5


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A bias-free ``kernel x kernel`` conv with PyTorch padding ``kernel // 2``; NHWC in, NHWC out."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_kernel_init,
        name=name,
    )


def batch_norm(
    *, dtype: Dtype = jnp.float32, zero_init: bool = False, name: str | None = None
) -> nn.BatchNorm:
    """Batch norm with torch's eps/momentum; ``use_running_average`` is passed at call time."""
    return nn.BatchNorm(
        use_running_average=None,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
        name=name,
    )


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch ``MaxPool2d(3, stride=2, padding=1)`` (-inf padding): (B, H, W, C) -> (B, H', W', C)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Spatial mean accumulated in float32: (B, h, w, c) -> (B, c) float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class ProjectionHead(nn.Module):
    """MLP ``Dense(hidden) - ReLU - Dense(D)`` on the last axis: (..., c) -> (..., D) float32.

    No normalisation layer, so applying it per location of a (B, h, w, c) map is exactly the
    pooled computation per pixel (a 1x1 convolution). torch naming: ``head.0`` / ``head.2``.
    """

    hidden_dim: int
    embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        x = dense(self.hidden_dim, name="hidden")(x)
        x = nn.relu(x)
        x = dense(self.embed_dim, name="proj")(x)
        return x.astype(jnp.float32)
