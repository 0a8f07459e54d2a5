"""ln_to_crmsnorm: Pre-LN transformer -> Pre-CRMSNorm (Jiang et al., NeurIPS 2023), the compressed variant.

ln_to_rmsnorm keeps the residual stream zero-mean; a zero-mean vector x of dimension d is fixed
by its first d - 1 coordinates (x[d-1] = -sum x[:d-1]), so the stream is stored in d - 1
coordinates: every writer, re-centred as in ln_to_rmsnorm, loses its last output channel, and the
stream's adds and layout ops run on d - 1 channels. A LayerNorm reading the stream becomes

    CRMSNorm(x^) = x^ / sqrt((sum x^_i^2 + (sum x^_i)^2) / d + eps)

on the compressed x^: the first d - 1 coordinates of LN(x) before its affine; the last is minus
their sum. The Linears reading the norm (directly, or through views, selects and token means that
keep the hidden axis last) absorb gamma, beta and that recovered coordinate:
W'[:, i] = W[:, i] gamma_i - W[:, d-1] gamma_{d-1}, b' = b + W beta; a read of the norm's shape
gets the original shape. The stream leaves the model only through those Linears, so their outputs
are what the original computed.

Decompressing instead, cat(x^, -sum x^), is exact in exact arithmetic only: the recovered
coordinate carries the rounding errors of all d - 1 others (measured on GPT-2-small: 2.1e-5 on the
final LayerNorm's output against LayerNorm's own 1.3e-6, which the oracle rejects). Inside a
Linear that coordinate is one term among d, so absorbing it stays within LayerNorm's error. A norm
with any other reader (an activation, the model output) therefore stops the pass.

Preconditions are ln_to_rmsnorm's (see its module and the shared notes "LayerNorm -> RMSNorm"),
plus: hidden size at least 2, every view / reshape / expand of the stream spells the hidden size
as a number or -1, and no Linear both reads a norm of the stream and writes into it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch.fx import Node, map_arg

from fxopt.ops import ADDMM, DROPOUT, IDENTITY, LAYER_NORM, LINEAR, layout_op, reads_as_input
from fxopt.pattern import Match, Pass, Pattern, Skip, register
from fxopt.patterns.ln_to_rmsnorm import Stream, find_stream, ln_to_rmsnorm_instances, rebuilt_stream, stream_nodes
from fxopt.rewriter import Rewriter, bias_name

_SIZED = {"view", "reshape", "_unsafe_view", "expand"}  # layout ops whose arguments spell output sizes


def _op_name(node: Node) -> str:
    return layout_op(node) or node.op


def _sizes_slot(node: Node) -> tuple[bool, list] | None:
    """(sizes passed as one list or tuple argument?, the sizes) of a view/reshape/expand, else None."""
    if node.op not in ("call_function", "call_method") or _op_name(node) not in _SIZED:
        return None
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return True, list(node.args[1])
    return False, list(node.args[1:])


def _hidden_size_problem(node: Node, axis: int, hidden: int) -> str | None:
    """Why the hidden size that ``node`` spells at output ``axis`` cannot become hidden - 1."""
    slot = _sizes_slot(node)
    if slot is None:
        return None
    sizes = slot[1]
    if node.kwargs or len(sizes) <= axis:
        return (
            f"{node.name} ({_op_name(node)}) passes its sizes in a form this pass cannot rewrite (by keyword, or "
            "not one per dimension)"
        )
    if sizes[axis] not in (hidden, -1):
        return (
            f"{node.name} ({_op_name(node)}) takes the hidden size from {sizes[axis]!r}, computed at run time; "
            "the compressed stream needs it written as a number or -1 (ln_to_rmsnorm applies here)"
        )
    return None


def _compressed_args(node: Node, axis: int) -> tuple[tuple, dict]:
    """``node``'s arguments with the hidden size it spells at ``axis`` lowered by one (-1 stays)."""
    slot = _sizes_slot(node)
    if slot is None:
        return node.args, node.kwargs
    as_one, sizes = slot
    if sizes[axis] != -1:
        sizes[axis] -= 1
    sizes_arg = (type(node.args[1])(sizes),) if as_one else tuple(sizes)
    return (node.args[0], *sizes_arg), node.kwargs


