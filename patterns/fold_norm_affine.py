"""fold_norm_affine: fold a norm's gamma and beta into the Linears that read it.

norm(x) = n(x) * gamma + beta with n parameter-free, so a Linear reading it computes
W (n * gamma + beta) + b = (W diag(gamma)) n + (b + W beta). When every consumer of the norm is
a Linear (or GPT-2's Conv1D, an addmm with an (in, out) weight) reading it as input, possibly
through a reshape that keeps the feature axis last, each consumer takes its own folded weight and
the norm loses its affine: two elementwise ops fewer, no parameter more (the folded weights
replace the old ones). The helpers below are shared with fold_repbn, which folds a per-channel
affine the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.fx import Node

from fxopt.ops import ADDMM, LAYER_NORM, LINEAR, RMS_NORM, ZERO_MEAN_RMS_NORM, Op, layout_op, reads_as_input
from fxopt.pattern import Match, Pass, Pattern, Skip, register
from fxopt.rewriter import Rewriter, bias_name

# reshapes that keep a tensor's last axis when its size is unchanged (row-major: the index along
# the last axis of any reshape with the same last size is the input's last index)
_RESHAPE_NAMES = {"view", "reshape", "_unsafe_view"}


@dataclass(frozen=True)
class Consumer:
    """A canonical linear or addmm reading a value as its input, possibly through one reshape."""

    layer: Node
    via: Node | None = None


def _layer_problem(layer: Node, rw: Rewriter) -> str | None:
    weight, bias = _weight_bias_nodes(layer)
    if weight.op != "get_attr" or not (rw.is_constant(weight) and rw.is_constant(bias)):
        return f"consumer {layer.name}: weight or bias is computed at run time, not a constant"
    if rw.shared(weight) or rw.shared(bias):
        return f"consumer {layer.name}: its weight is shared (tied) with another layer; folding would untie it"
    return None


def affine_consumers(value: Node, rw: Rewriter, what: str) -> list[Consumer] | Skip:
    """Every reader of ``value`` as a foldable Linear/addmm consumer, or why one is not."""
    if not value.users:
        return Skip(f"{what} has no consumers")
    consumers: list[Consumer] = []
    width = _last_dim(value, rw)
    for user in value.users:
        if layout_op(user) in _RESHAPE_NAMES and user.args and user.args[0] is value and width is not None and _last_dim(user, rw) == width:
            readers = [(layer, user) for layer in user.users]
        else:
            readers = [(user, None)]
        for layer, via in readers:
            if not reads_as_input(layer, via or value):
                name = layer.target if layer.op == "output" else getattr(layer.target, "__name__", layer.target)
                return Skip(f"{what} is read by {layer.name} ({name}), not a Linear reading it as input")
            problem = _layer_problem(layer, rw)
            if problem:
                return Skip(problem)
            consumers.append(Consumer(layer, via))
    return consumers


def _last_dim(node: Node, rw: Rewriter) -> int | None:
    shape = rw.shape(node)
    return shape[-1] if shape else None


def _weight_bias_nodes(layer: Node) -> tuple[Node, Node | None]:
    if LINEAR(layer):
        return layer.kwargs["weight"], layer.kwargs["bias"]
    return layer.kwargs["mat2"], layer.kwargs["input"]


def folded_layer(layer: Node, input: Node, scale: torch.Tensor | None, shift: torch.Tensor | None, rw: Rewriter) -> Node:
    """``layer`` reading ``input * scale + shift`` (per input feature, float64) rewritten to read ``input``."""
    weight_node, bias_node = _weight_bias_nodes(layer)
    stored = rw.constant(weight_node)
    # Linear weights are (out, in); an addmm's mat2 is (in, out): view everything as (out, in)
    w = stored.double() if stored.dtype == torch.float64 else stored.float()
    w = w if LINEAR(layer) else w.t()
    new_weight, new_bias = weight_node, bias_node
    if scale is not None:
        folded = w * scale.to(w.dtype)[None, :]
        new_weight = rw.new_constant(weight_node.target, (folded if LINEAR(layer) else folded.t()).to(stored.dtype))
    if shift is not None:
        old = rw.constant(bias_node)
        bias = (old.double() if old is not None else torch.zeros(w.shape[0], dtype=torch.float64)) + w.double() @ shift
        name = bias_node.target if bias_node is not None else bias_name(weight_node.target)
        new_bias = rw.new_constant(name, bias.to(stored.dtype))
    if LINEAR(layer):
        return rw.call(LINEAR, input=input, weight=new_weight, bias=new_bias)
    return rw.call(ADDMM, input=new_bias, mat1=input, mat2=new_weight)


def fold_into_consumers(
    consumers: list[Consumer], value: Node, scale: torch.Tensor | None, shift: torch.Tensor | None, rw: Rewriter
) -> dict[Node, Node]:
    """Each consumer rewritten to read ``value`` with the affine folded in: {old layer: new layer}."""
    reshaped: dict[Node, Node] = {}
    replacements: dict[Node, Node] = {}
    for consumer in consumers:
        input = value
        if consumer.via is not None:
            if consumer.via not in reshaped:
                via = consumer.via
                with rw.inserting_before(via):
                    build = rw.call_function if via.op == "call_function" else rw.call_method
                    reshaped[via] = build(via.target, value, *via.args[1:], **via.kwargs)
            input = reshaped[consumer.via]
        with rw.inserting_before(consumer.layer):
            replacements[consumer.layer] = folded_layer(consumer.layer, input, scale, shift, rw)
    return replacements


def consumer_nodes(consumers: list[Consumer]) -> dict[str, Node]:
    """The consumers' layers and reshapes, by name, for a Match."""
    nodes = {c.layer.name: c.layer for c in consumers}
    nodes.update({c.via.name: c.via for c in consumers if c.via is not None})
    return nodes


