"""ConvNeXt-T in timm's ``ConvNeXt`` layout (``convnext_tiny``).

Module tree as timm's ``convnext_tiny`` (``conv_mlp=False``: the block MLP is two ``nn.Linear``
on channels-last features, timm's default for this model): ``stem.0`` (4x4 stride-4 conv with
bias), ``stem.1`` (``LayerNorm2d``: LayerNorm over channels, eps 1e-6),
``stages.<i>.downsample.{0: LayerNorm2d, 1: 2x2 stride-2 conv}`` for ``i > 0`` (stage 0 has no
downsample), ``stages.<i>.blocks.<j>.{conv_dw (7x7 depthwise, bias, padding 3), norm (LayerNorm
eps 1e-6), mlp.fc1, mlp.fc2 (Linear, exact-erf GELU between), gamma (layer scale, init 1e-6)}``,
then ``head.norm`` (``LayerNorm2d`` applied *after* global average pooling, timm's default
ConvNeXt ordering) and ``head.fc`` (our ``fc``). Depths (3, 3, 9, 3), widths (96, 192, 384, 768).

Stages: ``stem`` (``stem``), ``stage1``..``stage4`` (``stages.0``..``stages.3``). ``pool`` is
timm's ``forward_head(pre_logits=True)``: ``head.norm(mean_hw(x))``; ``local`` is ``head.norm``
applied to each location of the last map. ``head.norm`` runs in float32 whatever ``dtype`` (it
acts on the float32 pooled features of the contract). Stochastic depth as timm
(``calculate_drop_path_rates(rate, depths, stagewise=True)``: ``linspace(0, rate, 18)`` split per
stage, so block ``k`` of all 18 gets ``rate * k / 17``), on the residual branch of every block.
timm's ``drop_rate`` (dropout before the classifier, 0 by default) is not modelled.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lclsc_jax.models.backbones.common import DropPath, Mlp
from lclsc_jax.models.backbones.spec import BackboneSpec

Dtype = Any

LN_EPS = 1e-6  # timm LayerNorm / LayerNorm2d default
DEPTHS = (3, 3, 9, 3)
DIMS = (96, 192, 384, 768)
PATCH = 4
KERNEL = 7
MLP_RATIO = 4
LS_INIT = 1e-6
STAGE_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4")

# timm ``_init_weights``: trunc_normal_(std=.02) (truncated at +-2 absolute, i.e. +-100 std: a plain normal), zero bias
_weight_init = nn.initializers.normal(0.02)


def drop_path_rates(rate: float, depths: tuple[int, ...] = DEPTHS) -> tuple[tuple[float, ...], ...]:
    """timm ``calculate_drop_path_rates(rate, depths, stagewise=True)``: ``linspace(0, rate, 18)`` split by stage."""
    flat = [float(r) for r in np.linspace(0.0, rate, sum(depths), dtype=np.float32)]
    out, k = [], 0
    for d in depths:
        out.append(tuple(flat[k:k + d]))
        k += d
    return tuple(out)


def _layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """timm ``LayerNorm`` / ``LayerNorm2d`` over the last (channel) axis: eps 1e-6, two-pass variance as torch."""
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name)


def _conv(features: int, kernel: int, stride: int, padding: int, dtype: Dtype, groups: int = 1) -> nn.Conv:
    """torch ``Conv2d(kernel, stride, padding, groups, bias=True)``, NHWC: (B, H, W, Cin) -> (B, H', W', features)."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                   feature_group_count=groups, use_bias=True, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=_weight_init, bias_init=nn.initializers.zeros)


