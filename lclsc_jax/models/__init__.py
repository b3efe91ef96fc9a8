"""Flax Linen backbones (tiny CNN, ResNet-18/34/50, and the registry's timm-layout ones) exposing every stage's feature map by name.

>>> model = create("resnet18", num_classes=2, head="gei")
>>> variables = model.init(rng, images, train=False)
>>> out = model.apply(variables, images, train=False)   # features, pooled, embedding, ...
>>> check_variables(model, variables)   # external variables: one error naming every mismatch
>>> create("tiny", 3, padding="reflect")   # convs pad by reflection instead of zeros (PADDING_MODES)
"""

from lclsc_jax.models.backbones import REGISTRY as BACKBONES
from lclsc_jax.models.backbones import BackboneSpec
from lclsc_jax.models.layers import PADDING_MODES
from lclsc_jax.models.model import (
    ARCH_SPECS,
    ARCHS,
    HEADS,
    ArchSpec,
    Model,
    arch_spec,
    create,
    num_params,
    stage_channels,
    stage_strides,
)
from lclsc_jax.models.ssl_heads import DINOHead, SelfSupervisedModel
from lclsc_jax.models.variables import (
    VariablesMismatchError,
    abstract_variables,
    check_variables,
    variable_shapes,
)

__all__ = [
    "ARCHS",
    "ARCH_SPECS",
    "BACKBONES",
    "HEADS",
    "PADDING_MODES",
    "ArchSpec",
    "BackboneSpec",
    "DINOHead",
    "Model",
    "SelfSupervisedModel",
    "VariablesMismatchError",
    "abstract_variables",
    "arch_spec",
    "check_variables",
    "create",
    "num_params",
    "stage_channels",
    "stage_strides",
    "variable_shapes",
]
