"""Cross-framework parity: the same weights and batch through Flax and the PyTorch reference."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lclsc_jax import models
from lclsc_jax.interop import monai3d
from lclsc_jax.interop.torch_reference import RESNET_LAYERS, require_torch, torch_resnet
from lclsc_jax.interop.weights import head_keys, load_torch_model, model_config_from_state_dict, read_state_dict


@dataclasses.dataclass(frozen=True)
class TensorDiff:
    """Max |jax - torch| and that divided by max |torch| for one named output tensor."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    passed: bool


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Per-tensor differences between the JAX model and the PyTorch reference."""

    arch: str
    tol: float
    diffs: tuple[TensorDiff, ...]

    @property
    def passed(self) -> bool:
        """True when every compared tensor is within ``tol`` (relative)."""
        return all(d.passed for d in self.diffs)

    def format(self) -> str:
        """Printable table: one row per tensor plus an overall PASS/FAIL line."""
        w = max(len(d.name) for d in self.diffs)
        rows = [f"{'tensor':<{w}}  {'shape':<20} {'max_abs':>11} {'max_rel':>11}  result"]
        for d in self.diffs:
            rows.append(
                f"{d.name:<{w}}  {str(d.shape):<20} {d.max_abs:11.3e} {d.max_rel:11.3e}  "
                + ("pass" if d.passed else "FAIL")
            )
        verdict = "PASS" if self.passed else "FAIL"
        rows.append(f"{verdict}: {self.arch}, relative tolerance {self.tol:g} (max_abs / max|torch|)")
        return "\n".join(rows)


def tensor_diff(name: str, got: np.ndarray, ref: np.ndarray, tol: float) -> TensorDiff:
    """Compare got vs ref (same shape): max abs diff and its ratio to max |ref|."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return TensorDiff(name, tuple(ref.shape), float("inf"), float("inf"), False)
    max_abs = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    return TensorDiff(name, tuple(ref.shape), max_abs, max_rel, bool(max_rel <= tol))


def compare_outputs(jax_out: Mapping[str, Any], torch_out: Mapping[str, Any], arch: str, tol: float) -> VerifyReport:
    """Diff every stage (torch NCHW -> NHWC, NCDHW -> NDHWC), pooled, logits and embedding present in both.

    The reference has ``embedding`` only with a projection head, so a plain classifier's
    (``embedding`` = ``pooled``) is not compared twice.
    """
    diffs = []
    for stage, ref in torch_out["features"].items():
        ref = np.moveaxis(np.asarray(ref), 1, -1)
        diffs.append(tensor_diff(f"features/{stage}", np.asarray(jax_out["features"][stage]), ref, tol))
    for key in ("pooled", "logits", "embedding"):
        if key in torch_out and key in jax_out:
            diffs.append(tensor_diff(key, np.asarray(jax_out[key]), np.asarray(torch_out[key]), tol))
    return VerifyReport(arch, tol, tuple(diffs))


def verify(
    weights_path: str | Path | Mapping[str, Any],
    arch: str,
    batch_size: int = 2,
    image_size: int = 224,
    in_channels: int | None = None,
    tol: float = 1e-4,
    seed: int = 0,
) -> VerifyReport:
    """Run one random (B, H, W, C) batch through both frameworks in eval mode and diff the outputs.

    ``arch``: a ResNet (against the project's torchvision-equivalent reference) or any registry
    backbone (against timm, or the spec's torch module for LeNet-5 / AlexNet). ``in_channels``
    defaults to the weights' (the first layer's); a different value is an error. Both sides are the
    model the file fills (``load_torch_model``): with ``fc`` only, a plain classifier (no projection
    head is added). Matmuls/convs run at full float32 precision.
    3D ResNets (``resnet18_3d``, ``resnet34_3d``): MONAI-layout weights against MONAI's model on a
    (B, C, S, S, S) volume batch (:func:`verify_monai`).
    """
    if arch in monai3d.MONAI_ARCHS:
        return verify_monai(arch, weights_path, in_channels=in_channels, image_size=image_size,
                            batch_size=batch_size, tol=tol, seed=seed)
    if arch not in RESNET_LAYERS and arch not in models.BACKBONES:
        raise ValueError(
            f"verify supports {(*RESNET_LAYERS, *models.BACKBONES)} (a PyTorch reference exists), got {arch!r}"
        )
    torch = require_torch()
    sd = read_state_dict(weights_path)
    cfg = model_config_from_state_dict(sd, arch)
    if in_channels is not None and in_channels != cfg["in_channels"]:
        raise ValueError(
            f"in_channels={in_channels} but the weights' first layer takes {cfg['in_channels']} channels"
        )
    # The model the file fills: without head.* a plain classifier (projection=False), nothing added.
    model, variables = load_torch_model(sd, arch)

    x = np.random.default_rng(seed).standard_normal(
        (batch_size, image_size, image_size, cfg["in_channels"])
    ).astype(np.float32)
    with jax.default_matmul_precision("float32"):
        jax_out = jax.jit(lambda v, im: model.apply(v, im, train=False))(variables, jnp.asarray(x))
    jax_out = jax.tree_util.tree_map(np.asarray, jax_out)
    x_nchw = torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())
    if arch in RESNET_LAYERS:
        torch_out = _resnet_reference(torch, sd, arch, cfg, x_nchw)
    else:
        torch_out = _registry_reference(torch, sd, arch, cfg, x_nchw)
    return compare_outputs(jax_out, torch_out, arch, tol)