class NormAffineIntoLinears(Pattern):
    """A LayerNorm / RMSNorm (or zero-mean RMSNorm) whose readers are all Linears."""

    def __init__(self, anchor: Op):
        self.anchor = anchor

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        k = node.kwargs
        gamma, beta = k["weight"], k.get("bias")
        if gamma is None and beta is None:
            return None  # already parameter-free (also what rewrite leaves behind)
        if not (rw.is_constant(gamma) and rw.is_constant(beta)):
            return Skip(f"{node.name}: gamma or beta is computed at run time, not a constant")
        if len(k["normalized_shape"]) != 1:
            return Skip(
                f"{node.name} normalizes the last {len(k['normalized_shape'])} dims: its gamma and beta vary along "
                "dims a Linear does not mix, so they cannot fold into its weight"
            )
        consumers = affine_consumers(node, rw, f"norm {node.name}")
        if isinstance(consumers, Skip):
            return consumers
        return Match(node, {"norm": node, **consumer_nodes(consumers)})

    def rewrite(self, match: Match, rw: Rewriter) -> dict[Node, Node]:
        norm = match.root
        k = norm.kwargs
        gamma, beta = rw.constant(k["weight"]), rw.constant(k.get("bias"))
        with rw.inserting_before(norm):
            bare = rw.call(self.anchor, **{**k, "weight": None, **({"bias": None} if "bias" in k else {})})
        consumers = affine_consumers(norm, rw, norm.name)
        return fold_into_consumers(
            consumers, bare,
            gamma.double().reshape(-1) if gamma is not None else None,
            beta.double().reshape(-1) if beta is not None else None,
            rw,
        )


# ---------------------------------------------------------------------------------------------
# instances: a norm feeding one to three Linears (q, k, v), module or functional, with a reshape


class _NormThenLinears(nn.Module):
    def __init__(self, d: int, kind: str, bias: bool, heads: int, reshape: bool):
        super().__init__()
        self.kind, self.reshape, self.d = kind, reshape, d
        self.norm = nn.LayerNorm(d, bias=bias) if "layer_norm" in kind else nn.RMSNorm(d)
        with torch.no_grad():
            self.norm.weight.normal_(1.0, 0.5)
            if getattr(self.norm, "bias", None) is not None:
                self.norm.bias.normal_()
        self.heads = nn.ModuleList(nn.Linear(d, d + i, bias=i % 2 == 0) for i in range(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        if self.kind == "functional_layer_norm":
            h = F.layer_norm(x, n.normalized_shape, n.weight, n.bias, n.eps)
        elif self.kind == "functional_rms_norm":
            h = F.rms_norm(x, n.normalized_shape, n.weight, n.eps)
        else:
            h = n(x)
        if self.reshape:
            h = h.reshape(-1, self.d)
        return torch.cat([linear(h) for linear in self.heads], dim=-1)


@st.composite
def fold_norm_affine_instances(draw) -> tuple[nn.Module, tuple]:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    d = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["layer_norm", "rms_norm", "functional_layer_norm", "functional_rms_norm"]))
    model = _NormThenLinears(d, kind, draw(st.booleans()), draw(st.integers(1, 3)), draw(st.booleans()))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    x = torch.randn(draw(st.integers(1, 3)), draw(st.integers(1, 4)), d, dtype=dtype)
    return model.to(dtype).eval(), (x,)


FOLD_NORM_AFFINE = register(
    Pass(
        name="fold_norm_affine",
        description="Fold a LayerNorm/RMSNorm's gamma and beta into the Linears that read it",
        patterns=tuple(NormAffineIntoLinears(op) for op in (LAYER_NORM, RMS_NORM, ZERO_MEAN_RMS_NORM)),
        instances=fold_norm_affine_instances,
    )
)
