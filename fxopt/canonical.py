"""Canonicalization: rewrite every known spelling of an op into its canonical form (see fxopt.ops).

The table below is data: each entry maps one spelling (a module type, a torch function, a Tensor
method name or an aten overload) to a function that returns the canonical op and its keyword
arguments, or None to leave the node alone (e.g. a BatchNorm in a training configuration that the
functional form cannot express). Unknown nodes are left as they are.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from . import ops
from .capture import has_forward_hooks
from .interpret import attribute, eliminate_dead_code, install_attributes, release_erased_nodes
from .metadata import reads_only_metadata, resolve_static_metadata
from .ops import Op

aten = torch.ops.aten
Canonical = tuple[Op, dict[str, Any]]


def canonicalize(gm: GraphModule, example_inputs: tuple | None = None) -> GraphModule:
    """Rewrite ``gm`` in place into canonical form and return it.

    With ``example_inputs``, what the capture fixed is made constant first (ranks, arithmetic on
    them, asserts they satisfy: see fxopt.metadata), so that ``assert x.ndim == 4`` leaves nothing
    behind that a pattern would count as a user. Afterwards ``gm`` holds the tensors and modules its
    graph reads in containers of its own, so rewrites never touch the captured model's modules
    (which are the user's)."""
    graph = gm.graph
    release_erased_nodes(gm)  # for every stage that erases nodes from here on, until codegen
    if example_inputs is not None:
        resolve_static_metadata(gm, example_inputs)
    for node in list(graph.nodes):
        canonical = _canonical_form(node, gm)
        if canonical is None:
            continue
        op, kwargs = canonical
        with graph.inserting_before(node):
            kwargs = {k: _as_arg(graph, gm, v) for k, v in kwargs.items()}
            if op.fields:
                new = graph.call_function(op.target, (), kwargs)
            else:
                new = graph.call_function(op.target, (kwargs["a"], kwargs["b"]))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    _absorb_border_writes(graph)
    _functionalize_writes(graph)
    _absorb_pads(graph)
    eliminate_dead_code(graph)
    targets = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}
    install_attributes(gm, {t: attribute(gm, t) for t in targets})
    return gm  # no recompile: the working graph runs through the Interpreter; codegen compiles once


class _Param:
    """A module attribute that becomes a get_attr node (a parameter or buffer, by qualified name)."""

    def __init__(self, qualname: str):
        self.qualname = qualname


def _as_arg(graph: torch.fx.Graph, gm: GraphModule, value: Any) -> Any:
    if isinstance(value, _Param):
        return graph.get_attr(value.qualname)
    return value


def _canonical_form(node: Node, gm: GraphModule) -> Canonical | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if has_forward_hooks(module):
            return None  # the call runs the user's hooks: it stays a call of the module
        convert = next((c for types, c in _MODULE_SPELLINGS if type(module) in types), None)
        if convert is None and _plain_batch_norm(module):
            convert = _bn_module
        if convert is None:
            return None
        return convert(node, module) if len(node.args) == 1 and not node.kwargs else None
    if node.op == "call_function":
        convert = _FUNCTION_SPELLINGS.get(node.target)
    elif node.op == "call_method":
        convert = _METHOD_SPELLINGS.get(node.target)
    else:
        return None
    return convert(node) if convert is not None else None


# ---------------------------------------------------------------------------------------------
# argument binding


