"""merge_lora: merge low-rank adapters into the weight of the layer they adapt.

An adapted layer computes ``W x + b + s * B(A(x))`` (or a variant) and costs the base layer plus
the branch; merged, it is one layer of the base's shape. Adapters are recognised by what they
compute, not by who wrote them: at the top of a sum, every term that is an *affine function of
one input x along the feature axis* is evaluated symbolically to ``(weight, bias)`` in float64:

* linear / matmul / addmm (fan_in_fan_out, GPT-2's Conv1D) / conv with constant weights compose,
* multiplication by a constant scalar or per-feature vector scales (LoRA's alpha/r, rsLoRA's
  alpha/sqrt(r), DoRA's magnitude / ||W + sBA||, VeRA's lambda vectors),
* add and sub combine (several adapters, lora_bias, DoRA's ``(c - 1) * (base - bias)``),
* eval-mode dropout, identity, same-dtype casts and reshapes of the row axes pass x through,
* reshapes and transposes of the feature axes, and ``C @ h`` along the second-to-last one, make the
  form map x's features to several axes (KronA applying ``A kron B`` without building it).

"Constant" includes weight-only subgraphs (DoRA's norm, VeRA's sliced bases, NOLA's mixed bases,
LoHa/LoKr weights built in forward): they are evaluated as the forward computes them
(fold_constants' closure, eval-mode dropout included). The sum is replaced by one layer when its
terms use at least two layers of which one (the base) already has the merged weight's shape, so the
result is never larger or slower. A base weight tied to other layers merges only with all of them,
when every one sees the same delta. An adapter's ``B @ A`` stays factored until it is added to the
base (one addmm per layer). See shared notes "LoRA family" for the traps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.fx import Node

from fxopt.interpret import run_nodes
from fxopt.metadata import value_users
from fxopt.ops import ADD, ADDMM, CONV, DROPOUT, IDENTITY, LINEAR, MATMUL, MUL, SUB, layout_op
from fxopt.pattern import Match, Pass, Pattern, Skip, register
from fxopt.rewriter import Rewriter, bias_name
from .fold_constants import constant_closure

# layout ops by their one name (fxopt.ops.layout_op)
_VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "unflatten"}  # row-major reshapes: read their result's shape
_CASTS = {"to", "_to_copy", "type_as"}
_PERMUTES = {"permute"}
_TRANSPOSES = {"transpose", *_PERMUTES}
_ALIASES = {"alias", "detach", "contiguous", "clone"}
_LAYERS = (LINEAR, MATMUL, ADDMM, CONV)
# In place, but on autograd state only: torch.export spells a tensor made in forward
# (``torch.tensor(scale)``, LoHa's scale) as lift_fresh_copy followed by detach_.


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


@dataclass(frozen=True)
class LowRank:
    """``left @ right`` (float64) kept factored: an adapter's B @ A is scaled through its small factor and
    materialised once, by the addmm that adds it to the base weight."""

    left: torch.Tensor  # (out, r)
    right: torch.Tensor  # (r, in)

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.left.shape[0], self.right.shape[1]])


Weight = torch.Tensor | LowRank


@dataclass
class Form:
    """A value as ``weight`` applied to x plus ``bias``, along the feature axis, in float64.

    ``weight`` is (out, in) for linear maps, (out, in, *kernel) dense (groups expanded) for convs,
    or None for x itself; a layer's own weight stays in its dtype (converted by the arithmetic that
    reads it: a sum that turns out not to merge costs no float64 copy of it). ``bias`` is (out,) or
    None for zero.
    """

    weight: Weight | None
    bias: torch.Tensor | None
    window: Window | None = None


@dataclass
class Plan:
    """What a sum merges into: the new layer's weight and bias, the layer it replaces, and what it removes."""

    root: Node
    x: Node
    base: Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    others: list[Node]  # terms of the sum that are not affine in x (a residual): added back
    region: set[Node]  # the nodes the merged layer replaces
    weight_only: set[Node]  # constant subgraphs the adapter reads (die with it)


