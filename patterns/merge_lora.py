"""merge_lora: merge low-rank adapters into the weight of the layer they adapt.

An adapted layer computes ``W x + b + s * B(A(x))`` (or a variant) and costs the base layer plus
the branch; merged, it is one layer of the base's shape. Adapters are recognised by what they
compute, not by who wrote them: at the top of a sum, every term that is an *affine function of
one input x along the feature axis* is evaluated symbolically to ``(weight, bias)`` in float64:

* linear / matmul / addmm (fan_in_fan_out, GPT-2's Conv1D) / conv with constant weights compose,
* multiplication by a constant scalar or per-feature vector scales (LoRA's alpha/r, rsLoRA's
  alpha/sqrt(r), DoRA's magnitude / ||W + sBA||, VeRA's lambda vectors),
* add and sub combine (several adapters, lora_bias, DoRA's ``(c - 1) * (base - bias)``),
* eval-mode dropout, identity, flattening views and same-dtype casts pass x through.

"Constant" includes weight-only subgraphs (DoRA's norm, VeRA's sliced bases, LoHa/LoKr weights
built in forward): they are evaluated as the forward computes them (fold_constants' closure).
The sum is replaced by one layer when its terms use at least two layers of which one (the base)
already has the merged weight's shape, so the result is never larger or slower. See shared notes
"LoRA family" for the traps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.fx import Node

from fxopt.interpret import run_nodes
from fxopt.ops import ADD, ADDMM, CONV, DROPOUT, IDENTITY, LINEAR, MATMUL, MUL, SUB
from fxopt.pattern import Match, Pass, Pattern, Skip, register
from fxopt.rewriter import Rewriter, bias_name
from .fold_constants import constant_closure

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape, "view", "reshape"}
_CASTS = {aten.to.dtype, aten._to_copy.default, "to", "type_as"}
_ALIASES = {aten.alias.default, aten.detach.default, aten.contiguous.default, aten.clone.default, "contiguous"}
_LAYERS = (LINEAR, MATMUL, ADDMM, CONV)


class _NotMergeable(Exception):
    """An adapter-shaped sum that cannot be merged; the message becomes the Skip reason."""


@dataclass(frozen=True)
class Window:
    """What a conv applied to x does spatially; every conv path of a merged sum must share it."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    padding_mode: str


@dataclass
class Form:
    """A value as ``weight`` applied to x plus ``bias``, along the feature axis, in float64.

    ``weight`` is (out, in) for linear maps, (out, in, *kernel) dense (groups expanded) for convs,
    or None for x itself. ``bias`` is (out,) or None for zero.
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    window: Window | None = None


@dataclass
class Plan:
    """What a match merges: the new layer's weight and bias, and the layer it replaces."""

    x: Node
    base: Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    others: list[Node] = field(default_factory=list)


def _layer_weight(layer: Node) -> Node:
    return layer.kwargs["mat2"] if ADDMM(layer) else layer.kwargs["other"] if MATMUL(layer) else layer.kwargs["weight"]


def _layer_input(layer: Node) -> Node:
    return layer.kwargs["mat1"] if ADDMM(layer) else layer.kwargs["input"]


