"""PyTorch (torchvision-named) state_dicts <-> this project's Flax variables.

Naming (Flax path -> torch key):
  params/conv1/kernel (H, W, I, O)           <-> conv1.weight (O, I, H, W)
  params/bn1/{scale,bias}                     <-> bn1.{weight,bias}
  batch_stats/bn1/{mean,var}                  <-> bn1.{running_mean,running_var}
  params/layer2_0/downsample_conv/kernel      <-> layer2.0.downsample.0.weight
  params/layer2_0/downsample_bn/...           <-> layer2.0.downsample.1.*
  params/fc/kernel (c, K), bias               <-> fc.weight (K, c), fc.bias
  params/head/hidden/*, params/head/proj/*    <-> head.0.*, head.2.*  (Sequential(Linear, ReLU, Linear))
A file without ``head.*`` (torchvision/timm: only ``fc``) gives a model with ``projection=False``.
Registry backbones (``models.backbones``: EfficientNetV2, InceptionV3, ViT, ConvNeXt, DenseNet,
LeNet-5, AlexNet) hold their variables under ``backbone`` named exactly as timm's modules, so
``params/backbone/blocks/0/1/conv_pw/kernel`` <-> ``blocks.0.1.conv_pw.weight``; their ``fc`` is
the spec's ``classifier_key`` (``classifier``, ``head``, ``head.fc``, ...) and the projection head
its ``projection_key`` (``head``, or ``proj_head`` where timm's classifier is ``head``).
``*.num_batches_tracked`` is accepted and ignored on import and exported as an int64 scalar 0.
Reading ``.pt``/``.pth`` never executes pickled code (``torch.load(weights_only=True)``);
``.safetensors`` needs no torch.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from lclsc_jax import models
from lclsc_jax.interop.torch_reference import require_torch

log = logging.getLogger(__name__)

PathLike = str | Path
StateDict = dict[str, np.ndarray]
TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
OPTIONAL_GROUPS = ("fc", "head")  # loaded if present in the file, as a whole
NBT = "num_batches_tracked"

_MODULE_RENAMES = {
    "downsample_conv": "downsample.0",
    "downsample_bn": "downsample.1",
    "hidden": "0",
    "proj": "2",
}
_LEAF_RENAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


class UnsafeCheckpointError(ValueError):
    """The file is not a plain tensor state_dict (it would need to execute pickled code)."""


class WeightsMismatchError(ValueError):
    """The state_dict does not match the architecture (missing/unexpected/mis-shaped keys)."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What an import did: torch keys loaded, missing, unexpected, mis-shaped, ignored, skipped."""

    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()  # key, file, expected
    ignored: tuple[str, ...] = ()  # num_batches_tracked
    skipped: tuple[str, ...] = ()  # deliberately not loaded (e.g. heads for init_backbone_from)

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unexpected or mis-shaped."""
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self) -> str:
        """Human-readable summary listing every problem key by name."""
        lines = [f"loaded {len(self.loaded)} tensors, ignored {len(self.ignored)} num_batches_tracked"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} (not part of the target): " + ", ".join(self.skipped))
        if self.missing:
            lines.append(f"missing {len(self.missing)}: " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"unexpected {len(self.unexpected)}: " + ", ".join(self.unexpected))
        if self.mismatched:
            lines.append(
                f"mis-shaped {len(self.mismatched)}: "
                + ", ".join(f"{k} file {tuple(a)} expected {tuple(b)}" for k, a, b in self.mismatched)
            )
        return "\n".join(lines)


# ---------------------------------------------------------------- naming + layout


def _backbone(arch: str | None) -> models.BackboneSpec | None:
    """The registry spec of ``arch`` (None for tiny, the ResNets, or no arch)."""
    return models.BACKBONES.get(arch) if arch else None


def head_keys(arch: str | None) -> tuple[str, str]:
    """Torch prefixes of (our linear classifier ``fc``, our projection head ``head``) for ``arch``."""
    spec = _backbone(arch)
    return (spec.classifier_key, spec.projection_key) if spec else ("fc", "head")


def _leaf_name(collection: str, leaf: str, path: tuple[str, ...]) -> str:
    try:
        return _LEAF_RENAMES[(collection, leaf)]
    except KeyError:
        if collection == "params" and path[0] == "backbone":  # cls_token, pos_embed, gamma: timm's own names
            return leaf
        raise ValueError(f"no torch name for Flax variable {collection}/{'/'.join(path)}") from None


def torch_key(collection: str, path: tuple[str, ...], arch: str | None = None) -> str:
    """Torch key of a Flax leaf, e.g. ('params', ('layer1_0', 'conv1', 'kernel')) -> 'layer1.0.conv1.weight'.

    Under ``backbone`` (registry archs) the path is timm's module path; ``fc`` / ``head`` take the
    prefixes of :func:`head_keys` (``arch`` names them; without it, ``fc`` / ``head``).
    """
    *mods, leaf = path
    if mods and mods[0] == "backbone":
        return ".".join([*mods[1:], _leaf_name(collection, leaf, path)])
    parts = []
    if mods and mods[0] in ("fc", "head"):
        parts.append(dict(zip(("fc", "head"), head_keys(arch)))[mods[0]])
        mods = mods[1:]
    for m in mods:
        if m in _MODULE_RENAMES:
            parts.append(_MODULE_RENAMES[m])
        elif m.startswith("layer") and "_" in m:
            parts.append(m.replace("_", ".", 1))  # layer3_2 -> layer3.2
        else:
            parts.append(m)
    parts.append(_leaf_name(collection, leaf, path))
    return ".".join(parts)


def flax_to_torch_layout(x: np.ndarray) -> np.ndarray:
    """Conv HWIO -> OIHW (3D: DHWIO -> OIDHW), Dense (in, out) -> (out, in); vectors unchanged."""
    if x.ndim == 4:
        return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))
    if x.ndim == 5:
        return np.ascontiguousarray(np.transpose(x, (4, 3, 0, 1, 2)))
    if x.ndim == 2:
        return np.ascontiguousarray(x.T)
    return np.asarray(x)


def torch_to_flax_layout(x: np.ndarray) -> np.ndarray:
    """Conv OIHW -> HWIO (3D: OIDHW -> DHWIO), Linear (out, in) -> (in, out); vectors unchanged."""
    if x.ndim == 4:
        return np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0)))
    if x.ndim == 5:
        return np.ascontiguousarray(np.transpose(x, (2, 3, 4, 1, 0)))
    if x.ndim == 2:
        return np.ascontiguousarray(x.T)
    return np.asarray(x)


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a Flax leaf once in torch layout."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 5:
        return (shape[4], shape[3], shape[0], shape[1], shape[2])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _flatten(variables: Mapping[str, Any]) -> dict[tuple[str, tuple[str, ...]], Any]:
    """{(collection, path): leaf} for the 'params' and 'batch_stats' collections."""
    flat = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables.get(collection, {})))[0]:
            flat[(collection, tuple(str(k.key) for k in path))] = leaf
    return flat


def _unflatten(flat: Mapping[tuple[str, tuple[str, ...]], Any]) -> dict[str, Any]:
    """Inverse of :func:`_flatten` into nested plain dicts."""
    out: dict[str, Any] = {}
    for (collection, path), leaf in flat.items():
        node = out.setdefault(collection, {})
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


# ---------------------------------------------------------------- reading files


def _to_numpy(value: Any, key: str) -> np.ndarray:
    """A torch tensor or array-like -> numpy (bfloat16 upcast to float32, losslessly)."""
    if hasattr(value, "detach"):  # torch.Tensor
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(value)
    raise ValueError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
    """Find the tensor dict in common checkpoint containers ({'state_dict': ...}, DataParallel)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _pickled_global(message: str) -> str:
    """The Python object a refused pickle names (``GLOBAL x.y`` in PyTorch's message), or ''."""
    m = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    return f" (it refers to the Python object {m.group(1)})" if m else ""


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: refuses (without running it) any pickled code."""
    torch = require_torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is not a plain tensor state_dict{_pickled_global(str(e))}, and "
            "loading it would execute pickled code. Convert it to a plain state_dict where its model is "
            "defined, from a source you trust: torch.save(model.state_dict(), 'weights.pth'), or "
            "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'); then pass that file."
        ) from None


def read_state_dict(source: PathLike | Mapping[str, Any]) -> StateDict:
    """A ``.safetensors`` / ``.pt`` / ``.pth`` file or an in-memory state_dict -> {key: np.ndarray}."""
    if isinstance(source, Mapping):
        obj: Any = source
        name = "state_dict"
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == SAFETENSORS_SUFFIX:
            obj = load_file(str(path))
        elif suffix in TORCH_SUFFIXES:
            obj = _torch_load(path)
        else:
            raise ValueError(
                f"{path}: unsupported weights format {suffix!r}; expected one of "
                f"{(SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)}"
            )
    obj = _unwrap(obj, name)
    return {str(k): _to_numpy(v, str(k)) for k, v in obj.items()}


# ---------------------------------------------------------------- config + templates


def _first_conv_key(arch: str) -> str:
    spec = _backbone(arch)
    if spec:
        return spec.first_key
    return "stem_conv.weight" if models.arch_spec(arch).kind == "tiny" else "conv1.weight"


def _in_group(key: str, prefix: str) -> bool:
    """Whether torch ``key`` belongs to the module ``prefix`` (``head.fc.weight`` in ``head.fc``)."""
    return key.startswith(prefix + ".")


def model_config_from_state_dict(state_dict: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """``models.create`` kwargs implied by a state_dict: exactly the model its weights fill.

    ``in_channels`` from the first conv; ``head="linear"`` and ``num_classes`` if ``fc.*`` is
    present (else ``head="gei"``, ``num_classes=1``); ``projection=True`` with ``embed_dim`` /
    ``head_hidden`` if ``head.*`` is present, else ``projection=False`` (a plain
    torchvision/timm classifier, or a bare backbone: the pooled features are the embedding).
    """
    models.arch_spec(arch)
    first = _first_conv_key(arch)
    if first not in state_dict:
        raise WeightsMismatchError(
            f"state_dict has no {first!r}: is it a torchvision-named {arch} state_dict? "
            f"first keys: {list(state_dict)[:5]}"
        )
    fc, head = head_keys(arch)
    cfg: dict[str, Any] = {"in_channels": int(np.shape(state_dict[first])[1]), "head": "gei", "num_classes": 1}
    if f"{fc}.weight" in state_dict:
        cfg["head"] = "linear"
        cfg["num_classes"] = int(np.shape(state_dict[f"{fc}.weight"])[0])
    # Any head.* key means a projection head; an incomplete one is then reported key by key.
    cfg["projection"] = any(_in_group(str(k), head) for k in state_dict)
    if f"{head}.2.weight" in state_dict and f"{head}.0.weight" in state_dict:
        cfg["embed_dim"] = int(np.shape(state_dict[f"{head}.2.weight"])[0])
        cfg["head_hidden"] = int(np.shape(state_dict[f"{head}.0.weight"])[0])
    elif f"{head}.2.weight" in state_dict and not any(_in_group(str(k), f"{head}.0") for k in state_dict):
        cfg["embed_dim"] = int(np.shape(state_dict[f"{head}.2.weight"])[0])  # a one-layer (linear) head
        cfg["projection_layers"] = 1
    return cfg


def abstract_variables(model: models.Model) -> dict[str, Any]:
    """Shapes/dtypes of ``model``'s variables without computing them (jax.eval_shape)."""
    return models.abstract_variables(model)