def verify_monai(
    arch: str = "resnet18_3d",
    weights: str | Path | Mapping[str, Any] | None = None,
    *,
    in_channels: int | None = None,
    num_classes: int = 2,
    image_size: int = 32,
    batch_size: int = 2,
    tol: float = 1e-4,
    seed: int = 0,
) -> VerifyReport:
    """Parity of a MONAI 3D ResNet (``resnet18_3d``/``resnet34_3d``) run in MONAI and imported here.

    ``weights``: a MONAI state_dict or file (built with ``conv1_t_stride=2``), or ``None`` for a
    random MONAI model with randomised BN statistics (``in_channels`` default 1, ``num_classes``).
    One random (B, C, S, S, S) batch, ``S = image_size``; every stage, ``pooled`` and ``logits``
    are compared (relative tolerance ``tol``; ``max_abs`` is reported too).
    """
    ours, ref = monai3d.monai_parity_outputs(arch, weights, in_channels=in_channels, num_classes=num_classes,
                                             image_size=image_size, batch_size=batch_size, seed=seed)
    return compare_outputs(ours, ref, arch, tol)


def _resnet_reference(torch: Any, sd: Mapping[str, np.ndarray], arch: str, cfg: dict, x: Any) -> dict[str, Any]:
    """Stages, pooled, logits, embedding of the project's torchvision-equivalent ResNet on ``x`` (B, C, H, W)."""
    net = torch_resnet(
        arch,
        num_classes=cfg["num_classes"] if cfg["head"] == "linear" else None,
        in_channels=cfg["in_channels"],
        embed_dim=cfg.get("embed_dim") if cfg["projection"] else None,
        head_hidden=cfg.get("head_hidden"),
    )
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    net.eval()
    with torch.no_grad():  # CPU, float32
        out = net(x)
    return {
        "features": {k: v.numpy() for k, v in out["features"].items()},
        **{k: v.numpy() for k, v in out.items() if k != "features"},
    }


def _registry_reference(torch: Any, sd: Mapping[str, np.ndarray], arch: str, cfg: dict, x: Any) -> dict[str, Any]:
    """The same for a registry backbone: timm's model (or the spec's torch module) on ``x`` (B, C, H, W).

    The file's backbone and classifier load into the reference strictly; our projection head
    (``head_keys(arch)[1]``) is not part of timm, so the reference embedding is that head applied
    to the reference's pooled features in float64 NumPy. Stages come from NCHW (or token) outputs
    in features layout (B, h, w, c).
    """
    from lclsc_jax.interop.timm_reference import reference_model, stage_outputs

    fc, head = head_keys(arch)
    net = reference_model(arch, num_classes=cfg["num_classes"] if cfg["head"] == "linear" else 0,
                          in_channels=cfg["in_channels"])
    own = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
    missing, unexpected = net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in own.items()},
                                              strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{arch}: the weights do not fill the PyTorch reference: missing {missing}, "
                         f"unexpected {unexpected}")
    pooled = {}
    hook = dict(net.named_modules())[fc].register_forward_pre_hook(lambda m, inp: pooled.__setitem__("x", inp[0]))
    try:
        feats, logits = stage_outputs(net, arch, x)
    finally:
        hook.remove()
    out: dict[str, Any] = {"features": {k: np.transpose(v, (0, 3, 1, 2)) for k, v in feats.items()},
                           "pooled": pooled["x"].double().numpy()}
    if isinstance(logits, tuple):  # timm's InceptionV3 with its auxiliary head: (logits, aux logits)
        logits = logits[0]
    if cfg["head"] == "linear":
        out["logits"] = logits.double().numpy()
    if cfg["projection"]:
        z = out["pooled"]
        if f"{head}.0.weight" in sd:
            z = np.maximum(z @ np.asarray(sd[f"{head}.0.weight"], np.float64).T + np.asarray(sd[f"{head}.0.bias"]), 0)
        out["embedding"] = z @ np.asarray(sd[f"{head}.2.weight"], np.float64).T + np.asarray(sd[f"{head}.2.bias"])
    return out
