"""Independent PyTorch reference of the ResNets (torchvision-equivalent), for parity checks.

No torchvision wheel exists for every platform we run on, so the reference architecture is
written here in plain ``torch.nn`` with **exactly torchvision's state_dict keys**
(``conv1.weight``, ``bn1.running_mean``, ``layer1.0.downsample.0.weight``, ``fc.weight``, ...,
including ``*.num_batches_tracked``). The optional projection head is
``head = nn.Sequential(Linear(c, hidden), ReLU(), Linear(hidden, D))`` -> keys ``head.0.*``,
``head.2.*``. torch is imported lazily: this module imports without it.
"""

from __future__ import annotations

import functools
import types
from typing import Any

RESNET_LAYERS: dict[str, tuple[tuple[int, ...], bool]] = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
}


def require_torch() -> Any:
    """Import and return ``torch``, with an actionable error if it is missing."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this needs PyTorch; install the CPU wheel with `pip install torch==2.13.0` "
            "(or `pip install lclsc-jax[torch]`)"
        ) from e
    return torch


@functools.cache
def _classes() -> types.SimpleNamespace:
    """Define the torch.nn classes once torch is importable."""
    torch = require_torch()
    nn = torch.nn

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + identity)

    class ResNet(nn.Module):
        """torchvision ResNet whose forward returns every stage (NCHW) and the heads."""

        def __init__(
            self,
            layers,
            bottleneck: bool,
            num_classes: int | None = 1000,
            in_channels: int = 3,
            embed_dim: int | None = None,
            head_hidden: int | None = None,
        ):
            super().__init__()
            block = Bottleneck if bottleneck else BasicBlock
            self.inplanes = 64
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(block, 64, layers[0], 1)
            self.layer2 = self._make_layer(block, 128, layers[1], 2)
            self.layer3 = self._make_layer(block, 256, layers[2], 2)
            self.layer4 = self._make_layer(block, 512, layers[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            c = 512 * block.expansion
            self.fc = nn.Linear(c, num_classes) if num_classes else None
            if embed_dim:
                hidden = head_hidden or c
                self.head = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))
            else:
                self.head = None

        def _make_layer(self, block, planes: int, blocks: int, stride: int):
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            mods = [block(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * block.expansion
            mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*mods)

        def forward(self, x):
            feats = {}
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            feats["stem"] = x
            for i in range(1, 5):
                x = getattr(self, f"layer{i}")(x)
                feats[f"stage{i}"] = x
            pooled = torch.flatten(self.avgpool(x), 1)
            out = {"features": feats, "pooled": pooled}
            if self.fc is not None:
                out["logits"] = self.fc(pooled)
            if self.head is not None:
                out["embedding"] = self.head(pooled)
            return out

    return types.SimpleNamespace(BasicBlock=BasicBlock, Bottleneck=Bottleneck, ResNet=ResNet)


def torch_resnet(
    arch: str,
    num_classes: int | None = 1000,
    in_channels: int = 3,
    embed_dim: int | None = None,
    head_hidden: int | None = None,
) -> Any:
    """A torchvision-equivalent ``torch.nn.Module``; ``num_classes=None`` drops ``fc``,
    ``embed_dim`` adds the projection head. forward(x (B, C, H, W)) -> dict of NCHW stages,
    ``pooled`` (B, c), ``logits`` (B, K), ``embedding`` (B, D)."""
    if arch not in RESNET_LAYERS:
        raise ValueError(f"no PyTorch reference for arch {arch!r}; available: {tuple(RESNET_LAYERS)}")
    layers, bottleneck = RESNET_LAYERS[arch]
    return _classes().ResNet(layers, bottleneck, num_classes, in_channels, embed_dim, head_hidden)


def randomize_batch_norm(module: Any, seed: int = 0) -> None:
    """Give every BatchNorm2d random affine params and non-trivial running statistics, in place."""
    torch = require_torch()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))