# ---------------------------------------------------------------- import


def _expected(template: Mapping[str, Any], arch: str | None = None) -> dict[str, tuple[tuple[str, tuple[str, ...]], Any]]:
    """{torch_key: ((collection, path), template_leaf)} for every leaf of ``template``."""
    return {torch_key(c, p, arch): ((c, p), leaf) for (c, p), leaf in _flatten(template).items()}


def _group(key: str, prefixes: tuple[str, ...]) -> str | None:
    """The first of ``prefixes`` whose module holds torch ``key``, or None."""
    return next((p for p in prefixes if _in_group(key, p)), None)


def state_dict_to_variables(
    state_dict: Mapping[str, np.ndarray],
    template: Mapping[str, Any],
    *,
    strict: bool = True,
    optional_groups: tuple[str, ...] | None = None,
    skip_groups: tuple[str, ...] = (),
    arch: str | None = None,
) -> tuple[dict[str, Any], LoadReport]:
    """Map a torch-named state_dict onto ``template``'s Flax variables; returns (variables, report).

    Every problem is collected before anything is converted; with ``strict`` any missing,
    unexpected or mis-shaped key raises :class:`WeightsMismatchError` listing them all. A group in
    ``optional_groups`` (torch module prefixes; default :func:`head_keys` of ``arch``: ``fc``/``head``)
    is required only if the file has any of its keys. Keys of ``skip_groups`` are not loaded and
    listed as skipped, as are keys of the arch's ``droppable`` modules (InceptionV3's ``AuxLogits``)
    when the template has none. ``arch`` names registry backbones' keys (:func:`torch_key`).
    Leaves not loaded keep the template's value if it is concrete, otherwise they are left out.
    """
    expected = _expected(template, arch)
    optional_groups = head_keys(arch) if optional_groups is None else tuple(optional_groups)
    spec = _backbone(arch)
    droppable = tuple(p for p in (spec.droppable if spec else ()) if not any(_in_group(k, p) for k in expected))
    present_groups = {g for k in state_dict if (g := _group(k, optional_groups))}
    skipped = tuple(sorted(k for k in state_dict if _group(k, tuple(skip_groups) + droppable)))
    ignored = tuple(
        sorted(k for k in state_dict if k.endswith("." + NBT) and k not in skipped)
    )
    candidates = {k: v for k, v in state_dict.items() if k not in skipped and k not in ignored}

    def needed(key: str) -> bool:
        if _group(key, tuple(skip_groups)):
            return False
        group = _group(key, optional_groups)
        return group is None or group in present_groups

    missing = tuple(sorted(k for k in expected if needed(k) and k not in candidates))
    unexpected = tuple(sorted(k for k in candidates if k not in expected))
    mismatched = []
    for k, v in candidates.items():
        if k in expected:
            want = _torch_shape(tuple(expected[k][1].shape))
            if tuple(np.shape(v)) != want:
                mismatched.append((k, tuple(np.shape(v)), want))
    mismatched = tuple(sorted(mismatched))
    bad = {k for k, _, _ in mismatched}
    loaded = tuple(sorted(k for k in candidates if k in expected and k not in bad))
    report = LoadReport(loaded, missing, unexpected, mismatched, ignored, skipped)
    if strict and not report.ok:
        raise WeightsMismatchError("state_dict does not match the model:\n" + report.format())

    flat = {}
    for key, ((collection, path), leaf) in expected.items():
        if key in loaded:
            arr = torch_to_flax_layout(np.asarray(state_dict[key]))
            flat[(collection, path)] = jnp.asarray(arr, dtype=leaf.dtype)
        elif isinstance(leaf, (jax.Array, np.ndarray)):
            flat[(collection, path)] = leaf
    return _unflatten(flat), report


