"""Vision Transformers ViT-S/16 and ViT-B/16 in timm's ``VisionTransformer`` layout.

Module tree as timm's ``vit_small_patch16_224`` / ``vit_base_patch16_224``: ``patch_embed.proj``
(16x16 stride-16 conv with bias), ``cls_token``, ``pos_embed`` (1, prefix + 14*14, C),
``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`` (pre-norm blocks, LayerNorm
eps 1e-6, exact-erf GELU, qkv bias), then ``norm`` (class-token variants) or ``fc_norm`` (mean-pool
variants: ``global_pool="avg", class_token=False``; timm's ``norm`` is then an Identity).
Attention goes through ``jax.nn.dot_product_attention`` so accelerators can use fused kernels.

The carry between stages is the token sequence (B, prefix + h*w, C). Stages: ``stem`` (patch
embedding + position embedding [+ class token], timm's ``norm_pre`` output) and ``stage1``..
``stage4`` (three blocks each). Images whose patch grid is not the stored 14x14 get the patch part of
``pos_embed`` resampled exactly as timm's ``dynamic_img_size=True`` forward does
(``resample_abs_pos_embed``: PyTorch bicubic, ``align_corners=False``, antialiased), built as
numpy matrices from the static shapes at trace time. Patch grids must be square (the token count
alone does not say how a non-square grid is laid out).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lclsc_jax.models.backbones.common import DropPath, Mlp
from lclsc_jax.models.backbones.spec import BackboneSpec

Dtype = Any

LN_EPS = 1e-6  # timm.layers.LayerNorm default
PATCH = 16
GRID = 14  # pos_embed grid of the 224 px models (224 / 16)
_STAGES = ("stem", "stage1", "stage2", "stage3", "stage4")

# timm init_weights_vit_timm: Linear trunc_normal(std=.02) truncated at +-2 (absolute, i.e. never binds).
_dense_init = nn.initializers.normal(0.02)
# torch Conv2d default (kaiming_uniform a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


# ---------------------------------------------------------------- PyTorch bicubic resampling


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a`` at distances ``x``: (...) -> (...)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def torch_bicubic_matrix(in_size: int, out_size: int, antialias: bool = True) -> np.ndarray:
    """``F.interpolate(mode="bicubic", align_corners=False, antialias=...)`` along one axis: (out, in) float64.

    ``antialias=False``: PyTorch's bicubic (a = -0.75, four taps, indices clamped at the border).
    ``antialias=True``: PyTorch's separable antialiased path (PIL's a = -0.5, support widened by the
    scale when downsampling, taps outside the input dropped and the weights renormalised).
    """
    scale = float(np.float32(in_size / out_size))  # torch: area_pixel_compute_scale, in float32
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        if antialias:
            support = 2.0 * max(scale, 1.0)
            invscale = 1.0 / scale if scale >= 1.0 else 1.0
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            taps = np.arange(lo, hi)
            w = _cubic((taps - center + 0.5) * invscale, -0.5)
            if w.sum() != 0:
                w = w / w.sum()
            m[i, taps] += w
        else:
            real = scale * (i + 0.5) - 0.5
            x0 = math.floor(real)
            t = real - x0
            for off in (-1, 0, 1, 2):
                m[i, min(max(x0 + off, 0), in_size - 1)] += _cubic(np.asarray(t - off), -0.75)
    return m


def resample_pos_embed(pos: jax.Array, grid: tuple[int, int], num_prefix: int, old: int = GRID) -> jax.Array:
    """timm ``resample_abs_pos_embed`` (bicubic, antialiased): (1, P + old*old, C) -> (1, P + gh*gw, C).

    The prefix (class) entries are kept; the patch part is resampled as an ``old`` x ``old`` image
    (float32, as timm). Returns ``pos`` itself when the grid is already ``old`` x ``old``.
    """
    gh, gw = grid
    if (gh, gw) == (old, old):
        return pos
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    img = patches.astype(jnp.float32).reshape(old, old, -1)
    mh = jnp.asarray(torch_bicubic_matrix(old, gh), jnp.float32)
    mw = jnp.asarray(torch_bicubic_matrix(old, gw), jnp.float32)
    out = jnp.einsum("ph,hwc,qw->pqc", mh, img, mw, precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(1, gh * gw, -1).astype(pos.dtype)
    return jnp.concatenate([prefix, out], axis=1)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """timm ``calculate_drop_path_rates``: per-block stochastic depth, linear from 0 to ``rate``."""
    return [float(r) for r in np.linspace(0.0, rate, depth, dtype=np.float32)]


# ---------------------------------------------------------------- modules


def _layer_norm(dtype: Dtype) -> nn.LayerNorm:
    """timm ``LayerNorm`` (eps 1e-6, two-pass variance), params float32, compute ``dtype``."""
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False)


def _dense(features: int, dtype: Dtype) -> nn.Dense:
    """torch ``nn.Linear`` with timm's ViT init (normal std .02, zero bias)."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=_dense_init,
                    bias_init=nn.initializers.zeros)