class _Analysis:
    """Affine forms of nodes in one input ``x`` (memoised), and what they read."""

    def __init__(self, x: Node, rw: Rewriter, variable: dict[Node, bool]):
        self.x, self.rw, self.variable = x, rw, variable
        self.conv: bool | None = None  # feature axis: channels (conv) or last (linear), set by the first layer
        self.forms: dict[Node, Form | None] = {}
        self.constants: dict[Node, torch.Tensor | None] = {}
        self.weight_only: set[Node] = set()  # constant subgraphs the forms read
        self.layers: list[Node] = []

    # -- constants ------------------------------------------------------------------------------

    def constant(self, arg: object) -> torch.Tensor | None:
        """A python number, a constant tensor, or the value of a weight-only subgraph, else None."""
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return torch.tensor(float(arg), dtype=torch.float64)
        if not isinstance(arg, Node):
            return None
        if arg not in self.constants:
            self.constants[arg] = self._evaluate(arg)
        return self.constants[arg]

    def _evaluate(self, node: Node) -> torch.Tensor | None:
        value = self.rw.constant(node)
        if value is not None:
            self.weight_only.add(node)
            return value
        if _reads_input(node, self.variable):
            return None  # checked first: fold_constants' closure walk is exponential on activations
        closure = constant_closure(node, self.rw)
        if closure is None:
            return None
        value = run_nodes(self.rw.gm, closure, {})[node]  # in the model's dtype, as the forward computes it
        if not isinstance(value, torch.Tensor):
            return None
        self.weight_only.update(closure)
        return value

    def feature_vector(self, value: torch.Tensor, ndim: int) -> torch.Tensor | None:
        """``value`` as a scalar or per-feature (out,) float64 vector, if it broadcasts only along features."""
        if value.dim() == 0 or value.numel() == 1 and value.dim() <= ndim:
            return value.double().reshape(())
        if value.dim() > ndim:
            return None
        shape = [1] * (ndim - value.dim()) + list(value.shape)
        axis = 1 if self.conv else ndim - 1
        if any(size != 1 for i, size in enumerate(shape) if i != axis):
            return None
        return value.double().reshape(-1)

    # -- forms ----------------------------------------------------------------------------------

    def form(self, node: object) -> Form | None:
        if not isinstance(node, Node):
            return None
        if node is self.x:
            return Form(None, None)
        if node not in self.forms:
            self.forms[node] = None  # a cycle cannot happen in a DAG; this only guards re-entry
            self.forms[node] = self._form(node)
        return self.forms[node]

    def _form(self, node: Node) -> Form | None:
        through = _passes_through(node, self.conv)
        if through is not None:
            return self.form(through)
        if any(layer(node) for layer in _LAYERS):
            return self._layer(node)
        if MUL(node):
            return self._scaled(node)
        if ADD(node) or SUB(node):
            return self._sum(node, -1.0 if SUB(node) else 1.0)
        return None

    def _set_kind(self, conv: bool) -> bool:
        if self.conv is None:
            self.conv = conv
        return self.conv == conv

    def _layer(self, node: Node) -> Form | None:
        inner = self.form(_layer_input(node))
        if inner is None or not self._set_kind(CONV(node)):
            return None
        weight = self.constant(_layer_weight(node))
        bias_arg = node.kwargs.get("bias") if not ADDMM(node) else node.kwargs["input"]
        bias = None if bias_arg is None else self.constant(bias_arg)
        if weight is None or (bias_arg is not None and bias is None):
            return None
        weight = weight.double()
        if ADDMM(node) or MATMUL(node):
            if weight.dim() != 2:
                return None
            weight = weight.t()  # stored (in, out)
        bias = None if bias is None else bias.double().reshape(-1)
        self.layers.append(node)
        if CONV(node):
            return _compose_conv(node, weight, bias, inner)
        return Form(
            weight if inner.weight is None else weight @ inner.weight,
            _add(bias, None if inner.bias is None else weight @ inner.bias),
        )

    def _scaled(self, node: Node) -> Form | None:
        a, b = node.args
        for value_arg, scale_arg in ((a, b), (b, a)):
            inner = self.form(value_arg)
            if inner is None:
                continue
            scale = self.constant(scale_arg)
            shape = self.rw.shape(node)
            vector = None if scale is None or shape is None else self.feature_vector(scale, len(shape))
            if vector is None or inner.weight is None:
                return None
            return Form(_scale_rows(inner.weight, vector), None if inner.bias is None else inner.bias * vector,
                        inner.window)
        return None

    def _sum(self, node: Node, sign: float) -> Form | None:
        a, b = node.args
        fa, fb = self.form(a), self.form(b)
        if fa is not None and fb is not None:
            return _combine(fa, fb, sign)
        shape = self.rw.shape(node)
        if fa is not None and fa.weight is not None and shape is not None:
            shift = self.constant(b)
            vector = None if shift is None else self.feature_vector(shift, len(shape))
            return None if vector is None else Form(fa.weight, _add(fa.bias, sign * vector), fa.window)
        return None


def _reads_input(node: Node, memo: dict[Node, bool]) -> bool:
    """True when ``node`` depends on a placeholder (memoised: rewrites never change an existing node's inputs)."""
    stack = [node]
    while stack:
        n = stack[-1]
        if n in memo:
            stack.pop()
            continue
        pending = [a for a in n.all_input_nodes if a not in memo]
        if pending:
            stack.extend(pending)
            continue
        memo[n] = n.op == "placeholder" or any(memo[a] for a in n.all_input_nodes)
        stack.pop()
    return memo[node]


