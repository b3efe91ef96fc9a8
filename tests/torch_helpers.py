"""PyTorch-side helpers shared by the parity tests (a plain module, imported plainly).

Import it only after ``pytest.importorskip("torch")``: it imports torch itself, so an import
error here is a bug, not a missing optional package.

pytorch-grad-cam imports torchvision at import time, but only for image preprocessing, SESS
and detection targets, none of which the parity tests use. Where torchvision is missing,
:func:`import_pytorch_grad_cam` puts a stub torchvision into ``sys.modules`` for the duration of
the import only, and afterwards removes the stub and every ``pytorch_grad_cam`` module imported
under it, so nothing outside the caller sees a torchvision that is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

# pytorch-grad-cam modules the tests use besides the package itself (it imports both, too).
_SUBMODULES = ("pytorch_grad_cam.utils.model_targets",)


def _torchvision_stub() -> dict[str, types.ModuleType]:
    """Stub ``torchvision`` modules with the names pytorch-grad-cam imports; calling any raises."""

    def missing(*args, **kwargs):
        raise RuntimeError("torchvision is not installed (stub for pytorch-grad-cam)")

    tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
    fn, ops = types.ModuleType("torchvision.transforms.functional"), types.ModuleType("torchvision.ops")
    tr.Compose = tr.Normalize = tr.ToTensor = missing
    fn.resize = ops.box_iou = missing
    tr.functional, tv.transforms, tv.ops = fn, tr, ops
    return {"torchvision": tv, "torchvision.transforms": tr,
            "torchvision.transforms.functional": fn, "torchvision.ops": ops}


def _torchvision_installed() -> bool:
    try:
        return importlib.util.find_spec("torchvision") is not None
    except ValueError:  # already in sys.modules without a spec: someone's stub, use it as it is
        return True


def _is_stubbed(name: str) -> bool:
    return name.split(".", 1)[0] in ("torchvision", "pytorch_grad_cam")


def import_pytorch_grad_cam() -> types.SimpleNamespace:
    """``pytorch_grad_cam`` and ``ClassifierOutputTarget`` (skips the caller if grad-cam is not installed).

    With torchvision installed this is a plain import. Without it, the stub exists only while
    pytorch-grad-cam imports; ``sys.modules`` is then restored (see the module docstring).
    """
    if _torchvision_installed():
        pgc = pytest.importorskip("pytorch_grad_cam")
        targets = importlib.import_module(_SUBMODULES[0])
        return types.SimpleNamespace(pgc=pgc, ClassifierOutputTarget=targets.ClassifierOutputTarget)
    before = {name for name in sys.modules if _is_stubbed(name)}
    with pytest.MonkeyPatch.context() as mp:
        for name, module in _torchvision_stub().items():
            mp.setitem(sys.modules, name, module)  # removed again when the context exits
        try:
            pgc = pytest.importorskip("pytorch_grad_cam")
            targets = importlib.import_module(_SUBMODULES[0])
        finally:
            for name in [n for n in sys.modules if _is_stubbed(n) and n not in before]:
                if not name.startswith("torchvision"):  # the stub itself: restored by mp
                    del sys.modules[name]
    return types.SimpleNamespace(pgc=pgc, ClassifierOutputTarget=targets.ClassifierOutputTarget)


class Logits(torch.nn.Module):
    """The logits of a ``torch_reference`` ResNet as one tensor (what pytorch-grad-cam expects).

    With ``global_emb (C, D)``: the cosine similarities of the embedding to it over ``tau``
    (the GEI score), else the classifier's logits.
    """

    def __init__(self, net, global_emb=None, tau=0.1):
        super().__init__()
        self.net, self.g, self.tau = net, global_emb, tau

    def forward(self, x):
        out = self.net(x)
        if self.g is None:
            return out["logits"]
        z = torch.nn.functional.normalize(out["embedding"], dim=-1)
        return z @ torch.nn.functional.normalize(self.g, dim=-1).T / self.tau


def assert_export_round_trip(net, variables, arch, x):
    """Our variables exported under timm's names load strictly into a fresh reference that computes as ``net``."""
    import numpy as np

    from lclsc_jax import interop
    from lclsc_jax.interop.timm_reference import reference_model

    sd = interop.variables_to_state_dict(variables, arch)
    fresh = reference_model(arch, num_classes=net.num_classes if hasattr(net, "num_classes") else 5)
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


def assert_stages_match(out, feats, spec, grids, rel=1e-5):
    """Every stage of ``out`` has the reference's (B, g, g, c) shape and values within ``rel`` x max(1, max|ref|)."""
    import numpy as np

    for name, c, g in zip(spec.stage_names, spec.stage_channels, grids):
        got = np.asarray(out["features"][name], np.float64)
        assert got.shape == feats[name].shape == (got.shape[0], g, g, c), name
        d = float(np.abs(got - feats[name]).max())
        assert d <= rel * max(1.0, float(np.abs(feats[name]).max())), (name, d)
