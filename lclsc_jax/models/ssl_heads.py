"""Heads of self-supervised pretraining: DINO's projection head, and the encoder + head a pretraining run trains."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lclsc_jax.models.model import Model

Dtype = Any


class DINOHead(nn.Module):
    """DINO's head (Caron et al. 2021, ``DINOHead``): MLP -> L2-normalised bottleneck -> weight-normalised linear.

    ``num_layers`` Dense layers with GELU between them (``in -> hidden ... -> bottleneck``), then a
    bias-free linear layer whose weight per output unit is ``g * v / ||v||``; with ``norm_last_layer``
    ``g`` is fixed to 1 (DINO's default, which stabilises training). Truncated-normal (0.02) init,
    zero biases, as the reference. ``(B, F) -> (B, out_dim)`` float32.
    """

    out_dim: int = 4096
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    norm_last_layer: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Project pooled features ``x (B, F)`` to the ``out_dim`` prototypes' logits ``(B, out_dim)``."""
        init = nn.initializers.truncated_normal(0.02)
        sizes = [self.hidden_dim] * (max(self.num_layers, 1) - 1) + [self.bottleneck_dim]
        x = x.astype(self.dtype)
        for i, size in enumerate(sizes):
            x = nn.Dense(size, dtype=self.dtype, kernel_init=init, name=f"mlp_{i}")(x)
            if i < len(sizes) - 1:
                x = nn.gelu(x, approximate=False)
        x = x.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        v = self.param("last_v", init, (self.bottleneck_dim, self.out_dim), jnp.float32)
        w = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12)
        if not self.norm_last_layer:
            w = w * self.param("last_g", nn.initializers.ones, (self.out_dim,), jnp.float32)
        return x @ w


class SelfSupervisedModel(nn.Module):
    """A pretraining run's network: ``encoder`` (a :class:`Model`, variables under ``encoder``) and DINO's head.

    ``__call__(images (B, H, W, C), train)`` returns ``pooled (B, F)`` (backbone features, what the
    probes and fine-tuning use), ``embedding (B, D)`` (the encoder's projection head: what SimCLR and
    SupCon contrast; the losses L2-normalise it) and, with ``dino_head``, ``dino (B, K)``.
    ``params["encoder"]`` is exactly a ``Model``'s parameter tree, so ``lclsc train --init-from`` takes it.
    """

    encoder: Model
    dino_head: DINOHead | None = None

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Forward ``images (B, H, W, C)``; see the class docstring for the outputs."""
        out = self.encoder(images, train=train)
        res = {"pooled": out["pooled"].astype(jnp.float32), "embedding": out["embedding"].astype(jnp.float32)}
        if self.dino_head is not None:
            res["dino"] = self.dino_head(out["pooled"])
        return res