def _layer_weight(layer: Node) -> Node:
    return layer.kwargs["mat2"] if ADDMM(layer) else layer.kwargs["other"] if MATMUL(layer) else layer.kwargs["weight"]


def _layer_bias(layer: Node) -> object:
    return layer.kwargs["input"] if ADDMM(layer) else layer.kwargs.get("bias")


def _layer_input(layer: Node) -> Node:
    return layer.kwargs["mat1"] if ADDMM(layer) else layer.kwargs["input"]


class _Analysis:
    """Affine forms of nodes in one input ``x`` (memoised), and what they read."""

    def __init__(self, x: Node, rw: Rewriter):
        self.x, self.rw = x, rw
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

    def required_constant(self, arg: object, user: Node, role: str) -> torch.Tensor | None:
        """``constant(arg)``; raises _NotMergeable when ``arg`` reads no input yet cannot be evaluated."""
        value = self.constant(arg)
        if value is None and isinstance(arg, Node) and not self.rw.reads_inputs(arg):
            raise _NotMergeable(
                f"the {role} {arg.name} of {user.name} depends on no input but is computed by a random or in-place "
                "op, so it cannot be evaluated once at merge time: call model.eval(), and build adapter weights "
                "without in-place ops"
            )
        return value

    def _evaluate(self, node: Node) -> torch.Tensor | None:
        value = self.rw.constant(node)
        if value is not None:
            self.weight_only.add(node)
            return value
        if self.rw.reads_inputs(node):
            return None  # checked first: the closure walk is exponential on activations
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
        if _is_call(node, _VIEWS):
            return self._reshaped(node)
        if _is_call(node, _TRANSPOSES):
            return self._permuted(node)
        through = _passes_through(node, self.conv)
        if through is not None:
            return self.form(through)
        if MATMUL(node) and self.form(node.kwargs["other"]) is not None:
            return self._left_matmul(node)
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
        weight = self.required_constant(_layer_weight(node), node, "weight")
        bias_arg = _layer_bias(node)
        bias = None if bias_arg is None else self.required_constant(bias_arg, node, "bias")
        if weight is None or (bias_arg is not None and bias is None):
            return None
        if ADDMM(node) or MATMUL(node):
            if weight.dim() != 2:
                return None
            weight = weight.t()  # stored (in, out)
        bias = None if bias is None else bias.double().reshape(-1)
        if CONV(node):
            self.layers.append(node)
            return _compose_conv(node, weight, bias, inner)
        features = self._features(inner, _layer_input(node))
        if features is None:
            return None
        self.layers.append(node)
        if len(features) > 1:  # along the last of several feature axes (a Kronecker factor)
            matrix = _f64(weight)
            out = (*features[:-1], matrix.shape[0])
            inner_bias = None if inner.bias is None else torch.einsum("of,...f->...o", matrix, inner.bias)
            return Form(torch.einsum("of,...fi->...oi", matrix, _full(inner, features)),
                        _add(None if bias is None else bias.expand(out), inner_bias))
        return Form(
            weight if inner.weight is None else _product(weight, inner.weight),
            _add(bias, None if inner.bias is None else _f64(weight) @ inner.bias),
        )

    def _scaled(self, node: Node) -> Form | None:
        a, b = node.args
        for value_arg, scale_arg in ((a, b), (b, a)):
            inner = self.form(value_arg)
            if inner is None:
                continue
            scale = self.required_constant(scale_arg, node, "scale") if inner.weight is not None else None
            shape = self.rw.shape(node)
            if scale is not None and shape is not None and not self.conv and len(inner.weight.shape) > 2:
                return self._scaled_axes(inner, scale, len(shape))
            vector = None if scale is None or shape is None else self.feature_vector(scale, len(shape))
            if vector is None or inner.weight is None:
                return None
            return Form(_scale_rows(inner.weight, vector), None if inner.bias is None else inner.bias * vector,
                        inner.window)
        return None

    # -- several feature axes: reshapes and transposes of the features, Kronecker factors ------------

    def _features(self, form: Form, node: object) -> tuple[int, ...] | None:
        """The trailing axes of ``node``'s value that ``form`` maps x's features to (linear maps only)."""
        if form.weight is not None:
            return tuple(form.weight.shape[:-1])
        shape = self.rw.shape(node)
        return None if shape is None or not shape else (shape[-1],)

    def _reshaped(self, node: Node) -> Form | None:
        """A reshape keeps each row's features together when its trailing axes hold exactly them: the
        leading (row) axes may be flattened or split (GPT-2's Conv1D), the feature block re-split (KronA)."""
        source = node.args[0]
        inner = self.form(source)
        after = self.rw.shape(node)
        if inner is None or after is None or self.conv or _reinterprets(source, node):
            return None
        features = self._features(inner, source)
        if features is None or not math.prod(features):
            return None
        block = math.prod(features)
        split = next((m for m in range(1, len(after) + 1) if math.prod(after[-m:]) >= block), None)
        if split is None or math.prod(after[-split:]) != block:
            return None  # the features are spread over rows: not a map of each row on its own
        new = tuple(after[-split:])
        if after != self.rw.shape(source) and not self._set_kind(False):
            return None  # rows and features are a linear map's: a conv reads channels, not the last axis
        if new == features:
            return inner
        weight = _full(inner, features)
        return Form(weight.reshape(*new, weight.shape[-1]), None if inner.bias is None else inner.bias.reshape(new))

    def _permuted(self, node: Node) -> Form | None:
        """A transpose or permute of feature axes permutes the form's (one that moves rows is not a map of
        each row on its own: rows stay where they are)."""
        source = node.args[0]
        inner, shape = self.form(source), self.rw.shape(source)
        if inner is None or shape is None or self.conv:
            return None
        features = self._features(inner, source)
        order = _permutation(node, len(shape))
        if features is None or order is None:
            return None
        if order == sorted(order):
            return inner  # transpose(d, d)
        if [o for o in order if shape[o] != 1] == [i for i in range(len(shape)) if shape[i] != 1]:
            return self._reshaped(node)  # only size-1 axes move: a reshape
        first_moved = next(i for i, o in enumerate(order) if i != o)
        claimed = self._claim_rows(inner, features, shape, len(shape) - first_moved)
        if claimed is None or not self._set_kind(False):
            return None  # moves rows
        inner, features = claimed
        rows = len(shape) - len(features)
        axes = [o - rows for o in order[rows:]]
        weight = _full(inner, features)
        return Form(weight.permute(*axes, len(axes)).contiguous(),
                    None if inner.bias is None else inner.bias.permute(*axes).contiguous())

    def _left_matmul(self, node: Node) -> Form | None:
        """``C @ h`` with a constant matrix C: a map along the second-to-last feature axis of h."""
        other = node.kwargs["other"]
        inner, shape = self.form(other), self.rw.shape(other)
        features = None if inner is None or shape is None else self._features(inner, other)
        claimed = None if features is None else self._claim_rows(inner, features, shape, 2)
        if claimed is None or not self._set_kind(False):
            return None
        inner, features = claimed
        matrix = self.required_constant(node.kwargs["input"], node, "weight")
        if matrix is None or matrix.dim() != 2:
            return None
        matrix = _f64(matrix)
        self.layers.append(node)
        return Form(torch.einsum("ik,...kjn->...ijn", matrix, _full(inner, features)),
                    None if inner.bias is None else torch.einsum("ik,...kj->...ij", matrix, inner.bias))

    def _claim_rows(self, inner: Form, features: tuple[int, ...], shape: torch.Size,
                    count: int) -> tuple[Form, tuple[int, ...]] | None:
        """``inner`` mapping to at least ``count`` trailing axes: the axes it takes from the rows must have size 1
        (one row along such an axis is as well a feature axis of size 1)."""
        extra = count - len(features)
        if extra <= 0:
            return inner, features
        if count > len(shape) or any(size != 1 for size in shape[-count:-len(features)]):
            return None
        wider = (*([1] * extra), *features)
        weight = _full(inner, features)
        return Form(weight.reshape(*wider, weight.shape[-1]),
                    None if inner.bias is None else inner.bias.reshape(wider)), wider

    def _scaled_axes(self, inner: Form, scale: torch.Tensor, ndim: int) -> Form | None:
        """``inner`` times a constant that is the same for every row, along several feature axes."""
        factor = _per_features(scale, ndim, inner.weight.shape[:-1])
        if factor is None:
            return None
        return Form(_f64(inner.weight) * factor.unsqueeze(-1), None if inner.bias is None else inner.bias * factor)

    def _sum(self, node: Node, sign: float) -> Form | None:
        a, b = node.args
        fa, fb = self.form(a), self.form(b)
        if fa is not None and fb is not None:
            return _combine(fa, fb, sign)
        shape = self.rw.shape(node)
        if fa is not None and fa.weight is not None and shape is not None and len(fa.weight.shape) > 2:
            shift = self.constant(b)
            features = tuple(fa.weight.shape[:-1])
            if tuple(shape[-len(features):]) != features:
                return None  # the sum broadcasts a's values: its features are not the result's
            block = None if shift is None else _per_features(shift, len(shape), features)
            return None if block is None else Form(fa.weight, _add(fa.bias, sign * block.expand(features)))
        if fa is not None and fa.weight is not None and shape is not None:
            shift = self.constant(b)
            vector = None if shift is None else self.feature_vector(shift, len(shape))
            if vector is None:
                return None
            if not vector.any():
                return fa  # DoRA's ``base - 0.0`` for a layer without bias: no bias to merge
            return Form(fa.weight, _add(fa.bias, sign * vector.expand(fa.weight.shape[0])), fa.window)
        return None