_PASS_THROUGH = {"alias", "clone", "contiguous", "detach"}


@dataclass(frozen=True)
class _NormReaders:
    """Everything that reads a LayerNorm's output: the Linears that absorb it, the layout ops on
    the way (each keeps the hidden axis last and intact), and reads of their shapes."""

    layers: tuple[Node, ...]
    layout: tuple[Node, ...]
    shapes: tuple[Node, ...]

    def nodes(self) -> dict[str, Node]:
        return {n.name: n for n in (*self.layers, *self.layout, *self.shapes)}


def _weight_bias(layer: Node) -> tuple[Node, Node | None]:
    k = layer.kwargs
    return (k["weight"], k["bias"]) if LINEAR(layer) else (k["mat2"], k["input"])


def _is_shape_read(node: Node, value: Node) -> bool:
    """``value.shape`` or ``value.size()`` / ``value.size(dim)``."""
    if node.op == "call_function" and node.target is getattr:
        return node.args == (value, "shape")
    return node.op == "call_method" and node.target == "size" and node.args[:1] == (value,) and not node.kwargs


def _untouched_axes(node: Node, value: Node, rank: int) -> bool:
    """``node`` indexes, slices or averages ``value`` along axes other than the last (each is
    linear in the token vectors, biases included: mean(W n + b) = W mean(n) + b)."""
    name, args = _op_name(node), node.args
    if name == "getitem" and node.op == "call_function":
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return len(index) < rank and all(isinstance(i, (int, slice)) and not isinstance(i, bool) for i in index)
    if name in ("select", "slice") and len(args) > 1 and isinstance(args[1], int):
        return args[1] % rank != rank - 1
    if name == "mean" and len(args) > 1 and "dtype" not in node.kwargs:
        dims = args[1] if isinstance(args[1], (list, tuple)) else (args[1],)
        return all(isinstance(d, int) and d % rank != rank - 1 for d in dims)
    return False


def _keeps_hidden_last(node: Node, value: Node, hidden: int, rw: Rewriter) -> bool:
    """``node`` moves ``value``'s token vectors without mixing or resizing them (hidden axis last)."""
    if (DROPOUT(node) and not (node.kwargs["training"] and node.kwargs["p"] > 0)) or IDENTITY(node):
        return node.kwargs["input"] is value
    if node.op not in ("call_function", "call_method") or not node.args or node.args[0] is not value:
        return False
    if any(isinstance(a, Node) for a in (*node.args[1:], *node.kwargs.values())):
        return False
    name = _op_name(node)
    if name in _PASS_THROUGH:
        return True
    if name in _SIZED and name != "expand":
        shape = rw.shape(node)
        return shape is not None and shape[-1] == hidden and _hidden_size_problem(node, len(shape) - 1, hidden) is None
    return _untouched_axes(node, value, len(rw.shape(value)))


def _norm_readers(norm: Node, rw: Rewriter) -> _NormReaders | str:
    """The readers of ``norm``'s output when Linears absorb all of it, else why not."""
    k = norm.kwargs
    if not (rw.is_constant(k["weight"]) and rw.is_constant(k["bias"])):
        return f"{norm.name}: gamma or beta is computed at run time"
    hidden = rw.shape(norm)[-1]
    layers: dict[Node, None] = {}
    layout: dict[Node, None] = {}
    shapes: dict[Node, None] = {}
    frontier = [norm]
    while frontier:
        value = frontier.pop()
        for user in value.users:
            if reads_as_input(user, value):
                weight, bias = _weight_bias(user)
                if weight.op != "get_attr" or not (rw.is_constant(weight) and rw.is_constant(bias)):
                    return f"{user.name} reads {norm.name}'s output with a weight or bias computed at run time"
                layers[user] = None
            elif _is_shape_read(user, value):
                shapes[user] = None
            elif _keeps_hidden_last(user, value, hidden, rw):
                if user not in layout:
                    layout[user] = None
                    frontier.append(user)
            else:
                what = "the model output" if user.op == "output" else f"{user.name} ({_op_name(user)})"
                return f"{norm.name}'s output is read by {what}, not by a Linear"
    return _NormReaders(tuple(layers), tuple(layout), tuple(shapes))


