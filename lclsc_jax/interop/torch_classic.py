"""Plain ``torch.nn`` references of the classic registry backbones (AlexNet, LeNet-5), for parity checks.

timm has neither network, so the registry's ``torch_module`` builds these:

- :func:`torch_alexnet`: torchvision's ``AlexNet`` layout exactly (``features.{0,3,6,8,10}`` convs,
  ``avgpool = AdaptiveAvgPool2d((6, 6))``, ``classifier.{1,4,6}`` Linears with ``Dropout`` at
  ``classifier.0`` / ``classifier.3``), so torchvision's AlexNet state_dicts load strictly;
- :func:`torch_lenet5`: LeNet-5 as CLE papers use it today: ``features.0`` Conv2d(C, 6, 5), ReLU,
  MaxPool2d(2), ``features.3`` Conv2d(6, 16, 5), ReLU, MaxPool2d(2), ``avgpool =
  AdaptiveAvgPool2d((5, 5))`` (any input >= 32 px), flatten, ``classifier.0`` Linear(400, 120),
  ReLU, ``classifier.2`` Linear(120, 84), ReLU, ``classifier.4`` Linear(84, K).

``num_classes=0`` leaves the final Linear an ``nn.Identity`` (timm's convention: the module name
exists, its keys do not, the forward returns the pre-logits). ReLUs are not in-place, so forward
hooks on them read their own output. torch is imported lazily: this module imports without it.
"""

from __future__ import annotations

import functools
import types
from typing import Any

from lclsc_jax.interop.torch_reference import require_torch


@functools.cache
def _classes() -> types.SimpleNamespace:
    """Define the torch.nn classes once torch is importable."""
    torch = require_torch()
    nn = torch.nn

    def last_linear(width: int, num_classes: int) -> Any:
        return nn.Linear(width, num_classes) if num_classes else nn.Identity()

    class AlexNet(nn.Module):
        """torchvision's AlexNet (``in_channels`` added): forward(x (B, C, H >= 63, W >= 63)) -> (B, K)."""

        def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(64, 192, kernel_size=5, padding=2),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(192, 384, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(384, 256, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(256, 256, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2),
            )
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(
                nn.Dropout(p=dropout),
                nn.Linear(256 * 6 * 6, 4096),
                nn.ReLU(),
                nn.Dropout(p=dropout),
                nn.Linear(4096, 4096),
                nn.ReLU(),
                last_linear(4096, num_classes),
            )

        def forward(self, x):
            x = self.avgpool(self.features(x))
            return self.classifier(torch.flatten(x, 1))

    class LeNet5(nn.Module):
        """LeNet-5 with ReLU, max pooling and an adaptive (5, 5) pool: forward(x (B, C, H >= 32, W >= 32)) -> (B, K)."""

        def __init__(self, num_classes: int = 10, in_channels: int = 3):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, 6, kernel_size=5),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=2),
                nn.Conv2d(6, 16, kernel_size=5),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=2),
            )
            self.avgpool = nn.AdaptiveAvgPool2d((5, 5))
            self.classifier = nn.Sequential(
                nn.Linear(16 * 5 * 5, 120),
                nn.ReLU(),
                nn.Linear(120, 84),
                nn.ReLU(),
                last_linear(84, num_classes),
            )

        def forward(self, x):
            x = self.avgpool(self.features(x))
            return self.classifier(torch.flatten(x, 1))

    return types.SimpleNamespace(AlexNet=AlexNet, LeNet5=LeNet5)


def torch_alexnet(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> Any:
    """torchvision-equivalent AlexNet ``torch.nn.Module``: forward(x (B, C, H, W)) -> logits (B, K).

    ``num_classes=0``: pre-logits (B, 4096) (``classifier.6`` is an ``nn.Identity``).
    """
    return _classes().AlexNet(num_classes, in_channels, dropout)


def torch_lenet5(num_classes: int = 10, in_channels: int = 3) -> Any:
    """LeNet-5 ``torch.nn.Module``: forward(x (B, C, H, W)) -> logits (B, K); ``num_classes=0``: pre-logits (B, 84)."""
    return _classes().LeNet5(num_classes, in_channels)