def _reinterprets(source: Node, view: Node) -> bool:
    """``x.view(torch.int32)``: same shape, other dtype, the bits read as something else."""
    before, after = _meta(source), _meta(view)
    return before is not None and after is not None and before.dtype != after.dtype


def _is_call(node: Node, names: set[str]) -> bool:
    return layout_op(node) in names and bool(node.args) and isinstance(node.args[0], Node)


def _permutation(node: Node, ndim: int) -> list[int] | None:
    """The axis order a transpose or permute node produces, or None when its arguments are not plain ints."""
    args = [*node.args[1:], *node.kwargs.values()]
    if layout_op(node) in _PERMUTES:
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        order = [d % ndim for d in dims] if all(isinstance(d, int) for d in dims) else None
        return order if order is not None and sorted(order) == list(range(ndim)) else None
    if len(args) != 2 or not all(isinstance(d, int) for d in args):
        return None
    order = list(range(ndim))
    a, b = args[0] % ndim, args[1] % ndim
    order[a], order[b] = order[b], order[a]
    return order


def _per_features(value: torch.Tensor, ndim: int, features: tuple[int, ...]) -> torch.Tensor | None:
    """A constant broadcast against a value of ``ndim`` axes whose trailing ones are ``features``, as a float64
    tensor of len(features) axes, or None when it differs between rows."""
    if value.dim() > ndim:
        return None
    shape = [1] * (ndim - value.dim()) + list(value.shape)
    rows = ndim - len(features)
    if any(size != 1 for size in shape[:rows]):
        return None
    return value.double().reshape(shape[rows:])


