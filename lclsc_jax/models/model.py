"""The classifier: a backbone exposing named stages, a projection head, an optional linear head.

One Linen module for every architecture, so the variables are a flat, torchvision-shaped tree
(``conv1``, ``bn1``, ``layer1_0``, ..., ``head``, ``fc``) and the network can be re-entered at
any named stage (``Model.from_stage``) for Ablation-CAM / CRM style perturbations.
``projection=False`` drops the projection head ``head`` (a plain torchvision/timm classifier:
the pooled features are the embedding).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from lclsc_jax.models.backbones import REGISTRY as BACKBONES
from lclsc_jax.models.blocks import BasicBlock, Bottleneck
from lclsc_jax.models.layers import (
    ProjectionHead,
    batch_norm,
    check_padding,
    conv,
    global_avg_pool,
    max_pool_3x3_s2,
)

Dtype = Any
HEADS = ("gei", "linear")
INPUT = "input"


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Static description of a backbone: stage names, output channels and strides."""

    kind: Literal["resnet", "tiny", "backbone"]  # backbone: models.backbones.REGISTRY[arch]
    stage_names: tuple[str, ...]
    stage_channels: tuple[int, ...]
    stage_strides: tuple[int, ...]
    blocks: tuple[int, ...] = ()  # ResNets: blocks per layer1..4
    bottleneck: bool = False
    ndim: int = 2  # spatial dims of the input: 2 (B, H, W, C) images, 3 (B, D, H, W, C) volumes


_RESNET_STAGES = ("stem", "stage1", "stage2", "stage3", "stage4")
_RESNET_STRIDES = (4, 4, 8, 16, 32)

ARCH_SPECS: dict[str, ArchSpec] = {
    "tiny": ArchSpec("tiny", _RESNET_STAGES, (16, 32, 64, 128, 128), (1, 2, 4, 8, 8)),
    "resnet18": ArchSpec("resnet", _RESNET_STAGES, (64, 64, 128, 256, 512), _RESNET_STRIDES, (2, 2, 2, 2)),
    "resnet34": ArchSpec("resnet", _RESNET_STAGES, (64, 64, 128, 256, 512), _RESNET_STRIDES, (3, 4, 6, 3)),
    "resnet50": ArchSpec(
        "resnet", _RESNET_STAGES, (64, 256, 512, 1024, 2048), _RESNET_STRIDES, (3, 4, 6, 3), True
    ),
    **{name: ArchSpec("backbone", b.stage_names, b.stage_channels, b.stage_strides) for name, b in BACKBONES.items()},
    # 3D (volumes (B, D, H, W, C)): k^3 kernels, the same stages, heads and outputs. The ResNets are MONAI's
    # ``resnet18/34(spatial_dims=3, conv1_t_stride=2, shortcut_type="B")`` layout (conv1 7^3 stride 2, max pool).
    "tiny3d": ArchSpec("tiny", _RESNET_STAGES, (16, 32, 64, 128, 128), (1, 2, 4, 8, 8), ndim=3),
    "resnet18_3d": ArchSpec("resnet", _RESNET_STAGES, (64, 64, 128, 256, 512), _RESNET_STRIDES, (2, 2, 2, 2), ndim=3),
    "resnet34_3d": ArchSpec("resnet", _RESNET_STAGES, (64, 64, 128, 256, 512), _RESNET_STRIDES, (3, 4, 6, 3), ndim=3),
}
ARCHS: tuple[str, ...] = tuple(ARCH_SPECS)

# tiny: per stage one conv3x3-BN-ReLU; stem keeps resolution, stage4 widens the receptive field.
_TINY_CONV_STRIDES = (1, 2, 2, 2, 1)


def arch_spec(arch: str) -> ArchSpec:
    """The static spec of ``arch``; a clear error for unknown names."""
    try:
        return ARCH_SPECS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}") from None


def stage_strides(arch: str) -> dict[str, int]:
    """Total downsampling factor of each stage's output w.r.t. the input image, e.g. stage4 -> 32."""
    spec = arch_spec(arch)
    return dict(zip(spec.stage_names, spec.stage_strides))


def stage_channels(arch: str) -> dict[str, int]:
    """Channel count of each stage's output feature map, e.g. resnet50 stage4 -> 2048."""
    spec = arch_spec(arch)
    return dict(zip(spec.stage_names, spec.stage_channels))


