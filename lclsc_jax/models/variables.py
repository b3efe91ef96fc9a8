"""Checking a variables tree against a model before it is applied.

``model.apply`` with variables built for another configuration fails deep inside Flax
(``ScopeParamNotFoundError ... "/head/hidden"``) or, for a wrong shape, with an obscure
broadcasting error. :func:`check_variables` compares the tree paths and shapes with the model's
own (``jax.eval_shape(model.init, ...)``, nothing computed) and raises one
:class:`VariablesMismatchError` naming every missing, unexpected and mis-shaped leaf in Flax
path form (``params/head/hidden/kernel``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MAX_LISTED = 25  # per category in the error message; the exception keeps every name


class VariablesMismatchError(ValueError):
    """Variables that do not fit a model; ``missing``, ``unexpected``, ``mismatched`` list them all.

    ``mismatched`` holds ``(path, given shape, expected shape)`` triples.
    """

    def __init__(
        self,
        message: str,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ) -> None:
        super().__init__(message)
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mismatched = tuple(mismatched)


def _key_name(k: Any) -> str:
    """One path entry of ``tree_flatten_with_path`` as text (dict key, attribute or index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def variable_shapes(variables: Any) -> dict[str, tuple[int, ...]]:
    """``{"collection/module/.../leaf": shape}`` of every leaf of a variables tree (arrays, tracers
    or ``ShapeDtypeStruct``), e.g. ``{"params/fc/kernel": (512, 1000), ...}``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(variables)
    return {
        "/".join(_key_name(k) for k in path): tuple(int(d) for d in getattr(leaf, "shape", np.shape(leaf)))
        for path, leaf in flat
    }


def _default_input_shape(model: Any) -> tuple[int, ...]:
    """(1, S, S, C) with S = 32, or the registry backbone's minimum image size if larger; 3D archs (1, S, S, S, C)."""
    from lclsc_jax.models.backbones import REGISTRY

    spec = REGISTRY.get(getattr(model, "arch", None))
    size = max(32, spec.min_image_size) if spec else 32
    return (1, *(size,) * int(getattr(model, "spatial_ndim", 2)), int(getattr(model, "in_channels", 3)))


@functools.lru_cache(maxsize=64)
def _abstract_cached(model: Any, input_shape: tuple[int, ...]) -> Any:
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    return jax.eval_shape(lambda im: model.init(jax.random.key(0), im, train=False), x)


def abstract_variables(model: Any, input_shape: Sequence[int] | None = None) -> Any:
    """Shapes and dtypes (``jax.ShapeDtypeStruct`` leaves) of ``model.init``'s variables, computed
    with ``jax.eval_shape`` (no FLOPs) for an input of ``input_shape`` ``(B, H, W, C)`` (default
    ``(1, 32, 32, model.in_channels)``; the variables of these convnets do not depend on H, W).
    Cached per (model, input_shape) for hashable models."""
    shape = tuple(int(v) for v in (input_shape or _default_input_shape(model)))
    try:
        hash(model)
    except TypeError:  # unhashable model: compute without the cache
        return _abstract_cached.__wrapped__(model, shape)
    return _abstract_cached(model, shape)


def _describe(model: Any) -> str:
    fields = ("arch", "num_classes", "head_type", "projection", "embed_dim", "head_hidden", "in_channels")
    parts = [f"{f}={getattr(model, f)!r}" for f in fields if hasattr(model, f)]
    return f"{type(model).__name__}({', '.join(parts)})"


def _listing(title: str, items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    more = f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return f"  {title} {len(items)}: {shown}{more}"


def _hints(given: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Likely causes of the common mismatches, as advice lines."""
    top = {p.split("/", 1)[0] for p in given}
    if given and not top & {"params", "batch_stats"}:
        return ["variables must be model.init's structure {'params': ..., 'batch_stats': ...}, "
                f"got top-level keys {sorted(top)[:5]}"]

    def has(tree: Mapping[str, Any], group: str) -> bool:
        return any(p.startswith(f"params/{group}/") for p in tree)

    hints = []
    if has(expected, "head") and not has(given, "head"):
        hints.append("the variables have no projection head (e.g. torchvision/timm weights with only fc): "
                     "build the model with projection=False (a plain classifier); for imported weights use "
                     "models.create(arch, **interop.model_config_from_state_dict(sd, arch)) or "
                     "interop.load_torch_model")
    if has(given, "head") and not has(expected, "head"):
        hints.append("the variables have a projection head: build the model with projection=True "
                     "(and their embed_dim / head_hidden)")
    if has(expected, "fc") and not has(given, "fc"):
        hints.append("the variables have no linear classifier fc: build the model with head='gei'")
    if has(given, "fc") and not has(expected, "fc"):
        hints.append("the variables have a linear classifier fc: build the model with head='linear' "
                     "and their num_classes")
    return hints


def check_variables(model: Any, variables: Any, input_shape: Sequence[int] | None = None) -> None:
    """Raise :class:`VariablesMismatchError` unless ``variables`` have exactly ``model``'s tree.

    Compares every leaf path (``params/layer1_0/conv1/kernel``, ``batch_stats/bn1/mean``, ...)
    and shape with ``abstract_variables(model, input_shape)``; dtypes are not compared. The
    message names all missing, unexpected and mis-shaped leaves (given vs expected shape).
    ``model`` is any Linen module whose ``init(rng, x (B, H, W, C), train=False)`` works;
    ``input_shape`` defaults to ``(1, 32, 32, model.in_channels)``. Leaves may be tracers.
    """
    expected = variable_shapes(abstract_variables(model, input_shape))
    given = variable_shapes(variables)
    missing = sorted(p for p in expected if p not in given)
    unexpected = sorted(p for p in given if p not in expected)
    mismatched = sorted((p, given[p], expected[p]) for p in expected if p in given and given[p] != expected[p])
    if not (missing or unexpected or mismatched):
        return
    lines = [f"variables do not match the model {_describe(model)}:"]
    if missing:
        lines.append(_listing("missing", missing))
    if unexpected:
        lines.append(_listing("unexpected", unexpected))
    if mismatched:
        lines.append(_listing("mis-shaped", [f"{p} (given {g}, expected {e})" for p, g, e in mismatched]))
    lines += [f"  hint: {h}" for h in _hints(given, expected)]
    raise VariablesMismatchError("\n".join(lines), missing, unexpected, mismatched)
