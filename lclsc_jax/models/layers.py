"""Building blocks shared by the backbones: PyTorch-faithful conv / batch-norm / pooling.

Every convolution uses explicit symmetric padding (as ``torch.nn.Conv2d(padding=p)``), never
``'SAME'``, so output sizes and values match PyTorch for odd input sizes as well. The padded values
follow ``torch.nn.Conv2d(padding_mode=...)``: zeros (the default), or reflected, replicated or
wrapped-around input pixels (:data:`PADDING_MODES`).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"), untruncated.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

#: ``torch.nn.Conv2d`` ``padding_mode`` -> ``jnp.pad`` mode.
PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}

BN_MOMENTUM = 0.9  # Flax convention: running = m * running + (1 - m) * batch (= torch momentum 0.1)
BN_EPSILON = 1e-5


def _is_channels_last(dn: Any, ndim: int) -> bool:
    """Whether conv dimension numbers are Flax's default ``N...C`` / ``...IO`` / ``N...C``."""
    spatial = tuple(range(1, ndim - 1))
    want = jax.lax.ConvDimensionNumbers((0, ndim - 1) + spatial, (ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
                                        (0, ndim - 1) + spatial)
    return dn == want


def patch_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Any, padding: Any, lhs_dilation: Any = None,
               rhs_dilation: Any = None, dimension_numbers: Any = None, feature_group_count: int = 1,
               precision: Any = None, **kwargs: Any) -> jax.Array:
    """``lax.conv_general_dilated``, but as patches @ kernel when the kernel overhangs the input.

    XLA:CPU's convolution is 50-110x slower than PyTorch's when the map is smaller than the
    kernel in every spatial dim (ResNet stage4 on 64 px inputs: 2x2 maps, 512 channels; see
    ``experiments/bench/cpu_conv_probe.py``). For those maps the padded input is cut into the
    ``prod(kernel)`` shifted windows, concatenated on channels, and multiplied by the reshaped
    kernel: one matmul whose gradients are matmuls too. Same values up to float rounding; other
    shapes, dilations and groups go to ``lax.conv_general_dilated`` unchanged. ``lhs (B, *S, Cin)``,
    ``rhs (*K, Cin, Cout)``.
    """
    nsp = lhs.ndim - 2
    kernel = rhs.shape[:nsp]
    simple = (feature_group_count == 1 and not kwargs.get("batch_group_count", 1) > 1
              and all(d in (None, 1) for d in (lhs_dilation or (1,) * nsp))
              and all(d in (None, 1) for d in (rhs_dilation or (1,) * nsp))
              and not isinstance(padding, str)
              and dimension_numbers is not None and _is_channels_last(dimension_numbers, lhs.ndim))
    if not simple or not all(s < k for s, k in zip(lhs.shape[1:-1], kernel)):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                            feature_group_count=feature_group_count, precision=precision, **kwargs)
    x = jnp.pad(lhs, ((0, 0), *[tuple(p) for p in padding], (0, 0)))
    out = [(x.shape[1 + i] - kernel[i]) // window_strides[i] + 1 for i in range(nsp)]
    windows = []
    for offset in itertools.product(*[range(k) for k in kernel]):  # row-major, as rhs.reshape below
        start = (0, *offset, 0)
        limit = (x.shape[0], *[o + (n - 1) * st + 1 for o, n, st in zip(offset, out, window_strides)], x.shape[-1])
        windows.append(jax.lax.slice(x, start, limit, (1, *window_strides, 1)))
    patches = jnp.concatenate(windows, axis=-1)  # (B, *out, prod(K) * Cin)
    return jnp.dot(patches, rhs.reshape(-1, rhs.shape[-1]), precision=precision)


def check_padding(padding: str) -> str:
    """``padding`` if it is one of :data:`PADDING_MODES`, else a ``ValueError`` naming them."""
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {tuple(PADDING_MODES)}, got {padding!r}")
    return padding


def _mode_padded_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Any, padding: Any, *args: Any,
                      pad_mode: str, dimension_numbers: Any = None, **kwargs: Any) -> jax.Array:
    """:func:`patch_conv` whose explicit ``padding`` is filled by ``jnp.pad(mode=pad_mode)`` instead of zeros."""
    if isinstance(padding, str) or dimension_numbers is None or not _is_channels_last(dimension_numbers, lhs.ndim):
        raise ValueError("a padding mode other than zeros needs explicit padding and channels-last convolutions")
    x = jnp.pad(lhs, ((0, 0), *[tuple(p) for p in padding], (0, 0)), mode=pad_mode)
    return patch_conv(x, rhs, window_strides, [(0, 0)] * len(padding), *args,
                      dimension_numbers=dimension_numbers, **kwargs)


