"""ln_to_rmsnorm: Pre-LN transformer -> Pre-RMSNorm (Jiang et al., NeurIPS 2023).

LN(x + c*1) = LN(x): a LayerNorm ignores each token's mean. When every reader of the residual
stream is a LayerNorm over the hidden dimension, re-centring every writer of the stream along
that dimension (W <- W - mean over output channels, b <- b - mean(b); embeddings, positional
embeddings and cls tokens likewise) keeps the stream zero-mean without changing any LayerNorm
output, and each LayerNorm becomes an RMSNorm with the same gamma, beta and eps.

The stream is found from a LayerNorm's input: backwards through adds and layout ops (dropout,
views, transposes, cat, expand) to its writers, forwards to every other reader. The hidden axis
is tracked through layout ops, so a patch-embedding conv (channels on axis 1, then flatten and
transpose) is re-centred over its output channels. A LayerScale multiply is folded into the
projection before re-centring (centring first and scaling after breaks the zero mean). See the
shared notes "LayerNorm -> RMSNorm" for the traps each precondition guards against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.fx import Node, map_arg

from fxopt.ops import (
    ADD, ADDMM, CONV, DROPOUT, EMBEDDING, IDENTITY, LAYER_NORM, LINEAR, MUL, ZERO_MEAN_RMS_NORM, layout_op,
)
from fxopt.pattern import Match, Pass, Pattern, Skip, register
from fxopt.rewriter import Rewriter

# ops that move values without mixing a token's hidden channels (checked per kind below)
_RESHAPES = {"view", "reshape", "_unsafe_view", "flatten"}
_PASS_THROUGH = {"alias", "clone", "contiguous", "to"}
def _rank(node: Node, rw: Rewriter) -> int | None:
    shape = rw.shape(node)
    return None if shape is None else len(shape)


@dataclass
class Stream:
    """A residual stream: its nodes (with the axis that holds the hidden channels), writers, readers."""

    hidden: int
    nodes: dict[Node, int] = field(default_factory=dict)
    writers: dict[Node, int] = field(default_factory=dict)
    readers: list[Node] = field(default_factory=list)


def _input_axis(node: Node, axis: int, rw: Rewriter) -> list[tuple[Node, int]] | str | None:
    """The (input, axis) pairs a stream node's value at ``axis`` comes from; None when ``node`` is
    not an add or a layout op (it is then a writer); a string says why it cannot be followed."""
    out = rw.shape(node)
    if node.op in ("call_function", "call_method") and out is None:
        return f"{node.name} has no recorded shape"
    if ADD(node):
        pairs = []
        for operand in node.args:
            if not isinstance(operand, Node):
                return f"{node.name} adds a Python scalar to the residual stream"
            shape = rw.shape(operand)
            if shape is None:
                return f"{node.name}: operand {operand.name} has no recorded shape"
            operand_axis = axis - (len(out) - len(shape))
            if operand_axis < 0 or shape[operand_axis] != out[axis]:
                return f"{operand.name} is broadcast along the hidden dimension of the residual stream"
            pairs.append((operand, operand_axis))
        return pairs
    if (DROPOUT(node) and not (node.kwargs["training"] and node.kwargs["p"] > 0)) or IDENTITY(node):
        return [(node.kwargs["input"], axis)]
    if node.op not in ("call_function", "call_method"):
        return None
    name, source = layout_op(node), node.args[0] if node.args else None
    if name == "cat":
        tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim % len(out) == axis:
            return f"{node.name} concatenates along the hidden dimension"
        return [(t, axis) for t in tensors]
    if not isinstance(source, Node) or rw.shape(source) is None:
        return None
    shape = rw.shape(source)
    if name in _PASS_THROUGH:
        return [(source, axis)] if node.meta.get("tensor_meta") is None or out == shape else None
    if name in _RESHAPES:
        # row-major reshape: output axis a is input axis b when the sizes before them match
        before = math.prod(out[:axis])
        for b in range(len(shape)):
            if math.prod(shape[:b]) == before and shape[b] == out[axis]:
                return [(source, b)]
        return f"{node.name} reshapes the hidden dimension"
    if name == "transpose":
        d0, d1 = (d % len(out) for d in node.args[1:3])
        return [(source, {d0: d1, d1: d0}.get(axis, axis))]
    if name == "permute":
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return [(source, dims[axis] % len(out))]
    if name == "expand":
        source_axis = axis - (len(out) - len(shape))
        if source_axis < 0 or shape[source_axis] != out[axis]:
            return f"{node.name} broadcasts along the hidden dimension"
        return [(source, source_axis)]
    return None


def find_stream(norm: Node, rw: Rewriter) -> Stream | Skip:
    """The residual stream that LayerNorm ``norm`` reads, or why it is not a Pre-LN stream."""
    start = norm.kwargs["input"]
    rank = _rank(start, rw)
    if rank is None:
        return Skip("the LayerNorm input has no recorded shape")
    stream = Stream(hidden=rw.shape(start)[-1])
    backwards: list[tuple[Node, int]] = [(start, rank - 1)]
    forwards: list[Node] = []
    while backwards or forwards:
        if backwards:
            node, axis = backwards.pop()
            if node in stream.nodes or node in stream.writers:
                if stream.nodes.get(node, stream.writers.get(node)) != axis:
                    return Skip(f"{node.name} reaches the residual stream along two different axes")
                continue
            inputs = _input_axis(node, axis, rw)
            if isinstance(inputs, str):
                return Skip(inputs)
            if inputs is None:
                stream.writers[node] = axis
            else:
                stream.nodes[node] = axis
                backwards += inputs
                forwards.append(node)
            continue
        node = forwards.pop()
        for user in node.users:
            if user in stream.nodes or user in stream.readers:
                continue
            problem = _reader_problem(user, node, stream, rw)
            if problem == "":
                stream.readers.append(user)
            elif problem is None:
                backwards.append((user, _rank(user, rw) - 1))  # a later add or layout op of the stream
            else:
                return Skip(problem)
    return _writers_problem(stream, rw) or stream


def _reader_problem(user: Node, value: Node, stream: Stream, rw: Rewriter) -> str | None:
    """'' for a LayerNorm reader over the hidden dim, None for a node that continues the stream,
    else why the stream has a reader that is not mean-invariant."""
    if user.op == "output":
        return "the model returns the residual stream itself (raw hidden states): re-centring would change it"
    if LAYER_NORM(user) and user.kwargs["input"] is value:
        if tuple(user.kwargs["normalized_shape"]) != (stream.hidden,) or stream.nodes[value] != _rank(value, rw) - 1:
            return f"LayerNorm {user.name} does not normalize over the hidden dimension alone"
        return ""
    if _rank(user, rw) is None:
        return f"{user.name} reads the residual stream and is not a tensor op (e.g. a shape read)"
    if ADD(user) or _input_axis(user, _rank(user, rw) - 1, rw) is not None:
        return None
    return (
        f"{user.name} ({layout_op(user) or user.op}) reads the residual stream and is not a LayerNorm over the "
        "hidden dimension (a Post-LN model such as BERT, or a head on the raw stream)"
    )


def _writers_problem(stream: Stream, rw: Rewriter) -> Skip | None:
    for writer, axis in stream.writers.items():
        problem = _writer_problem(writer, axis, rw)
        if problem is not None:
            return Skip(problem)
        if writer.op != "get_attr" and any(u not in stream.nodes for u in writer.users):
            return Skip(f"{writer.name} writes into the residual stream and is also read elsewhere")
    return None


def _layer_scale(node: Node, axis: int, rw: Rewriter) -> tuple[Node, Node] | None:
    """(projection, gamma) for LayerScale ``projection(x) * gamma`` with gamma per hidden channel."""
    if not MUL(node) or not all(isinstance(a, Node) for a in node.args):
        return None
    for inner, gamma in (node.args, node.args[::-1]):
        value = rw.constant(gamma)
        if value is None or _projection_problem(inner, axis, rw) is not None or len(inner.users) != 1:
            continue
        per_channel = value.numel() == rw.shape(node)[axis] and value.shape[-1] == value.numel()
        if per_channel and axis == len(rw.shape(node)) - 1:
            return inner, gamma
    return None


def _projection_problem(node: Node, axis: int, rw: Rewriter) -> str | None:
    """None when ``node`` is a Linear/addmm/conv whose output channels can be re-centred."""
    rank = _rank(node, rw)
    if LINEAR(node) or ADDMM(node):
        weight = node.kwargs["weight" if LINEAR(node) else "mat2"]
        bias = node.kwargs["bias" if LINEAR(node) else "input"]
        if axis != rank - 1:
            return f"{node.name} writes the stream along an axis that is not its output features"
        if not (rw.is_constant(weight) and rw.is_constant(bias)) or weight is None:
            return f"{node.name}: weight or bias computed at run time"
        return None
    if CONV(node):
        k = node.kwargs
        if k["transposed"] or k["groups"] != 1 or axis != 1:
            return f"{node.name}: only a plain conv's output channels can be re-centred"
        return None if rw.is_constant(k["weight"]) and rw.is_constant(k["bias"]) else f"{node.name}: weights computed at run time"
    return ""


def _writer_problem(writer: Node, axis: int, rw: Rewriter) -> str | None:
    if writer.op == "get_attr":
        return None if rw.constant(writer) is not None else f"{writer.name} is not a tensor constant"
    if EMBEDDING(writer):
        if axis != _rank(writer, rw) - 1 or rw.constant(writer.kwargs["weight"]) is None:
            return f"embedding {writer.name} cannot be re-centred"
        if writer.kwargs["max_norm"] is not None:
            return f"embedding {writer.name} renormalizes rows (max_norm): re-centring changes that"
        return None
    if LAYER_NORM(writer) or ZERO_MEAN_RMS_NORM(writer):
        return (
            f"LayerNorm {writer.name} writes into the residual stream (Post-LN, or an embedding LayerNorm): "
            "its output cannot be re-centred with per-channel parameters"
        )
    problem = _projection_problem(writer, axis, rw)
    if problem == "":
        if _layer_scale(writer, axis, rw) is not None:
            return None
        return f"{writer.name} ({layout_op(writer) or writer.op}) writes into the residual stream and cannot be re-centred"
    return problem


# ---------------------------------------------------------------------------------------------
# re-centring


def _centred(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """float64 ``tensor`` minus its mean along ``dim``: the written vectors become zero-mean."""
    return tensor - tensor.mean(dim, keepdim=True)


def _written(tensor: torch.Tensor, dim: int, drop_last: bool) -> torch.Tensor:
    """float64 ``tensor`` re-centred along ``dim``; without its last channel there when ``drop_last``
    (Pre-CRMSNorm stores the zero-mean stream in its first d - 1 coordinates)."""
    centred = _centred(tensor, dim)
    return centred.narrow(dim, 0, centred.shape[dim] - 1) if drop_last else centred


def recentred_writer(writer: Node, axis: int, rw: Rewriter, pass_name: str, drop_last: bool = False) -> Node:
    """``writer`` of the stream (along ``axis``) rebuilt to write zero-mean vectors: a new node
    (constant, embedding or projection). ``drop_last``: it writes the first d - 1 channels only."""
    if writer.op == "get_attr":
        value = rw.constant(writer)
        _note_untied(writer, rw, pass_name)
        return rw.new_constant(writer.target, _written(value.double(), axis, drop_last).to(value.dtype))
    if EMBEDDING(writer):
        weight = writer.kwargs["weight"]
        value = rw.constant(weight)
        _note_untied(weight, rw, pass_name)
        new = rw.new_constant(weight.target, _written(value.double(), 1, drop_last).to(value.dtype))
        return rw.call(EMBEDDING, **{**writer.kwargs, "weight": new})
    scale = _layer_scale(writer, axis, rw)
    projection, gamma = scale if scale is not None else (writer, None)
    gamma_value = None if gamma is None else rw.constant(gamma).double().reshape(-1)
    return _recentred_projection(projection, gamma_value, rw, pass_name, drop_last)


def _recentred_projection(node: Node, gamma: torch.Tensor | None, rw: Rewriter, pass_name: str, drop_last: bool) -> Node:
    """Linear/addmm/conv with output channels scaled by LayerScale ``gamma`` first, then re-centred."""
    weight_key, bias_key, out_dim = ("weight", "bias", 0) if not ADDMM(node) else ("mat2", "input", 1)
    weight_node, bias_node = node.kwargs[weight_key], node.kwargs[bias_key]
    weight = rw.constant(weight_node)
    w = weight.double()
    channels = w.shape[out_dim]
    b = rw.constant(bias_node).double() if bias_node is not None else torch.zeros(channels, dtype=torch.float64)
    if gamma is not None:
        shape = [1] * w.dim()
        shape[out_dim] = channels
        w, b = w * gamma.view(shape), b * gamma
    _note_untied(weight_node, rw, pass_name)
    new_w = rw.new_constant(weight_node.target, _written(w, out_dim, drop_last).to(weight.dtype))
    bias_name = bias_node.target if bias_node is not None else f"{weight_node.target}_bias"
    new_b = rw.new_constant(bias_name, _written(b, 0, drop_last).to(weight.dtype))
    op = LINEAR if LINEAR(node) else ADDMM if ADDMM(node) else CONV
    return rw.call(op, **{**node.kwargs, weight_key: new_w, bias_key: new_b})


def _note_untied(weight: Node, rw: Rewriter, pass_name: str) -> None:
    if rw.shared(weight):
        value = rw.constant(weight)
        size = value.numel() * value.element_size()
        rw.note(
            f"{pass_name} untied {weight.target} {tuple(value.shape)}: the stream writer gets a re-centred copy, "
            f"its other readers (e.g. a tied LM head) keep their own; +{size / 2**20:.2f} MiB"
        )


def stream_nodes(stream: Stream, rw: Rewriter) -> dict[str, Node]:
    """Every node a stream rewrite replaces, by name (for a Match): writers (with the projection of
    a LayerScale writer), the stream's adds and layout ops, and its LayerNorm readers."""
    nodes = {**stream.writers, **stream.nodes, **dict.fromkeys(stream.readers)}
    for writer, axis in stream.writers.items():
        scale = _layer_scale(writer, axis, rw) if MUL(writer) else None
        if scale is not None:
            nodes[scale[0]] = axis
    return {n.name: n for n in nodes}