class Model(nn.Module):
    """Backbone + projection head (if ``projection``) (+ linear ``fc`` if ``head_type == "linear"``).

    ``__call__(images (B, H, W, C), train)`` and ``from_stage(feats, stage, train)`` both return
    ``{"features": {stage: (B, h, w, c)}, "pooled": (B, c), "embedding": (B, D),
    "local_embedding": (B, h, w, D), "logits": (B, num_classes)}`` (logits only for a linear head;
    3D archs (``spatial_ndim == 3``): volumes (B, D, H, W, C) in, (B, d, h, w, ...) maps out;
    ``"aux_logits": (B, num_classes)`` in training where the backbone has an auxiliary classifier).
    With ``projection=False`` there is no ``head``: ``embedding`` is ``pooled`` and
    ``local_embedding`` the last feature map, both float32 (``D = c``).
    """

    arch: str
    num_classes: int
    head_type: str = "gei"
    embed_dim: int = 128
    in_channels: int = 3
    head_hidden: int | None = None  # None: the last stage's channel count
    dtype: Dtype = jnp.float32
    remat: bool = False
    zero_init_residual: bool = False
    projection: bool = True  # False: no projection head, embedding = pooled features
    projection_layers: int = 2  # 2: MLP head; 1: linear head (commutes with pooling: decomposable SC maps)
    padding: str = "zeros"  # what every conv's padded border holds: zeros | reflect | replicate | circular
    drop_path_rate: float = 0.0  # registry backbones: stochastic depth in training ("dropout" rng)

    # ---- static properties (usable on an unbound module) ----
    @property
    def spec(self) -> ArchSpec:
        """The static :class:`ArchSpec` of ``self.arch``."""
        return arch_spec(self.arch)

    @property
    def spatial_ndim(self) -> int:
        """Number of spatial axes of the input: 2 (images (B, H, W, C)) or 3 (volumes (B, D, H, W, C))."""
        return self.spec.ndim

    @property
    def stage_names(self) -> tuple[str, ...]:
        """Stage names in forward order, e.g. ``("stem", "stage1", ..., "stage4")``."""
        return self.spec.stage_names

    @property
    def last_stage(self) -> str:
        """Name of the last stage (the one pooled and fed to the heads)."""
        return self.spec.stage_names[-1]

    @property
    def stage_channels(self) -> dict[str, int]:
        """Output channels of each stage."""
        return stage_channels(self.arch)

    @property
    def stage_strides(self) -> dict[str, int]:
        """Downsampling factor of each stage w.r.t. the input."""
        return stage_strides(self.arch)

    @property
    def pooled_channels(self) -> int:
        """Width ``c`` of ``pooled``: the last stage's channels, or what a registry backbone's ``pool`` gives."""
        bb = BACKBONES.get(self.arch)
        return (bb.pooled_channels if bb and bb.pooled_channels else None) or self.spec.stage_channels[-1]

    @property
    def embedding_dim(self) -> int:
        """Size ``D`` of ``embedding``: ``embed_dim``, or the pooled features' width without projection."""
        return self.embed_dim if self.projection else self.pooled_channels

    # ---- submodules ----
    def setup(self) -> None:
        spec = self.spec
        if self.head_type not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head_type!r}")
        nd = spec.ndim
        if spec.kind == "resnet":
            self.conv1 = conv(64, 7, 2, dtype=self.dtype, padding=self.padding, ndim=nd)
            self.bn1 = batch_norm(dtype=self.dtype)
            block_cls = Bottleneck if spec.bottleneck else BasicBlock
            if self.remat:
                block_cls = nn.remat(block_cls, static_argnums=(2,))  # (self, x, train)
            inplanes = 64
            for i, n_blocks in enumerate(spec.blocks):
                planes = 64 * 2**i
                out_ch = planes * (4 if spec.bottleneck else 1)
                for j in range(n_blocks):
                    stride = 2 if (i > 0 and j == 0) else 1
                    block = block_cls(
                        planes=planes,
                        stride=stride,
                        downsample=(j == 0 and (stride != 1 or inplanes != out_ch)),
                        zero_init_residual=self.zero_init_residual,
                        dtype=self.dtype,
                        padding=self.padding,
                        ndim=nd,
                    )
                    setattr(self, f"layer{i + 1}_{j}", block)
                    inplanes = out_ch
        elif spec.kind == "backbone":
            bb = BACKBONES[self.arch]
            self.backbone = bb.module(
                dtype=self.dtype, in_channels=self.in_channels, remat=self.remat, drop_path_rate=self.drop_path_rate,
                **({"aux_classes": self.num_classes} if bb.aux_stage else {}),
            )
        else:
            for name, ch, s in zip(spec.stage_names, spec.stage_channels, _TINY_CONV_STRIDES):
                setattr(self, f"{name}_conv", conv(ch, 3, s, dtype=self.dtype, padding=self.padding, ndim=nd))
                setattr(self, f"{name}_bn", batch_norm(dtype=self.dtype))
        if self.projection:
            hidden = self.head_hidden or self.pooled_channels
            self.head = ProjectionHead(hidden, self.embed_dim, dtype=self.dtype, layers=self.projection_layers)
        if self.head_type == "linear":
            self.fc = nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                # torch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            )

    # ---- forward ----
    def _stage(self, name: str, x: jax.Array, train: bool) -> jax.Array:
        """Run one named stage: (B, H, W, c_in) -> (B, h, w, c) (3D: (B, D, H, W, c_in) -> (B, d, h, w, c))."""
        ra = not train
        if self.spec.kind == "backbone":
            return self.backbone.stage(name, x, train)
        if self.spec.kind == "tiny":
            x = getattr(self, f"{name}_conv")(x)
            return nn.relu(getattr(self, f"{name}_bn")(x, use_running_average=ra))
        if name == "stem":
            x = nn.relu(self.bn1(self.conv1(x), use_running_average=ra))
            return max_pool_3x3_s2(x)
        layer = int(name.removeprefix("stage"))
        for j in range(self.spec.blocks[layer - 1]):
            x = getattr(self, f"layer{layer}_{j}")(x, train)
        return x

    def _run(self, x: jax.Array, first: int, features: dict[str, jax.Array], train: bool) -> dict:
        """Run stages ``stage_names[first:]`` from ``x`` and the heads on the last one."""
        registry = self.spec.kind == "backbone"
        aux_stage = BACKBONES[self.arch].aux_stage if registry else None
        aux = None
        for name in self.stage_names[first:]:
            x = self._stage(name, x, train)
            features[name] = self.backbone.to_map(name, x) if registry else x
            if train and name == aux_stage:
                aux = self.backbone.aux(x, train)
        if registry:  # x: the last stage's carry (a ViT's tokens keep their class token)
            pooled = self.backbone.pool(x, train)
            last = self.backbone.local(x, train)
        else:
            last = features[self.last_stage]
            pooled = global_avg_pool(last)
        out = {"features": features, "pooled": pooled}
        if self.projection:
            out["embedding"] = self.head(pooled.astype(self.dtype))
            out["local_embedding"] = self.head(last.astype(self.dtype))
        else:  # plain classifier: the pooled backbone features are the embedding
            out["embedding"] = pooled
            out["local_embedding"] = last.astype(jnp.float32)
        if self.head_type == "linear":
            out["logits"] = self.fc(pooled.astype(self.dtype)).astype(jnp.float32)
        if aux is not None:
            out["aux_logits"] = aux
        return out

    def __call__(self, images: jax.Array, train: bool = False) -> dict:
        """Full forward of images (B, H, W, in_channels) (3D archs: volumes (B, D, H, W, in_channels)) -> dict."""
        if images.ndim != self.spatial_ndim + 2 or images.shape[-1] != self.in_channels:
            what = "volumes of shape (B, D, H, W" if self.spatial_ndim == 3 else "images of shape (B, H, W"
            raise ValueError(
                f"{self.arch}: expected {what}, {self.in_channels}), "
                f"got {tuple(images.shape)} (set in_channels= in models.create to change C"
                + ("; a 3D arch takes 5D volume batches)" if self.spatial_ndim == 3 else ")")
            )
        return self._run(images.astype(self.dtype), 0, {}, train)

    def from_stage(self, feats: jax.Array, stage: str, train: bool = False) -> dict:
        """Resume the forward after ``stage`` given its output feats (B, h, w, c) (3D: (B, d, h, w, c)); same dict.

        ``stage="input"`` means ``feats`` are images (identical to ``__call__``); for
        ``stage == last_stage`` only pooling and the heads are re-run. ``"features"`` holds the
        given stage and every later one.
        """
        if stage == INPUT:
            return self(feats, train)
        if stage not in self.stage_names:
            raise ValueError(
                f"unknown stage {stage!r} for {self.arch}; expected 'input' or one of {self.stage_names}"
            )
        expected_c = self.stage_channels[stage]
        if feats.ndim != self.spatial_ndim + 2 or feats.shape[-1] != expected_c:
            axes = "B, d, h, w" if self.spatial_ndim == 3 else "B, h, w"
            raise ValueError(
                f"{self.arch}: output of {stage!r} must have shape ({axes}, {expected_c}), "
                f"got {tuple(feats.shape)}"
            )
        idx = self.stage_names.index(stage)
        carry = self.backbone.from_map(stage, feats) if self.spec.kind == "backbone" else feats
        return self._run(carry, idx + 1, {stage: feats}, train)