def load_torch_weights(
    source: PathLike | Mapping[str, Any], arch: str, *, strict: bool = True
) -> dict[str, Any]:
    """Import a torchvision-named state_dict (file or dict) as Flax variables for ``arch``.

    The matching model is ``models.create(arch, **model_config_from_state_dict(sd, arch))``
    (or use :func:`load_torch_model`); ``fc``/``head`` are imported when the file has them. With
    ``strict=False`` problem keys are skipped (and listed in a warning) instead of raising.
    """
    sd = read_state_dict(source)
    cfg = model_config_from_state_dict(sd, arch)
    template = abstract_variables(models.create(arch, **cfg))
    variables, report = state_dict_to_variables(sd, template, strict=strict, arch=arch)
    if not report.ok:
        warnings.warn(f"load_torch_weights({arch}, strict=False) skipped keys:\n{report.format()}", stacklevel=2)
    log.info("load_torch_weights(%s): %s", arch, report.format())
    return variables


def load_torch_model(
    source: PathLike | Mapping[str, Any], arch: str, **model_kwargs: Any
) -> tuple[models.Model, dict[str, Any]]:
    """``(model, variables)`` for a torchvision/timm-named state_dict, ready for ``model.apply``.

    The model is ``models.create(arch, **model_config_from_state_dict(sd, arch), **model_kwargs)``
    (``model_kwargs``: e.g. ``dtype``, ``remat``); a file with only ``fc`` gives a plain classifier
    (``projection=False``: ``out["logits"] (B, K)``, ``out["embedding"] = out["pooled"] (B, c)``).
    Loading is strict (:class:`WeightsMismatchError` names every bad torch key) and the result is
    checked with ``models.check_variables`` (:class:`models.VariablesMismatchError` if a
    ``model_kwargs`` override contradicts the file).
    """
    sd = read_state_dict(source)
    cfg = {**model_config_from_state_dict(sd, arch), **model_kwargs}
    model = models.create(arch, **cfg)
    variables, _ = state_dict_to_variables(sd, abstract_variables(model), strict=True, arch=arch)
    models.check_variables(model, variables)
    log.info("load_torch_model(%s): %s", arch, cfg)
    return model, variables


