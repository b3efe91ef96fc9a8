"""Saliency maps for any :mod:`lclsc_jax.models` model: CAM family, CRM, perturbation, gradients.

>>> maps = saliency("gradcam", model, variables, images, targets=None, stage="stage4")  # (B, H, W)

``METHODS`` lists the names; ``write_explanations`` writes ``.npy`` maps and PNG overlays
(used by ``lclsc explain``). See docs/explain.md for formulas, costs and options.
"""

from lclsc_jax.explain.api import INPUT_METHODS, METHODS, STAGE_METHODS, saliency
from lclsc_jax.explain.core import Scorer, finish_cams, make_scorer, minmax, normalize_map, resize
from lclsc_jax.explain.figures import overlay, write_explanations
from lclsc_jax.explain.perturbation import occlusion_windows, slic_segments

__all__ = [
    "INPUT_METHODS",
    "METHODS",
    "STAGE_METHODS",
    "Scorer",
    "finish_cams",
    "make_scorer",
    "minmax",
    "normalize_map",
    "occlusion_windows",
    "overlay",
    "resize",
    "saliency",
    "slic_segments",
    "write_explanations",
]
