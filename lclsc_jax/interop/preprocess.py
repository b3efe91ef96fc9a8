"""Input normalisation of imported ImageNet-style models (torchvision/timm ResNets).

Weights trained on ImageNet expect RGB in [0, 1] standardised per channel with torchvision's
``Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))``; this project's own runs
use ``lclsc_jax.data.normalize_images`` (``(u8/255 - 0.5) / 0.25``) instead.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def imagenet_normalize(u8: np.ndarray) -> np.ndarray:
    """uint8 RGB images ``(..., H, W, 3)`` -> float32 ``(u8/255 - IMAGENET_MEAN) / IMAGENET_STD``.

    Exactly torchvision's ``ToTensor()`` + ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``, channels last.
    Raises ``ValueError`` for a dtype other than uint8 or a channel count other than 3.
    """
    u8 = np.asarray(u8)
    if u8.dtype != np.uint8:
        raise ValueError(f"imagenet_normalize expects uint8 pixels, got {u8.dtype}")
    if u8.ndim < 3 or u8.shape[-1] != 3:
        raise ValueError(
            f"ImageNet normalisation is defined for RGB images (..., H, W, 3), got shape {u8.shape}; "
            "use the normalisation the model was trained with"
        )
    x = u8.astype(np.float32) * np.float32(1.0 / 255.0)
    return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
