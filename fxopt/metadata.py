"""Which users of a value read the value, and which only its metadata (rank, shape, dtype, device).

Real model code reads metadata all the time: timm's ``BatchNormAct2d`` asserts ``x.ndim == 4`` on
its input, attention blocks do ``B, N, C = x.shape``, an SE block pools over ``x.size()[2:]``. To a
rewrite these are not uses of the values: folding a BatchNorm into the conv before it gives a value
of the same shape, dtype and device, so a metadata read of the conv's output can read the folded
conv's output instead. Two things follow, both here so that every pass sees them the same way:

* :func:`value_users` is what a pattern counts when it asks "does anything else read this?";
* :func:`resolve_static_metadata` (a canonicalization step) replaces what is fixed once the graph
  is captured by constants: the rank of every tensor (a captured graph is written for one rank),
  Python arithmetic and comparisons on constants (``x.dim() - 1``), ``torch._assert`` of a
  condition that is now constant True. Shapes stay as they are: batch and spatial sizes must stay
  free in the result, so ``x.shape`` and ``x.size(i)`` remain graph nodes (metadata users).

The Rewriter moves the metadata users of a node a rewrite removes onto a replacement with the same
recorded shape and dtype (:meth:`fxopt.rewriter.Rewriter.metadata_moves`).
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

from .interpret import record_shapes

aten = torch.ops.aten

# attribute reads (``x.shape``: fx records builtins.getattr(x, "shape")) and Tensor methods that
# return metadata, never values
_ATTRIBUTES = frozenset({
    "ndim", "shape", "dtype", "device", "is_cuda", "is_cpu", "is_meta", "is_sparse", "is_quantized", "layout",
    "requires_grad", "is_leaf",
})
_METHODS = frozenset({
    "dim", "ndimension", "size", "numel", "nelement", "stride", "get_device", "is_floating_point",
    "is_complex", "is_contiguous", "element_size", "is_signed",
})
_FUNCTIONS = frozenset({
    torch.numel, torch.is_floating_point, torch.is_complex, torch.is_tensor, builtins.len, builtins.isinstance,
    aten.sym_size.int, aten.sym_size.default, aten.sym_numel.default, aten.sym_stride.int,
    aten.sym_stride.default, aten.sym_storage_offset.default, aten.dim.default,
})
_RANK_METHODS = frozenset({"dim", "ndimension"})
# y.reshape_as(x) reads x's shape only (timm's LinearNorm: bn(x.flatten(0, 1)).reshape_as(x))
_TEMPLATE_METHODS = frozenset({"reshape_as", "view_as", "expand_as"})

# pure Python operations on ints, bools and tuples: evaluated once their operands are constants
_PURE_PYTHON = frozenset({
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod, operator.pow,
    operator.neg, operator.pos, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.not_, operator.and_, operator.or_, operator.getitem, operator.contains, builtins.len,
    builtins.min, builtins.max, builtins.abs, builtins.int, builtins.bool,
})
_ASSERTS = frozenset({torch._assert})


def reads_only_metadata(user: Node, value: Node) -> bool:
    """True when ``user`` reads nothing of ``value`` but its metadata (``value.ndim``, ``value.shape``,
    ``value.size(1)``, ``value.dtype``, ``len(value)``, ``torch.numel(value)``, or ``value`` as the
    shape template of ``y.reshape_as(value)``)."""
    if user.op == "call_method" and user.target in _TEMPLATE_METHODS and user.args[1:] == (value,):
        return user.args[0] is not value and not user.kwargs
    if not (user.args and user.args[0] is value) or value in user.args[1:] or value in user.kwargs.values():
        return False
    if user.op == "call_method":
        return user.target in _METHODS
    if user.op != "call_function":
        return False
    if user.target is builtins.getattr:
        return len(user.args) == 2 and user.args[1] in _ATTRIBUTES
    return user.target in _FUNCTIONS


def value_users(node: Node) -> list[Node]:
    """The users of ``node`` that read its values (every user but the metadata reads)."""
    return [u for u in node.users if not reads_only_metadata(u, node)]


def same_metadata(a: Node, b: Node) -> bool:
    """True when the recorded values of ``a`` and ``b`` have one shape, dtype and device (so a
    metadata read of one can read the other)."""
    ma, mb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    if ma is None or mb is None or not hasattr(ma, "shape") or not hasattr(mb, "shape"):
        return False
    return tuple(ma.shape) == tuple(mb.shape) and ma.dtype == mb.dtype


def resolve_static_metadata(gm: GraphModule, example_inputs: tuple) -> None:
    """Replace rank reads, constant Python arithmetic and satisfied asserts by constants (in place)."""
    graph = gm.graph
    if not any(_is_rank_read(n) or n.target in _ASSERTS for n in graph.nodes):
        return  # nothing to resolve: no forward pass to record ranks
    record_shapes(gm, example_inputs)
    for node in list(graph.nodes):
        if _is_rank_read(node):
            meta = node.args[0].meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):
                _substitute(node, len(meta.shape))
        elif node.op == "call_function" and node.target in _PURE_PYTHON and node.users:
            if not any(isinstance(a, Node) for a in _flat(node.args, node.kwargs)):
                try:
                    value = node.target(*node.args, **node.kwargs)
                except Exception:  # noqa: BLE001 - left to fail, as it would, when the model runs
                    continue
                _substitute(node, value)
        elif node.target in _ASSERTS and node.args and node.args[0] is True:
            graph.erase_node(node)


def _is_rank_read(node: Node) -> bool:
    if not (node.args and isinstance(node.args[0], Node)):
        return False
    if node.op == "call_method":
        return node.target in _RANK_METHODS and len(node.args) == 1 and not node.kwargs
    return node.op == "call_function" and node.target is builtins.getattr and node.args[1:] == ("ndim",)


def _substitute(node: Node, value: Any) -> None:
    """Write the constant ``value`` wherever ``node`` is read, then erase ``node``."""
    for user in list(node.users):
        def swap(arg: Any) -> Any:
            return value if arg is node else arg

        user.args = map_aggregate(user.args, swap)
        user.kwargs = map_aggregate(user.kwargs, swap)
    node.graph.erase_node(node)


def _flat(args: tuple, kwargs: dict) -> list[Any]:
    flat: list[Any] = []
    map_aggregate((args, kwargs), lambda a: flat.append(a))
    return flat
