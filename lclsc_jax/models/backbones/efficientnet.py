"""EfficientNetV2-S in timm's layout (``tf_efficientnetv2_s`` and ``efficientnetv2_s``).

The module tree follows ``timm.models.efficientnet.EfficientNet`` built by ``_gen_efficientnetv2_s``:
``conv_stem`` / ``bn1``, ``blocks.<stage>.<block>`` (``ConvBnAct``, ``EdgeResidual`` (FusedMBConv),
``InvertedResidual`` (MBConv) with ``SqueezeExcite``), ``conv_head`` / ``bn2``, SiLU activations,
then global average pooling before the ``classifier``. The ``tf_`` variant (the one with public
weights) pads as TensorFlow: strided convolutions get ``padding="SAME"`` computed from the input
size when traced (timm's ``Conv2dSame``: the odd pixel after), unstrided ones timm's static
symmetric padding; BatchNorm eps 1e-3. ``efficientnetv2_s`` pads symmetrically as torch, eps 1e-5.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lclsc_jax.models.backbones.common import DropPath, MapCarry, tf_same_padding
from lclsc_jax.models.backbones.spec import BackboneSpec

Dtype = Any

BN_MOMENTUM = 0.9  # Flax convention (= torch momentum 0.1, timm's default for both variants)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm ``make_divisible``: ``v`` rounded to a multiple of ``divisor``, never below ``round_limit * v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


@dataclasses.dataclass(frozen=True)
class BlockDef:
    """One block of the trunk as timm's builder makes it (channels, stride, skip, drop-path rate)."""

    kind: str  # "cn" ConvBnAct, "er" EdgeResidual, "ir" InvertedResidual
    in_chs: int
    out_chs: int
    kernel: int
    stride: int
    exp_ratio: float
    se_ratio: float  # relative to the block input (timm divides by exp_ratio for the expanded channels)
    skip: bool  # "cn" only: the arch string's ``_skip``
    drop_path: float


# timm ``_gen_efficientnetv2_s``: (type, repeats, kernel, stride, expansion, out channels, se ratio, skip)
_V2_S_ARCH = (
    ("cn", 2, 3, 1, 1.0, 24, 0.0, True),
    ("er", 4, 3, 2, 4.0, 48, 0.0, False),
    ("er", 4, 3, 2, 4.0, 64, 0.0, False),
    ("ir", 6, 3, 2, 4.0, 128, 0.25, False),
    ("ir", 9, 3, 1, 6.0, 160, 0.25, False),
    ("ir", 15, 3, 2, 6.0, 256, 0.25, False),
)
_V2_S_STEM = 24
_V2_S_FEATURES = 1280


def efficientnetv2_s_blocks(drop_path_rate: float = 0.0) -> tuple[tuple[BlockDef, ...], ...]:
    """The six stages of EfficientNetV2-S as timm's ``EfficientNetBuilder`` lays them out.

    Only a stage's first block strides; block ``i`` of all ``n`` gets drop-path rate
    ``drop_path_rate * i / n`` (so the first block never drops).
    """
    total = sum(a[1] for a in _V2_S_ARCH)
    in_chs, idx, stages = _V2_S_STEM, 0, []
    for kind, repeats, k, s, e, c, se, skip in _V2_S_ARCH:
        out_chs = make_divisible(c)
        stage = []
        for j in range(repeats):
            stage.append(BlockDef(kind, in_chs, out_chs, k, s if j == 0 else 1, e, se, skip,
                                  drop_path_rate * idx / total))
            in_chs, idx = out_chs, idx + 1
        stages.append(tuple(stage))
    return tuple(stages)