def _full(form: Form, features: tuple[int, ...]) -> torch.Tensor:
    """The form's weight as a dense float64 (*features, in) tensor (the identity for x itself)."""
    if form.weight is None:
        return torch.eye(features[0], dtype=torch.float64)
    return _materialised(form.weight) if isinstance(form.weight, LowRank) else _f64(form.weight)


def _is_eval_dropout(node: Node) -> bool:
    return DROPOUT(node) and (not node.kwargs["training"] or node.kwargs["p"] == 0)


def _passes_through(node: Node, conv: bool | None) -> Node | None:
    """The input of a node that returns its input's values unchanged at inference, else None."""
    if DROPOUT(node):
        return node.kwargs["input"] if _is_eval_dropout(node) else None
    if IDENTITY(node):
        return node.kwargs["input"]
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], Node):
        return None
    source = node.args[0]
    if layout_op(node) in _ALIASES:
        return source
    before, after = _meta(source), _meta(node)
    if before is None or after is None:
        return None
    if layout_op(node) in _CASTS:
        return source if before.dtype == after.dtype else None
    if layout_op(node) in _VIEWS and conv is not True and before.dtype == after.dtype:
        # flattening / unflattening leading dims keeps each feature row: GPT-2's Conv1D does this around addmm
        same_rows = before.shape[-1:] == after.shape[-1:] and math.prod(before.shape) == math.prod(after.shape)
        return source if same_rows else None
    return None


