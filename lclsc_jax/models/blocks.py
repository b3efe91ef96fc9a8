"""Residual blocks in torchvision's layout (ResNet v1.5: the stride sits on the 3x3 conv)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lclsc_jax.models.layers import batch_norm, conv

Dtype = Any


class BasicBlock(nn.Module):
    """torchvision ``BasicBlock`` (ResNet-18/34): (B, H, W, Cin) -> (B, H/s, W/s, planes); 3D with ``ndim=3``."""

    planes: int
    stride: int = 1
    downsample: bool = False
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    padding: str = "zeros"  # conv padding mode (layers.PADDING_MODES)
    ndim: int = 2  # spatial dims: 2 (B, H, W, C) or 3 (B, D, H, W, C), k^ndim kernels

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        ra = not train
        identity = x
        y = conv(self.planes, 3, self.stride, dtype=self.dtype, padding=self.padding, ndim=self.ndim, name="conv1")(x)
        y = nn.relu(batch_norm(dtype=self.dtype, name="bn1")(y, use_running_average=ra))
        y = conv(self.planes, 3, dtype=self.dtype, padding=self.padding, ndim=self.ndim, name="conv2")(y)
        y = batch_norm(dtype=self.dtype, zero_init=self.zero_init_residual, name="bn2")(
            y, use_running_average=ra
        )
        if self.downsample:
            identity = conv(self.planes, 1, self.stride, dtype=self.dtype, padding=self.padding, ndim=self.ndim,
                            name="downsample_conv")(x)
            identity = batch_norm(dtype=self.dtype, name="downsample_bn")(
                identity, use_running_average=ra
            )
        return nn.relu(y + identity)


class Bottleneck(nn.Module):
    """torchvision ``Bottleneck`` (ResNet-50, v1.5): (B, H, W, Cin) -> (B, H/s, W/s, 4*planes); 3D with ``ndim=3``."""

    planes: int
    stride: int = 1
    downsample: bool = False
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    padding: str = "zeros"  # conv padding mode (layers.PADDING_MODES)
    ndim: int = 2  # spatial dims: 2 (B, H, W, C) or 3 (B, D, H, W, C), k^ndim kernels

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        ra = not train
        out_ch = self.planes * self.expansion
        identity = x
        y = conv(self.planes, 1, dtype=self.dtype, padding=self.padding, ndim=self.ndim, name="conv1")(x)
        y = nn.relu(batch_norm(dtype=self.dtype, name="bn1")(y, use_running_average=ra))
        y = conv(self.planes, 3, self.stride, dtype=self.dtype, padding=self.padding, ndim=self.ndim, name="conv2")(y)
        y = nn.relu(batch_norm(dtype=self.dtype, name="bn2")(y, use_running_average=ra))
        y = conv(out_ch, 1, dtype=self.dtype, padding=self.padding, ndim=self.ndim, name="conv3")(y)
        y = batch_norm(dtype=self.dtype, zero_init=self.zero_init_residual, name="bn3")(
            y, use_running_average=ra
        )
        if self.downsample:
            identity = conv(out_ch, 1, self.stride, dtype=self.dtype, padding=self.padding, ndim=self.ndim,
                            name="downsample_conv")(x)
            identity = batch_norm(dtype=self.dtype, name="downsample_bn")(
                identity, use_running_average=ra
            )
        return nn.relu(y + identity)