def _goog_kernel_init(groups: int) -> Any:
    """timm ``_init_weight_goog`` for a conv kernel (kh, kw, in/groups, out): N(0, 2 / (kh*kw*out/groups))."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        fan_out = shape[0] * shape[1] * shape[3] // groups
        return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)

    return init


class Conv2d(nn.Module):
    """timm ``create_conv2d``: a conv with torch's symmetric or TF "same" padding: (B, H, W, Cin) -> (B, H', W', features).

    ``tf_same``: ``padding="same"`` as timm resolves it: static symmetric padding where stride is 1,
    else the TensorFlow padding of the traced input size (``Conv2dSame``). Otherwise torch padding
    ``((stride - 1) + (kernel - 1)) // 2`` on both sides (timm's ``get_padding``).
    """

    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    use_bias: bool = False
    tf_same: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.stride
        kernel = self.param("kernel", _goog_kernel_init(self.groups),
                            (k, k, x.shape[-1] // self.groups, self.features), jnp.float32)
        if self.tf_same and s > 1:  # dynamic "SAME" (Conv2dSame): depends on the input size
            padding = [tf_same_padding(int(size), k, s) for size in x.shape[1:3]]
        else:
            p = ((s - 1) + (k - 1)) // 2
            padding = [(p, p), (p, p)]
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (s, s), padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups,
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


def _batch_norm(eps: float, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm with torch momentum 0.1 and timm's eps of the variant (``use_running_average`` at call)."""
    return nn.BatchNorm(use_running_average=None, momentum=BN_MOMENTUM, epsilon=eps, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


class SqueezeExcite(nn.Module):
    """timm ``SqueezeExcite``: x * sigmoid(conv_expand(silu(conv_reduce(mean_hw(x))))): (B, H, W, C) -> same."""

    rd_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        acc = jnp.promote_types(self.dtype, jnp.float32)  # bf16 accumulates in float32, float64 stays
        s = jnp.mean(x.astype(acc), axis=(1, 2), keepdims=True).astype(self.dtype)
        s = nn.silu(Conv2d(self.rd_channels, 1, use_bias=True, dtype=self.dtype, name="conv_reduce")(s))
        s = Conv2d(x.shape[-1], 1, use_bias=True, dtype=self.dtype, name="conv_expand")(s)
        return x * nn.sigmoid(s)


class Block(nn.Module):
    """One trunk block (timm ``ConvBnAct`` / ``EdgeResidual`` / ``InvertedResidual``): (B, H, W, in) -> (B, H/s, W/s, out)."""

    cfg: BlockDef
    tf_same: bool = False
    bn_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c, ra = self.cfg, not train
        conv = functools.partial(Conv2d, tf_same=self.tf_same, dtype=self.dtype)
        bn = functools.partial(_batch_norm, self.bn_eps, self.dtype)
        shortcut = x
        if c.kind == "cn":
            y = nn.silu(bn(name="bn1")(conv(c.out_chs, c.kernel, c.stride, name="conv")(x), use_running_average=ra))
            has_skip = c.skip and c.stride == 1 and c.in_chs == c.out_chs
        else:
            mid = make_divisible(c.in_chs * c.exp_ratio)
            if c.kind == "er":
                y = conv(mid, c.kernel, c.stride, name="conv_exp")(x)
                y = nn.silu(bn(name="bn1")(y, use_running_average=ra))
                pwl_bn = "bn2"
            else:  # "ir"
                y = nn.silu(bn(name="bn1")(conv(mid, 1, name="conv_pw")(x), use_running_average=ra))
                y = conv(mid, c.kernel, c.stride, groups=mid, name="conv_dw")(y)
                y = nn.silu(bn(name="bn2")(y, use_running_average=ra))
                pwl_bn = "bn3"
            if c.se_ratio:
                # timm: SqueezeExcite(mid, rd_ratio=se_ratio / exp_ratio), rd = round(mid * rd_ratio)
                y = SqueezeExcite(round(mid * (c.se_ratio / c.exp_ratio)), dtype=self.dtype, name="se")(y)
            y = bn(name=pwl_bn)(conv(c.out_chs, 1, name="conv_pwl")(y), use_running_average=ra)
            has_skip = c.stride == 1 and c.in_chs == c.out_chs
        if has_skip:
            if c.drop_path:
                y = DropPath(c.drop_path, name="drop_path")(y, deterministic=not train)
            y = y + shortcut
        return y


class Stage(nn.Module):
    """One ``blocks.<i>`` Sequential: its blocks named "0", "1", ...: (B, H, W, in) -> (B, h, w, out)."""

    cfgs: tuple[BlockDef, ...]
    tf_same: bool = False
    bn_eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block  # (self, x, train)
        for j, cfg in enumerate(self.cfgs):
            setattr(self, str(j), block_cls(cfg, tf_same=self.tf_same, bn_eps=self.bn_eps, dtype=self.dtype))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for j in range(len(self.cfgs)):
            x = getattr(self, str(j))(x, train)
        return x


class Blocks(nn.Module):
    """timm's ``blocks`` Sequential of stages named "0".."5"; ``__call__(x, i, train)`` runs stage ``i``."""

    stages: tuple[tuple[BlockDef, ...], ...]
    tf_same: bool = False
    bn_eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        for i, cfgs in enumerate(self.stages):
            setattr(self, str(i), Stage(cfgs, tf_same=self.tf_same, bn_eps=self.bn_eps, remat=self.remat,
                                        dtype=self.dtype))

    def __call__(self, x: jax.Array, index: int, train: bool = False) -> jax.Array:
        return getattr(self, str(index))(x, train)


STAGE_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "conv_head")


