"""Classic plain CNNs as registry backbones: AlexNet (torchvision's layout) and LeNet-5.

Both are ``features`` (conv + ReLU [+ max pool] per stage) -> ``avgpool`` (adaptive, torch-exact)
-> NCHW flatten -> ``classifier`` (hidden Linears + ReLU, then the final Linear). Variables are
named as the torch modules (:mod:`lclsc_jax.interop.torch_classic`): ``features/0/kernel`` <->
``features.0.weight``, ``classifier/1/kernel`` <-> ``classifier.1.weight``. The hidden Linears
belong to the backbone (``pool``); the final Linear is the model's ``fc`` (``classifier.6`` /
``classifier.4``).

``local`` (the per-location features the SC module projects) is defined for a location vector
``v`` (c,) of the last map as the classifier applied to an ``ph x pw`` pooled map filled with
``v``: the first hidden Linear's weight summed over its ``ph * pw`` spatial positions, applied to
``v`` (then bias, ReLU, the next Linears and ReLUs as in ``pool``). So a spatially constant last
map gives ``local == pool`` at every location (AlexNet at 63-94 px has a 1x1 last map: always).

Neither network has residual branches: ``drop_path_rate`` and ``remat`` are accepted and have no
effect. AlexNet's ``Dropout(0.5)`` before each hidden Linear (torchvision's ``classifier.0`` /
``classifier.3``) is active in training only and draws from the ``"dropout"`` rng (in ``local``
one mask per location).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lclsc_jax.models.backbones.common import adaptive_avg_pool
from lclsc_jax.models.backbones.spec import BackboneSpec
from lclsc_jax.models.layers import patch_conv

Dtype = Any

# torch's default Conv2d / Linear init: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_weight_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _bias_init(fan_in: int) -> Any:
    """torch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as a Flax initializer."""
    bound = 1.0 / fan_in**0.5

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static layout of a classic CNN, in the torch module's indices."""

    convs: tuple[tuple[int, int, int, int, int], ...]  # (features index, out channels, kernel, stride, padding)
    max_pools: tuple[tuple[int, int, int], ...]  # (features index of the conv it follows, kernel, stride)
    stages: tuple[tuple[int, ...], ...]  # features indices of each stage's convs
    pool_hw: tuple[int, int]  # AdaptiveAvgPool2d output size
    hidden: tuple[tuple[int, int], ...]  # (classifier index, width) of the hidden Linears
    dropout: float = 0.0  # torch Dropout before each hidden Linear (training only)


ALEXNET = Layout(
    convs=((0, 64, 11, 4, 2), (3, 192, 5, 1, 2), (6, 384, 3, 1, 1), (8, 256, 3, 1, 1), (10, 256, 3, 1, 1)),
    max_pools=((0, 3, 2), (3, 3, 2), (10, 3, 2)),
    stages=((0,), (3,), (6,), (8,), (10,)),
    pool_hw=(6, 6),
    hidden=((1, 4096), (4, 4096)),
    dropout=0.5,
)
LENET5 = Layout(
    convs=((0, 6, 5, 1, 0), (3, 16, 5, 1, 0)),
    max_pools=((0, 2, 2), (3, 2, 2)),
    stages=((0,), (3,)),
    pool_hw=(5, 5),
    hidden=((0, 120), (2, 84)),
)


class _Features(nn.Module):
    """torch ``features``: the biased convolutions, each named by its Sequential index."""

    convs: tuple[tuple[int, int, int, int, int], ...]
    in_channels: int
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        layers = {}
        cin = self.in_channels
        for idx, cout, k, s, p in self.convs:
            layers[str(idx)] = nn.Conv(
                cout, (k, k), strides=(s, s), padding=((p, p), (p, p)), use_bias=True, dtype=self.dtype,
                param_dtype=jnp.float32, kernel_init=_weight_init, bias_init=_bias_init(cin * k * k),
                conv_general_dilated=patch_conv, name=str(idx),
            )
            cin = cout
        self.layers = layers

    def __call__(self, index: int, x: jax.Array) -> jax.Array:
        """Conv ``features.<index>``: (B, H, W, c_in) -> (B, h, w, c_out)."""
        return self.layers[str(index)](x)


