"""fold_constants: evaluate, once, every computation that reads only constants.

A layer that builds its kernel in forward from its parameters (DEA-Net's difference convs, a
weight standardisation, a reparameterised scale) recomputes the same tensor on every call. Any
pure, deterministic call whose inputs are constants (parameters, buffers, python values, or other
such calls) is evaluated at optimisation time and replaced by a new constant; the parameters it
read disappear when nothing else reads them. Only the outermost tensor of a constant chain is
materialised (its intermediate values are evaluated with it), so a chain costs one evaluation.
Random ops and calls that mutate a tensor are never folded. Neither is a value much bigger than the
constants it reads (an expand or repeat of a small parameter, a tensor built from sizes): storing
it would grow the model; except where a conv, linear or BatchNorm reads it as a parameter, which
the folds and re-parameterizations after this pass need as a constant.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.fx import Node

from fxopt.interpret import run_nodes
from fxopt.ops import ANY, BATCH_NORM, CONV, DROPOUT, LINEAR, PAD_PER_CHANNEL
from fxopt.pattern import Match, Pass, Pattern, Skip, register
from fxopt.rewriter import Rewriter

# Random (or dropout) functions: each call must draw anew.
_RANDOM_FUNCTIONS = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like, torch.randint_like,
    torch.bernoulli, torch.multinomial, torch.normal, torch.poisson, torch.dropout, torch.feature_dropout,
    torch.alpha_dropout, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.feature_alpha_dropout, F.rrelu, F.gumbel_softmax,
}
_RANDOM_METHODS = {"bernoulli", "multinomial"}
# Functions that write into an argument.
_MUTATING_FUNCTIONS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul,
}
# A folded value may hold more numbers than the constants it is computed from only up to this many.
GROWTH_FLOOR = 1024
# Where a layer reads a folded value as a parameter: folded whatever its size (passes need it constant).
_PARAMETER_SLOTS = (
    (CONV, ("weight", "bias")),
    (LINEAR, ("weight", "bias")),
    (BATCH_NORM, ("running_mean", "running_var", "weight", "bias")),
    (PAD_PER_CHANNEL, ("value",)),
)


def _is_aten(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload)


# In-place in name only: they change autograd bookkeeping, never values (LoHa under torch.export).
_KEEPS_VALUES = {torch.ops.aten.detach_.default, "detach_", "requires_grad_"}


def is_pure(node: Node) -> bool:
    """A deterministic call that writes into none of its arguments (eval-mode dropout included:
    it is the identity)."""
    if node.target in _KEEPS_VALUES or (DROPOUT(node) and (not node.kwargs["training"] or node.kwargs["p"] == 0)):
        return True
    if node.op == "call_method":
        name = node.target
        return not (name.endswith("_") and not name.endswith("__")) and name not in _RANDOM_METHODS
    if node.op != "call_function":
        return False
    target = node.target
    if _is_aten(target):
        return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
    if target in _RANDOM_FUNCTIONS or target in _MUTATING_FUNCTIONS:
        return False
    if BATCH_NORM(node) and node.kwargs["training"]:
        return False  # updates the running statistics
    return node.kwargs.get("inplace") is not True and "out" not in node.kwargs


def _mutated(node: Node, rw: Rewriter) -> bool:
    """True when some user writes into ``node``'s value (folding it would freeze the write).

    For a get_attr, every read of the same attribute counts: a buffer updated in forward is not constant.
    """
    readers = rw.get_attrs(node.target) if node.op == "get_attr" else [node]
    return any(
        user.op in ("call_function", "call_method") and not is_pure(user) for n in readers for user in n.users
    )


def constant_closure(node: Node, rw: Rewriter) -> list[Node] | None:
    """``node`` and every call and get_attr it depends on, when all of it is constant; else None."""
    if rw.reads_inputs(node):
        return None
    closure: dict[Node, None] = {}

    def visit(n: Node) -> bool:
        if n in closure:
            return True
        if n.op == "get_attr":
            ok = rw.constant(n) is not None and not _mutated(n, rw)
        else:
            ok = is_pure(n) and not _mutated(n, rw) and all(visit(arg) for arg in n.all_input_nodes)
        if ok:
            closure[n] = None
        return ok

    return list(closure) if visit(node) else None


class FoldConstantCall(Pattern):
    """A tensor-valued call whose inputs are all constant, at the end of its constant chain."""

    anchor = ANY

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        closure = constant_closure(node, rw)
        if closure is None or rw.shape(node) is None:
            return None  # varies, or not a tensor (a shape, a tuple): folded with the tensor it feeds
        seen: dict[Node, bool] = {}
        if node.users and all(_will_fold(user, rw, seen) for user in node.users):
            return None  # every user folds this value together with its own: one evaluation for the chain
        growth = _growth(node, closure, rw)
        if growth is not None:
            return growth
        return Match(node, {n.name: n for n in closure})

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        value = run_nodes(rw.gm, match.nodes.values(), {})[match.root]
        # a copy: the result may be a view of a parameter that stays in use elsewhere
        return rw.new_constant(_constant_name(match), value.detach().clone())


def _will_fold(node: Node, rw: Rewriter, seen: dict[Node, bool]) -> bool:
    """True when ``node``'s value is computed at optimisation time: folded itself, or inside the folds of
    all its users. ``seen`` memoises the answer per node (constant subgraphs may share nodes)."""
    if node not in seen:
        closure = None if node.op == "output" or rw.shape(node) is None else constant_closure(node, rw)
        seen[node] = closure is not None and (
            (bool(node.users) and all(_will_fold(user, rw, seen) for user in node.users))
            or _growth(node, closure, rw) is None
        )
    return seen[node]


def _growth(node: Node, closure: list[Node], rw: Rewriter) -> Skip | None:
    """Why folding ``node`` would store many more numbers than the constants it reads; None when it is fine."""
    size = rw.shape(node).numel()
    read = sum(rw.constant(n).numel() for n in {n.target: n for n in closure if n.op == "get_attr"}.values()
               if rw.constant(n) is not None)
    if size <= max(read, GROWTH_FLOOR) or _read_as_parameter(node):
        return None
    return Skip(
        f"kept computed at run time: folding would store {size:,} numbers computed from {read:,} constant ones "
        "(an expand, repeat or broadcast of a small tensor, or a tensor built from sizes), a larger model; "
        "values a conv, linear or BatchNorm reads as a parameter are folded whatever their size"
    )


def _read_as_parameter(node: Node) -> bool:
    return any(
        op(user) and any(user.kwargs.get(slot) is node for slot in slots)
        for user in node.users
        for op, slots in _PARAMETER_SLOTS
    )


def _constant_name(match: Match) -> str:
    """Named after a parameter it is computed from (``conv.weight`` -> ``conv.weight_folded``)."""
    sources = [n.target for n in match.nodes.values() if n.op == "get_attr"]
    return f"{sources[0]}_folded" if sources else f"_folded_{match.root.name}"


# ---------------------------------------------------------------------------------------------
# instances: layers that compute their kernel (or a scale) from their parameters in forward


class _StandardisedConv(nn.Conv2d):
    """Weight standardisation: the kernel is normalised per output channel on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _ScaledLinear(nn.Linear):
    """A Linear whose effective weight is a per-row exp-scale of its raw weight."""

    def __init__(self, fin: int, fout: int):
        super().__init__(fin, fout)
        self.log_scale = nn.Parameter(torch.randn(fout, 1) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.log_scale.exp(), self.bias.view(-1).clone())


@st.composite
def fold_constants_instances(draw) -> tuple[nn.Module, tuple]:
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if draw(st.booleans()):
        cin, cout = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        model = _StandardisedConv(cin, cout, draw(st.sampled_from([1, 3])), padding=1)
        return model.eval(), (torch.randn(draw(st.integers(1, 2)), cin, 6, 6),)
    fin, fout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    return _ScaledLinear(fin, fout).eval(), (torch.randn(draw(st.integers(1, 3)), fin),)


FOLD_CONSTANTS = register(
    Pass(
        name="fold_constants",
        description="Evaluate computations that read only constants (kernels built from parameters) once",
        patterns=(FoldConstantCall(),),
        instances=fold_constants_instances,
    )
)
