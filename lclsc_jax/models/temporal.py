"""A small temporal model on frozen frame embeddings: a 1D convolution over time plus an MLP (Flax linen).

Input per frame: the frozen embedding ``z`` times the keep flag, and the flag itself (so a rejected frame is
a zero vector with flag 0, exactly like the zero padding). ``causal=True`` pads ``W-1`` frames on the left,
so position ``t`` sees frames ``[t-W+1, t]`` only (online use); ``causal=False`` pads ``W//2`` on the left and
``W-1-W//2`` on the right (the centred window ``[t-W//2, t+W//2]`` for odd ``W``).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["TemporalHead", "temporal_inputs", "temporal_padding"]


def temporal_padding(window: int, causal: bool = True) -> tuple[int, int]:
    """(left, right) frames of zero padding for a kernel of ``window`` frames."""
    if window < 1:
        raise ValueError(f"the temporal kernel needs at least 1 frame, got {window}")
    if causal:
        return window - 1, 0
    return window // 2, window - 1 - window // 2


def temporal_inputs(z: jnp.ndarray, keep: jnp.ndarray) -> jnp.ndarray:
    """(B, T, D) embeddings and (B, T) keep flags -> (B, T, D+1) inputs ``[z * keep, keep]``."""
    k = keep.astype(z.dtype)[..., None]
    return jnp.concatenate([z * k, k], axis=-1)


class TemporalHead(nn.Module):
    """(B, T, D) frozen embeddings and (B, T) keep flags -> (B, T, C) per-frame class logits."""

    num_classes: int
    window: int
    hidden: int = 64
    causal: bool = True

    @nn.compact
    def __call__(self, z: jnp.ndarray, keep: jnp.ndarray) -> jnp.ndarray:
        """(B, T, D), (B, T) -> (B, T, C) logits; position t uses only its window's frames."""
        x = temporal_inputs(z, keep)
        left, right = temporal_padding(self.window, self.causal)
        x = jnp.pad(x, ((0, 0), (left, right), (0, 0)))
        x = nn.Conv(self.hidden, kernel_size=(self.window,), padding="VALID", name="conv")(x)
        x = nn.relu(x)
        x = nn.relu(nn.Dense(self.hidden, name="mlp")(x))
        return nn.Dense(self.num_classes, name="out")(x)