def _meta(node: Node):
    return node.meta.get("tensor_meta")


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    # contiguous: GPT-2's Conv1D weights are read transposed, and strided full-size arithmetic is slow
    return tensor if tensor.dtype == torch.float64 else tensor.to(torch.float64, memory_format=torch.contiguous_format)


def _product(outer: torch.Tensor, inner: Weight) -> Weight:
    """``outer @ inner``, kept factored when it has low rank (an adapter's B after its A)."""
    if isinstance(inner, LowRank):
        return LowRank(_f64(outer) @ inner.left, inner.right)
    rank = inner.shape[0]
    if rank < min(outer.shape[0], inner.shape[1]):
        return LowRank(_f64(outer), _f64(inner))
    return _f64(outer) @ _f64(inner)


def _scale_rows(weight: Weight, vector: torch.Tensor) -> Weight:
    if isinstance(weight, LowRank):
        return LowRank(_scale_rows(weight.left, vector), weight.right)
    return _f64(weight) * (vector.reshape(-1, *([1] * (weight.dim() - 1))) if vector.dim() else vector)


def _negated(weight: Weight) -> Weight:
    return LowRank(-weight.left, weight.right) if isinstance(weight, LowRank) else -_f64(weight)


def _sum_of(a: Weight, b: Weight, sign: float) -> Weight:
    """``a + sign * b`` in one pass over the full-size matrix (addmm where one side is factored)."""
    if isinstance(a, LowRank) and isinstance(b, LowRank):
        return LowRank(torch.cat([a.left, sign * b.left], 1), torch.cat([a.right, b.right]))
    if isinstance(a, LowRank):
        return torch.addmm(_f64(b), a.left, a.right, beta=sign)
    total = _f64(a)
    fresh = total is not a  # a float64 copy made just now: add into it (a full-size matrix less)
    if isinstance(b, LowRank):
        return total.addmm_(b.left, b.right, alpha=sign) if fresh else torch.addmm(total, b.left, b.right, alpha=sign)
    return total.add_(_f64(b), alpha=sign) if fresh else torch.add(total, _f64(b), alpha=sign)


def _materialised(weight: Weight) -> torch.Tensor:
    return weight.left @ weight.right if isinstance(weight, LowRank) else weight