class PatchEmbed(nn.Module):
    """timm ``PatchEmbed``: ``proj`` conv (kernel = stride = patch, bias): (B, H, W, Cin) -> (B, H/p, W/p, C)."""

    embed_dim: int
    patch_size: int = PATCH
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        p = self.patch_size
        self.proj = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                            param_dtype=jnp.float32, kernel_init=_conv_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, Cin) -> (B, H // p, W // p, C) (the remainder pixels dropped, as torch)."""
        return self.proj(x)


def attention_implementation(dtype: Any) -> str | None:
    """Which ``jax.nn.dot_product_attention`` kernel to ask for: cuDNN's fused one on a GPU in bf16/fp16.

    ``LCLSC_ATTENTION=xla`` forces XLA's (what jax picks when none is named), ``cudnn`` the fused one.
    """
    choice = os.environ.get("LCLSC_ATTENTION", "auto")
    if choice in ("xla", "cudnn"):
        return choice
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return None


class Attention(nn.Module):
    """timm ``Attention``: fused ``qkv`` Linear, scaled dot-product attention, ``proj``: (B, N, C) -> (B, N, C)."""

    dim: int
    num_heads: int
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.qkv = _dense(3 * self.dim, self.dtype)
        self.proj = _dense(self.dim, self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, N, C) -> (B, N, C); heads as timm: qkv reshaped (B, N, 3, heads, C / heads)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, N, H) each
        impl = attention_implementation(q.dtype)
        try:
            y = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        except (NotImplementedError, ValueError, RuntimeError):  # cuDNN refuses this shape/version: XLA's
            if impl != "cudnn":
                raise
            y = jax.nn.dot_product_attention(q, k, v)
        return self.proj(y.reshape(b, n, c))




class Block(nn.Module):
    """timm ViT ``Block`` (pre-norm; stochastic depth on both residual branches): (B, N, C) -> (B, N, C)."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.norm1 = _layer_norm(self.dtype)
        self.attn = Attention(self.dim, self.num_heads, dtype=self.dtype)
        self.drop_path1 = DropPath(self.drop_path)
        self.norm2 = _layer_norm(self.dtype)
        self.mlp = Mlp(self.dim, int(self.dim * self.mlp_ratio), dtype=self.dtype)
        self.drop_path2 = DropPath(self.drop_path)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(B, N, C) -> (B, N, C); drop path only when ``train``."""
        x = x + self.drop_path1(self.attn(self.norm1(x)), deterministic=not train)
        return x + self.drop_path2(self.mlp(self.norm2(x)), deterministic=not train)