def _plan(norm: Node, rw: Rewriter) -> tuple[Stream, dict[Node, _NormReaders]] | Skip:
    stream = find_stream(norm, rw)
    if isinstance(stream, Skip):
        return stream
    if stream.hidden < 2:
        return Skip(
            "the hidden size is 1: a zero-mean stream of one channel is all zeros, nothing to compress "
            "(ln_to_rmsnorm applies here)"
        )
    for node, axis in stream.nodes.items():
        problem = _hidden_size_problem(node, axis, stream.hidden)
        if problem:
            return Skip(problem)
    readers: dict[Node, _NormReaders] = {}
    for norm_node in stream.readers:
        found = _norm_readers(norm_node, rw)
        if isinstance(found, str):
            return Skip(
                f"{found}: the stream would have to be decompressed there, cat(x^, -sum x^), and the recovered "
                "coordinate carries the rounding errors of all d - 1 others (about sqrt(d) times LayerNorm's own "
                "error): not exact in floating point (ln_to_rmsnorm applies here)"
            )
        readers[norm_node] = found
    rewritten = set(stream_nodes(stream, rw).values())  # writers (and LayerScale projections) included
    for found in readers.values():
        for layer in found.layers:
            if layer in rewritten:
                return Skip(
                    f"{layer.name} reads a LayerNorm of the stream and writes back into it directly: its weight "
                    "would need the compressed input and output at once, which this pass does not build"
                )
    return stream, readers


class PreLNStreamCompressed(Pattern):
    """Every LayerNorm reading one residual stream, the stream's writers, and the Linears that
    read those norms (with the layout ops and shape reads in between)."""

    anchor = LAYER_NORM

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        plan = _plan(node, rw)
        if isinstance(plan, Skip):
            return plan
        stream, readers = plan
        nodes = stream_nodes(stream, rw)
        for found in readers.values():
            nodes.update(found.nodes())
        return Match(node, nodes, facts=plan)

    def rewrite(self, match: Match, rw: Rewriter) -> dict[Node, Node]:
        stream, readers = match.facts
        new = rebuilt_stream(stream, rw, "ln_to_crmsnorm", drop_last=True, layout_args=_compressed_args)
        replacements: dict[Node, Node] = {}
        for norm, found in readers.items():
            with rw.inserting_before(norm):
                new[norm] = _crms_norm(new[norm.kwargs["input"]], stream.hidden, norm.kwargs["eps"], rw)
            replacements.update(_absorbing_readers(norm, found, new, stream.hidden, rw))
        return replacements


def _crms_norm(compressed: Node, hidden: int, eps: float, rw: Rewriter) -> Node:
    """x^ / sqrt((|x^|^2 + (sum x^)^2) / d + eps): LayerNorm of the zero-mean x, less its last coordinate."""
    total = rw.call_function(torch.sum, compressed, -1, keepdim=True)
    norm = rw.call_function(torch.linalg.vector_norm, compressed, 2, -1, keepdim=True)
    squares = rw.call_function(operator.add, rw.call_function(torch.square, norm), rw.call_function(torch.square, total))
    mean_square = rw.call_function(operator.truediv, squares, float(hidden))
    scale = rw.call_function(torch.rsqrt, rw.call_function(operator.add, mean_square, eps))
    return rw.call_function(operator.mul, compressed, scale)


def _absorbing_readers(
    norm: Node, found: _NormReaders, new: dict[Node, Node], hidden: int, rw: Rewriter
) -> dict[Node, Node]:
    """The norm's readers rebuilt on its compressed output ``new[norm]``: layout ops with the hidden
    size lowered, shape reads giving the original shapes, and each Linear with gamma, beta and the
    recovered last coordinate folded into its weight: {old reader: new reader}."""
    gamma, beta = (rw.constant(norm.kwargs[key]) for key in ("weight", "bias"))
    order = {n: i for i, n in enumerate(rw.graph.nodes)}
    for node in sorted(found.layout, key=order.__getitem__):
        args, kwargs = _compressed_args(node, len(rw.shape(node)) - 1)
        args, kwargs = map_arg((args, kwargs), lambda a: new.get(a, a))
        with rw.inserting_before(node):
            build = rw.call_function if node.op == "call_function" else rw.call_method
            new[node] = build(node.target, *args, **kwargs)
    replacements: dict[Node, Node] = {}
    for read in found.shapes:
        with rw.inserting_before(read):
            replacements[read] = _original_shape(read, new[read.args[0]], hidden, rw)
    for layer in found.layers:
        with rw.inserting_before(layer):
            input = new[layer.kwargs["input" if LINEAR(layer) else "mat1"]]
            replacements[layer] = _absorbing_layer(layer, input, gamma, beta, rw)
    return replacements