def _combine(a: Form, b: Form, sign: float) -> Form | None:
    if a.weight is None or b.weight is None:
        return None  # x itself in the sum (a residual): not part of a layer
    if a.window != b.window:
        raise _NotMergeable(
            "the adapter's conv window (kernel, stride, padding, dilation) differs from the base conv's: "
            "the branch is not a conv of the base's shape"
        )
    if a.weight.shape != b.weight.shape:
        return None  # the terms split the same values into rows and features differently
    return Form(_sum_of(a.weight, b.weight, sign), _add(a.bias, None if b.bias is None else sign * b.bias), a.window)


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
    matrix = _f64(dense.flatten(1))
    composed = torch.einsum("or,ri...->oi...", matrix, _f64(inner.weight))
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
                if isinstance(_layer_input(node), Node):  # in case x's rows differ from the layer's (a flatten)
                    seen.add(_layer_input(node))
                stack.append(_layer_input(node))
            elif MUL(node) or ADD(node) or SUB(node):
                stack.extend(node.args)
            elif node.args:
                stack.append(node.args[0])
        for node in seen:
            counts[node] = counts.get(node, 0) + 1
    return sorted(counts, key=lambda n: -counts[n])


class MergeAdapter(Pattern):
    """A sum of a base layer and adapter branches on the same input -> one layer.

    A base weight shared with other layers (tied) merges only together with every one of them, and
    only when each sees the same delta: the tie is kept, one merged weight read by all of them.
    """

    anchor = ADD
    benefit = 2

    def __init__(self) -> None:
        self._plans: dict[Node, list[Plan]] = {}  # by match root: the sums merged together (tied weights)

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        if _inner_sum(node):
            return None  # merged with the whole sum at its top
        found = _plan(node, rw)
        if not isinstance(found, Plan):
            return found
        tied = _tied_plans(found, rw)
        if isinstance(tied, Skip):
            return tied
        plans = [found, *tied]
        self._plans[node] = plans
        nodes = {"root": node}
        for plan in plans:
            nodes.update({n.name: n for n in (plan.base, *plan.region)})
        return Match(node, nodes)

    def rewrite(self, match: Match, rw: Rewriter) -> Node | dict[Node, Node]:
        plans = self._plans.pop(match.root)
        old_weight = _layer_weight(plans[0].base)
        dtype = rw.constant(old_weight).dtype
        with rw.inserting_before(_first_in_graph([p.root for p in plans])):  # dominates every merged layer
            weight = rw.new_constant(old_weight.target, plans[0].weight.to(dtype))
        biases: dict[str, list[Node]] = {}  # a bias the tied layers share stays shared
        replacements: dict[Node, Node] = {}
        for plan in plans:
            with rw.inserting_before(plan.root):
                replacements[plan.root] = _merged_layer(plan, weight, _bias_node(plan, dtype, biases, rw), rw)
        return replacements if len(plans) > 1 else replacements[match.root]


def _inner_sum(node: Node) -> bool:
    users = list(node.users)
    return len(users) == 1 and (ADD(users[0]) or SUB(users[0]))


def _plan(root: Node, rw: Rewriter) -> Plan | Skip | None:
    """How the sum at ``root`` merges (ignoring whether its base weight is shared), the first Skip, or None."""
    terms, sums = _terms(root)
    reason: Skip | None = None
    for x in _candidate_inputs(terms):
        try:
            found = _plan_on(root, x, terms, sums, rw)
        except _NotMergeable as error:
            found = Skip(str(error))
        if isinstance(found, Plan):
            return found
        reason = reason or found
    return reason


def _plan_on(
    root: Node, x: Node, terms: list[tuple[object, float]], sums: list[Node], rw: Rewriter
) -> Plan | Skip | None:
    analysis = _Analysis(x, rw)
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
        if merged is None:
            merged = form if sign > 0 else Form(_negated(form.weight), None if form.bias is None else -form.bias,
                                                form.window)
        else:
            merged = _combine(merged, form, sign)
            if merged is None:
                return None
        affine.append(term)
    if merged is None:
        return None
    region = _region(sums, affine, x, analysis.weight_only)
    layers = [n for n in dict.fromkeys(analysis.layers) if n in region]
    base = _base_layer(layers, merged, rw)
    if len(layers) < 2 or base is None or not _rows_kept(root, x, base, rw):
        return None
    skip = _check(root, base, region, rw)
    if skip is not None:
        return skip
    weight = _materialised(merged.weight)
    if CONV(base):
        weight = _grouped(weight, base.kwargs["groups"])
        if weight is None:
            return Skip(
                f"the adapter on grouped conv {base.name} (groups={base.kwargs['groups']}) mixes channel groups: "
                "its delta is not block-diagonal, so it has no grouped-conv form"
            )
    return Plan(root, x, base, weight, merged.bias, others, region, analysis.weight_only)


