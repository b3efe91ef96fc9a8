"""The registry of backbones beyond the tiny CNN and the ResNets, each in timm's (or torchvision's) layout.

``REGISTRY[name]`` is a :class:`BackboneSpec` (see :mod:`.spec` for the module contract). Every
family module lists its specs in ``SPECS``; the registry drives ``models.ARCHS``, weight import
and export, ``lclsc verify --arch`` and the docs.
"""

from __future__ import annotations

from lclsc_jax.models.backbones import classic, convnext, densenet, efficientnet, inception, vit
from lclsc_jax.models.backbones.spec import BackboneSpec

REGISTRY: dict[str, BackboneSpec] = {
    s.name: s for family in (efficientnet, inception, vit, convnext, densenet, classic) for s in family.SPECS
}

__all__ = ["REGISTRY", "BackboneSpec"]