class Blocks(nn.Module):
    """timm's ``blocks`` ``nn.Sequential``: members named ``"0"``, ``"1"``, ...; runs a slice of them."""

    depth: int
    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block  # (self, x, train)
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            setattr(self, str(i), block_cls(self.dim, self.num_heads, self.mlp_ratio, rate, dtype=self.dtype))

    def __call__(self, x: jax.Array, start: int, stop: int, train: bool = False) -> jax.Array:
        """Blocks ``start .. stop - 1`` in order: (B, N, C) -> (B, N, C)."""
        for i in range(start, stop):
            x = getattr(self, str(i))(x, train)
        return x


class VisionTransformer(nn.Module):
    """timm ``VisionTransformer`` (patch 16, learned position embedding) as a staged registry backbone.

    Carry: tokens (B, prefix + h*w, C), prefix 1 with a class token, else 0. See the module docstring.
    """

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    class_token: bool = True  # False: mean pool over patch tokens with fc_norm (timm global_pool="avg")
    arch: str = "vit"  # for error messages
    dtype: Dtype = jnp.float32
    in_channels: int = 3
    remat: bool = False
    drop_path_rate: float = 0.0

    @property
    def num_prefix_tokens(self) -> int:
        """Leading non-patch tokens of the carry: 1 (class token) or 0."""
        return 1 if self.class_token else 0

    def setup(self) -> None:
        c = self.embed_dim
        self.patch_embed = PatchEmbed(c, dtype=self.dtype)
        if self.class_token:
            self.cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, c), jnp.float32)
        self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                    (1, self.num_prefix_tokens + GRID * GRID, c), jnp.float32)
        self.blocks = Blocks(self.depth, c, self.num_heads, self.mlp_ratio, self.drop_path_rate, self.remat,
                             dtype=self.dtype)
        if self.class_token:
            self.norm = _layer_norm(self.dtype)
        else:
            self.fc_norm = _layer_norm(self.dtype)

    # ---- helpers ----
    def _grid(self, tokens: jax.Array) -> int:
        """Side of the (square) patch grid of a carry (B, P + n*n, C)."""
        n = tokens.shape[1] - self.num_prefix_tokens
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{self.arch}: {n} patch tokens do not form a square grid")
        return side

    def _patch_map(self, tokens: jax.Array) -> jax.Array:
        """Patch tokens as a grid: (B, P + h*w, C) -> (B, h, w, C)."""
        side = self._grid(tokens)
        b, _, c = tokens.shape
        return tokens[:, self.num_prefix_tokens:].reshape(b, side, side, c)

    def _final_norm(self, x: jax.Array) -> jax.Array:
        """The norm before the classifier (``norm`` or ``fc_norm``), per token / vector: (..., C) -> (..., C)."""
        return self.norm(x) if self.class_token else self.fc_norm(x)

    # ---- the backbone contract ----
    def stage(self, name: str, x: jax.Array, train: bool = False) -> jax.Array:
        """Run one stage: ``stem`` images (B, H, W, Cin) -> tokens (B, P + h*w, C); others tokens -> tokens."""
        if name == "stem":
            hw = x.shape[1:3]
            x = self.patch_embed(x.astype(self.dtype))  # (B, gh, gw, C)
            b, gh, gw, c = x.shape
            if gh < 1:
                raise ValueError(f"{self.arch}: {hw[0]}x{hw[1]} px images are smaller than one {PATCH}x{PATCH} patch")
            if gh != gw:
                raise ValueError(
                    f"{self.arch}: {hw[0]}x{hw[1]} px images give a {gh}x{gw} patch grid; ViT backbones need a "
                    "square patch grid (the token sequence alone does not say how a non-square one is laid out)"
                )
            x = x.reshape(b, gh * gw, c)
            if self.class_token:
                x = jnp.concatenate([jnp.broadcast_to(self.cls_token.astype(self.dtype), (b, 1, c)), x], axis=1)
            pos = resample_pos_embed(self.pos_embed, (gh, gw), self.num_prefix_tokens)
            return x + pos.astype(self.dtype)
        if name not in _STAGES:
            raise ValueError(f"{self.arch}: unknown stage {name!r}; expected one of {_STAGES}")
        per = self.depth // 4
        k = _STAGES.index(name) - 1
        return self.blocks(x, k * per, (k + 1) * per, train)

    def to_map(self, name: str, carry: jax.Array) -> jax.Array:
        """A stage's tokens as a feature map, prefix tokens dropped: (B, P + h*w, C) -> (B, h, w, C)."""
        return self._patch_map(carry)

    def from_map(self, name: str, fmap: jax.Array) -> jax.Array:
        """Inverse of :meth:`to_map` (mean-pool variants only): (B, h, w, C) -> (B, h*w, C)."""
        if self.class_token:
            raise ValueError(
                f"{self.arch}: cannot re-enter at {name!r} from a feature map: the class token is not part of "
                f"the map. Use the mean-pool variant {self.arch}_gap (no class token) for stage CAMs and "
                "Model.from_stage"
            )
        b, h, w, c = fmap.shape
        if h != w:
            raise ValueError(f"{self.arch}: a {h}x{w} map; ViT backbones need a square patch grid")
        return fmap.astype(self.dtype).reshape(b, h * w, c)

    def pool(self, carry: jax.Array, train: bool = False) -> jax.Array:
        """timm ``forward_head(pre_logits=True)``: (B, N, C) -> (B, C) float32.

        Class token: ``norm(x)[:, 0]``; mean pool: ``fc_norm(mean of the patch tokens)`` (``norm`` is an Identity).
        """
        if self.class_token:
            out = self.norm(carry[:, :1])[:, 0]  # LayerNorm is per token: norm(x)[:, 0]
        else:
            out = self.fc_norm(jnp.mean(carry[:, self.num_prefix_tokens:], axis=1))
        return out.astype(jnp.float32)

    def local(self, carry: jax.Array, train: bool = False) -> jax.Array:
        """The final norm applied to each patch token: (B, P + h*w, C) -> (B, h, w, C) float32."""
        return self._final_norm(self._patch_map(carry)).astype(jnp.float32)


