"""DenseNet-121 in timm's ``DenseNet`` layout (``densenet121``).

Module tree as timm's ``densenet121`` (growth 32, bottleneck 4 * 32, blocks (6, 12, 24, 16), 64
stem features): ``features.conv0`` (7x7 stride-2 conv, padding 3, no bias), ``features.norm0``,
``features.pool0`` (max pool 3x3 stride 2 padding 1),
``features.denseblock<K>.denselayer<N>.{norm1, conv1 (1x1), norm2, conv2 (3x3, padding 1)}``,
``features.transition<K>.{norm, conv (1x1, halves the channels), pool (avg 2x2 stride 2)}``,
``features.norm5``, then global average pooling and the ``classifier`` (our ``fc``). Every norm is
timm's ``BatchNormAct2d`` (BatchNorm eps 1e-5 *and* ReLU in one module, so ``norm5``'s output is
already rectified); here a Flax ``BatchNorm`` followed by ``relu`` under the same name. A dense
layer reads the concatenation of all earlier features of its block and adds 32 channels.

Stages: ``stem`` (after ``pool0``), ``stage1``..``stage3`` = dense block + transition, ``stage4`` =
dense block 4 + ``norm5``. ``pool`` is the global average (timm's pre-logits), ``local`` the last
map. ``remat`` is timm's ``memory_efficient``: each dense layer is rematerialised and takes the
*list* of earlier features, concatenating them inside, so the backward pass keeps only the
individual features (not every layer's concatenated input). timm's DenseNet has no stochastic
depth: ``drop_path_rate`` is accepted and has no effect; its ``drop_rate`` (dropout before the
classifier) and ``proj_drop_rate`` (dropout after each dense layer), both 0 by default, are not
modelled.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lclsc_jax.models.backbones.common import MapCarry
from lclsc_jax.models.backbones.spec import BackboneSpec
from lclsc_jax.models.layers import max_pool_3x3_s2, patch_conv

Dtype = Any

GROWTH = 32
BN_SIZE = 4
BLOCKS = (6, 12, 24, 16)
STEM_FEATURES = 2 * GROWTH
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # Flax convention (= torch momentum 0.1)
STAGE_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4")

# torch DenseNet init: nn.init.kaiming_normal_(w) (fan_in, gain sqrt(2), untruncated)
_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def block_channels() -> tuple[tuple[int, int], ...]:
    """(channels into, channels out of) each dense block: ((64, 256), (128, 512), (256, 1024), (512, 1024))."""
    out, c = [], STEM_FEATURES
    for i, n in enumerate(BLOCKS):
        out.append((c, c + n * GROWTH))
        c = (c + n * GROWTH) // 2 if i < len(BLOCKS) - 1 else c + n * GROWTH
    return tuple(out)


def _conv(features: int, kernel: int, stride: int = 1, dtype: Dtype = jnp.float32) -> nn.Conv:
    """torch ``Conv2d(kernel, stride, padding=kernel // 2, bias=False)``, NHWC: (B, H, W, Cin) -> (B, H', W', features).

    Runs through :func:`lclsc_jax.models.layers.patch_conv` (a matmul where the map is smaller than
    the kernel, e.g. dense block 4's 3x3 convs on 2x2 maps, which XLA:CPU's conv runs very slowly).
    """
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)), use_bias=False,
                   dtype=dtype, param_dtype=jnp.float32, kernel_init=_conv_init, conv_general_dilated=patch_conv)


def _batch_norm(dtype: Dtype) -> nn.BatchNorm:
    """The BatchNorm of timm's ``BatchNormAct2d`` (eps 1e-5, torch momentum 0.1); ``use_running_average`` at call."""
    return nn.BatchNorm(use_running_average=None, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype,
                        param_dtype=jnp.float32)


class DenseLayer(nn.Module):
    """timm ``DenseLayer``: conv2(relu(norm2(conv1(relu(norm1(cat(feats))))))): [(B, H, W, c_i)] -> (B, H, W, 32)."""

    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.norm1 = _batch_norm(self.dtype)
        self.conv1 = _conv(BN_SIZE * GROWTH, 1, dtype=self.dtype)
        self.norm2 = _batch_norm(self.dtype)
        self.conv2 = _conv(GROWTH, 3, dtype=self.dtype)

    def __call__(self, features: tuple[jax.Array, ...], train: bool = False) -> jax.Array:
        """The block's features so far (concatenated on channels, in order) -> the 32 new channels (B, H, W, 32)."""
        ra = not train
        x = jnp.concatenate(features, axis=-1) if len(features) > 1 else features[0]
        x = self.conv1(nn.relu(self.norm1(x, use_running_average=ra)))
        return self.conv2(nn.relu(self.norm2(x, use_running_average=ra)))


class DenseBlock(nn.Module):
    """timm ``DenseBlock``: ``denselayer1``..``denselayerN``, all concatenated: (B, H, W, c) -> (B, H, W, c + 32N)."""

    num_layers: int
    remat: bool = False
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        layer_cls = nn.remat(DenseLayer, static_argnums=(2,)) if self.remat else DenseLayer  # (self, features, train)
        for n in range(1, self.num_layers + 1):
            setattr(self, f"denselayer{n}", layer_cls(dtype=self.dtype))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, c) -> (B, H, W, c + 32 * num_layers): input first, then each layer's new channels."""
        features = [x]
        for n in range(1, self.num_layers + 1):
            features.append(getattr(self, f"denselayer{n}")(tuple(features), train))
        return jnp.concatenate(features, axis=-1)


