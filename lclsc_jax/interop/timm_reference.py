"""timm as the PyTorch reference of the registry backbones (optional; imported lazily).

timm imports torchvision at import time, but only for data transforms, datasets and
``FrozenBatchNorm2d``, none of which building and running its models needs. No torchvision wheel
exists for every platform we run on, so where torchvision is missing :func:`require_timm` serves
stub ``torchvision.*`` modules while timm imports (their names resolve to placeholders that raise
when called), then removes the stubs, so nothing else sees a torchvision that is not installed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from lclsc_jax.interop.torch_reference import require_torch


class _MissingMeta(type):
    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(f"{cls.__name__}.{name}")


def _missing(name: str) -> type:
    """A placeholder class named ``name``: subclassable, hashable, raises when instantiated."""

    def init(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{name} needs torchvision, which is not installed (stub for importing timm)")

    return _MissingMeta(name.rsplit(".", 1)[-1], (), {"__init__": init, "__module__": "torchvision"})


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(f"{self.__name__}.{name}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds every ``torchvision.*`` module as a :class:`_StubModule`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.split(".")[0] != "torchvision":
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


@contextlib.contextmanager
def _torchvision_stub() -> Iterator[None]:
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n, m in sys.modules.items() if n.split(".")[0] == "torchvision" and isinstance(m, _StubModule)]:
            del sys.modules[name]


def _torchvision_installed() -> bool:
    try:
        return importlib.util.find_spec("torchvision") is not None
    except ValueError:  # in sys.modules without a spec: someone else's stub, use it
        return True


def require_timm() -> Any:
    """Import and return ``timm`` (needs torch; torchvision is stubbed if missing), with an actionable error."""
    require_torch()
    if "timm" in sys.modules:
        return sys.modules["timm"]
    try:
        if _torchvision_installed():
            import timm
        else:
            with _torchvision_stub():
                import timm
    except ImportError as e:
        raise ImportError(
            "this needs timm (the PyTorch reference of the registry backbones): "
            "`pip install --no-deps timm pyyaml huggingface_hub` (torchvision is not needed)"
        ) from e
    return timm


def reference_model(arch: str, num_classes: int = 0, in_channels: int = 3, **kwargs: Any) -> Any:
    """The PyTorch model of registry ``arch`` (timm, or the spec's own torch module), in eval mode.

    ``num_classes=0`` builds it without the final classifier (timm's convention).
    """
    from lclsc_jax.models import BACKBONES

    spec = BACKBONES[arch]
    if spec.torch_module is not None:
        module, _, fn = spec.torch_module.partition(":")
        net = getattr(importlib.import_module(module), fn)(num_classes=num_classes, in_channels=in_channels, **kwargs)
    else:
        timm = require_timm()
        net = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                **{**dict(spec.timm_kwargs), **kwargs})
    return net.eval()


def stage_outputs(net: Any, arch: str, x: Any) -> tuple[dict[str, np.ndarray], Any]:
    """``({stage: (B, h, w, c) float64 numpy}, forward output)`` of ``net(x)`` read with forward hooks.

    Token outputs (ViT, ``(B, N, c)``) lose their prefix tokens and become the patch grid.
    """
    from lclsc_jax.models import BACKBONES

    torch = require_torch()
    spec = BACKBONES[arch]
    modules: Mapping[str, Any] = dict(net.named_modules())
    got: dict[str, Any] = {}
    hooks = []
    for stage, name in zip(spec.stage_names, spec.torch_stages):
        if name not in modules:
            raise ValueError(f"{arch}: the reference has no module {name!r} (stage {stage})")
        hooks.append(modules[name].register_forward_hook(
            lambda mod, inp, out, stage=stage: got.__setitem__(stage, out.detach())))
    try:
        with torch.no_grad():
            out = net(x)
    finally:
        for h in hooks:
            h.remove()
    feats = {}
    for stage in spec.stage_names:
        t = got[stage].double().numpy()
        if spec.torch_tokens:
            t = t[:, spec.num_prefix_tokens:]
            side = int(round(np.sqrt(t.shape[1])))
            h = x.shape[2] // (x.shape[2] // side) if side * side != t.shape[1] else side
            t = t.reshape(t.shape[0], h, t.shape[1] // h, t.shape[2])
        else:
            t = np.transpose(t, (0, 2, 3, 1))
        feats[stage] = t
    return feats, out
