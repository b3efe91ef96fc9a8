"""A small U-Net (3D by default) whose sigmoid output is a perturbation mask: the optimal perturbation generator.

Rajapaksa & Khalvati (Frontiers in Radiology 2022) train a 3D U-Net against a frozen classifier so
that one forward pass gives the relevance map of a volume. This one is deliberately plain:

- ``depth`` levels; level ``l`` has ``base_width * 2**l`` channels and one block of
  ``blocks_per_level`` x (3^n conv -> GroupNorm -> ReLU);
- down: 2^n max pooling (stride 2 on every spatial axis); up: 2^n transposed conv (stride 2),
  concatenated with the same level's encoder features (the skip connection), then a block;
- head: 1^n conv to one channel, ``sigmoid`` -> mask ``m`` in ``[0, 1]``.

The number of spatial axes follows the input (``x.ndim - 2``), so the same module serves volumes
``(B, D, H, W, C)`` and images ``(B, H, W, C)``. Any spatial size works: the input is edge-padded
up to a multiple of ``2**(depth - 1)`` and the mask cropped back. GroupNorm has no batch
statistics, so the module has only ``params`` and behaves the same in training and inference.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _groups(channels: int, max_groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``max_groups``."""
    return max(g for g in range(1, max(1, min(channels, max_groups)) + 1) if channels % g == 0)


class ConvBlock(nn.Module):
    """``n_convs`` x (3^n conv -> GroupNorm -> ReLU): ``(B, *S, Cin) -> (B, *S, features)``."""

    features: int
    n_convs: int = 2
    norm_groups: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        nd = x.ndim - 2
        for i in range(self.n_convs):
            x = nn.Conv(self.features, (3,) * nd, padding="SAME", name=f"conv{i}")(x)
            x = nn.GroupNorm(num_groups=_groups(self.features, self.norm_groups), name=f"norm{i}")(x)
            x = nn.relu(x)
        return x


class UNet3D(nn.Module):
    """U-Net mask generator: ``x (B, D, H, W, C)`` (or ``(B, H, W, C)``) -> mask ``(B, D, H, W, 1)`` in [0, 1].

    ``base_width``: channels of the first level; ``depth``: number of levels (``depth - 1``
    poolings); ``blocks_per_level``: convs per block; ``out_bias``: initial bias of the output
    logit (``sigmoid(out_bias)`` is the starting mask value, 0.5 by default).
    """

    base_width: int = 8
    depth: int = 3
    blocks_per_level: int = 2
    norm_groups: int = 4
    out_bias: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        nd = x.ndim - 2
        if nd < 1:
            raise ValueError(f"expected (B, *spatial, C) inputs, got shape {x.shape}")
        spatial = x.shape[1:-1]
        mult = 2 ** (self.depth - 1)
        pad = [(0, (-s) % mult) for s in spatial]
        h = jnp.pad(x.astype(jnp.float32), [(0, 0), *pad, (0, 0)], mode="edge")
        window = (2,) * nd
        skips = []
        for level in range(self.depth):
            h = ConvBlock(self.base_width * 2 ** level, self.blocks_per_level, self.norm_groups,
                          name=f"down{level}")(h)
            if level < self.depth - 1:
                skips.append(h)
                h = nn.max_pool(h, window, strides=window)
        for level in reversed(range(self.depth - 1)):
            width = self.base_width * 2 ** level
            h = nn.ConvTranspose(width, window, strides=window, padding="VALID", name=f"upsample{level}")(h)
            h = jnp.concatenate([h, skips[level]], axis=-1)  # the skip connection: this level's fine detail
            h = ConvBlock(width, self.blocks_per_level, self.norm_groups, name=f"up{level}")(h)
        logit = nn.Conv(1, (1,) * nd, name="head", bias_init=nn.initializers.constant(self.out_bias))(h)
        crop = (slice(None),) + tuple(slice(0, s) for s in spatial) + (slice(None),)
        return jax.nn.sigmoid(logit[crop])
