"""Saliency maps for any :mod:`lclsc_jax.models` model: CAM family, CRM, perturbation, gradients.

>>> maps = saliency("gradcam", model, variables, images, targets=None, stage="stage4")  # (B, H, W)

``METHODS`` lists the names (from :mod:`lclsc_jax.explain.registry`, one spec per method);
``write_explanations`` writes ``.npy`` maps and PNG overlays (used by ``lclsc explain``). See
docs/explain.md for formulas, costs and options.

Names are imported on first use, so ``lclsc_jax.explain.registry`` (the method list) loads without JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lclsc_jax.explain.api import saliency, saliency_batched
    from lclsc_jax.explain.core import Explainer, Scorer, finish_cams, make_scorer, minmax, normalize_map, resize
    from lclsc_jax.explain.figures import overlay, write_explanations
    from lclsc_jax.explain.perturbation import occlusion_windows, slic_segments
    from lclsc_jax.explain.registry import (
        GRADIENT_CAMS,
        INPUT_METHODS,
        METHODS,
        REGISTRY,
        STAGE_METHODS,
        VOLUME_METHODS,
        MethodSpec,
    )
    from lclsc_jax.explain.volume_figures import orthogonal_figure, write_map_nifti

_WHERE = {
    "GRADIENT_CAMS": "registry", "INPUT_METHODS": "registry", "METHODS": "registry", "MethodSpec": "registry",
    "REGISTRY": "registry", "STAGE_METHODS": "registry",
    "saliency": "api", "saliency_batched": "api",
    "Explainer": "core", "Scorer": "core", "finish_cams": "core", "make_scorer": "core", "minmax": "core",
    "normalize_map": "core", "resize": "core",
    "overlay": "figures", "write_explanations": "figures",
    "occlusion_windows": "perturbation", "slic_segments": "perturbation",
    "VOLUME_METHODS": "registry", "orthogonal_figure": "volume_figures", "write_map_nifti": "volume_figures",
}
_SUBMODULES = ("api", "cam", "core", "figures", "frame_overlay", "fullgrad", "gradients", "perturbation", "registry",
               "volume_figures")

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """Import an exported name (or a submodule) on first access."""
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE) | set(_SUBMODULES))