_PADDED_CONVS = {mode: (patch_conv if mode == "zeros" else functools.partial(_mode_padded_conv, pad_mode=np_mode))
                 for mode, np_mode in PADDING_MODES.items()}


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    dtype: Dtype = jnp.float32,
    padding: str = "zeros",
    name: str | None = None,
    ndim: int = 2,
) -> nn.Conv:
    """A bias-free ``kernel^ndim`` conv with PyTorch padding ``kernel // 2``; channels-last in and out.

    ``ndim=2``: (B, H, W, C) images, kernel (k, k, Cin, Cout); ``ndim=3``: (B, D, H, W, C) volumes,
    kernel (k, k, k, Cin, Cout) (``torch.nn.Conv3d``, zeros padding only).
    ``padding``: what the padded border holds, as torch's ``padding_mode`` (:data:`PADDING_MODES`):
    ``"zeros"``, ``"reflect"`` (``jnp.pad(mode="reflect")``, the edge pixel not repeated),
    ``"replicate"`` or ``"circular"``. The variables are the same whatever the mode.
    """
    if ndim not in (2, 3):
        raise ValueError(f"conv supports 2 or 3 spatial dims, got ndim={ndim}")
    if ndim == 3 and padding != "zeros":
        raise ValueError(f"3D convolutions support padding='zeros' only, got {padding!r}")
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel,) * ndim,
        strides=(stride,) * ndim,
        padding=((pad, pad),) * ndim,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_kernel_init,
        conv_general_dilated=_PADDED_CONVS[check_padding(padding)],
        name=name,
    )


def batch_norm(
    *, dtype: Dtype = jnp.float32, zero_init: bool = False, name: str | None = None
) -> nn.BatchNorm:
    """Batch norm with torch's eps/momentum; ``use_running_average`` is passed at call time."""
    return nn.BatchNorm(
        use_running_average=None,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
        name=name,
    )


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch ``MaxPool2d/3d(3, stride=2, padding=1)`` (-inf padding): (B, *S, C) -> (B, *S', C), S 2 or 3 axes."""
    nsp = x.ndim - 2
    return nn.max_pool(x, (3,) * nsp, strides=(2,) * nsp, padding=((1, 1),) * nsp)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over every spatial axis, accumulated in float32: (B, h, w, c) or (B, d, h, w, c) -> (B, c) float32."""
    return jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim - 1)))


class ProjectionHead(nn.Module):
    """MLP ``Dense(hidden) - ReLU - Dense(D)`` (``layers=2``) or ``Dense(D)`` (``layers=1``) on the last axis.

    ``(..., c) -> (..., D)`` float32. No normalisation layer, so applying it per location of a
    (B, h, w, c) map is exactly the pooled computation per pixel (a 1x1 convolution); with one
    (linear) layer it also commutes with average pooling. torch naming: ``head.0`` / ``head.2``.
    """

    hidden_dim: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    layers: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.layers not in (1, 2):
            raise ValueError(f"a projection head has 1 or 2 layers, got {self.layers}")
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        if self.layers == 2:
            x = dense(self.hidden_dim, name="hidden")(x)
            x = nn.relu(x)
        x = dense(self.embed_dim, name="proj")(x)
        return x.astype(jnp.float32)
