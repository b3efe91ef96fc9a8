"""MONAI 3D ResNets (``monai.networks.nets.resnet18/34(spatial_dims=3, ...)``) <-> ``resnet18_3d`` / ``resnet34_3d``.

Supported layout (what ``models.create("resnet18_3d", ...)`` builds): ``conv1`` 7^3 with
``conv1_t_stride=2``, max pool (``no_max_pool=False``), ``shortcut_type="B"`` (1x1x1 conv + BN
downsample, with or without ``bias_downsample``), ``widen_factor=1``, batch norm, ReLU. MONAI's
own default ``conv1_t_stride=1`` is 8x the stem cost on volumes and is not supported: build the
MONAI model with ``conv1_t_stride=2``. Naming (MONAI key -> Flax path):

  conv1.weight (O, I, D, H, W)               -> params/conv1/kernel (D, H, W, I, O)
  bn1.{weight,bias,running_mean,running_var} -> params/bn1/{scale,bias}, batch_stats/bn1/{mean,var}
  layer2.0.conv1.weight                      -> params/layer2_0/conv1/kernel
  layer2.0.downsample.0.weight               -> params/layer2_0/downsample_conv/kernel
  layer2.0.downsample.0.bias (bias_downsample=True): folded into downsample_bn's running mean
  layer2.0.downsample.1.*                    -> params/layer2_0/downsample_bn/*, batch_stats/...
  fc.weight (K, 512), fc.bias                -> params/fc/kernel (512, K), params/fc/bias

Folding the downsample bias is exact in eval *and* train mode: a bias right before batch norm
shifts the batch mean by the same amount (``BN(x + b)`` with running mean ``m`` equals ``BN(x)``
with running mean ``m - b``). Without ``fc.*`` (``feed_forward=False``) the model is a bare
backbone (``head="gei"``, ``num_classes=1``), as :func:`weights.model_config_from_state_dict` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lclsc_jax import models
from lclsc_jax.interop.torch_reference import require_torch
from lclsc_jax.interop.weights import NBT, WeightsMismatchError, read_state_dict

#: Our 3D arch -> MONAI constructor name (``monai.networks.nets.<name>``).
MONAI_ARCHS = {"resnet18_3d": "resnet18", "resnet34_3d": "resnet34"}
#: The MONAI ``conv1_t_stride`` / ``no_max_pool`` / ``conv1_t_size`` our 3D ResNets implement.
CONV1_T_STRIDE = 2
NO_MAX_POOL = False
CONV1_T_SIZE = 7

_MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
           ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _check_arch(arch: str) -> None:
    if arch not in MONAI_ARCHS:
        raise ValueError(f"MONAI import supports {tuple(MONAI_ARCHS)}, got {arch!r}")


def check_monai_layout(conv1_t_stride: Any = CONV1_T_STRIDE, no_max_pool: bool = NO_MAX_POOL,
                       shortcut_type: str = "B", widen_factor: float = 1.0) -> None:
    """Raise ``ValueError`` unless these MONAI ``ResNet`` arguments are the layout our 3D ResNets implement."""
    strides = tuple(conv1_t_stride) if isinstance(conv1_t_stride, (tuple, list)) else (conv1_t_stride,) * 3
    if any(int(s) != CONV1_T_STRIDE for s in strides):
        raise ValueError(f"unsupported MONAI layout: conv1_t_stride={conv1_t_stride!r}; resnet18_3d/resnet34_3d "
                         f"implement conv1_t_stride={CONV1_T_STRIDE} (build the MONAI model with "
                         f"conv1_t_stride={CONV1_T_STRIDE}; MONAI's default 1 is not supported)")
    if no_max_pool != NO_MAX_POOL:
        raise ValueError(f"unsupported MONAI layout: no_max_pool={no_max_pool!r}; our 3D ResNets keep the max pool")
    if shortcut_type != "B":
        raise ValueError(f"unsupported MONAI layout: shortcut_type={shortcut_type!r}; only 'B' (1x1x1 conv + BN)")
    if widen_factor != 1.0:
        raise ValueError(f"unsupported MONAI layout: widen_factor={widen_factor!r}; only 1.0")


def monai_key(collection: str, path: tuple[str, ...]) -> str:
    """MONAI key of one of our Flax leaves, e.g. ('params', ('layer2_0', 'downsample_conv', 'kernel'))."""
    *mods, leaf = path
    parts = [_MODULES.get(m, m.replace("_", ".", 1) if m.startswith("layer") else m) for m in mods]
    return ".".join([*parts, _LEAVES[(collection, leaf)]])


def _to_flax(x: np.ndarray) -> np.ndarray:
    """Conv OIDHW -> DHWIO, Linear (out, in) -> (in, out); vectors unchanged."""
    if x.ndim == 5:
        return np.ascontiguousarray(np.transpose(x, (2, 3, 4, 1, 0)))
    if x.ndim == 2:
        return np.ascontiguousarray(x.T)
    return np.asarray(x)


def _monai_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 5:
        return (shape[4], shape[3], shape[0], shape[1], shape[2])
    return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def monai_model_config(state_dict: Mapping[str, Any], arch: str = "resnet18_3d") -> dict[str, Any]:
    """``models.create`` kwargs of the model a MONAI 3D ResNet state_dict fills (``in_channels``, head, classes)."""
    _check_arch(arch)
    if "conv1.weight" not in state_dict:
        raise WeightsMismatchError(f"state_dict has no 'conv1.weight': is it a MONAI 3D ResNet? first keys: "
                                   f"{list(state_dict)[:5]}")
    w = np.shape(state_dict["conv1.weight"])
    if len(w) != 5:
        raise WeightsMismatchError(f"'conv1.weight' has shape {tuple(w)}: not a 3D (spatial_dims=3) MONAI ResNet")
    if tuple(w[2:]) != (CONV1_T_SIZE,) * 3:
        raise WeightsMismatchError(f"'conv1.weight' has a {tuple(w[2:])} kernel; only conv1_t_size={CONV1_T_SIZE} "
                                   "is supported")
    cfg: dict[str, Any] = {"in_channels": int(w[1]), "head": "gei", "num_classes": 1, "projection": False}
    if "fc.weight" in state_dict:
        cfg.update(head="linear", num_classes=int(np.shape(state_dict["fc.weight"])[0]))
    return cfg


def monai_state_dict_to_variables(
    state_dict: Mapping[str, Any] | str | Path,
    arch: str = "resnet18_3d",
    *,
    conv1_t_stride: Any = CONV1_T_STRIDE,
    no_max_pool: bool = NO_MAX_POOL,
) -> tuple[models.Model, dict[str, Any]]:
    """A MONAI 3D ResNet state_dict (torch tensors / numpy arrays, or a weights file) -> ``(model, variables)``.

    ``model = models.create(arch, K, head="linear", projection=False, in_channels=C)`` (a plain
    classifier; ``head="gei"`` without ``fc.*``), ``variables = {"params", "batch_stats"}``.
    ``conv1_t_stride`` / ``no_max_pool``: the arguments the MONAI model was built with (they
    leave no trace in the weights); anything but our layout is an error. Missing, unexpected or
    mis-shaped keys raise :class:`WeightsMismatchError` naming the keys.
    """
    check_monai_layout(conv1_t_stride, no_max_pool)
    sd = read_state_dict(state_dict)
    cfg = monai_model_config(sd, arch)
    model = models.create(arch, cfg["num_classes"], head=cfg["head"], projection=False,
                          in_channels=cfg["in_channels"])
    template = models.abstract_variables(model)
    flat = {(c, tuple(getattr(k, "key", str(k)) for k in p)): leaf
            for c in template for p, leaf in jax.tree_util.tree_leaves_with_path(template[c])}
    expected = {monai_key(c, p): ((c, p), leaf) for (c, p), leaf in flat.items()}
    bias_keys = {k.replace(".weight", ".bias") for k in expected if k.endswith("downsample.0.weight")}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(k for k in sd if k not in expected and k not in bias_keys and not k.endswith(NBT))
    if missing or unexpected:
        hint = ""
        if any(".downsample." in k for k in missing):
            hint = " (shortcut_type='A' models have no downsample weights; only shortcut_type='B' is supported)"
        raise WeightsMismatchError(f"{arch}: the state_dict does not match MONAI's {MONAI_ARCHS[arch]} layout: "
                                   f"missing {missing}, unexpected {unexpected}{hint}")
    out: dict[str, Any] = {}
    for key, ((c, p), leaf) in expected.items():
        value = np.asarray(sd[key], np.float32)
        if tuple(value.shape) != _monai_shape(tuple(leaf.shape)):
            raise WeightsMismatchError(f"{arch}: {key!r} has shape {tuple(value.shape)}, expected "
                                       f"{_monai_shape(tuple(leaf.shape))}")
        value = _to_flax(value)
        if c == "batch_stats" and p[-2] == "downsample_bn" and p[-1] == "mean":
            bias = key.replace("downsample.1.running_mean", "downsample.0.bias")
            if bias in sd:  # bias_downsample=True: BN(conv(x) + b) == BN'(conv(x)) with mean' = mean - b
                value = value - np.asarray(sd[bias], np.float32)
        node = out.setdefault(c, {})
        for m in p[:-1]:
            node = node.setdefault(m, {})
        node[p[-1]] = jnp.asarray(value)
    return model, out


def random_monai_resnet(arch: str = "resnet18_3d", in_channels: int = 1, num_classes: int = 2, seed: int = 0) -> Any:
    """A MONAI 3D ResNet in our layout (eval mode) with random weights, BN affine and running statistics."""
    _check_arch(arch)
    torch = require_torch()
    from monai.networks import nets

    torch.manual_seed(seed)
    net = getattr(nets, MONAI_ARCHS[arch])(spatial_dims=3, n_input_channels=in_channels, num_classes=num_classes,
                                           conv1_t_stride=CONV1_T_STRIDE, shortcut_type="B")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def monai_outputs(net: Any, x: np.ndarray) -> dict[str, Any]:
    """Stages (NCDHW), pooled and logits of a MONAI 3D ResNet on ``x (B, C, D, H, W)``, float64 NumPy, eval mode."""
    torch = require_torch()
    feats: dict[str, Any] = {}
    names = {"stem": net.act if net.no_max_pool else net.maxpool,
             **{f"stage{i}": getattr(net, f"layer{i}") for i in range(1, 5)}, "pooled": net.avgpool}
    hooks = [mod.register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o.detach().double().numpy()))
             for n, mod in names.items()]
    try:
        with torch.no_grad():
            logits = net.eval()(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    finally:
        for h in hooks:
            h.remove()
    pooled = feats.pop("pooled")
    out: dict[str, Any] = {"features": feats, "pooled": pooled.reshape(pooled.shape[0], -1)}
    if net.fc is not None:
        out["logits"] = logits.double().numpy()
    return out


def monai_parity_outputs(
    arch: str = "resnet18_3d",
    weights: Mapping[str, Any] | str | Path | None = None,
    *,
    in_channels: int | None = None,
    num_classes: int = 2,
    image_size: int = 32,
    batch_size: int = 2,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(ours, monai)`` outputs of one MONAI 3D ResNet on one random (B, C, S, S, S) batch, eval mode, float32.

    ``weights``: a MONAI state_dict or file (built with ``conv1_t_stride=2``); ``None`` builds a
    random MONAI model (:func:`random_monai_resnet`, ``in_channels`` default 1, ``num_classes``).
    ``ours`` is our model's output dict (NumPy; stages (B, d, h, w, c)), ``monai`` holds
    ``features`` (NCDHW), ``pooled`` and ``logits``: ``interop.verify.compare_outputs`` diffs them.
    """
    _check_arch(arch)
    torch = require_torch()
    from monai.networks import nets

    if weights is None:
        net = random_monai_resnet(arch, in_channels or 1, num_classes, seed)
        sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    else:
        sd = read_state_dict(weights)
        cfg = monai_model_config(sd, arch)
        if in_channels is not None and in_channels != cfg["in_channels"]:
            raise ValueError(f"in_channels={in_channels} but the weights' conv1 takes {cfg['in_channels']} channels")
        net = getattr(nets, MONAI_ARCHS[arch])(
            spatial_dims=3, n_input_channels=cfg["in_channels"], num_classes=max(cfg["num_classes"], 1),
            conv1_t_stride=CONV1_T_STRIDE, shortcut_type="B", feed_forward=cfg["head"] == "linear",
            bias_downsample=any(k.endswith("downsample.0.bias") for k in sd))
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    model, variables = monai_state_dict_to_variables(sd, arch)
    x = np.random.default_rng(seed).standard_normal(
        (batch_size, model.in_channels, image_size, image_size, image_size)).astype(np.float32)
    with jax.default_matmul_precision("float32"):
        jax_out = jax.jit(lambda v, im: model.apply(v, im, train=False))(
            variables, jnp.asarray(np.transpose(x, (0, 2, 3, 4, 1))))
    return jax.tree_util.tree_map(np.asarray, jax_out), monai_outputs(net, x)