def _bind(node: Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """Bind a call's positional and keyword arguments to parameter names; None on unknown keywords."""
    if len(node.args) > len(names):
        return None
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    for key, value in node.kwargs.items():
        if key not in names:
            return None
        bound[key] = value
    return bound if all(n in bound for n in names) else None


def _schema_names(overload: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    args = overload._schema.arguments
    defaults = {a.name: a.default_value for a in args if a.has_default_value()}
    return tuple(a.name for a in args), defaults


def _tuple(value: Any, rank: int) -> tuple[int, ...] | Any:
    if isinstance(value, int):
        return (value,) * rank
    if isinstance(value, (list, tuple)):
        return tuple(value) * rank if len(value) == 1 and rank > 1 else tuple(value)
    return value


def _shape(node: Any) -> torch.Size | None:
    if isinstance(node, Node):
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            return meta.shape
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.shape
    return None


# ---------------------------------------------------------------------------------------------
# conv


def _conv_kwargs(bound: dict[str, Any], rank: int, transposed: bool) -> Canonical | None:
    padding = bound["padding"]
    if isinstance(padding, str):
        padding = _resolve_string_padding(padding, bound["weight"], bound["dilation"], rank)
    return ops.CONV, {
        "input": bound["input"],
        "weight": bound["weight"],
        "bias": bound.get("bias"),
        "stride": _tuple(bound["stride"], rank),
        "padding": _tuple(padding, rank),
        "dilation": _tuple(bound["dilation"], rank),
        "groups": bound["groups"],
        "padding_mode": bound.get("padding_mode", "zeros"),
        "transposed": transposed,
        "output_padding": _tuple(bound.get("output_padding", 0), rank),
    }


def _resolve_string_padding(padding: str, weight: Any, dilation: Any, rank: int) -> tuple[int, ...] | str:
    if padding == "valid":
        return (0,) * rank
    shape = weight.shape if isinstance(weight, torch.Tensor) else _shape(weight)
    if shape is None:
        return padding
    totals = [d * (k - 1) for d, k in zip(_tuple(dilation, rank), shape[2:])]
    if any(t % 2 for t in totals):
        return padding  # asymmetric 'same': kept as the string
    return tuple(t // 2 for t in totals)


_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_NAMES = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}


def _conv_function(rank: int, transposed: bool) -> Callable[[Node], Canonical | None]:
    names = _CONV_T_NAMES if transposed else _CONV_NAMES

    def convert(node: Node) -> Canonical | None:
        bound = _bind(node, names, _CONV_DEFAULTS)
        return None if bound is None else _conv_kwargs(bound, rank, transposed)

    return convert


def _aten_convolution(node: Node) -> Canonical | None:
    bound = _bind(node, *_schema_names(aten.convolution.default))
    if bound is None:
        return None
    return _conv_kwargs(bound, len(bound["stride"]), bound["transposed"])


def _conv_module(node: Node, m: nn.Module) -> Canonical | None:
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    rank = m.weight.dim() - 2
    padding = m.padding
    if isinstance(padding, str):
        padding = _resolve_string_padding(padding, m.weight, m.dilation, rank)
        if isinstance(padding, str) and m.padding_mode != "zeros":
            return None
    bound = {
        "input": node.args[0],
        "weight": _Param(f"{node.target}.weight"),
        "bias": _Param(f"{node.target}.bias") if m.bias is not None else None,
        "stride": m.stride,
        "padding": padding,
        "dilation": m.dilation,
        "groups": m.groups,
        "padding_mode": m.padding_mode,
        "output_padding": getattr(m, "output_padding", 0),
    }
    return _conv_kwargs(bound, rank, transposed)


_PAD_TARGETS = {F.pad, aten.pad.default, aten.constant_pad_nd.default}


def _absorb_pads(graph: torch.fx.Graph) -> None:
    """pad(x) -> conv(padding=0) becomes one conv with that padding and padding mode.

    nn.ConvNd with a non-zero padding mode is traced by torch.export as exactly this pair.
    Only symmetric padding with a single-user pad node is absorbed.
    """
    for node in list(graph.nodes):
        if not ops.CONV(node) or node.kwargs["transposed"]:
            continue
        pad = node.kwargs["input"]
        if not isinstance(pad, Node) or pad.target not in _PAD_TARGETS or len(pad.users) != 1:
            continue
        if any(p != 0 for p in node.kwargs["padding"]) or isinstance(node.kwargs["padding"], str):
            continue
        bound = _bind(pad, ("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
        if bound is None or not isinstance(bound["pad"], (list, tuple)):
            continue
        mode, value = bound["mode"], bound["value"]
        if mode == "constant" and value not in (None, 0, 0.0):
            continue
        widths = list(bound["pad"])
        rank = len(node.kwargs["stride"])
        if len(widths) != 2 * rank or widths[0::2] != widths[1::2]:
            continue
        padding = tuple(reversed(widths[0::2]))
        kwargs = dict(node.kwargs, input=bound["input"], padding=padding)
        kwargs["padding_mode"] = "zeros" if mode == "constant" else mode
        node.kwargs = kwargs
        graph.erase_node(pad)


# ---------------------------------------------------------------------------------------------
# padding with per-channel values: zero padding, then each border strip written in place


# reshapes that keep the order of elements: a per-channel value seen through them is the same value
_ORDER_PRESERVING_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default}


def _absorb_border_writes(graph: torch.fx.Graph) -> None:
    """``out = pad(x)`` with zeros, then ``out[:, :, :p] = v`` (and so on) for every padded side,
    becomes one pure ``ops.pad_per_channel(x, widths, v)``.

    DBB's BNAndPadLayer pads this way; torch.export records each write as ``slice`` + ``copy_``.
    Rewritten only when the writes cover exactly the padded border, all write the same per-channel
    value, and every other reader of the padded tensor comes after the last write; otherwise the
    in-place writes stay as they are.
    """
    position = {node: i for i, node in enumerate(graph.nodes)}
    for pad in list(graph.nodes):
        zero_pad = _zero_pad(pad) if pad.target in _PAD_TARGETS else None
        shape = _shape(pad)
        if zero_pad is None or shape is None or len(zero_pad[1]) > 2 * (len(shape) - 2):
            continue  # not a zero pad of the spatial dimensions only
        x, widths = zero_pad
        writes = [w for w in map(_slice_write, pad.users) if w is not None]
        readers = [u for u in pad.users if u not in {w[0] for w in writes}]
        value = _border_value(writes, widths, shape)
        if value is None or any(position[r] < max(position[w[1]] for w in writes) for r in readers):
            continue
        last_write = max((w[1] for w in writes), key=position.__getitem__)
        widths += [0, 0] * (len(shape) - 2 - len(widths) // 2)  # a pair for every spatial dimension
        with graph.inserting_after(last_write):
            filled = graph.call_function(ops.PAD_PER_CHANNEL.target, (), {"input": x, "pad": widths, "value": value})
        filled.meta = dict(pad.meta)
        for reader in readers:
            reader.replace_input_with(pad, filled)
        for slice_node, copy in writes:
            graph.erase_node(copy)
            graph.erase_node(slice_node)
        graph.erase_node(pad)


def _zero_pad(pad: Node) -> tuple[Node, list[int]] | None:
    """(input, F.pad widths) of a constant pad with zeros."""
    if pad.target is aten.constant_pad_nd.default:
        bound = _bind(pad, ("input", "pad", "value"), {"value": 0})
        mode = "constant"
    else:
        bound = _bind(pad, ("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
        mode = bound and bound["mode"]
    if bound is None or mode != "constant" or bound["value"] not in (None, 0, 0.0):
        return None
    widths = bound["pad"]
    if not isinstance(widths, (list, tuple)) or not all(isinstance(w, int) and w >= 0 for w in widths):
        return None
    return bound["input"], list(widths)


def _slice_write(user: Node) -> tuple[Node, Node] | None:
    """(slice, copy_) when ``user`` is a slice of the padded tensor that is only written into."""
    if user.target is not aten.slice.Tensor or len(user.users) != 1:
        return None
    (copy,) = user.users
    if copy.target is not aten.copy_.default or copy.args[0] is not user or copy.users or len(copy.args) != 2:
        return None
    return user, copy


def _border_value(writes: list[tuple[Node, Node]], widths: list[int], shape: torch.Size) -> Node | None:
    """The per-channel value the writes fill the whole padded border with, or None."""
    ndim, channels = len(shape), shape[1] if len(shape) > 1 else None
    sides = {(ndim - 1 - j, end) for j in range(len(widths) // 2) for end in (0, 1) if widths[2 * j + end] > 0}
    written, values = [], []
    for slice_node, copy in writes:
        bound = _bind(slice_node, ("self", "dim", "start", "end", "step"), {"dim": 0, "start": None, "end": None, "step": 1})
        if bound is None or bound["step"] != 1 or not all(isinstance(bound[k], (int, type(None))) for k in ("start", "end")):
            return None
        dim = bound["dim"] % ndim
        j = ndim - 1 - dim
        if not 0 <= j < len(widths) // 2:
            return None
        size = shape[dim]
        start, end = slice(bound["start"], bound["end"]).indices(size)[:2]
        low, high = widths[2 * j], widths[2 * j + 1]
        side = (dim, 0) if (start, end) == (0, low) else (dim, 1) if (start, end) == (size - high, size) else None
        written.append(side)
        src = copy.args[1]
        values.append(src.args[0] if isinstance(src, Node) and src.target is aten.expand.default else src)
    if channels is None or len(written) != len(sides) or set(written) != sides:
        return None
    roots = {_view_root(v) for v in values}
    if len(roots) != 1 or not all(_per_channel_shape(_shape(v), ndim, channels) for v in values):
        return None
    return values[0]


def _view_root(value: Any) -> Any:
    while isinstance(value, Node) and value.target in _ORDER_PRESERVING_VIEWS:
        value = value.args[0]
    return value


def _per_channel_shape(shape: torch.Size | None, ndim: int, channels: int) -> bool:
    """A tensor of ``shape`` broadcast against (N, C, ...) gives every position of channel c one number."""
    if shape is None or len(shape) > ndim:
        return False
    aligned = (1,) * (ndim - len(shape)) + tuple(shape)
    return aligned[1] in (1, channels) and all(d == 1 for i, d in enumerate(aligned) if i != 1)


# ---------------------------------------------------------------------------------------------
# in-place writes into values the graph itself made: their functional forms


# in-place op -> its functional form, for values with one owner
_FUNCTIONAL_FORMS: dict[Any, Any] = {
    aten.add_.Tensor: aten.add.Tensor, aten.sub_.Tensor: aten.sub.Tensor, aten.mul_.Tensor: aten.mul.Tensor,
    aten.div_.Tensor: aten.div.Tensor, aten.add_.Scalar: aten.add.Scalar, aten.mul_.Scalar: aten.mul.Scalar,
    aten.index_put_.default: aten.index_put.default, aten.relu_.default: aten.relu.default,
    "add_": operator.add, "sub_": operator.sub, "mul_": operator.mul, "div_": operator.truediv,
}
_SCATTERS = {aten.select.int: aten.select_scatter.default, aten.slice.Tensor: aten.slice_scatter.default}


def _functionalize_writes(graph: torch.fx.Graph) -> None:
    """``out += b`` (``add_``), ``k[:, :, i] = v`` (``select`` + ``copy_``) and ``index_put_`` on a
    tensor the graph made (not an input, a parameter or a view of one) become functional ops whose
    result later readers read: a sum written ``out += b`` is then a sum to the passes, and a kernel
    assembled by writes into ``torch.zeros`` folds to a constant.

    Exact because nothing else can see the old value change: the written tensor is fresh (made by an
    op that returns new memory) and none of its readers before the write made a view of it."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    for write in list(graph.nodes):
        found = _functional_write(write)
        if found is None:
            continue
        written, build = found
        if not _owned(written, write, position):
            continue
        with graph.inserting_before(write):
            new = build()
        new.meta = dict(written.meta)
        position[new] = position[write]
        for user in list(written.users):
            if position.get(user, -1) > position[write]:
                user.replace_input_with(written, new)
        write.replace_all_uses_with(new)
        graph.erase_node(write)


def _functional_write(write: Node) -> tuple[Node, Callable[[], Node]] | None:
    """(the tensor ``write`` writes into, a builder of its functional form), or None."""
    graph, key = write.graph, write.target
    if write.op == "call_function" and write.target is aten.copy_.default and len(write.args) == 2 and not write.kwargs:
        chain = _view_chain(write.args[0])
        if chain is None:
            return None
        base, views = chain

        def scatter() -> Node:
            value = graph.call_function(aten.expand_as.default, (write.args[1], views[-1]))
            for view in reversed(views):  # innermost first: scatter into the view it was taken from
                source = view.args[0]
                value = graph.call_function(_SCATTERS[view.target], (source, value, *view.args[1:]), dict(view.kwargs))
            return value

        return base, scatter
    if write.op not in ("call_function", "call_method") or key not in _FUNCTIONAL_FORMS or not write.args or not isinstance(write.args[0], Node):
        return None
    if write.op == "call_method" and (len(write.args) != 2 or write.kwargs):
        return None
    functional = _FUNCTIONAL_FORMS[key]
    return write.args[0], lambda: graph.call_function(functional, write.args, dict(write.kwargs))


def _view_chain(view: Any) -> tuple[Node, list[Node]] | None:
    """(base, [view of base, view of that, ...]) for a chain of select/slice views read only by the next."""
    views: list[Node] = []
    while isinstance(view, Node) and view.target in _SCATTERS and len(view.users) == 1:
        views.append(view)
        view = view.args[0]
    if not views or not isinstance(view, Node):
        return None
    return view, list(reversed(views))


def _owned(value: Node, write: Node, position: dict[Node, int]) -> bool:
    """True when ``value`` is new memory that no view made before ``write`` can show (see above)."""
    if not _returns_new_memory(value):
        return False
    for user in value.users:
        if user is write or position.get(user, -1) > position[write]:
            continue
        if not _returns_new_memory(user) and not _is_metadata_read(user):
            if _view_chain_of(user, write):
                continue  # the select/slice being written into
            return False
    return True


def _view_chain_of(node: Node, write: Node) -> bool:
    chain = _view_chain(write.args[0]) if write.target is aten.copy_.default else None
    return chain is not None and node in chain[1]


def _returns_new_memory(node: Node) -> bool:
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema
        return not schema.is_mutable and all(r.alias_info is None for r in schema.returns)
    return any(op(node) for op in ops.ALL_OPS) and not ops.IDENTITY(node) and not ops.DROPOUT(node)


def _is_metadata_read(node: Node) -> bool:
    return bool(node.args) and isinstance(node.args[0], Node) and reads_only_metadata(node, node.args[0])


# ---------------------------------------------------------------------------------------------
# batch norm


_BN_FIELDS = ops.BATCH_NORM.fields


def _bn_aten(node: Node) -> Canonical | None:
    bound = _bind(node, *_schema_names(aten.batch_norm.default))
    if bound is None:
        return None
    return ops.BATCH_NORM, {k: bound[k] for k in _BN_FIELDS}


def _bn_native_getitem(node: Node) -> Canonical | None:
    """getitem(_native_batch_norm_legit_no_training(...), 0) when the statistics outputs are unused."""
    source = node.args[0]
    if not (isinstance(source, Node) and source.target is aten._native_batch_norm_legit_no_training.default):
        return None
    if node.args[1] != 0 or any(u.args[1] != 0 for u in source.users):
        return None
    bound = _bind(source, *_schema_names(aten._native_batch_norm_legit_no_training.default))
    if bound is None:
        return None
    return ops.BATCH_NORM, {**{k: bound[k] for k in _BN_FIELDS if k != "training"}, "training": False}


def _plain_batch_norm(m: nn.Module) -> bool:
    """A BatchNorm subclass that computes what BatchNorm does: one that keeps torch's forward, and
    nn.SyncBatchNorm in eval mode (in training it reduces statistics across processes)."""
    if isinstance(m, nn.SyncBatchNorm):
        return not m.training and type(m).forward is nn.SyncBatchNorm.forward
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).forward is nn.modules.batchnorm._BatchNorm.forward


def _bn_module(node: Node, m: nn.modules.batchnorm._BatchNorm) -> Canonical | None:
    uses_batch_stats = m.training or m.running_mean is None
    if uses_batch_stats and m.training and m.momentum is None and m.track_running_stats:
        return None  # cumulative moving average needs num_batches_tracked: not expressible functionally
    keep_stats = not m.training or m.track_running_stats
    return ops.BATCH_NORM, {
        "input": node.args[0],
        "running_mean": _Param(f"{node.target}.running_mean") if keep_stats and m.running_mean is not None else None,
        "running_var": _Param(f"{node.target}.running_var") if keep_stats and m.running_var is not None else None,
        "weight": _Param(f"{node.target}.weight") if m.affine else None,
        "bias": _Param(f"{node.target}.bias") if m.affine else None,
        "training": uses_batch_stats,
        "momentum": 0.0 if m.momentum is None else m.momentum,
        "eps": m.eps,
    }


# ---------------------------------------------------------------------------------------------
# linear, norms, dropout, identity


def _linear_module(node: Node, m: nn.Linear) -> Canonical:
    bias = _Param(f"{node.target}.bias") if m.bias is not None else None
    return ops.LINEAR, {"input": node.args[0], "weight": _Param(f"{node.target}.weight"), "bias": bias}


def _functional(op: Op, defaults: dict[str, Any], extra: tuple[str, ...] = ()) -> Callable[[Node], Canonical | None]:
    """A function spelling whose parameters are the op's fields (plus ``extra`` ones we ignore)."""

    def convert(node: Node) -> Canonical | None:
        bound = _bind(node, op.fields + extra, {**defaults, **{name: None for name in extra}})
        if bound is None:
            return None
        kwargs = {k: bound[k] for k in op.fields}
        if "normalized_shape" in kwargs:
            kwargs["normalized_shape"] = tuple(kwargs["normalized_shape"])
        return op, kwargs

    return convert


_TRANSPOSE_2D = {aten.t.default, aten.numpy_T.default, torch.t}


def _addmm(node: Node) -> Canonical | None:
    """addmm(bias, x, W.t()) is linear(x, W, bias) when W is a module attribute."""
    bound = _bind(node, *_schema_names(aten.addmm.default))
    if bound is None or bound["beta"] != 1 or bound["alpha"] != 1:
        return None
    mat2 = bound["mat2"]
    is_transpose = isinstance(mat2, Node) and (
        mat2.target in _TRANSPOSE_2D
        or (mat2.target is aten.permute.default and list(mat2.args[1]) == [1, 0])
        or (mat2.target is aten.transpose.int and sorted(mat2.args[1:3]) == [0, 1])
    )
    if not is_transpose or mat2.args[0].op != "get_attr":
        return ops.ADDMM, {"input": bound["self"], "mat1": bound["mat1"], "mat2": mat2}
    return ops.LINEAR, {"input": bound["mat1"], "weight": mat2.args[0], "bias": bound["self"]}


def _layer_norm_module(node: Node, m: nn.LayerNorm) -> Canonical:
    return ops.LAYER_NORM, {
        "input": node.args[0],
        "normalized_shape": tuple(m.normalized_shape),
        "weight": _Param(f"{node.target}.weight") if m.weight is not None else None,
        "bias": _Param(f"{node.target}.bias") if m.bias is not None else None,
        "eps": m.eps,
    }


def _rms_norm_module(node: Node, m: nn.RMSNorm) -> Canonical:
    return ops.RMS_NORM, {
        "input": node.args[0],
        "normalized_shape": tuple(m.normalized_shape),
        "weight": _Param(f"{node.target}.weight") if m.weight is not None else None,
        "eps": m.eps,
    }


_EMBEDDING_DEFAULTS = {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False}


def _embedding_module(node: Node, m: nn.Embedding) -> Canonical:
    fields = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    return ops.EMBEDDING, {"input": node.args[0], "weight": _Param(f"{node.target}.weight"), **{f: getattr(m, f) for f in fields}}


def _embedding_aten(node: Node) -> Canonical | None:
    """aten.embedding(weight, indices, padding_idx=-1, ...): padding_idx only affects gradients."""
    bound = _bind(node, ("weight", "indices", "padding_idx", "scale_grad_by_freq", "sparse"),
                  {"padding_idx": -1, "scale_grad_by_freq": False, "sparse": False})
    if bound is None:
        return None
    padding_idx = None if bound["padding_idx"] == -1 else bound["padding_idx"]
    return ops.EMBEDDING, {**_EMBEDDING_DEFAULTS, "input": bound["indices"], "weight": bound["weight"],
                           "padding_idx": padding_idx, "scale_grad_by_freq": bound["scale_grad_by_freq"],
                           "sparse": bound["sparse"]}


def _dropout_module(node: Node, m: nn.Module) -> Canonical | None:
    if m.training and type(m) is not nn.Dropout:
        return None  # channel-wise dropouts in training mode have no F.dropout form
    return ops.DROPOUT, {"input": node.args[0], "p": m.p, "training": m.training, "inplace": False}


def _dropout_aten(node: Node) -> Canonical | None:
    bound = _bind(node, ("input", "p", "train"), {})
    if bound is None:
        return None
    return ops.DROPOUT, {"input": bound["input"], "p": bound["p"], "training": bound["train"], "inplace": False}


# ---------------------------------------------------------------------------------------------
# average pooling (1-D, 2-D, 3-D: one canonical op per rank, each a torch function)


def _avg_pool_kwargs(bound: dict[str, Any], rank: int) -> Canonical:
    op = ops.AVG_POOLS[rank - 1]
    kernel = _tuple(bound["kernel_size"], rank)
    stride = bound["stride"]
    kwargs = {
        "input": bound["input"],
        "kernel_size": kernel,
        "stride": kernel if stride is None or (isinstance(stride, (list, tuple)) and not stride) else _tuple(stride, rank),
        "padding": _tuple(bound["padding"], rank),
        "ceil_mode": bound["ceil_mode"],
        "count_include_pad": bound["count_include_pad"],
        "divisor_override": bound.get("divisor_override"),
    }
    return op, {k: kwargs[k] for k in op.fields}


_AVG_POOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None}


def _avg_pool_function(rank: int) -> Callable[[Node], Canonical | None]:
    def convert(node: Node) -> Canonical | None:
        bound = _bind(node, ops.AVG_POOLS[rank - 1].fields, _AVG_POOL_DEFAULTS)
        return None if bound is None else _avg_pool_kwargs(bound, rank)

    return convert


def _avg_pool_aten(rank: int) -> Callable[[Node], Canonical | None]:
    def convert(node: Node) -> Canonical | None:
        names, defaults = _schema_names(getattr(aten, f"avg_pool{rank}d").default)
        bound = _bind(node, names, defaults)
        return None if bound is None else _avg_pool_kwargs({**bound, "input": bound["self"]}, rank)

    return convert


def _avg_pool_module(node: Node, m: nn.AvgPool1d | nn.AvgPool2d | nn.AvgPool3d) -> Canonical:
    rank = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]
    fields = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    return _avg_pool_kwargs({"input": node.args[0], **{f: getattr(m, f, None) for f in fields}}, rank)


# ---------------------------------------------------------------------------------------------
# add and mul


def _binary(op: Op, first: str, second: str) -> Callable[[Node], Canonical | None]:
    def convert(node: Node) -> Canonical | None:
        bound = _bind(node, (first, second, "alpha"), {"alpha": 1})
        if bound is None or bound["alpha"] != 1:
            return None
        a, b = bound[first], bound[second]
        if not (isinstance(a, Node) or isinstance(b, Node)):
            return None
        return op, {"a": a, "b": b}

    return convert


def _matmul(first: str, second: str) -> Callable[[Node], Canonical | None]:
    def convert(node: Node) -> Canonical | None:
        bound = _bind(node, (first, second), {})
        return None if bound is None else (ops.MATMUL, {"input": bound[first], "other": bound[second]})

    return convert


def _fake_quant_module(node: Node, m: torch.ao.quantization.FakeQuantizeBase) -> Canonical | None:
    if not all(hasattr(m, a) for a in ("observer_enabled", "fake_quant_enabled", "scale", "zero_point")):
        return None  # a FakeQuantizeBase subclass with its own state: left as it is
    if int(m.observer_enabled[0]) != 0:
        return None  # still observing: forward updates its scale, a stateful call left as it is
    if int(m.fake_quant_enabled[0]) == 0:
        return ops.IDENTITY, {"input": node.args[0]}
    common = {"input": node.args[0], "scale": _Param(f"{node.target}.scale"),
              "zero_point": _Param(f"{node.target}.zero_point"), "quant_min": m.quant_min, "quant_max": m.quant_max}
    if m.is_per_channel:
        return ops.FAKE_QUANT_PER_CHANNEL, {**common, "axis": m.ch_axis}
    return ops.FAKE_QUANT_PER_TENSOR, common


# ---------------------------------------------------------------------------------------------
# the spelling tables

_MODULE_SPELLINGS: list[tuple[tuple[type, ...], Callable[[Node, Any], Canonical | None]]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _conv_module),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), _bn_module),
    ((nn.Linear,), _linear_module),
    ((nn.LayerNorm,), _layer_norm_module),
    ((nn.RMSNorm,), _rms_norm_module),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout), _dropout_module),
    ((nn.Identity,), lambda node, m: (ops.IDENTITY, {"input": node.args[0]})),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), _avg_pool_module),
    ((nn.Embedding,), _embedding_module),
    ((torch.ao.quantization.FakeQuantize, torch.ao.quantization.FusedMovingAvgObsFakeQuantize), _fake_quant_module),
]