def rebuilt_stream(
    stream: Stream, rw: Rewriter, pass_name: str, drop_last: bool = False,
    layout_args: Callable[[Node, int], tuple[tuple, dict]] | None = None,
) -> dict[Node, Node]:
    """The stream rebuilt zero-mean, in graph order: {old writer or stream node: new node}.

    Each new node goes in front of the one it replaces. ``layout_args(node, axis)`` gives a layout
    op's new (args, kwargs) before the inputs are mapped (default: unchanged); readers are left to
    the caller."""
    new: dict[Node, Node] = {}
    order = {n: i for i, n in enumerate(rw.graph.nodes)}
    for node in sorted({*stream.writers, *stream.nodes}, key=order.__getitem__):
        with rw.inserting_before(node):
            if node in stream.writers:
                new[node] = recentred_writer(node, stream.writers[node], rw, pass_name, drop_last)
                continue
            args, kwargs = layout_args(node, stream.nodes[node]) if layout_args else (node.args, node.kwargs)
            args, kwargs = map_arg((args, kwargs), lambda a: new.get(a, a))
            build = rw.call_function if node.op == "call_function" else rw.call_method
            new[node] = build(node.target, *args, **kwargs)
    return new


class PreLNStream(Pattern):
    """Every LayerNorm reading one residual stream, with all the stream's writers."""

    anchor = LAYER_NORM

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        stream = find_stream(node, rw)
        if isinstance(stream, Skip):
            return stream
        return Match(node, stream_nodes(stream, rw))

    def rewrite(self, match: Match, rw: Rewriter) -> dict[Node, Node]:
        stream = find_stream(match.root, rw)
        new = rebuilt_stream(stream, rw, "ln_to_rmsnorm")
        replacements: dict[Node, Node] = {}
        for reader in stream.readers:
            k = reader.kwargs
            with rw.inserting_before(reader):
                replacements[reader] = rw.call(ZERO_MEAN_RMS_NORM, input=new[k["input"]], normalized_shape=k["normalized_shape"],
                                               weight=k["weight"], bias=k["bias"], eps=k["eps"])
        return replacements