# ---------------------------------------------------------------- registry


def _spec(name: str, timm_name: str, dim: int, heads: int, class_token: bool, description: str) -> BackboneSpec:
    """The registry entry of one ViT variant."""
    kwargs: dict[str, Any] = {"dynamic_img_size": True}  # timm resamples pos_embed at forward time, as we do
    if not class_token:
        kwargs.update(global_pool="avg", class_token=False)
    return BackboneSpec(
        name=name,
        module=functools.partial(VisionTransformer, embed_dim=dim, depth=12, num_heads=heads,
                                 class_token=class_token, arch=name),
        stage_names=_STAGES,
        stage_channels=(dim,) * 5,
        stage_strides=(PATCH,) * 5,
        first_key="patch_embed.proj.weight",
        classifier_key="head",
        projection_key="proj_head",
        torch_stages=("norm_pre", "blocks.2", "blocks.5", "blocks.8", "blocks.11"),
        timm_name=timm_name,
        timm_kwargs=kwargs,
        torch_tokens=True,
        num_prefix_tokens=1 if class_token else 0,
        min_image_size=PATCH,
        description=description,
    )


SPECS: tuple[BackboneSpec, ...] = (
    _spec("vit_small_patch16", "vit_small_patch16_224", 384, 6, True,
          "ViT-S/16 (timm vit_small_patch16_224), class token; 22M params"),
    _spec("vit_small_patch16_gap", "vit_small_patch16_224", 384, 6, False,
          "ViT-S/16, mean pool over patch tokens + fc_norm, no class token (re-enterable: stage CAMs)"),
    _spec("vit_base_patch16", "vit_base_patch16_224", 768, 12, True,
          "ViT-B/16 (timm vit_base_patch16_224), class token; 86M params"),
    _spec("vit_base_patch16_gap", "vit_base_patch16_224", 768, 12, False,
          "ViT-B/16, mean pool over patch tokens + fc_norm, no class token (re-enterable: stage CAMs)"),
)