_FUNCTION_SPELLINGS: dict[Any, Callable[[Node], Canonical | None]] = {
    operator.add: _binary(ops.ADD, "a", "b"),
    torch.add: _binary(ops.ADD, "input", "other"),
    aten.add.Tensor: _binary(ops.ADD, "self", "other"),
    operator.mul: _binary(ops.MUL, "a", "b"),
    torch.mul: _binary(ops.MUL, "input", "other"),
    aten.mul.Tensor: _binary(ops.MUL, "self", "other"),
    operator.sub: _binary(ops.SUB, "a", "b"),
    torch.sub: _binary(ops.SUB, "input", "other"),
    aten.sub.Tensor: _binary(ops.SUB, "self", "other"),
    operator.matmul: _matmul("a", "b"),
    torch.matmul: _matmul("input", "other"),
    aten.matmul.default: _matmul("self", "other"),
    aten.mm.default: _matmul("self", "mat2"),
    torch.addmm: _addmm,
    F.batch_norm: _functional(
        ops.BATCH_NORM, {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    ),
    torch.batch_norm: _bn_aten,
    aten.batch_norm.default: _bn_aten,
    operator.getitem: _bn_native_getitem,
    F.linear: _functional(ops.LINEAR, {"bias": None}),
    aten.linear.default: _functional(ops.LINEAR, {"bias": None}),
    aten.addmm.default: _addmm,
    F.layer_norm: _functional(ops.LAYER_NORM, {"weight": None, "bias": None, "eps": 1e-5}),
    aten.layer_norm.default: _functional(ops.LAYER_NORM, {"weight": None, "bias": None, "eps": 1e-5}, ("cudnn_enable",)),
    F.rms_norm: _functional(ops.RMS_NORM, {"weight": None, "eps": None}),
    aten.rms_norm.default: _functional(ops.RMS_NORM, {"weight": None, "eps": None}),
    F.dropout: _functional(ops.DROPOUT, {"p": 0.5, "training": True, "inplace": False}),
    torch.dropout: _dropout_aten,
    aten.dropout.default: _dropout_aten,
    aten.convolution.default: _aten_convolution,
    F.avg_pool1d: _avg_pool_function(1),
    F.avg_pool2d: _avg_pool_function(2),
    F.avg_pool3d: _avg_pool_function(3),
    aten.avg_pool1d.default: _avg_pool_aten(1),
    aten.avg_pool2d.default: _avg_pool_aten(2),
    aten.avg_pool3d.default: _avg_pool_aten(3),
    F.embedding: _functional(ops.EMBEDDING, _EMBEDDING_DEFAULTS),
    aten.embedding.default: _embedding_aten,
}
def _overloads(packet: Any) -> list[Any]:
    return [getattr(packet, name) for name in packet.overloads()]


for _rank in (1, 2, 3):
    for _transposed, _spellings in (
        (False, (getattr(F, f"conv{_rank}d"), getattr(torch, f"conv{_rank}d"), getattr(aten, f"conv{_rank}d").default)),
        (True, (getattr(F, f"conv_transpose{_rank}d"), *_overloads(getattr(aten, f"conv_transpose{_rank}d")))),
    ):
        for _target in _spellings:
            _FUNCTION_SPELLINGS[_target] = _conv_function(_rank, _transposed)
    _FUNCTION_SPELLINGS[getattr(aten, f"conv{_rank}d").padding] = _conv_function(_rank, False)

_METHOD_SPELLINGS: dict[str, Callable[[Node], Canonical | None]] = {
    "add": _binary(ops.ADD, "self", "other"),
    "mul": _binary(ops.MUL, "self", "other"),
    "sub": _binary(ops.SUB, "self", "other"),
    "matmul": _matmul("self", "other"),
}


# ---------------------------------------------------------------------------------------------
# fake quantizers: torch.fake_quantize_*, and torch.ao FakeQuantize modules (kept whole by capture:
# their forward branches on their own buffers) read from the module's state


def _float32_source(scale: Any) -> Any:
    """The tensor behind ``scale.float()`` / ``scale.to(torch.float32)``: the canonical per-channel
    op casts its scale itself, so the constant stays visible to patterns."""
    if isinstance(scale, Node) and scale.op == "call_method" and len(scale.args) >= 1 and not scale.kwargs:
        if scale.target == "float" and len(scale.args) == 1:
            return scale.args[0]
        if scale.target == "to" and scale.args[1:] == (torch.float32,):
            return scale.args[0]
    return scale


def _fake_quant(op: Op, first: str) -> Callable[[Node], Canonical | None]:
    def convert(node: Node) -> Canonical | None:
        bound = _bind(node, (first, *op.fields[1:]), {})
        if bound is None:
            return None
        kwargs = {"input": bound[first], **{k: bound[k] for k in op.fields[1:]}}
        if op is ops.FAKE_QUANT_PER_CHANNEL:
            kwargs["scale"] = _float32_source(kwargs["scale"])
        return op, kwargs

    return convert


_FUNCTION_SPELLINGS.update({
    torch.fake_quantize_per_channel_affine: _fake_quant(ops.FAKE_QUANT_PER_CHANNEL, "input"),
    ops.fake_quantize_per_channel: _fake_quant(ops.FAKE_QUANT_PER_CHANNEL, "input"),
    aten.fake_quantize_per_channel_affine.default: _fake_quant(ops.FAKE_QUANT_PER_CHANNEL, "self"),
    torch.fake_quantize_per_tensor_affine: _fake_quant(ops.FAKE_QUANT_PER_TENSOR, "input"),
    aten.fake_quantize_per_tensor_affine.default: _fake_quant(ops.FAKE_QUANT_PER_TENSOR, "self"),
    aten.fake_quantize_per_tensor_affine.tensor_qparams: _fake_quant(ops.FAKE_QUANT_PER_TENSOR, "self"),
    ops.LOG_SQRT2_QUANT.target: _functional(ops.LOG_SQRT2_QUANT, {}),
    ops.LOG2_QUANT.target: _functional(ops.LOG2_QUANT, {}),
})
