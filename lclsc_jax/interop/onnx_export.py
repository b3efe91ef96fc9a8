"""A JAX function -> an ONNX graph, primitive by primitive (``lclsc export --format onnx``).

The function is traced once with ``jax.make_jaxpr`` at a fixed input shape; its closed-over arrays
(the model's parameters, BN statistics, GEI class embeddings) become ONNX initializers and every
primitive of the jaxpr one or a few ONNX operators (opset 18). Nested jaxprs (``jit``, custom
derivatives, remat) are inlined. The translation is by primitive, not by layer, so any model built
from the primitives below exports, whatever its architecture; a primitive outside the table is an
error that names it. Convolutions and window pools run in ONNX's channels-first layout between two
``Transpose`` nodes (ONNX Runtime folds them). Shapes are static: the batch size is the one traced.

Supported primitives: see ``_HANDLERS`` (elementwise arithmetic and comparisons, ``dot_general``
as ``Einsum``, ``conv_general_dilated``, ``reduce_window_max``, reductions, ``argmax``,
shape operations, ``pad``/``slice``/``rev``/``concatenate``, ``select_n``, casts).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["OPSET", "UnsupportedPrimitiveError", "jax_to_onnx", "require_onnx"]

OPSET = 18
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class UnsupportedPrimitiveError(NotImplementedError):
    """A primitive of the traced function has no ONNX translation here."""


def require_onnx() -> Any:
    """The ``onnx`` module, or an ImportError saying how to install it."""
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs the optional packages onnx and onnxruntime: "
                          "pip install 'lclsc_jax[onnx]'") from e
    return onnx


class _Graph:
    """The ONNX graph under construction: nodes, initializers, and the jaxpr variable -> tensor name map."""

    def __init__(self, onnx: Any):
        self.onnx = onnx
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.names = (f"t{i}" for i in itertools.count())

    def fresh(self) -> str:
        """A new tensor name."""
        return next(self.names)

    def const(self, value: Any, dtype: Any = None) -> str:
        """An initializer holding ``value``; its name."""
        arr = np.asarray(value, dtype=dtype)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        name = self.fresh()
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> str:
        """Append a node with one output; its name."""
        out = self.fresh()
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


def _onnx_dtype(onnx: Any, dtype: Any) -> int:
    """The ``TensorProto`` element type of a NumPy dtype."""
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _binary(op_type: str) -> Callable:
    def handle(g: _Graph, eqn: Any, x: list[str]) -> str:
        return g.op(op_type, x)
    return handle


def _unary(op_type: str) -> Callable:
    def handle(g: _Graph, eqn: Any, x: list[str]) -> str:
        return g.op(op_type, x[:1])
    return handle


def _shape_of(v: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in v.aval.shape)


def _reshape_to(g: _Graph, x: str, shape: Sequence[int]) -> str:
    return g.op("Reshape", [x, g.const(np.asarray(shape, np.int64))])


def _transpose(g: _Graph, x: str, perm: Sequence[int]) -> str:
    perm = [int(p) for p in perm]
    return x if perm == sorted(perm) else g.op("Transpose", [x], perm=perm)


def _rsqrt(g: _Graph, eqn: Any, x: list[str]) -> str:
    return g.op("Reciprocal", [g.op("Sqrt", x[:1])])


def _square(g: _Graph, eqn: Any, x: list[str]) -> str:
    return g.op("Mul", [x[0], x[0]])


def _integer_pow(g: _Graph, eqn: Any, x: list[str]) -> str:
    dtype = eqn.invars[0].aval.dtype
    return g.op("Pow", [x[0], g.const(np.asarray(eqn.params["y"], dtype))])


def _ne(g: _Graph, eqn: Any, x: list[str]) -> str:
    return g.op("Not", [g.op("Equal", x)])


def _cast(g: _Graph, eqn: Any, x: list[str]) -> str:
    return g.op("Cast", x[:1], to=_onnx_dtype(g.onnx, eqn.params["new_dtype"]))


def _reshape(g: _Graph, eqn: Any, x: list[str]) -> str:
    return _reshape_to(g, x[0], _shape_of(eqn.outvars[0]))


def _identity(g: _Graph, eqn: Any, x: list[str]) -> str:
    return g.op("Identity", x[:1])


def _broadcast_in_dim(g: _Graph, eqn: Any, x: list[str]) -> str:
    shape = eqn.params["shape"]
    dims = eqn.params["broadcast_dimensions"]
    src = _shape_of(eqn.invars[0])
    full = [1] * len(shape)
    for d, n in zip(dims, src):
        full[d] = n
    return g.op("Expand", [_reshape_to(g, x[0], full), g.const(np.asarray(shape, np.int64))])


def _transpose_eqn(g: _Graph, eqn: Any, x: list[str]) -> str:
    return g.op("Transpose", x[:1], perm=[int(p) for p in eqn.params["permutation"]])


def _reduce(op_type: str) -> Callable:
    def handle(g: _Graph, eqn: Any, x: list[str]) -> str:
        axes = g.const(np.asarray(eqn.params["axes"], np.int64))
        return g.op(op_type, [x[0], axes], keepdims=0)
    return handle


def _argmax(g: _Graph, eqn: Any, x: list[str]) -> str:
    (axis,) = eqn.params["axes"]
    out = g.op("ArgMax", x[:1], axis=int(axis), keepdims=0, select_last_index=0)
    return g.op("Cast", [out], to=_onnx_dtype(g.onnx, eqn.params["index_dtype"]))


def _dot_general(g: _Graph, eqn: Any, x: list[str]) -> str:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    nl, nr = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
    letters = iter(_LETTERS)
    lhs = [""] * nl
    rhs = [""] * nr
    for a, b in zip(lb, rb):
        lhs[a] = rhs[b] = next(letters)
    for a, b in zip(lc, rc):
        lhs[a] = rhs[b] = next(letters)
    for i in range(nl):
        lhs[i] = lhs[i] or next(letters)
    for i in range(nr):
        rhs[i] = rhs[i] or next(letters)
    out = [lhs[a] for a in lb] + [lhs[i] for i in range(nl) if i not in lb and i not in lc]
    out += [rhs[i] for i in range(nr) if i not in rb and i not in rc]
    y = g.op("Einsum", x[:2], equation=f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}")
    want = eqn.outvars[0].aval.dtype
    return y if want == eqn.invars[0].aval.dtype else g.op("Cast", [y], to=_onnx_dtype(g.onnx, want))


def _conv(g: _Graph, eqn: Any, x: list[str]) -> str:
    p = eqn.params
    if any(d != 1 for d in p["lhs_dilation"]) or p.get("batch_group_count", 1) != 1:
        raise UnsupportedPrimitiveError("conv_general_dilated with lhs dilation or batch groups has no ONNX Conv")
    dn = p["dimension_numbers"]
    lhs = _transpose(g, x[0], dn.lhs_spec)  # -> (N, C, *S)
    rhs = _transpose(g, x[1], dn.rhs_spec)  # -> (O, I, *K)
    pads = [int(lo) for lo, _ in p["padding"]] + [int(hi) for _, hi in p["padding"]]
    y = g.op("Conv", [lhs, rhs], strides=[int(s) for s in p["window_strides"]], pads=pads,
             dilations=[int(d) for d in p["rhs_dilation"]], group=int(p["feature_group_count"]))
    return _transpose(g, y, np.argsort(dn.out_spec))


def _pool(op_type: str) -> Callable:
    """``reduce_window_max`` -> ``MaxPool``; ``reduce_window_sum`` -> ``AveragePool`` (padding counted) x window size."""

    def emit(g: _Graph, eqn: Any, x: list[str]) -> str:
        p = eqn.params
        win, strides, pad = p["window_dimensions"], p["window_strides"], p["padding"]
        if any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
            raise UnsupportedPrimitiveError(f"{eqn.primitive.name} with dilations has no ONNX {op_type}")
        spatial = [i for i in range(len(win)) if win[i] != 1 or strides[i] != 1 or pad[i] != (0, 0)]
        rest = [i for i in range(len(win)) if i not in spatial]
        if len(rest) != 2:
            raise UnsupportedPrimitiveError(f"{eqn.primitive.name} over axes {spatial} of a rank-{len(win)} array")
        perm = rest + spatial
        attrs = dict(kernel_shape=[int(win[i]) for i in spatial], strides=[int(strides[i]) for i in spatial],
                     pads=[int(pad[i][0]) for i in spatial] + [int(pad[i][1]) for i in spatial])
        if op_type == "AveragePool":
            attrs["count_include_pad"] = 1
        y = g.op(op_type, [_transpose(g, x[0], perm)], **attrs)
        if op_type == "AveragePool":  # the window's sum = its mean (zeros counted) x its size
            y = g.op("Mul", [y, g.const(np.prod([int(win[i]) for i in spatial]), eqn.invars[0].aval.dtype)])
        return _transpose(g, y, np.argsort(perm))

    return emit


def _erfc(g: _Graph, eqn: Any, x: list[str]) -> str:
    return g.op("Sub", [g.const(1.0, eqn.invars[0].aval.dtype), g.op("Erf", [x[0]])])


def _pad(g: _Graph, eqn: Any, x: list[str]) -> str:
    cfg = eqn.params["padding_config"]
    if any(interior for _, _, interior in cfg):
        raise UnsupportedPrimitiveError("pad with interior padding")
    pads = [int(lo) for lo, _, _ in cfg] + [int(hi) for _, hi, _ in cfg]
    return g.op("Pad", [x[0], g.const(np.asarray(pads, np.int64)), x[1]], mode="constant")


def _slice(g: _Graph, eqn: Any, x: list[str]) -> str:
    p = eqn.params
    n = len(p["start_indices"])
    strides = p["strides"] or (1,) * n
    return g.op("Slice", [x[0], g.const(np.asarray(p["start_indices"], np.int64)),
                          g.const(np.asarray(p["limit_indices"], np.int64)), g.const(np.arange(n, dtype=np.int64)),
                          g.const(np.asarray(strides, np.int64))])


def _rev(g: _Graph, eqn: Any, x: list[str]) -> str:
    dims = [int(d) for d in eqn.params["dimensions"]]
    big = np.iinfo(np.int64).max
    return g.op("Slice", [x[0], g.const(np.full(len(dims), -1, np.int64)), g.const(np.full(len(dims), -big, np.int64)),
                          g.const(np.asarray(dims, np.int64)), g.const(np.full(len(dims), -1, np.int64))])


def _concatenate(g: _Graph, eqn: Any, x: list[str]) -> str:
    return g.op("Concat", x, axis=int(eqn.params["dimension"]))


def _select_n(g: _Graph, eqn: Any, x: list[str]) -> str:
    if len(x) != 3 or eqn.invars[0].aval.dtype != np.bool_:
        raise UnsupportedPrimitiveError("select_n with an integer selector or more than two cases")
    return g.op("Where", [x[0], x[2], x[1]])


def _clamp(g: _Graph, eqn: Any, x: list[str]) -> str:
    lo, v, hi = x
    return g.op("Max", [g.op("Min", [v, hi]), lo])


def _iota(g: _Graph, eqn: Any, x: list[str]) -> str:
    p = eqn.params
    shape = tuple(int(d) for d in p["shape"])
    r = np.arange(shape[p["dimension"]], dtype=p["dtype"])
    view = [1] * len(shape)
    view[p["dimension"]] = shape[p["dimension"]]
    return g.const(np.broadcast_to(r.reshape(view), shape))


def _split(g: _Graph, eqn: Any, x: list[str]) -> list[str]:
    outs = [g.fresh() for _ in eqn.outvars]
    sizes = g.const(np.asarray(eqn.params["sizes"], np.int64))
    g.nodes.append(g.onnx.helper.make_node("Split", [x[0], sizes], outs, axis=int(eqn.params["axis"])))
    return outs


_HANDLERS: dict[str, Callable] = {
    "add": _binary("Add"), "add_any": _binary("Add"), "sub": _binary("Sub"), "mul": _binary("Mul"),
    "div": _binary("Div"), "max": _binary("Max"), "min": _binary("Min"), "pow": _binary("Pow"),
    "eq": _binary("Equal"), "ne": _ne, "gt": _binary("Greater"), "ge": _binary("GreaterOrEqual"),
    "lt": _binary("Less"), "le": _binary("LessOrEqual"), "and": _binary("And"), "or": _binary("Or"),
    "not": _unary("Not"), "neg": _unary("Neg"), "exp": _unary("Exp"), "log": _unary("Log"), "sqrt": _unary("Sqrt"),
    "rsqrt": _rsqrt, "abs": _unary("Abs"), "tanh": _unary("Tanh"), "logistic": _unary("Sigmoid"), "erf": _unary("Erf"),
    "sign": _unary("Sign"), "floor": _unary("Floor"), "ceil": _unary("Ceil"), "square": _square,
    "integer_pow": _integer_pow, "convert_element_type": _cast, "reshape": _reshape, "squeeze": _reshape,
    "expand_dims": _reshape, "broadcast_in_dim": _broadcast_in_dim, "transpose": _transpose_eqn,
    "reduce_sum": _reduce("ReduceSum"), "reduce_max": _reduce("ReduceMax"), "reduce_min": _reduce("ReduceMin"),
    "argmax": _argmax, "dot_general": _dot_general, "conv_general_dilated": _conv,
    "reduce_window_max": _pool("MaxPool"), "reduce_window_sum": _pool("AveragePool"), "erfc": _erfc, "pad": _pad, "slice": _slice, "rev": _rev,
    "concatenate": _concatenate, "select_n": _select_n, "clamp": _clamp, "iota": _iota, "split": _split,
    "copy": _identity, "copy_p": _identity, "stop_gradient": _identity, "reduce_precision": _identity,
    "optimization_barrier": None,  # handled in _emit: several operands pass through
}
#: Primitives whose inner jaxpr is inlined (the parameter that holds it).
_INLINE = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "remat": "jaxpr", "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr",
           "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}


def _emit(g: _Graph, jaxpr: Any, consts: Sequence[Any], inputs: Sequence[str]) -> list[str]:
    """Translate ``jaxpr`` with its ``consts`` and input tensor names; the output tensor names."""
    env: dict[Any, str] = {}

    def read(v: Any) -> str:
        if isinstance(v, jax.extend.core.Literal):
            return g.const(np.asarray(v.val, dtype=v.aval.dtype))
        return env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = g.const(np.asarray(c))
    for v, name in zip(jaxpr.invars, inputs):
        env[v] = name
    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        x = [read(v) for v in eqn.invars]
        if prim in _INLINE:
            inner = eqn.params[_INLINE[prim]]
            inner_jaxpr, inner_consts = (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, ())
            outs = _emit(g, inner_jaxpr, inner_consts, x[:len(inner_jaxpr.invars)])
        elif prim == "optimization_barrier":
            outs = x
        elif prim in _HANDLERS:
            res = _HANDLERS[prim](g, eqn, x)
            outs = res if isinstance(res, list) else [res]
        else:
            raise UnsupportedPrimitiveError(f"no ONNX translation for the JAX primitive {prim!r} "
                                            f"(params {sorted(eqn.params)})")
        for v, name in zip(eqn.outvars, outs):
            env[v] = name
    return [read(v) for v in jaxpr.outvars]


def jax_to_onnx(fn: Callable[[jax.Array], Any], example: np.ndarray, path: str | Path | None = None, *,
                input_name: str = "images", output_names: Sequence[str] | None = None,
                doc: str = "") -> Any:
    """The ONNX model (``onnx.ModelProto``) of ``fn(x)`` traced at ``example``'s shape and dtype.

    ``fn`` returns an array, a tuple of arrays or a dict of arrays (its keys, sorted, name the
    outputs unless ``output_names`` is given). With ``path`` the model is also written there.
    """
    onnx = require_onnx()
    example = np.asarray(example)
    closed = jax.make_jaxpr(fn)(example)
    out_tree = jax.eval_shape(fn, example)
    leaves, treedef = jax.tree_util.tree_flatten(out_tree)
    if output_names is None:
        if isinstance(out_tree, dict):
            output_names = sorted(out_tree)
        else:
            output_names = [f"output_{i}" for i in range(len(leaves))] if len(leaves) > 1 else ["output"]
    if len(output_names) != len(leaves):
        raise ValueError(f"{len(output_names)} output names for {len(leaves)} outputs")
    g = _Graph(onnx)
    outs = _emit(g, closed.jaxpr, closed.consts, [input_name])
    for name, src in zip(output_names, outs):
        g.nodes.append(onnx.helper.make_node("Identity", [src], [name]))
    graph = onnx.helper.make_graph(
        g.nodes, "lclsc_jax", [onnx.helper.make_tensor_value_info(input_name, _onnx_dtype(onnx, example.dtype),
                                                                  list(example.shape))],
        [onnx.helper.make_tensor_value_info(n, _onnx_dtype(onnx, leaf.dtype), list(leaf.shape))
         for n, leaf in zip(output_names, leaves)],
        initializer=g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="lclsc_jax", doc_string=doc)
    model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime releases of the last year
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, str(path))
    return model