def _rows_kept(root: Node, x: Node, base: Node, rw: Rewriter) -> bool:
    """Whether one linear layer on ``x`` has the sum's rows: x reached through a reshape of the rows
    (a flatten of (N, 1, F) to (N, F)) would give the merged layer other rows than the sum."""
    if CONV(base):
        return True
    shape_x, shape_root = rw.shape(x), rw.shape(root)
    if shape_x is None or shape_root is None:
        return True  # without shapes x was not reached through a reshape (_passes_through reads them)
    return tuple(shape_x[:-1]) == tuple(shape_root[:-1])


def _tied_plans(plan: Plan, rw: Rewriter) -> list[Plan] | Skip:
    """The plans of the other layers that read ``plan``'s base weight, when each merges the same delta."""
    weight = _layer_weight(plan.base)
    plans = [plan]
    for reader in rw.readers(weight):
        for user in reader.users:
            if any(user in p.region or user in p.weight_only or user is p.base for p in plans):
                continue
            other = _plan_of_layer(user, reader, rw)
            if other is None:
                return Skip(
                    f"{plan.base.name}'s weight {weight.target} is shared with another layer ({user.name}) that does "
                    "not see the same adapter: merging would untie it"
                )
            if not torch.equal(other.weight, plan.weight):
                return Skip(
                    f"{plan.base.name} and {other.base.name} share the weight {weight.target} but their adapters "
                    "differ: merging would untie it (each needs its own copy)"
                )
            if _shared_bias(plan, other, rw) and not _same(plan.bias, other.bias):
                return Skip(
                    f"{plan.base.name} and {other.base.name} share a bias but their adapters change it differently: "
                    "merging would untie it"
                )
            plans.append(other)
    return plans


def _plan_of_layer(layer: Node, weight: Node, rw: Rewriter) -> Plan | None:
    """The plan of an adapter sum whose base is ``layer`` reading ``weight`` as its weight, if any."""
    if not any(op(layer) for op in _LAYERS) or _layer_weight(layer) is not weight:
        return None
    for root in _enclosing_sums(layer):
        found = _plan(root, rw)
        if isinstance(found, Plan) and found.base is layer:
            return found
    return None


def _enclosing_sums(layer: Node, limit: int = 64) -> list[Node]:
    """The top-level sums reached from ``layer`` through ops an adapter sum is made of: where it may be a base."""
    tops: list[Node] = []
    seen: set[Node] = set()
    stack = [layer]
    while stack and len(seen) < limit:
        for user in stack.pop().users:
            if user in seen:
                continue
            seen.add(user)
            if (ADD(user) or SUB(user)) and not _inner_sum(user):
                tops.append(user)
            elif ADD(user) or SUB(user) or MUL(user) or _passes_through(user, None) is not None:
                stack.append(user)
    return tops


def _shared_bias(a: Plan, b: Plan, rw: Rewriter) -> bool:
    bias_a, bias_b = rw.constant(_layer_bias(a.base)), rw.constant(_layer_bias(b.base))
    return bias_a is not None and bias_a is bias_b


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


def _first_in_graph(nodes: list[Node]) -> Node:
    wanted = set(nodes)
    return next(n for n in nodes[0].graph.nodes if n in wanted)


