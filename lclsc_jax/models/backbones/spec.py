"""The contract every registry backbone (EfficientNetV2, InceptionV3, ViT, ConvNeXt, DenseNet, LeNet-5, AlexNet) keeps.

A backbone is a Linen module built by ``BackboneSpec.module(**kwargs)`` and held by
:class:`lclsc_jax.models.Model` as its submodule ``backbone``. Its submodules are defined in
``setup`` and **named and nested exactly as the PyTorch/timm module tree** (``conv_stem``,
``blocks/0/1/conv_pw``, ``stages/2/blocks/0/conv_dw``, ``Mixed_5b/branch1x1/conv``; a list entry
is named ``"0"``, ``"1"``, ...), so the torch key of a variable is its Flax path after
``backbone`` joined by dots, the leaf renamed (``kernel``/``scale`` -> ``weight``, ``mean`` ->
``running_mean``, ``var`` -> ``running_var``, anything else unchanged).

Methods (``carry`` is whatever the backbone passes between stages: a (B, h, w, c) map for CNNs,
a (B, N, c) token sequence for ViTs):

- ``stage(name, carry, train) -> carry``: run one named stage (the first gets the images);
- ``to_map(name, carry) -> (B, h, w, c)``: the stage's output as a feature map (CNNs: itself;
  ViT: the patch tokens as a grid);
- ``from_map(name, fmap) -> carry``: inverse of ``to_map``, for re-entry (``Model.from_stage``);
- ``pool(carry, train) -> (B, c)`` float32: what the network computes between the last stage and
  its classifier (global pooling, a final norm, hidden fully connected layers);
- ``local(carry, train) -> (B, h, w, c)`` float32: ``pool`` applied at each location of the last
  map separately (the per-location features the SC module projects).

- ``aux(carry, train) -> (B, K)`` float32, only where the spec names an ``aux_stage``: the
  auxiliary classifier on that stage's carry (``Model`` returns it as ``aux_logits`` in training).

Keyword arguments every ``module`` accepts: ``dtype`` (compute), ``in_channels``, ``remat``
(rematerialise blocks in the backward pass), ``drop_path_rate`` (stochastic depth in training,
drawn from the ``"dropout"`` rng; 0 disables it); with an ``aux_stage`` also ``aux_classes``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Static description of a registry backbone: its stages, its module and its PyTorch names.

    ``torch_stages[i]`` is the torch module whose forward output is stage ``stage_names[i]``
    (a forward hook reads it for parity checks); ``torch_tokens`` says those outputs are (B, N, c)
    token sequences with ``num_prefix_tokens`` leading non-patch tokens. ``classifier_key`` is the
    torch prefix of the final ``Linear`` (our ``fc``) and ``projection_key`` that of our projection
    head (``head``); ``droppable`` lists torch prefixes skipped (not an error) when the model has no
    such module (InceptionV3's ``AuxLogits``). ``timm_name`` / ``timm_kwargs`` build the reference
    with ``timm.create_model``; ``torch_module`` names (``"module:function"``, so this layer imports no
    interop code) a ``(num_classes, in_channels) -> torch module`` function that builds it where
    timm has none (LeNet-5, AlexNet).
    """

    name: str
    module: Callable[..., nn.Module]
    stage_names: tuple[str, ...]
    stage_channels: tuple[int, ...]
    stage_strides: tuple[int, ...]
    first_key: str
    classifier_key: str
    torch_stages: tuple[str, ...]
    projection_key: str = "head"
    droppable: tuple[str, ...] = ()
    timm_name: str | None = None
    timm_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    torch_module: str | None = None  # "package.module:function" (resolved by interop: models import no torch code)
    torch_tokens: bool = False
    num_prefix_tokens: int = 0
    min_image_size: int = 32
    pooled_channels: int | None = None  # width of ``pool``'s output when it is not the last stage's (AlexNet: 4096)
    aux_stage: str | None = None  # an auxiliary classifier reads this stage's carry in training (InceptionV3)
    description: str = ""

    def __post_init__(self) -> None:
        n = len(self.stage_names)
        if not (len(self.stage_channels) == len(self.stage_strides) == len(self.torch_stages) == n):
            raise ValueError(
                f"{self.name}: stage_names, stage_channels, stage_strides and torch_stages differ in length")
        if (self.timm_name is None) == (self.torch_module is None):
            raise ValueError(f"{self.name}: give exactly one of timm_name and torch_module")