def _original_shape(read: Node, compressed: Node, hidden: int, rw: Rewriter) -> Node:
    """What ``read`` (a shape or size read) gave on the uncompressed value, from the compressed one."""
    dims = read.args[1:] if read.op == "call_method" else ()
    if dims:  # size(dim): the hidden size on the last axis, the compressed value's size elsewhere
        rank = len(rw.shape(read.args[0]))
        size = rw.call_method("size", compressed, *dims)
        return rw.call_function(operator.add, size, 1) if dims[0] % rank == rank - 1 else size
    if read.op == "call_method":
        shape = rw.call_method("size", compressed)
    else:
        shape = rw.call_function(getattr, compressed, "shape")
    return rw.call_function(operator.add, rw.call_function(operator.getitem, shape, slice(None, -1)), (hidden,))


def _absorbing_layer(
    layer: Node, input: Node, gamma: torch.Tensor | None, beta: torch.Tensor | None, rw: Rewriter
) -> Node:
    """Linear/addmm reading the compressed normalized ``input``:
    W'[:, i] = W[:, i] gamma_i - W[:, -1] gamma_-1, b' = b + W beta."""
    weight_key, bias_key = ("weight", "bias") if LINEAR(layer) else ("mat2", "input")
    weight_node, bias_node = layer.kwargs[weight_key], layer.kwargs[bias_key]
    stored = rw.constant(weight_node)
    if rw.shared(weight_node):
        rw.note(f"ln_to_crmsnorm: {layer.name} absorbs the norm into its own copy of {weight_node.target}, "
                "which was shared with another reader")
    w = stored.double() if LINEAR(layer) else stored.double().t()  # (out, in) either way
    scaled = w * gamma.double()[None, :] if gamma is not None else w
    compressed = scaled[:, :-1] - scaled[:, -1:]
    new_weight = rw.new_constant(weight_node.target, (compressed if LINEAR(layer) else compressed.t()).to(stored.dtype))
    new_bias = bias_node
    if beta is not None:
        old = rw.constant(bias_node)
        bias = (old.double() if old is not None else torch.zeros(w.shape[0], dtype=torch.float64)) + w @ beta.double()
        new_bias = rw.new_constant(bias_node.target if bias_node is not None else bias_name(weight_node.target),
                                   bias.to(stored.dtype))
    if LINEAR(layer):
        return rw.call(LINEAR, input=input, weight=new_weight, bias=new_bias)
    return rw.call(ADDMM, input=new_bias, mat1=input, mat2=new_weight)


def ln_to_crmsnorm_instances() -> st.SearchStrategy:
    """ln_to_rmsnorm's Pre-LN stacks, some with a head reading the final norm's token mean."""
    return ln_to_rmsnorm_instances(pooled_heads=True)


LN_TO_CRMSNORM = register(
    Pass(
        name="ln_to_crmsnorm",
        description="Pre-LN transformer -> Pre-CRMSNorm: zero-mean residual stream stored in d - 1 channels (exact; "
        "opt-in: d - 1 wide matmuls ran 1-5% slower on a CPU)",
        patterns=(PreLNStreamCompressed(),),
        instances=ln_to_crmsnorm_instances,
        # not default: the compressed norm is several kernels in eager mode, the Linears reading it
        # take d - 1 inputs (misaligned for the GEMM kernels: GPT-2-small 1.007x, ViT-S 1.04-1.05x,
        # eager and compiled, benchmarks/bench_norms.py), and untying a tied LM head makes the model larger
        default=False,
    )
)