def _passes_through(node: Node, conv: bool | None) -> Node | None:
    """The input of a node that returns its input's values unchanged at inference, else None."""
    if DROPOUT(node):
        k = node.kwargs
        return k["input"] if not k["training"] or k["p"] == 0 else None
    if IDENTITY(node):
        return node.kwargs["input"]
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], Node):
        return None
    source = node.args[0]
    if node.target in _ALIASES:
        return source
    before, after = _meta(source), _meta(node)
    if before is None or after is None:
        return None
    if node.target in _CASTS:
        return source if before.dtype == after.dtype else None
    if node.target in _VIEWS and conv is not True:
        # flattening / unflattening leading dims keeps each feature row: GPT-2's Conv1D does this around addmm
        same_rows = before.shape[-1:] == after.shape[-1:] and math.prod(before.shape) == math.prod(after.shape)
        return source if same_rows else None
    return None


def _meta(node: Node):
    return node.meta.get("tensor_meta")


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _scale_rows(weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return weight * vector.reshape(-1, *([1] * (weight.dim() - 1))) if vector.dim() else weight * vector


def _combine(a: Form, b: Form, sign: float) -> Form | None:
    if a.weight is None or b.weight is None:
        return None  # x itself in the sum (a residual): not part of a layer
    if a.window != b.window or a.weight.shape != b.weight.shape:
        raise _NotMergeable(
            "the adapter's conv window (kernel, stride, padding, dilation) differs from the base conv's: "
            "the branch is not a conv of the base's shape"
        )
    return Form(a.weight + sign * b.weight, _add(a.bias, None if b.bias is None else sign * b.bias), a.window)


def _dense(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv weight (out, in/groups, *k) as the dense (out, in, *k) one it equals."""
    if groups == 1:
        return weight
    out, in_g = weight.shape[:2]
    dense = weight.new_zeros(out, in_g * groups, *weight.shape[2:])
    out_g = out // groups
    for g in range(groups):
        dense[g * out_g:(g + 1) * out_g, g * in_g:(g + 1) * in_g] = weight[g * out_g:(g + 1) * out_g]
    return dense


def _grouped(dense: torch.Tensor, groups: int) -> torch.Tensor | None:
    """The grouped weight of a dense one, or None when it reads across channel groups."""
    if groups == 1:
        return dense
    out, in_all = dense.shape[:2]
    out_g, in_g = out // groups, in_all // groups
    blocks = [dense[g * out_g:(g + 1) * out_g, g * in_g:(g + 1) * in_g] for g in range(groups)]
    outside = dense.clone()
    for g in range(groups):
        outside[g * out_g:(g + 1) * out_g, g * in_g:(g + 1) * in_g] = 0
    return torch.cat(blocks) if not outside.any() else None


def _compose_conv(node: Node, weight: torch.Tensor, bias: torch.Tensor | None, inner: Form) -> Form | None:
    k = node.kwargs
    if k["transposed"]:
        return None
    dense = _dense(weight, k["groups"])
    if inner.weight is None:
        window = Window(tuple(weight.shape[2:]), k["stride"], k["padding"], k["dilation"], k["padding_mode"])
        return Form(dense, bias, window)
    pointwise = all(s == 1 for s in weight.shape[2:]) and all(s == 1 for s in k["stride"]) and (
        not isinstance(k["padding"], str) and not any(k["padding"])
    )
    if not pointwise:
        return None  # only a 1x1 conv after the first one keeps the first one's window
    matrix = dense.flatten(1)
    composed = torch.einsum("or,ri...->oi...", matrix, inner.weight)
    return Form(composed, _add(bias, None if inner.bias is None else matrix @ inner.bias), inner.window)


# ---------------------------------------------------------------------------------------------
# the pattern


def _terms(root: Node) -> tuple[list[tuple[object, float]], list[Node]]:
    """The signed summands of the sum at ``root`` (expanding inner adds/subs nothing else reads), and those sums."""
    terms: list[tuple[object, float]] = []
    sums: list[Node] = []

    def expand(node: object, sign: float, top: bool) -> None:
        if isinstance(node, Node) and (ADD(node) or SUB(node)) and (top or len(node.users) == 1):
            sums.append(node)
            a, b = node.args
            expand(a, sign, False)
            expand(b, -sign if SUB(node) else sign, False)
        else:
            terms.append((node, sign))

    expand(root, 1.0, True)
    return terms, sums


def _peel(node: object) -> object:
    """Through eval dropout, identity, row-preserving views and casts: the tensor a layer really reads."""
    while isinstance(node, Node):
        through = _passes_through(node, None)
        if through is None:
            break
        node = through
    return node


def _candidate_inputs(terms: list[tuple[object, float]]) -> list[Node]:
    """Inputs of the layers near each term, most common first: the x an adapter and its base share."""
    counts: dict[Node, int] = {}
    for term, _ in terms:
        seen: set[Node] = set()
        stack, budget = [term], 64  # a few ops deep is enough to see an adapter's layers
        while stack and budget:
            node, budget = stack.pop(), budget - 1
            if not isinstance(node, Node) or node.op in ("placeholder", "get_attr"):
                continue
            if any(layer(node) for layer in _LAYERS):
                source = _peel(_layer_input(node))
                if isinstance(source, Node):
                    seen.add(source)
                stack.append(_layer_input(node))
            elif MUL(node) or ADD(node) or SUB(node):
                stack.extend(node.args)
            elif node.args:
                stack.append(node.args[0])
        for node in seen:
            counts[node] = counts.get(node, 0) + 1
    return sorted(counts, key=lambda n: -counts[n])


class MergeAdapter(Pattern):
    """A sum of a base layer and adapter branches on the same input -> one layer."""

    anchor = ADD
    benefit = 2

    def __init__(self) -> None:
        self._plans: dict[Node, Plan] = {}
        self._reads_input: dict[Node, bool] = {}

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        users = list(node.users)
        if len(users) == 1 and (ADD(users[0]) or SUB(users[0])):
            return None  # an inner sum: merged with the whole sum at its top
        terms, sums = _terms(node)
        reason: Skip | None = None
        for x in _candidate_inputs(terms):
            try:
                found = self._try(node, x, terms, sums, rw)
            except _NotMergeable as error:
                found = Skip(str(error))
            if isinstance(found, Match):
                return found
            reason = reason or found
        return reason

    def _try(
        self, root: Node, x: Node, terms: list[tuple[object, float]], sums: list[Node], rw: Rewriter
    ) -> Match | Skip | None:
        analysis = _Analysis(x, rw, self._reads_input)
        merged: Form | None = None
        affine: list[Node] = []
        others: list[Node] = []
        for term, sign in terms:
            form = analysis.form(term)
            if form is None or form.weight is None:
                if sign < 0 or not isinstance(term, Node):
                    return None
                others.append(term)
                continue
            signed = Form(form.weight * sign, None if form.bias is None else form.bias * sign, form.window)
            merged = signed if merged is None else _combine(merged, signed, 1.0)
            affine.append(term)
        if merged is None:
            return None
        layers = list(dict.fromkeys(analysis.layers))
        region = _region(sums, affine, x, analysis.weight_only)
        layers = [n for n in layers if n in region]
        base = _base_layer(layers, merged, rw)
        if len(layers) < 2 or base is None:
            return None
        return _check(root, base, region, analysis, rw) or self._planned(root, x, base, merged, others, region, rw)

    def _planned(self, root: Node, x: Node, base: Node, merged: Form, others: list[Node], region: set[Node],
                 rw: Rewriter) -> Match | Skip:
        weight = merged.weight
        if CONV(base):
            weight = _grouped(weight, base.kwargs["groups"])
            if weight is None:
                return Skip(
                    f"the adapter on grouped conv {base.name} (groups={base.kwargs['groups']}) mixes channel groups: "
                    "its delta is not block-diagonal, so it has no grouped-conv form"
                )
        self._plans[root] = Plan(x, base, weight, merged.bias, others)
        nodes = {"root": root, "base": base}
        nodes.update({n.name: n for n in region})
        return Match(root, nodes)

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        plan = self._plans.pop(match.root)
        base = plan.base
        old_weight = _layer_weight(base)
        dtype = rw.constant(old_weight).dtype
        weight = rw.new_constant(old_weight.target, plan.weight.to(dtype))
        bias = None if plan.bias is None else rw.new_constant(_bias_name(base), plan.bias.to(dtype))
        if CONV(base):
            layer = rw.call(CONV, **{**base.kwargs, "input": plan.x, "weight": weight, "bias": bias})
        else:
            layer = rw.call(LINEAR, input=plan.x, weight=weight, bias=bias)
        for other in plan.others:
            layer = rw.call(ADD, a=layer, b=other)
        return layer


def _region(sums: list[Node], affine: list[Node], x: Node, weight_only: set[Node]) -> set[Node]:
    """The sum nodes and every node on a path from x to an affine term (x and constants excluded)."""
    reaches: dict[Node, bool] = {x: True}

    def on_path(node: Node) -> bool:
        if node not in reaches:
            reaches[node] = False
            if node.op not in ("placeholder", "get_attr") and node not in weight_only:
                reaches[node] = any([on_path(a) for a in node.all_input_nodes])
        return reaches[node]

    for term in affine:
        on_path(term)
    return set(sums) | {n for n, hit in reaches.items() if hit and n is not x}


def _base_layer(layers: list[Node], merged: Form, rw: Rewriter) -> Node | None:
    """The layer already of the merged weight's shape (the base), preferring one that reads x directly."""
    for layer in layers:
        weight = rw.constant(_layer_weight(layer))
        if weight is None:
            continue
        shape = weight.t().shape if (ADDMM(layer) or MATMUL(layer)) else weight.shape
        if CONV(layer):
            groups = layer.kwargs["groups"]
            shape = torch.Size([shape[0], shape[1] * groups, *shape[2:]])
        if shape == merged.weight.shape:
            return layer
    return None


def _check(root: Node, base: Node, region: set[Node], analysis: _Analysis, rw: Rewriter) -> Skip | None:
    for node in region:
        if node is not root and any(user not in region for user in node.users):
            return Skip(f"{node.name}, inside the adapter, is also read outside it: merging would not remove it")
    weight = _layer_weight(base)
    outside = [u for r in rw.readers(weight) for u in r.users if u not in region and u not in analysis.weight_only]
    if outside:
        return Skip(
            f"{base.name}'s weight {weight.target} is shared with another layer ({outside[0].name}) that does not "
            "see the same adapter: merging would untie it"
        )
    meta, w = _meta(root), rw.constant(weight)
    if meta is None or meta.dtype != w.dtype:
        return Skip(f"the adapter's result is {getattr(meta, 'dtype', 'unknown')} but the base weight is {w.dtype}")
    return None


def _bias_name(layer: Node) -> str:
    bias = layer.kwargs["input"] if ADDMM(layer) else layer.kwargs.get("bias")
    if isinstance(bias, Node) and bias.op == "get_attr":
        return bias.target
    return bias_name(_layer_weight(layer).target)


# ---------------------------------------------------------------------------------------------
# instances for the property tests: hand-written adapters in several spellings


class LoraLinear(nn.Module):
    """``W x + b + sum_i s_i * B_i(A_i(dropout(x)))``, each adapter spelled one of several ways."""

    def __init__(self, fin: int, fout: int, ranks: list[int], spelling: str, bias: bool = True,
                 lora_bias: bool = False, dora: bool = False, fan_in_fan_out: bool = False):
        super().__init__()
        self.spelling, self.dora, self.fan_in_fan_out = spelling, dora, fan_in_fan_out
        self.base = nn.Linear(fin, fout, bias=bias)
        if fan_in_fan_out:  # stored (in, out), applied as x @ W + b (GPT-2's Conv1D)
            self.base.weight = nn.Parameter(self.base.weight.detach().t().contiguous())
        self.dropout = nn.Dropout(0.1)
        self.lora_A = nn.ModuleList(nn.Linear(fin, r, bias=False) for r in ranks)
        self.lora_B = nn.ModuleList(nn.Linear(r, fout, bias=lora_bias) for r in ranks)
        self.scales = [2.0 / math.sqrt(r) if i % 2 else 2.0 / r for i, r in enumerate(ranks)]
        self.register_buffer("scale_tensor", torch.tensor(self.scales[0]))
        if dora:
            self.magnitude = nn.Parameter(torch.rand(fout) + 0.5)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.fan_in_fan_out:
            out = x @ self.base.weight
            return out if self.base.bias is None else out + self.base.bias
        return self.base(x)

    def _branch(self, i: int, x: torch.Tensor) -> torch.Tensor:
        a, b, s = self.lora_A[i], self.lora_B[i], self.scales[i]
        if self.spelling == "scale_first":
            return s * b(a(self.dropout(x)))
        if self.spelling == "scale_between":
            return b(a(self.dropout(x)) * s)
        if self.spelling == "scale_tensor" and i == 0:
            return torch.mul(b(F.linear(x, a.weight)), self.scale_tensor)
        return b(a(self.dropout(x))) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self._base(x)
        delta = self._branch(0, x)
        for i in range(1, len(self.lora_A)):
            delta = delta + self._branch(i, x)
        if self.dora:  # PEFT's form: (c - 1) * (base - bias) + c * delta, with c = m / ||W + delta_W|| per row
            weight = self.base.weight.t() if self.fan_in_fan_out else self.base.weight
            eye = torch.eye(weight.shape[1], dtype=weight.dtype)
            delta_w = torch.stack([self._branch(i, eye) for i in range(len(self.lora_A))]).sum(0).t()
            c = (self.magnitude / (weight + delta_w).norm(dim=1).detach()).view(1, -1)
            bias = self.base.bias if self.base.bias is not None else 0.0
            return base + ((c - 1) * (base - bias) + c * delta)
        return delta + base if self.spelling == "branch_first" else base + delta


class LoraConv(nn.Module):
    """conv(x) + s * B(A(x)): A has the base's window, B is 1x1 (with b_groups > 1 and a dense A, as
    PEFT builds it for a grouped base, the delta mixes groups and cannot merge)."""

    def __init__(self, cin: int, cout: int, rank: int, kernel: int, stride: int, padding: int, dilation: int,
                 groups: int, b_groups: int = 1):
        super().__init__()
        self.base = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups=groups)
        self.lora_A = nn.Conv2d(cin, rank, kernel, stride, padding, dilation, bias=False)
        self.lora_B = nn.Conv2d(rank, cout, 1, groups=b_groups, bias=False)
        self.scale = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


@st.composite
def merge_lora_instances(draw) -> tuple[nn.Module, tuple]:
    """(model in eval mode, example inputs) with one adapted layer: linear (several spellings,
    adapters, lora_bias, DoRA, fan_in_fan_out) or conv LoRA; float32, float64 or bfloat16."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    if draw(st.booleans()):
        fin, fout = draw(st.integers(2, 12)), draw(st.integers(2, 12))
        ranks = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
        spelling = draw(st.sampled_from(["scale_last", "scale_first", "scale_between", "scale_tensor", "branch_first"]))
        model = LoraLinear(fin, fout, ranks, spelling, bias=draw(st.booleans()), lora_bias=draw(st.booleans()),
                           dora=draw(st.booleans()), fan_in_fan_out=draw(st.booleans()))
        leading = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
        x = torch.randn(*leading, fin)
    else:
        groups = draw(st.sampled_from([1, 1, 2]))
        cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
        kernel, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        model = LoraConv(cin, cout, groups * draw(st.integers(1, 2)), kernel, draw(st.integers(1, 2)),
                         draw(st.integers(0, 1)), dilation, groups=1)
        x = torch.randn(draw(st.integers(1, 2)), cin, *(2 * [draw(st.integers(dilation * (kernel - 1) + 1, 7))]))
    for p in model.parameters():  # LoRA's B starts at zero; make every branch matter
        nn.init.normal_(p, std=0.5)
    return model.to(dtype).eval(), (x.to(dtype),)


MERGE_LORA = register(
    Pass(
        name="merge_lora",
        description="Merge low-rank adapters (LoRA, rsLoRA, DoRA, lora_bias, several at once, conv LoRA, "
        "VeRA/LoHa/LoKr-style weights built in forward) into the base layer's weight",
        patterns=(MergeAdapter(),),
        instances=merge_lora_instances,
    )
)