def create(
    arch: str,
    num_classes: int,
    head: str = "gei",
    embed_dim: int = 128,
    in_channels: int = 3,
    dtype: Dtype = jnp.float32,
    projection: bool = True,
    **kwargs: Any,
) -> Model:
    """Build a :class:`Model`; kwargs: ``head_hidden``, ``remat``, ``zero_init_residual``, ``padding``,
    ``projection_layers`` (2: MLP projection head, 1: linear).

    ``projection=False`` builds a model without the projection head (variables have no
    ``head``; ``embedding`` = ``pooled`` (B, c)): with ``head="linear"`` a plain
    torchvision/timm-style classifier. ``embed_dim`` / ``head_hidden`` are then unused.
    ``padding`` (default ``"zeros"``): what the convolutions' padded border holds, as torch's
    ``Conv2d(padding_mode=...)``: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``;
    same variables whatever the mode (ResNets' max pool keeps its -inf padding).
    ``drop_path_rate``: stochastic depth of the registry backbones in training (timm's
    ``drop_path_rate``; the ``"dropout"`` rng of ``apply`` draws it).
    3D archs (``tiny3d``, ``resnet18_3d``, ``resnet34_3d``) take volumes (B, D, H, W, C), zeros padding only.
    """
    arch_spec(arch)
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    allowed = {"head_hidden", "remat", "zero_init_residual", "padding", "projection_layers", "drop_path_rate"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"models.create got unknown kwargs {sorted(unknown)}; allowed: {sorted(allowed)}")
    check_padding(kwargs.get("padding", "zeros"))
    if arch_spec(arch).ndim == 3 and kwargs.get("padding", "zeros") != "zeros":
        raise ValueError(f"3D arch {arch!r} supports padding='zeros' only, got {kwargs['padding']!r}")
    if arch in BACKBONES and kwargs.get("padding", "zeros") != "zeros":
        raise ValueError(f"padding modes other than 'zeros' exist for tiny and the ResNets, not {arch!r}")
    if arch in BACKBONES and kwargs.get("zero_init_residual"):
        raise ValueError(f"zero_init_residual is a ResNet option, not one of {arch!r}")
    if not 0.0 <= float(kwargs.get("drop_path_rate", 0.0)) < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {kwargs['drop_path_rate']}")
    if arch not in BACKBONES and kwargs.get("drop_path_rate", 0.0):
        raise ValueError(f"drop_path_rate (stochastic depth) needs a registry backbone, not {arch!r}")
    if num_classes < 1 or embed_dim < 1 or in_channels < 1:
        raise ValueError(
            f"num_classes, embed_dim, in_channels must be >= 1, got {num_classes}, {embed_dim}, {in_channels}"
        )
    return Model(
        arch=arch,
        num_classes=num_classes,
        head_type=head,
        embed_dim=embed_dim,
        in_channels=in_channels,
        dtype=dtype,
        projection=bool(projection),
        **kwargs,
    )


def num_params(variables: Any) -> int:
    """Number of scalars in the ``params`` collection (or in a bare params tree)."""
    tree = variables["params"] if isinstance(variables, dict) and "params" in variables else variables
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
