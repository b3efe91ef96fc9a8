"""InceptionV3 in timm's layout (``inception_v3``, and ``inception_v3_aux`` with the auxiliary classifier).

The module tree follows ``timm.models.inception_v3.InceptionV3`` (the same keys as torchvision's
``Inception3``): ``Conv2d_1a_3x3`` .. ``Conv2d_4a_3x3`` (each a ``ConvNormAct``: ``conv`` without
bias, ``bn`` BatchNorm eps 1e-3 with the ReLU inside), max pools ``Pool1`` / ``Pool2`` (3x3,
stride 2, floor mode), ``Mixed_5b``..``Mixed_7c`` (``InceptionA``..``InceptionE``, their branch
pools ``F.avg_pool2d(3, 1, padding=1)`` counting the zero padding, or ``F.max_pool2d(3, 2)``),
the optional ``AuxLogits`` head (``InceptionAux``) on the ``Mixed_6e`` output, then global average
pooling before ``fc``. Convolutions pad symmetrically as torch (valid where timm sets no padding).
timm's ``inception_v3`` has no input transform (torchvision's ``transform_input`` is not there).

Stages: ``stage1`` = ``Conv2d_1a_3x3``..``Conv2d_2b_3x3`` (64 ch, stride 2), ``stage2`` = ``Pool1``,
``Conv2d_3b_1x1``, ``Conv2d_4a_3x3`` (192, 4), ``stage3`` = ``Pool2``, ``Mixed_5b``..``5d``
(288, 8), ``stage4`` = ``Mixed_6a``..``6e`` (768, 16), ``stage5`` = ``Mixed_7a``..``7c`` (2048, 32).
The valid convolutions and pools make the maps a little smaller than the image over the stride;
the smallest image is 75 px (``stage5`` 1x1). The auxiliary head needs a ``Mixed_6e`` map of at
least 17x17 (its 5x5/3 average pool, then a 5x5 valid conv), i.e. images of at least 299 px, so
``inception_v3_aux`` trains on images >= 299 px (its eval forward, without the head, on >= 75 px).

InceptionV3 has no residual branches: ``drop_path_rate`` is accepted and has no effect (timm's
``InceptionV3`` takes none); ``remat`` rematerialises each ``Mixed_*`` block.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lclsc_jax.models.backbones.common import MapCarry
from lclsc_jax.models.backbones.spec import BackboneSpec
from lclsc_jax.models.layers import patch_conv

Dtype = Any

BN_MOMENTUM = 0.9  # Flax convention (= torch momentum 0.1)
BN_EPS = 1e-3  # timm InceptionV3 norm_eps
MIN_IMAGE = 75  # the smallest image with a non-empty Mixed_7c map (1x1)
AUX_MIN_MAP = 17  # InceptionAux: avg_pool2d(5, 3) then a 5x5 valid conv needs a >= 17x17 Mixed_6e map
AUX_MIN_IMAGE = 299  # the smallest image whose Mixed_6e map is 17x17 (the 299 px Inception input)
AUX_CHANNELS = 768  # Mixed_6e output channels, the auxiliary head's input

STAGE_NAMES = ("stage1", "stage2", "stage3", "stage4", "stage5")
# The timm modules of each stage in forward order (Pool1 / Pool2: parameter-free max pools).
STAGE_LAYERS: dict[str, tuple[str, ...]] = {
    "stage1": ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    "stage2": ("Pool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    "stage3": ("Pool2", "Mixed_5b", "Mixed_5c", "Mixed_5d"),
    "stage4": ("Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
    "stage5": ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
}
STAGE_CHANNELS = (64, 192, 288, 768, 2048)
STAGE_STRIDES = (2, 4, 8, 16, 32)
TORCH_STAGES = ("Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c")


def _trunc_normal(std: float) -> Any:
    """timm ``trunc_normal_(w, std=std)``: N(0, std) truncated to [-2, 2] (absolute, as timm's default a/b)."""
    return nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


def _torch_linear_bias(fan_in: int) -> Any:
    """torch ``nn.Linear``'s default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (timm leaves it)."""
    bound = 1.0 / fan_in**0.5

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch ``MaxPool2d(3, stride=2)`` (no padding, floor mode): (B, H, W, C) -> (B, (H-3)//2+1, ..., C)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def avg_pool_3x3_s1(x: jax.Array) -> jax.Array:
    """torch ``F.avg_pool2d(x, 3, stride=1, padding=1)`` (zero padding counted): (B, H, W, C) -> same shape."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)


class BasicConv2d(nn.Module):
    """timm ``ConvNormAct``: bias-free conv -> BatchNorm (eps 1e-3) -> ReLU: (B, H, W, Cin) -> (B, h, w, features)."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    init_std: float = 0.1
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        ph, pw = self.padding
        self.conv = nn.Conv(
            self.features, self.kernel, strides=(self.stride, self.stride), padding=((ph, ph), (pw, pw)),
            use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_trunc_normal(self.init_std),
            conv_general_dilated=patch_conv,
        )
        self.bn = nn.BatchNorm(use_running_average=None, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=self.dtype,
                               param_dtype=jnp.float32)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, Cin) -> (B, h, w, features) in ``dtype``."""
        return nn.relu(self.bn(self.conv(x), use_running_average=not train))


def _conv(features: int, kernel: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0,
          dtype: Dtype = jnp.float32, init_std: float = 0.1) -> BasicConv2d:
    """A :class:`BasicConv2d` with torch-style int-or-pair kernel/padding arguments."""
    k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    p = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return BasicConv2d(features, k, stride, p, init_std, dtype)


class InceptionA(nn.Module):
    """timm ``InceptionA`` (Mixed_5b..5d): (B, H, W, C) -> (B, H, W, 224 + pool_features)."""

    pool_features: int
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        c = functools.partial(_conv, dtype=self.dtype)
        self.branch1x1 = c(64, 1)
        self.branch5x5_1 = c(48, 1)
        self.branch5x5_2 = c(64, 5, padding=2)
        self.branch3x3dbl_1 = c(64, 1)
        self.branch3x3dbl_2 = c(96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 3, padding=1)
        self.branch_pool = c(self.pool_features, 1)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, 224 + pool_features)."""
        b1 = self.branch1x1(x, train)
        b5 = self.branch5x5_2(self.branch5x5_1(x, train), train)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, train), train), train)
        bp = self.branch_pool(avg_pool_3x3_s1(x), train)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """timm ``InceptionB`` (Mixed_6a): (B, H, W, C) -> (B, (H-3)//2+1, (W-3)//2+1, 480 + C)."""

    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        c = functools.partial(_conv, dtype=self.dtype)
        self.branch3x3 = c(384, 3, stride=2)
        self.branch3x3dbl_1 = c(64, 1)
        self.branch3x3dbl_2 = c(96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 3, stride=2)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, C) -> (B, h, w, 480 + C)."""
        b3 = self.branch3x3(x, train)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, train), train), train)
        return jnp.concatenate([b3, bd, max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """timm ``InceptionC`` (Mixed_6b..6e), factorised 7x7 branches: (B, H, W, C) -> (B, H, W, 768)."""

    channels_7x7: int
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        c, c7 = functools.partial(_conv, dtype=self.dtype), self.channels_7x7
        self.branch1x1 = c(192, 1)
        self.branch7x7_1 = c(c7, 1)
        self.branch7x7_2 = c(c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = c(192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = c(c7, 1)
        self.branch7x7dbl_2 = c(c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = c(c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = c(c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = c(192, (1, 7), padding=(0, 3))
        self.branch_pool = c(192, 1)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, 768)."""
        b1 = self.branch1x1(x, train)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x, train), train), train)
        bd = self.branch7x7dbl_1(x, train)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd, train)
        bp = self.branch_pool(avg_pool_3x3_s1(x), train)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """timm ``InceptionD`` (Mixed_7a): (B, H, W, C) -> (B, (H-3)//2+1, (W-3)//2+1, 512 + C)."""

    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        c = functools.partial(_conv, dtype=self.dtype)
        self.branch3x3_1 = c(192, 1)
        self.branch3x3_2 = c(320, 3, stride=2)
        self.branch7x7x3_1 = c(192, 1)
        self.branch7x7x3_2 = c(192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = c(192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = c(192, 3, stride=2)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, C) -> (B, h, w, 512 + C)."""
        b3 = self.branch3x3_2(self.branch3x3_1(x, train), train)
        b7 = self.branch7x7x3_1(x, train)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7, train)
        return jnp.concatenate([b3, b7, max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """timm ``InceptionE`` (Mixed_7b, 7c), expanded 1x3/3x1 branches: (B, H, W, C) -> (B, H, W, 2048)."""

    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        c = functools.partial(_conv, dtype=self.dtype)
        self.branch1x1 = c(320, 1)
        self.branch3x3_1 = c(384, 1)
        self.branch3x3_2a = c(384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = c(384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = c(448, 1)
        self.branch3x3dbl_2 = c(384, 3, padding=1)
        self.branch3x3dbl_3a = c(384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = c(384, (3, 1), padding=(1, 0))
        self.branch_pool = c(192, 1)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, 2048)."""
        b1 = self.branch1x1(x, train)
        b3 = self.branch3x3_1(x, train)
        b3 = jnp.concatenate([self.branch3x3_2a(b3, train), self.branch3x3_2b(b3, train)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x, train), train)
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd, train), self.branch3x3dbl_3b(bd, train)], axis=-1)
        bp = self.branch_pool(avg_pool_3x3_s1(x), train)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionAux(nn.Module):
    """timm ``InceptionAux``: avg pool 5/3, conv0 1x1, conv1 5x5, mean, fc: (B, >=17, >=17, 768) -> (B, classes) f32."""

    num_classes: int
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.conv0 = _conv(128, 1, dtype=self.dtype)
        self.conv1 = _conv(768, 5, dtype=self.dtype, init_std=0.01)
        self.fc = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=_trunc_normal(0.001), bias_init=_torch_linear_bias(768))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(B, h, w, 768) -> (B, num_classes) float32 logits."""
        x = nn.avg_pool(x, (5, 5), strides=(3, 3), padding="VALID")  # F.avg_pool2d(5, stride=3)
        x = self.conv1(self.conv0(x, train), train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # F.adaptive_avg_pool2d(1) + flatten
        return self.fc(x.astype(self.dtype)).astype(jnp.float32)


class InceptionV3(MapCarry, nn.Module):
    """InceptionV3 backbone in timm's layout; stages ``stage1``..``stage5`` (see the module docstring).

    ``stage(name, x, train)``: (B, H, W, c_in) -> (B, h, w, c) (``stage1`` takes the images, H, W >= 75);
    ``pool``: (B, h, w, 2048) -> (B, 2048) float32 global average (timm's pre-logits); ``local``: the
    ``Mixed_7c`` map as float32; with ``aux_logits``: ``aux(stage4 carry, train)`` -> (B, aux_classes).
    """

    aux_logits: bool = False
    aux_classes: int = 1000
    dtype: Dtype = jnp.float32
    in_channels: int = 3
    remat: bool = False
    drop_path_rate: float = 0.0  # no residual branches: no stochastic depth (timm's InceptionV3 has none)

    def setup(self) -> None:
        d = self.dtype
        self.Conv2d_1a_3x3 = _conv(32, 3, stride=2, dtype=d)
        self.Conv2d_2a_3x3 = _conv(32, 3, dtype=d)
        self.Conv2d_2b_3x3 = _conv(64, 3, padding=1, dtype=d)
        self.Conv2d_3b_1x1 = _conv(80, 1, dtype=d)
        self.Conv2d_4a_3x3 = _conv(192, 3, dtype=d)
        wrap = (lambda cls: nn.remat(cls, static_argnums=(2,))) if self.remat else (lambda cls: cls)  # (self, x, train)
        a, b, c, dd, e = (wrap(k) for k in (InceptionA, InceptionB, InceptionC, InceptionD, InceptionE))
        self.Mixed_5b = a(32, dtype=d)
        self.Mixed_5c = a(64, dtype=d)
        self.Mixed_5d = a(64, dtype=d)
        self.Mixed_6a = b(dtype=d)
        self.Mixed_6b = c(128, dtype=d)
        self.Mixed_6c = c(160, dtype=d)
        self.Mixed_6d = c(160, dtype=d)
        self.Mixed_6e = c(192, dtype=d)
        if self.aux_logits:
            self.AuxLogits = InceptionAux(self.aux_classes, dtype=d)
        self.Mixed_7a = dd(dtype=d)
        self.Mixed_7b = e(dtype=d)
        self.Mixed_7c = e(dtype=d)

    def stage(self, name: str, x: jax.Array, train: bool = False) -> jax.Array:
        """Run one named stage: (B, H, W, c_in) -> (B, h, w, c) in ``dtype``."""
        if name not in STAGE_LAYERS:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGE_NAMES}")
        if name == "stage1" and min(x.shape[1:3]) < MIN_IMAGE:
            raise ValueError(f"InceptionV3 needs images of at least {MIN_IMAGE}x{MIN_IMAGE} px, got "
                             f"{x.shape[1]}x{x.shape[2]}")
        x = x.astype(self.dtype)
        for layer in STAGE_LAYERS[name]:
            x = max_pool_3x3_s2(x) if layer.startswith("Pool") else getattr(self, layer)(x, train)
        return x

    def aux(self, carry: jax.Array, train: bool = False) -> jax.Array:
        """timm ``AuxLogits`` on the ``Mixed_6e`` map: (B, h >= 17, w >= 17, 768) -> (B, aux_classes) float32."""
        if not self.aux_logits:
            raise ValueError("this InceptionV3 has no auxiliary classifier (use arch 'inception_v3_aux')")
        if carry.shape[1] < AUX_MIN_MAP or carry.shape[2] < AUX_MIN_MAP:
            raise ValueError(
                f"InceptionV3's auxiliary classifier needs a Mixed_6e map of at least {AUX_MIN_MAP}x{AUX_MIN_MAP}, "
                f"got {carry.shape[1]}x{carry.shape[2]}: train inception_v3_aux on images of at least "
                f"{AUX_MIN_IMAGE} px (or use inception_v3, without the auxiliary head)")
        return self.AuxLogits(carry.astype(self.dtype), train)

    def pool(self, carry: jax.Array, train: bool = False) -> jax.Array:
        """timm ``forward_head(pre_logits=True)``: global average (B, h, w, 2048) -> (B, 2048) float32."""
        if self.aux_logits and self.is_initializing():
            # The auxiliary head runs in training only; create its variables whatever the init image size.
            self.AuxLogits(jnp.zeros((1, AUX_MIN_MAP, AUX_MIN_MAP, AUX_CHANNELS), self.dtype), False)
        return MapCarry.pool(self, carry, train)



_COMMON: dict[str, Any] = dict(
    stage_names=STAGE_NAMES,
    stage_channels=STAGE_CHANNELS,
    stage_strides=STAGE_STRIDES,
    first_key="Conv2d_1a_3x3.conv.weight",
    classifier_key="fc",
    projection_key="head",
    torch_stages=TORCH_STAGES,
    timm_name="inception_v3",
    min_image_size=MIN_IMAGE,
)

SPECS: tuple[BackboneSpec, ...] = (
    BackboneSpec(
        name="inception_v3",
        module=InceptionV3,
        droppable=("AuxLogits",),
        description="InceptionV3 (timm inception_v3, torchvision's keys), no auxiliary classifier (an AuxLogits "
                    "head in a weights file is skipped); 2048-d pooled features, images >= 75 px",
        **_COMMON,
    ),
    BackboneSpec(
        name="inception_v3_aux",
        module=functools.partial(InceptionV3, aux_logits=True),
        timm_kwargs={"aux_logits": True},
        aux_stage="stage4",
        description="InceptionV3 with the auxiliary classifier AuxLogits on Mixed_6e (its logits in training, "
                    "0.4 x cross-entropy); training needs images >= 299 px",
        **_COMMON,
    ),
)