def _split_backbone(variables: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(backbone variables, head variables) where heads are the top-level ``fc``/``head``."""
    backbone: dict[str, Any] = {}
    heads: dict[str, Any] = {}
    for collection, tree in variables.items():
        for name, sub in dict(tree).items():
            target = heads if name in OPTIONAL_GROUPS else backbone
            target.setdefault(collection, {})[name] = sub
    return backbone, heads


def init_backbone_from(
    variables: Mapping[str, Any],
    source: PathLike | Mapping[str, Any],
    arch: str,
    *,
    strict: bool = True,
    return_report: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], LoadReport]:
    """Replace the backbone params/batch_stats of ``variables`` by imported ones; ``fc``/``head`` kept.

    The file's ``fc.*`` and ``head.*`` are skipped (the heads stay as initialised). With
    ``strict=False`` mis-shaped backbone tensors (e.g. a 3-channel ``conv1`` into a grayscale
    model) keep their initial values. The report is logged, or returned with ``return_report``.
    """
    models.arch_spec(arch)
    sd = read_state_dict(source)
    backbone, heads = _split_backbone(variables)
    loaded, report = state_dict_to_variables(
        sd, backbone, strict=strict, optional_groups=(), skip_groups=head_keys(arch), arch=arch
    )
    out = {c: dict(loaded.get(c, {})) for c in variables}
    for c, tree in heads.items():
        out[c].update(tree)
    for c in variables:  # keep collections other than params/batch_stats untouched
        if c not in ("params", "batch_stats"):
            out[c] = variables[c]
    log.info("init_backbone_from(%s): %s", arch, report.format())
    if not report.ok:
        warnings.warn(f"init_backbone_from({arch}, strict=False) kept initial values for:\n{report.format()}", stacklevel=2)
    return (out, report) if return_report else out


# ---------------------------------------------------------------- export


def variables_to_state_dict(variables: Mapping[str, Any], arch: str | None = None) -> StateDict:
    """Flax variables -> torchvision/timm-named numpy state_dict (plus int64 ``num_batches_tracked`` = 0).

    ``arch`` names the heads of registry backbones (:func:`head_keys`); it is required for them.
    """
    if arch is None and "backbone" in dict(variables.get("params", {})):
        raise ValueError("variables of a registry backbone: pass arch= so fc/head get timm's names")
    sd: StateDict = {}
    for (collection, path), leaf in _flatten(variables).items():
        arr = np.asarray(leaf)
        if arr.dtype not in (np.float16, np.float32, np.float64):
            arr = arr.astype(np.float32)
        key = torch_key(collection, path, arch)
        sd[key] = flax_to_torch_layout(arr)
        if collection == "batch_stats" and path[-1] == "mean":
            sd[key.removesuffix("running_mean") + NBT] = np.zeros((), np.int64)
    return dict(sorted(sd.items()))


def export_torch_weights(variables: Mapping[str, Any], arch: str, path: PathLike) -> Path:
    """Write ``variables`` as a torchvision-named ``.safetensors`` file; returns its path.

    The result is checked against ``arch`` first, so a wrong ``arch`` fails before writing.
    """
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ValueError(f"export writes .safetensors only, got {path.name!r}")
    sd = variables_to_state_dict(variables, arch)
    cfg = model_config_from_state_dict(sd, arch)
    state_dict_to_variables(sd, abstract_variables(models.create(arch, **cfg)), strict=True, arch=arch)

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "arch": arch, "producer": "lclsc_jax"})
    return path