# ---------------------------------------------------------------------------------------------
# instances: small Pre-LN stacks (embedding or patch/cls-token input, optional LayerScale)


class _Block(nn.Module):
    """x + ls1 * proj(f(LN1(x))); x + ls2 * fc2(gelu(fc1(LN2(x)))): a Pre-LN block without attention."""

    def __init__(self, d: int, layer_scale: bool, bias: bool):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, elementwise_affine=bias or layer_scale), nn.LayerNorm(d)
        self.mix, self.proj = nn.Linear(d, d), nn.Linear(d, d, bias=bias)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ls1 = nn.Parameter(torch.rand(d) + 0.5) if layer_scale else None
        self.ls2 = nn.Parameter(torch.rand(d) + 0.5) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(torch.tanh(self.mix(self.ln1(x))))
        x = x + (h * self.ls1 if self.ls1 is not None else h)
        h = self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return x + (h * self.ls2 if self.ls2 is not None else h)


class _TinyPreLN(nn.Module):
    """``pooled``: the head reads the final norm's token mean, not the norm itself (a non-Linear reader)."""

    def __init__(self, d: int, depth: int, vocab: int | None, layer_scale: bool, bias: bool, pooled: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d) if vocab else nn.Linear(3, d)
        self.pos = nn.Parameter(torch.randn(d))
        self.blocks = nn.Sequential(*[_Block(d, layer_scale, bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)
        self.pooled = pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.blocks(self.embed(x) + self.pos))
        return self.head(h.mean(1) if self.pooled else h)


@st.composite
def ln_to_rmsnorm_instances(draw, pooled_heads: bool = False) -> tuple[nn.Module, tuple]:
    """A Pre-LN stack fed by token ids or features, with or without LayerScale and biases;
    ``pooled_heads``: some heads read the final norm through a token mean."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    d, depth = draw(st.integers(2, 12)), draw(st.integers(1, 3))
    vocab = draw(st.sampled_from([None, 7]))
    # always LayerScale: check_pass sees a pass fire by its op count, which only the folded multiply changes
    pooled = draw(st.booleans()) if pooled_heads else False
    model = _TinyPreLN(d, depth, vocab, True, draw(st.booleans()), pooled)
    with torch.no_grad():  # random norm affines, so gamma and beta matter
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.normal_(1.0, 0.5), m.bias.normal_()
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 4)))
    x = torch.randint(0, 7, shape) if vocab else torch.randn(*shape, 3)
    return model.eval(), (x,)


LN_TO_RMSNORM = register(
    Pass(
        name="ln_to_rmsnorm",
        description="Pre-LN transformer: re-centre the residual stream's writers, LayerNorm -> RMSNorm (exact)",
        patterns=(PreLNStream(),),
        instances=ln_to_rmsnorm_instances,
        # not default: with eager CPU kernels the emitted norm is the LayerNorm kernel (no faster),
        # and untying a tied LM head makes the model larger
        default=False,
    )
)