class _Linear(nn.Module):
    """A torch ``Linear`` (kernel (in, out), bias) that can also be applied with its input positions summed."""

    in_features: int
    out_features: int
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.kernel = self.param("kernel", _weight_init, (self.in_features, self.out_features), jnp.float32)
        self.bias = self.param("bias", _bias_init(self.in_features), (self.out_features,), jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in) -> (..., out) in ``dtype``."""
        return jnp.dot(x.astype(self.dtype), self.kernel.astype(self.dtype)) + self.bias.astype(self.dtype)

    def summed(self, v: jax.Array, positions: int) -> jax.Array:
        """The Linear on a C-major flattened (c, positions) input filled with ``v``: (..., c) -> (..., out).

        Input index ``i * positions + p`` is channel ``i`` at position ``p`` (torch's NCHW flatten), so
        this is ``v @ kernel.reshape(c, positions, out).sum(1) + bias``.
        """
        w = self.kernel.reshape(self.in_features // positions, positions, self.out_features).sum(axis=1)
        return jnp.dot(v.astype(self.dtype), w.astype(self.dtype)) + self.bias.astype(self.dtype)


class _Classifier(nn.Module):
    """torch ``classifier`` without its final Linear: the hidden Linears named by their Sequential index."""

    linears: tuple[tuple[int, int, int], ...]  # (classifier index, in, out)
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.layers = {str(i): _Linear(n_in, n_out, self.dtype, name=str(i)) for i, n_in, n_out in self.linears}

    def __call__(self, index: int, x: jax.Array) -> jax.Array:
        """Linear ``classifier.<index>``: (..., in) -> (..., out)."""
        return self.layers[str(index)](x)

    def summed(self, index: int, v: jax.Array, positions: int) -> jax.Array:
        """Linear ``classifier.<index>`` on a map filled with ``v`` (``_Linear.summed``): (..., c) -> (..., out)."""
        return self.layers[str(index)].summed(v, positions)


class ClassicCNN(nn.Module):
    """A plain CNN of ``LAYOUT`` (set by subclasses): stages of conv+ReLU(+max pool), adaptive pool, hidden Linears.

    Images (B, H, W, in_channels) -> stage maps (B, h, w, c); ``pool`` -> (B, width of the last hidden
    Linear); ``local`` -> (B, h, w, that width) by the summed-weight rule of the module docstring.
    """

    LAYOUT: ClassVar[Layout]
    STAGES: ClassVar[tuple[str, ...]]
    dtype: Dtype = jnp.float32
    in_channels: int = 3
    remat: bool = False  # no repeated blocks: nothing to rematerialise
    drop_path_rate: float = 0.0  # no residual branches: no stochastic depth

    def setup(self) -> None:
        lay = self.LAYOUT
        self.features = _Features(lay.convs, self.in_channels, self.dtype)
        n_in = lay.convs[-1][1] * lay.pool_hw[0] * lay.pool_hw[1]
        linears = []
        for idx, width in lay.hidden:
            linears.append((idx, n_in, width))
            n_in = width
        self.classifier = _Classifier(tuple(linears), self.dtype)
        self.drop = nn.Dropout(lay.dropout)

    def stage(self, name: str, x: jax.Array, train: bool) -> jax.Array:
        """Run stage ``name``: (B, H, W, c_in) -> (B, h, w, c) in ``dtype``."""
        if name not in self.STAGES:
            raise ValueError(f"unknown stage {name!r}; expected one of {self.STAGES}")
        pools = {idx: (k, s) for idx, k, s in self.LAYOUT.max_pools}
        for idx in self.LAYOUT.stages[self.STAGES.index(name)]:
            x = nn.relu(self.features(idx, x.astype(self.dtype)))
            if idx in pools:
                k, s = pools[idx]
                x = nn.max_pool(x, (k, k), strides=(s, s), padding="VALID")  # torch MaxPool2d, floor mode
        return x

    def to_map(self, name: str, carry: jax.Array) -> jax.Array:
        """A stage's output as a map: itself, (B, h, w, c)."""
        return carry

    def from_map(self, name: str, fmap: jax.Array) -> jax.Array:
        """Inverse of ``to_map``: itself, (B, h, w, c)."""
        return fmap

    def _hidden(self, x: jax.Array, train: bool, positions: int) -> jax.Array:
        """Dropout + hidden Linear + ReLU for each hidden Linear; the first sums ``positions`` input positions."""
        for n, (idx, _) in enumerate(self.LAYOUT.hidden):
            x = self.drop(x, deterministic=not train)
            x = self.classifier(idx, x) if positions == 0 or n else self.classifier.summed(idx, x, positions)
            x = nn.relu(x)
        return x.astype(jnp.float32)

    def pool(self, carry: jax.Array, train: bool) -> jax.Array:
        """torch ``avgpool`` -> ``flatten`` (NCHW order) -> hidden Linears: (B, h, w, c) -> (B, width) f32."""
        if carry.shape[1] < 1 or carry.shape[2] < 1:
            raise ValueError(f"{type(self).__name__}: the last map is empty ({carry.shape}); the input images "
                             "are smaller than the network's minimum size (AlexNet: 63 px, LeNet-5: 16 px)")
        x = adaptive_avg_pool(carry, self.LAYOUT.pool_hw)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        return self._hidden(x, train, positions=0)

    def local(self, carry: jax.Array, train: bool) -> jax.Array:
        """``pool`` of a map filled with each location's vector: (B, h, w, c) -> (B, h, w, width) float32."""
        ph, pw = self.LAYOUT.pool_hw
        return self._hidden(carry, train, positions=ph * pw)


class AlexNet(ClassicCNN):
    """torchvision's AlexNet backbone: (B, H >= 63, W >= 63, C) -> stage1..stage5 maps; ``pool`` (B, 4096)."""

    LAYOUT: ClassVar[Layout] = ALEXNET
    STAGES: ClassVar[tuple[str, ...]] = ("stage1", "stage2", "stage3", "stage4", "stage5")


class LeNet5(ClassicCNN):
    """LeNet-5 backbone (ReLU, max pool, adaptive 5x5 pool): (B, H >= 32, W >= 32, C) -> stage1, stage2; (B, 84)."""

    LAYOUT: ClassVar[Layout] = LENET5
    STAGES: ClassVar[tuple[str, ...]] = ("stage1", "stage2")


SPECS: tuple[BackboneSpec, ...] = (
    BackboneSpec(
        name="alexnet",
        module=AlexNet,
        stage_names=AlexNet.STAGES,
        stage_channels=(64, 192, 384, 256, 256),
        stage_strides=(8, 16, 16, 16, 32),
        first_key="features.0.weight",
        classifier_key="classifier.6",
        torch_stages=("features.2", "features.5", "features.7", "features.9", "features.12"),
        projection_key="head",
        torch_module="lclsc_jax.interop.torch_classic:torch_alexnet",
        min_image_size=63,
        pooled_channels=4096,
        description="AlexNet (torchvision layout; hidden Linears classifier.1/.4 in the backbone, pooled 4096-d)",
    ),
    BackboneSpec(
        name="lenet5",
        module=LeNet5,
        stage_names=LeNet5.STAGES,
        stage_channels=(6, 16),
        stage_strides=(2, 4),
        first_key="features.0.weight",
        classifier_key="classifier.4",
        torch_stages=("features.2", "features.5"),
        projection_key="head",
        torch_module="lclsc_jax.interop.torch_classic:torch_lenet5",
        min_image_size=32,
        pooled_channels=84,
        description="LeNet-5 (ReLU, max pool, adaptive 5x5 pool; hidden Linears classifier.0/.2 in the backbone, "
                    "pooled 84-d)",
    ),
)