def _dense(features: int, dtype: Dtype) -> nn.Dense:
    """torch ``nn.Linear`` with timm's ConvNeXt init (normal std .02, zero bias): (..., in) -> (..., features)."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=_weight_init,
                    bias_init=nn.initializers.zeros)


class Stem(nn.Module):
    """timm's ``stem`` Sequential: ``0`` 4x4 stride-4 conv, ``1`` LayerNorm2d: (B, H, W, Cin) -> (B, H/4, W/4, 96)."""

    dim: int = DIMS[0]
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        setattr(self, "0", _conv(self.dim, PATCH, PATCH, 0, self.dtype))
        setattr(self, "1", _layer_norm(self.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, Cin) -> (B, H // 4, W // 4, dim) (remainder pixels dropped, as torch)."""
        return getattr(self, "1")(getattr(self, "0")(x))


class Downsample(nn.Module):
    """timm's ``stages.<i>.downsample``: ``0`` LayerNorm2d, ``1`` 2x2/2 conv: (B, H, W, C) -> (B, H/2, W/2, dim)."""

    dim: int
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        setattr(self, "0", _layer_norm(self.dtype))
        setattr(self, "1", _conv(self.dim, 2, 2, 0, self.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H // 2, W // 2, dim)."""
        return getattr(self, "1")(getattr(self, "0")(x))




class ConvNeXtBlock(nn.Module):
    """timm ``ConvNeXtBlock``: x + drop_path(gamma * mlp(norm(conv_dw(x)))): (B, H, W, C) -> (B, H, W, C)."""

    dim: int
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.conv_dw = _conv(self.dim, KERNEL, 1, KERNEL // 2, self.dtype, groups=self.dim)
        self.norm = _layer_norm(self.dtype)
        self.mlp = Mlp(self.dim, MLP_RATIO * self.dim, dtype=self.dtype)
        self.gamma = self.param("gamma", nn.initializers.constant(LS_INIT), (self.dim,), jnp.float32)
        self.drop = DropPath(self.drop_path)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C); drop path only when ``train``."""
        y = self.mlp(self.norm(self.conv_dw(x)))
        y = y * self.gamma.astype(y.dtype)
        return self.drop(y, deterministic=not train) + x


class Blocks(nn.Module):
    """timm's ``stages.<i>.blocks`` Sequential, members ``"0"``, ``"1"``, ...: (B, H, W, C) -> (B, H, W, C)."""

    dim: int
    rates: tuple[float, ...]
    remat: bool = False
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        block_cls = nn.remat(ConvNeXtBlock, static_argnums=(2,)) if self.remat else ConvNeXtBlock  # (self, x, train)
        for j, rate in enumerate(self.rates):
            setattr(self, str(j), block_cls(self.dim, rate, dtype=self.dtype))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """All blocks in order: (B, H, W, C) -> (B, H, W, C)."""
        for j in range(len(self.rates)):
            x = getattr(self, str(j))(x, train)
        return x


class ConvNeXtStage(nn.Module):
    """timm ``ConvNeXtStage``: optional ``downsample`` then ``blocks``: (B, H, W, Cin) -> (B, H/s, W/s, dim)."""

    dim: int
    rates: tuple[float, ...]
    has_downsample: bool
    remat: bool = False
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        if self.has_downsample:
            self.downsample = Downsample(self.dim, dtype=self.dtype)
        self.blocks = Blocks(self.dim, self.rates, remat=self.remat, dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, Cin) -> (B, H / s, W / s, dim), s = 2 with a downsample, else 1."""
        if self.has_downsample:
            x = self.downsample(x)
        return self.blocks(x, train)


class Stages(nn.Module):
    """timm's ``stages``: four ``ConvNeXtStage`` named ``"0"``..``"3"``; ``__call__(x, i, train)`` runs stage ``i``."""

    drop_path_rate: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        for i, (dim, rates) in enumerate(zip(DIMS, drop_path_rates(self.drop_path_rate))):
            setattr(self, str(i), ConvNeXtStage(dim, rates, has_downsample=i > 0, remat=self.remat, dtype=self.dtype))

    def __call__(self, x: jax.Array, index: int, train: bool = False) -> jax.Array:
        """Stage ``index``: (B, H, W, Cin) -> (B, h, w, DIMS[index])."""
        return getattr(self, str(index))(x, train)


class Head(nn.Module):
    """The part of timm's ``NormMlpClassifierHead`` the backbone owns: ``norm`` (LayerNorm2d), in float32."""

    def setup(self) -> None:
        self.norm = _layer_norm(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """LayerNorm over channels: (..., C) -> (..., C) float32."""
        return self.norm(x.astype(jnp.float32))


class ConvNeXt(nn.Module):
    """ConvNeXt-T backbone in timm's layout; stages ``stem``, ``stage1``..``stage4`` (see the module docstring).

    ``stage(name, x, train)``: (B, H, W, c_in) -> (B, h, w, c); ``pool``: (B, h, w, 768) -> (B, 768)
    float32 = ``head.norm(mean_hw(x))``; ``local``: ``head.norm`` per location, (B, h, w, 768) float32.
    """

    dtype: Dtype = jnp.float32
    in_channels: int = 3
    remat: bool = False
    drop_path_rate: float = 0.0

    def setup(self) -> None:
        self.stem = Stem(DIMS[0], dtype=self.dtype)
        self.stages = Stages(self.drop_path_rate, remat=self.remat, dtype=self.dtype)
        self.head = Head()

    def stage(self, name: str, x: jax.Array, train: bool = False) -> jax.Array:
        """Run one named stage: (B, H, W, c_in) -> (B, h, w, c) (``stem`` takes the images)."""
        if name == "stem":
            return self.stem(x.astype(self.dtype))
        if name not in STAGE_NAMES:
            raise ValueError(f"convnext: unknown stage {name!r}; expected one of {STAGE_NAMES}")
        return self.stages(x, int(name.removeprefix("stage")) - 1, train)

    def to_map(self, name: str, carry: jax.Array) -> jax.Array:
        """The stage's output as a map (B, h, w, c): the carry itself."""
        return carry

    def from_map(self, name: str, fmap: jax.Array) -> jax.Array:
        """Re-entry carry from a map (B, h, w, c): the map itself in ``dtype``."""
        return fmap.astype(self.dtype)

    def pool(self, carry: jax.Array, train: bool = False) -> jax.Array:
        """timm ``forward_head(pre_logits=True)``: ``head.norm(mean_hw(x))``, (B, h, w, c) -> (B, c) float32."""
        return self.head(jnp.mean(carry.astype(jnp.float32), axis=(1, 2)))

    def local(self, carry: jax.Array, train: bool = False) -> jax.Array:
        """``head.norm`` applied at each location: (B, h, w, c) -> (B, h, w, c) float32."""
        return self.head(carry)


SPECS: tuple[BackboneSpec, ...] = (
    BackboneSpec(
        name="convnext_tiny",
        module=ConvNeXt,
        stage_names=STAGE_NAMES,
        stage_channels=(DIMS[0], *DIMS),
        stage_strides=(4, 4, 8, 16, 32),
        first_key="stem.0.weight",
        classifier_key="head.fc",
        projection_key="proj_head",
        torch_stages=("stem", "stages.0", "stages.1", "stages.2", "stages.3"),
        timm_name="convnext_tiny",
        description="ConvNeXt-T (timm convnext_tiny): patchify stem, depthwise 7x7 blocks with LayerNorm, "
                    "MLP and layer scale; head.norm after global pooling belongs to the backbone; 28M params",
    ),
)
