"""Parity with pytorch-grad-cam 1.5.7 on the same ResNet-18 weights (optional).

Needs torch and ``grad-cam`` (``pip install --no-deps grad-cam==1.5.7 ttach opencv-python-headless``);
torchvision is not needed: pytorch-grad-cam imports it only for image preprocessing, SESS and
detection targets, so ``torch_helpers.import_pytorch_grad_cam`` puts a stub in place for the import
when it is missing (and removes it again). Skipped otherwise.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.torch, pytest.mark.slow]

import jax.numpy as jnp  # noqa: E402
from torch_helpers import Logits, import_pytorch_grad_cam  # noqa: E402 - tests/ helper; needs torch

_grad_cam = import_pytorch_grad_cam()  # skips this module without pytorch-grad-cam
pgc, ClassifierOutputTarget = _grad_cam.pgc, _grad_cam.ClassifierOutputTarget

# The project itself: an import error must fail, not skip.
from lclsc_jax import explain, interop, models  # noqa: E402
from lclsc_jax.interop import torch_reference as tref  # noqa: E402

# The pytorch-grad-cam class of every method the registry says is parity-tested against it.
CLASSES = {s.name: s.reference.split(".")[-1] for s in explain.REGISTRY if s.reference.startswith("pytorch_grad_cam.")}
# One backward (gradient CAMs) or none (Eigen-CAM): cheap, every stage; perturbation CAMs: one stage.
ONE_PASS = [m for m in CLASSES if m in explain.GRADIENT_CAMS or m == "eigencam"]
PERTURBATION = [m for m in CLASSES if m in explain.STAGE_METHODS and m not in ONE_PASS]


def _torchvision_order_forward(self, x):
    """torchvision's BasicBlock.forward (downsample after the main path): FullGrad pairs biases
    with gradients in module-registration order, which needs this execution order."""
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    net = tref.torch_resnet("resnet18", num_classes=4, embed_dim=32)
    tref.randomize_batch_norm(net, 0)
    net.eval()
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    variables = interop.load_torch_weights(sd, "resnet18")
    model = models.create("resnet18", 4, head="linear", embed_dim=32)
    # The BasicBlock class is torch_reference's own (shared by every test): patched for this module only.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(net.layer1[0]), "forward", _torchvision_order_forward)
        yield net, model, variables


def _compare(pair, method, stage, size, batch, gei=False):
    net, model, variables = pair
    x = np.random.RandomState(1).randn(batch, 3, size, size).astype(np.float32)
    g = np.random.RandomState(2).randn(4, 32).astype(np.float32) if gei else None
    wrapped = Logits(net, None if g is None else torch.from_numpy(g)).eval()
    with torch.no_grad():
        tg = wrapped(torch.from_numpy(x)).numpy().argmax(-1)
    layer = {"stage4": net.layer4, "stage3": net.layer3}[stage]
    cam = getattr(pgc, CLASSES[method])(model=wrapped, target_layers=[] if method == "fullgrad" else [layer])
    ref = cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(int(t)) for t in tg])
    kw = {"global_emb": jnp.asarray(g), "score": "gei"} if gei else {}
    ours = np.asarray(explain.saliency(method, model, variables, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                       jnp.asarray(tg), stage, **kw))
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ref, ours)]
    print(f"parity {method} {stage}{' gei' if gei else ''}: min correlation {min(corr):.6f}")  # pytest -s shows it
    assert min(corr) > 0.99, (method, stage, corr)
    return corr


@pytest.mark.parametrize("stage", ["stage4", "stage3"])
@pytest.mark.parametrize("method", ONE_PASS)
def test_gradient_cams_and_eigencam_match(pair, method, stage):
    _compare(pair, method, stage, 96, 2)


@pytest.mark.parametrize("method", PERTURBATION)
def test_perturbation_cams_match(pair, method):
    _compare(pair, method, "stage4", 64, 1)


def test_fullgrad_matches(pair):
    _compare(pair, "fullgrad", "stage4", 64, 2)


def test_gei_scores_match(pair):
    _compare(pair, "gradcam", "stage4", 96, 2, gei=True)



def test_torchvision_stub_is_gone_after_the_import():
    # The stub existed only while pytorch-grad-cam imported (its modules have no __spec__): the
    # other tests see the environment as it is, with torchvision and pytorch-grad-cam not importable.
    stubs = [n for n, m in sys.modules.items() if n.split(".")[0] == "torchvision" and m.__spec__ is None]
    assert not stubs
    if "torchvision" not in sys.modules:
        assert not [n for n in sys.modules if n.split(".")[0] == "pytorch_grad_cam"]