class DenseTransition(nn.Module):
    """timm ``DenseTransition``: avgpool2x2(conv(relu(norm(x)))): (B, H, W, c) -> (B, H // 2, W // 2, features)."""

    features: int
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.norm = _batch_norm(self.dtype)
        self.conv = _conv(self.features, 1, dtype=self.dtype)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, c) -> (B, H // 2, W // 2, features) (torch ``AvgPool2d(2, 2)``: an odd last row/column dropped)."""
        x = self.conv(nn.relu(self.norm(x, use_running_average=not train)))
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class Features(nn.Module):
    """timm's ``features`` (``conv0``, ``norm0``, ``pool0``, dense blocks, transitions, ``norm5``), run by stage."""

    remat: bool = False
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.conv0 = _conv(STEM_FEATURES, 7, 2, dtype=self.dtype)
        self.norm0 = _batch_norm(self.dtype)
        for k, (n, (_, c_out)) in enumerate(zip(BLOCKS, block_channels()), start=1):
            setattr(self, f"denseblock{k}", DenseBlock(n, remat=self.remat, dtype=self.dtype))
            if k < len(BLOCKS):
                setattr(self, f"transition{k}", DenseTransition(c_out // 2, dtype=self.dtype))
        self.norm5 = _batch_norm(self.dtype)

    def __call__(self, x: jax.Array, index: int, train: bool = False) -> jax.Array:
        """Stage ``index``: 0 stem (B, H, W, Cin) -> (B, H/4, W/4, 64); k: dense block k + transition k (or norm5)."""
        ra = not train
        if index == 0:
            return max_pool_3x3_s2(nn.relu(self.norm0(self.conv0(x), use_running_average=ra)))
        x = getattr(self, f"denseblock{index}")(x, train)
        if index < len(BLOCKS):
            return getattr(self, f"transition{index}")(x, train)
        return nn.relu(self.norm5(x, use_running_average=ra))


class DenseNet(MapCarry, nn.Module):
    """DenseNet-121 backbone in timm's layout; stages ``stem``, ``stage1``..``stage4`` (see the module docstring).

    ``stage(name, x, train)``: (B, H, W, c_in) -> (B, h, w, c); ``pool``: (B, h, w, 1024) -> (B, 1024)
    float32 global average (timm's pre-logits); ``local``: the ``norm5`` map itself as float32.
    """

    dtype: Dtype = jnp.float32
    in_channels: int = 3
    remat: bool = False
    drop_path_rate: float = 0.0  # timm's DenseNet has no stochastic depth: accepted, no effect

    def setup(self) -> None:
        self.features = Features(remat=self.remat, dtype=self.dtype)

    def stage(self, name: str, x: jax.Array, train: bool = False) -> jax.Array:
        """Run one named stage: (B, H, W, c_in) -> (B, h, w, c) (``stem`` takes the images)."""
        if name not in STAGE_NAMES:
            raise ValueError(f"densenet: unknown stage {name!r}; expected one of {STAGE_NAMES}")
        if name == "stem":
            x = x.astype(self.dtype)
        return self.features(x, STAGE_NAMES.index(name), train)



def _stage_channels() -> tuple[int, ...]:
    """Output channels of ``STAGE_NAMES``: (64, 128, 256, 512, 1024)."""
    outs = [c_out for _, c_out in block_channels()]
    return (STEM_FEATURES, *(c // 2 for c in outs[:-1]), outs[-1])


SPECS: tuple[BackboneSpec, ...] = (
    BackboneSpec(
        name="densenet121",
        module=DenseNet,
        stage_names=STAGE_NAMES,
        stage_channels=_stage_channels(),
        stage_strides=(4, 8, 16, 32, 32),
        first_key="features.conv0.weight",
        classifier_key="classifier",
        projection_key="head",
        torch_stages=("features.pool0", "features.transition1", "features.transition2", "features.transition3",
                      "features.norm5"),
        timm_name="densenet121",
        description="DenseNet-121 (timm densenet121): growth 32, dense blocks (6, 12, 24, 16) with BN-ReLU-conv "
                    "layers and transitions; 1024-d pooled features; remat = memory-efficient; 8M params",
    ),
)