class EfficientNetV2(MapCarry, nn.Module):
    """EfficientNetV2-S backbone in timm's layout; stages ``stem``, ``stage1``..``stage6``, ``conv_head``.

    ``stage(name, x, train)``: (B, H, W, c_in) -> (B, h, w, c) (``stem`` takes the images);
    ``pool``: (B, h, w, 1280) -> (B, 1280) float32 global average (timm's pre-logits);
    ``local``: the ``conv_head`` map itself as float32.
    """

    tf_same: bool = False
    bn_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    in_channels: int = 3
    remat: bool = False
    drop_path_rate: float = 0.0

    def setup(self) -> None:
        conv = functools.partial(Conv2d, tf_same=self.tf_same, dtype=self.dtype)
        self.conv_stem = conv(_V2_S_STEM, 3, 2)
        self.bn1 = _batch_norm(self.bn_eps, self.dtype)
        stages = efficientnetv2_s_blocks(self.drop_path_rate)
        self.blocks = Blocks(stages, tf_same=self.tf_same, bn_eps=self.bn_eps, remat=self.remat, dtype=self.dtype)
        self.conv_head = conv(_V2_S_FEATURES, 1)
        self.bn2 = _batch_norm(self.bn_eps, self.dtype)

    def stage(self, name: str, x: jax.Array, train: bool = False) -> jax.Array:
        """Run one named stage: (B, H, W, c_in) -> (B, h, w, c)."""
        ra = not train
        if name == "stem":
            return nn.silu(self.bn1(self.conv_stem(x.astype(self.dtype)), use_running_average=ra))
        if name == "conv_head":
            return nn.silu(self.bn2(self.conv_head(x), use_running_average=ra))
        if name not in STAGE_NAMES:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGE_NAMES}")
        return self.blocks(x, int(name.removeprefix("stage")) - 1, train)



def _stage_channels() -> tuple[int, ...]:
    """Output channels of ``STAGE_NAMES``."""
    return (_V2_S_STEM, *(s[-1].out_chs for s in efficientnetv2_s_blocks()), _V2_S_FEATURES)


_STRIDES = (2, 2, 4, 8, 16, 16, 32, 32)
_TORCH_STAGES = ("bn1", *(f"blocks.{i}" for i in range(6)), "bn2")

def _spec(name: str, tf_same: bool, bn_eps: float, description: str) -> BackboneSpec:
    """The registry entry of one EfficientNetV2-S variant (they differ in padding and BatchNorm eps only)."""
    return BackboneSpec(
        name=name,
        module=functools.partial(EfficientNetV2, tf_same=tf_same, bn_eps=bn_eps),
        stage_names=STAGE_NAMES,
        stage_channels=_stage_channels(),
        stage_strides=_STRIDES,
        first_key="conv_stem.weight",
        classifier_key="classifier",
        torch_stages=_TORCH_STAGES,
        timm_name=name,
        description=description,
    )


SPECS: tuple[BackboneSpec, ...] = (
    _spec("tf_efficientnetv2_s", True, 1e-3,
          "EfficientNetV2-S, TensorFlow 'SAME' padding and BatchNorm eps 1e-3 (timm tf_efficientnetv2_s, "
          "the variant with public ImageNet weights); 1280-d pooled features"),
    _spec("efficientnetv2_s", False, 1e-5,
          "EfficientNetV2-S, torch symmetric padding and BatchNorm eps 1e-5 (timm efficientnetv2_s)"),
)
