"""Heads of self-supervised pretraining: DINO's projection head, and the encoder + head a pretraining run trains."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lclsc_jax.models.model import Model

Dtype = Any

# DINO's _init_weights: trunc_normal_(std=.02) with torch's default bounds [-2, 2] (absolute, i.e.
# +-100 std: a plain normal), zero biases. Its last layer is built after ``apply(_init_weights)``
# and so keeps torch's nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_MLP_INIT = nn.initializers.normal(0.02)
_LAST_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class DINOHead(nn.Module):
    """DINO's head (Caron et al. 2021, facebookresearch/dino ``DINOHead``): MLP, L2-normalised bottleneck, WN linear.

    ``num_layers`` Dense layers (``mlp_0 ...``, with bias) with exact GELU between them
    (``F -> hidden_dim ... -> bottleneck_dim``; one layer: ``F -> bottleneck_dim``), then
    ``x / ||x||``, then a bias-free linear layer ``bottleneck_dim -> out_dim`` whose weight column
    per output unit is ``g * v / ||v||`` (``last_v (bottleneck_dim, out_dim)``; torch's
    ``weight_norm`` with ``dim=0``). With ``norm_last_layer`` (DINO's default) ``g`` is fixed to 1
    and is no parameter; otherwise ``last_g (out_dim,)`` starts at 1 and trains. The MLP runs in
    ``dtype`` with float32 parameters; the normalisation and last layer in float32.
    ``__call__(x (B, F)) -> (B, out_dim)`` float32.
    """

    out_dim: int = 4096
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    norm_last_layer: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Project pooled features ``x (B, F)`` to the ``out_dim`` prototypes' logits ``(B, out_dim)`` float32."""
        sizes = [self.hidden_dim] * (max(self.num_layers, 1) - 1) + [self.bottleneck_dim]
        x = x.astype(self.dtype)
        for i, size in enumerate(sizes):
            x = nn.Dense(size, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_MLP_INIT, name=f"mlp_{i}")(x)
            if i < len(sizes) - 1:
                x = nn.gelu(x, approximate=False)
        x = x.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize(p=2, eps=1e-12)
        v = self.param("last_v", _LAST_INIT, (self.bottleneck_dim, self.out_dim), jnp.float32)
        w = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12)
        if not self.norm_last_layer:
            w = w * self.param("last_g", nn.initializers.ones, (self.out_dim,), jnp.float32)
        return x @ w  # default precision: the reference runs this layer under fp16 autocast


class SelfSupervisedModel(nn.Module):
    """A pretraining run's network: ``encoder`` (a :class:`Model`, variables under ``encoder``) and DINO's head.

    ``encoder`` is any ``models.create(arch, num_classes, head="gei", ...)``. ``__call__(images
    (B, H, W, C), train)`` returns float32 ``pooled (B, F)`` (the backbone's pooled features: what the
    probes and fine-tuning use, and what the DINO head reads), ``embedding (B, D)`` (the encoder's
    projection-head output: what SimCLR and SupCon contrast) and, with ``dino_head``, ``dino (B, K)``.
    ``embedding`` is NOT L2-normalised (``Model``'s projection head is a plain MLP; every loss and
    ``gei_logits`` normalise it themselves). ``variables["params"]["encoder"]`` (and
    ``batch_stats``' ``encoder``) is exactly a ``Model``'s tree, so ``lclsc train --init-from`` takes it.
    """

    encoder: Model
    dino_head: DINOHead | None = None

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Forward ``images (B, H, W, C)``: ``{"pooled", "embedding"[, "dino"]}`` (see the class docstring)."""
        out = self.encoder(images, train=train)
        res = {"pooled": out["pooled"].astype(jnp.float32), "embedding": out["embedding"].astype(jnp.float32)}
        if self.dino_head is not None:
            res["dino"] = self.dino_head(out["pooled"])
        return res