def _bias_node(plan: Plan, dtype: torch.dtype, made: dict[str, list[Node]], rw: Rewriter) -> Node | None:
    """A new constant for the plan's merged bias, or the one made for a tied layer whose bias equals it."""
    if plan.bias is None:
        return None
    name = _bias_name(plan.base)
    value = plan.bias.to(dtype)
    for node in made.setdefault(name, []):
        if torch.equal(rw.constant(node), value):
            return node
    node = rw.new_constant(name, value)
    made[name].append(node)
    return node


def _merged_layer(plan: Plan, weight: Node, bias: Node | None, rw: Rewriter) -> Node:
    if CONV(plan.base):
        layer = rw.call(CONV, **{**plan.base.kwargs, "input": plan.x, "weight": weight, "bias": bias})
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


def _check(root: Node, base: Node, region: set[Node], rw: Rewriter) -> Skip | None:
    for node in region:
        # a node that only passes x on (an eval-mode dropout two adapters share) costs nothing if it stays
        shared = node is not root and any(user not in region for user in value_users(node))
        if shared and _passes_through(node, CONV(base)) is None:
            return Skip(f"{node.name}, inside the adapter, is also read outside it: merging would not remove it")
    meta, w = _meta(root), rw.constant(_layer_weight(base))
    if meta is None or meta.dtype != w.dtype:
        return Skip(f"the adapter's result is {getattr(meta, 'dtype', 'unknown')} but the base weight is {w.dtype}")
    return None


def _bias_name(layer: Node) -> str:
    bias = _layer_bias(layer)
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


class KronLinear(nn.Module):
    """KronA: ``W x + b + s * (A kron B) x``, the product built as a weight (``kron``) or applied to x without
    building it: x's features reshaped to (in_a, in_b), B along the last axis, A along the other (``factored``:
    A from the left, as torch.export captures it; ``transposed``: both from the right, the axes swapped in
    between, as symbolic_trace captures it)."""

    def __init__(self, in_a: int, in_b: int, out_a: int, out_b: int, spelling: str, bias: bool = True):
        super().__init__()
        self.spelling = spelling
        self.base = nn.Linear(in_a * in_b, out_a * out_b, bias=bias)
        self.A = nn.Parameter(torch.randn(out_a, in_a))
        self.B = nn.Parameter(torch.randn(out_b, in_b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_a, in_b = self.A.shape[1], self.B.shape[1]
        if self.spelling == "kron":
            delta = F.linear(x, torch.kron(self.A, self.B))
        elif self.spelling == "factored":
            rows = x.shape[:-1]
            delta = torch.matmul(self.A, F.linear(x.reshape(*rows, in_a, in_b), self.B)).reshape(*rows, -1)
        else:
            h = (x.unflatten(-1, (in_a, in_b)) @ self.B.t()).transpose(-1, -2)  # (.., out_b, in_a)
            delta = (h @ self.A.t()).transpose(-1, -2).flatten(-2)
        return self.base(x) + 2.0 * delta


@st.composite
def merge_lora_instances(draw) -> tuple[nn.Module, tuple]:
    """(model in eval mode, example inputs) with one adapted layer: linear (several spellings,
    adapters, lora_bias, DoRA, fan_in_fan_out), conv LoRA or KronA; float32, float64 or bfloat16."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    kind = draw(st.sampled_from(["linear", "conv", "kron"]))
    if kind == "kron":  # the symbolic_trace spellings: torch.export is slow for a property test
        sizes = [draw(st.integers(1, 3)) for _ in range(4)]
        model = KronLinear(*sizes, draw(st.sampled_from(["kron", "transposed"])), bias=draw(st.booleans()))
        x = torch.randn(*draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)), sizes[0] * sizes[1])
    elif kind == "linear":
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
        "VeRA/NOLA/LoHa/LoKr-style weights built in forward, KronA, tied weights) into the base layer's weight",
        patterns=(MergeAdapter(),),
        instances=merge_lora_instances,
    )
)
