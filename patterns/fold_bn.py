"""fold_bn: fold inference-mode BatchNorm into the adjacent conv, transposed conv or Linear.

BN(y) = a * y + c with a = gamma / sqrt(var + eps) and c = beta - mean * a. After a conv the
scale goes on the weight's output-channel axis (dim 0; dim 1 per group for a transposed conv,
whose weight is (in, out/groups, k...)). Before a conv it goes on the input-channel axis and
the shift becomes a bias, exactly only where the conv never pads with zeros. The scale and shift
are computed in float64; a weight is scaled in float32 (float64 for a float64 model: one
product, so float32 loses nothing measurable and is several times cheaper on large weights) and
cast back once (folding in half precision loses accuracy); sums over a weight run in float64.
See shared notes "BatchNorm folding" for the traps each precondition guards against.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.fx import Node

from fxopt.ops import BATCH_NORM, CONV, LINEAR, layout_op
from fxopt.metadata import value_users
from fxopt.pattern import Match, Pass, Pattern, Skip, register
from fxopt.rewriter import Rewriter, bias_name



def bn_affine(bn: Node, rw: Rewriter) -> tuple[torch.Tensor, torch.Tensor] | Skip:
    """(a, c) in float64 such that BN(y) = a * y + c per channel, or why the BN is not foldable."""
    k = bn.kwargs
    if k["training"]:
        if k["running_mean"] is None:
            return Skip("BatchNorm without running statistics (track_running_stats=False) uses batch statistics")
        return Skip("BatchNorm in training mode uses batch statistics: call model.eval() first")
    if not all(rw.is_constant(k[name]) for name in ("running_mean", "running_var", "weight", "bias")):
        return Skip("BatchNorm statistics or affine parameters are computed at run time, not constants")
    mean = rw.constant(k["running_mean"]).double()
    var = rw.constant(k["running_var"]).double()
    gamma = rw.constant(k["weight"]).double() if k["weight"] is not None else torch.ones_like(mean)
    beta = rw.constant(k["bias"]).double() if k["bias"] is not None else torch.zeros_like(mean)
    a = gamma / torch.sqrt(var + k["eps"])
    return a, beta - mean * a


def _foldable_weights(layer: Node, rw: Rewriter, what: str) -> Skip | None:
    weight, bias = layer.kwargs["weight"], layer.kwargs["bias"]
    if not (rw.is_constant(weight) and rw.is_constant(bias)):
        return Skip(f"{what} weight or bias is computed at run time, not a constant")
    if rw.shared(weight) or rw.shared(bias):
        return Skip(f"{what} weight is shared with another layer: folding would untie it")
    return None


def _new_layer(rw: Rewriter, layer: Node, weight: torch.Tensor, bias: torch.Tensor, input: Node) -> Node:
    """A copy of a canonical conv/linear node reading ``input``, with the new weight and bias cast back."""
    dtype = rw.constant(layer.kwargs["weight"]).dtype
    w = rw.new_constant(layer.kwargs["weight"].target, weight.to(dtype))
    old_bias = layer.kwargs["bias"]
    b = rw.new_constant(old_bias.target if old_bias is not None else bias_name(layer.kwargs["weight"].target), bias.to(dtype))
    op = CONV if CONV(layer) else LINEAR
    return rw.call(op, **{**layer.kwargs, "input": input, "weight": w, "bias": b})


def _weight_and_bias(
    layer: Node, rw: Rewriter, out_channels: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight in ``dtype`` (default: float32, or float64 for a float64 layer) and its
    bias in float64 (zeros when absent)."""
    weight = rw.constant(layer.kwargs["weight"])
    weight = weight.to(dtype or (torch.float64 if weight.dtype == torch.float64 else torch.float32))
    bias = rw.constant(layer.kwargs["bias"])
    return weight, bias.double() if bias is not None else torch.zeros(out_channels, dtype=torch.float64)


def _single_user(node: Node, what: str) -> Skip | None:
    n = len(value_users(node))
    return Skip(f"{what} output has {n} users") if n != 1 else None


class ConvThenBN(Pattern):
    """conv / transposed conv -> BatchNorm."""

    anchor = BATCH_NORM

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        conv = node.kwargs["input"]
        if not CONV(conv):
            return None
        problem = _single_user(conv, "conv") or _foldable_weights(conv, rw, "conv") or _as_skip(bn_affine(node, rw))
        return problem or Match(node, {"conv": conv, "bn": node})

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        conv, bn = match.nodes["conv"], match.nodes["bn"]
        a, c = bn_affine(bn, rw)
        weight, bias = _weight_and_bias(conv, rw, a.numel())
        spatial = (1,) * (weight.dim() - 2)
        if conv.kwargs["transposed"]:
            # weight is (in, out/groups, k...): output channel g*out_g + j sits at [group g's rows, j]
            groups = conv.kwargs["groups"]
            in_g, out_g = weight.shape[0] // groups, weight.shape[1]
            scale = a.view(groups, 1, out_g).expand(groups, in_g, out_g).reshape(weight.shape[0], out_g)
            weight = weight * scale.view(*scale.shape, *spatial).to(weight.dtype)
        else:
            weight = weight * a.view(-1, 1, *spatial).to(weight.dtype)
        return _new_layer(rw, conv, weight, bias * a + c, conv.kwargs["input"])


class LinearThenBN(Pattern):
    """Linear -> BatchNorm1d on (N, C): the BN's channel axis is the Linear's output axis. Also through
    a reshape that only merges the leading axes (timm's LinearNorm: ``bn(linear(x).flatten(0, 1))``)."""

    anchor = BATCH_NORM

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        linear, rows = node.kwargs["input"], None
        if not LINEAR(linear):
            rows, linear = linear, _rows_of(linear, rw)
            if linear is None:
                return None
        shape = rw.shape(linear if rows is None else rows)
        if shape is None or len(shape) != 2:
            return Skip(
                "Linear -> BatchNorm1d on a 3-D input: the BatchNorm normalizes axis 1 but the Linear "
                "writes the last axis"
            )
        problem = (_single_user(linear, "Linear") or (rows is not None and _single_user(rows, "reshape"))
                   or _foldable_weights(linear, rw, "Linear"))
        nodes = {"linear": linear, "bn": node, **({"rows": rows} if rows is not None else {})}
        return problem or _as_skip(bn_affine(node, rw)) or Match(node, nodes)

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        linear, bn = match.nodes["linear"], match.nodes["bn"]
        a, c = bn_affine(bn, rw)
        weight, bias = _weight_and_bias(linear, rw, a.numel())
        folded = _new_layer(rw, linear, weight * a[:, None].to(weight.dtype), bias * a + c, linear.kwargs["input"])
        rows = match.nodes.get("rows")
        if rows is None:
            return folded
        rw.has_metadata_of(folded, linear)  # the template of LinearNorm's reshape_as(linear output)
        build = rw.call_method if rows.op == "call_method" else rw.call_function
        return build(rows.target, folded, *rows.args[1:], **rows.kwargs)


def _rows_of(view: object, rw: Rewriter) -> Node | None:
    """The Linear whose (..., C) output ``view`` reshapes to (M, C), keeping every row whole."""
    if layout_op(view) not in ("flatten", "reshape", "view", "_unsafe_view") or not LINEAR(view.args[0]):
        return None
    before, after = rw.shape(view.args[0]), rw.shape(view)
    if before is None or after is None or len(after) != 2 or after[-1] != before[-1]:
        return None
    return view.args[0]


class BNThenConv(Pattern):
    """BatchNorm -> conv: exact when the conv pads with a non-zero mode or not at all."""

    anchor = CONV

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        bn = node.kwargs["input"]
        if not BATCH_NORM(bn):
            return None
        if node.kwargs["transposed"]:
            return Skip("BatchNorm before a transposed conv: the shift's contribution varies at the borders")
        padding = node.kwargs["padding"]
        if node.kwargs["padding_mode"] == "zeros" and (isinstance(padding, str) or any(padding)):
            return Skip("conv zero-pads the BatchNorm output: the border would see 0 instead of the BatchNorm shift")
        problem = _single_user(bn, "BatchNorm") or _foldable_weights(node, rw, "conv")
        return problem or _as_skip(bn_affine(bn, rw)) or Match(node, {"bn": bn, "conv": node})

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        bn, conv = match.nodes["bn"], match.nodes["conv"]
        a, c = bn_affine(bn, rw)
        weight, bias = _weight_and_bias(conv, rw, rw.constant(conv.kwargs["weight"]).shape[0], torch.float64)
        groups, out, in_g = conv.kwargs["groups"], weight.shape[0], weight.shape[1]
        # input channel of weight[o, i] is (o's group) * in_g + i
        channel_a = a.view(groups, 1, in_g).expand(groups, out // groups, in_g).reshape(out, in_g)
        channel_c = c.view(groups, 1, in_g).expand(groups, out // groups, in_g).reshape(out, in_g)
        spatial = (1,) * (weight.dim() - 2)
        bias = bias + (weight * channel_c.view(out, in_g, *spatial)).flatten(1).sum(1)
        return _new_layer(rw, conv, weight * channel_a.view(out, in_g, *spatial), bias, bn.kwargs["input"])


class BNThenLinear(Pattern):
    """BatchNorm1d on (N, C) -> Linear."""

    anchor = LINEAR

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        bn = node.kwargs["input"]
        if not BATCH_NORM(bn):
            return None
        shape = rw.shape(bn)
        if shape is None or len(shape) != 2:
            return Skip("BatchNorm1d on a 3-D input feeds a Linear: its channel axis is not the Linear's input axis")
        problem = _single_user(bn, "BatchNorm") or _foldable_weights(node, rw, "Linear")
        return problem or _as_skip(bn_affine(bn, rw)) or Match(node, {"bn": bn, "linear": node})

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        bn, linear = match.nodes["bn"], match.nodes["linear"]
        a, c = bn_affine(bn, rw)
        weight, bias = _weight_and_bias(linear, rw, rw.constant(linear.kwargs["weight"]).shape[0], torch.float64)
        return _new_layer(rw, linear, weight * a[None, :], bias + weight @ c, bn.kwargs["input"])


class UnfoldableBN(Pattern):
    """Not a rewrite: tried after the folds, it says why a BatchNorm none of them matched stays
    (every BatchNorm left in a model has a reason in the report)."""

    anchor = BATCH_NORM
    benefit = 0

    def match(self, node: Node, rw: Rewriter) -> Skip:
        problem = _as_skip(bn_affine(node, rw))
        if problem is not None:
            return problem
        after = sorted({_what(u) for u in value_users(node)}) or ["the model's output"]
        return Skip(f"follows {_what(node.kwargs['input'])} and feeds {', '.join(after)}: no conv or Linear "
                    "next to it to fold into")

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        raise AssertionError("UnfoldableBN never matches")


def _what(node: object) -> str:
    """A short name for what computes ``node`` ("a model input", "cat", "relu", "nn.ReLU")."""
    if not isinstance(node, Node):
        return "a constant"
    if node.op == "placeholder":
        return "a model input"
    if node.op == "output":
        return "the model's output"
    if node.op == "call_module":
        name = type(node.graph.owning_module.get_submodule(node.target)).__name__
        return f"{'an' if name[0] in 'AEIOU' else 'a'} {name} module"
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return {"conv": "a conv", "linear": "a Linear", "batch_norm": "another BatchNorm"}.get(name, name)


def _as_skip(result: object) -> Skip | None:
    return result if isinstance(result, Skip) else None


# ---------------------------------------------------------------------------------------------
# instances for the property tests: small modules exhibiting every fold, in module and functional style

_CONVS = {1: (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
          3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d)}


class FunctionalBN(nn.Module):
    """A BatchNorm written as F.batch_norm on the module's own tensors (timm's BatchNormAct style)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bn
        return F.batch_norm(x, b.running_mean, b.running_var, b.weight, b.bias, False, 0.1, b.eps)


def _random_bn(bn: nn.modules.batchnorm._BatchNorm, draw, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))
        near_zero = draw(st.booleans())
        var = torch.rand(n, generator=g) * (1e-6 if near_zero else 2.0) + (0.0 if near_zero else 0.1)
        bn.running_var.copy_(var)
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g))
    return FunctionalBN(bn) if draw(st.booleans()) else bn


@st.composite
def fold_bn_instances(draw) -> tuple[nn.Module, tuple]:
    """(model in eval mode, example inputs) for one random fold: conv/convT/linear with BN after or before."""
    kind = draw(st.sampled_from(["conv_bn", "convT_bn", "bn_conv", "linear_bn", "bn_linear"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    bias, affine = draw(st.booleans()), draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    torch.manual_seed(seed)
    if kind in ("linear_bn", "bn_linear"):
        fin, fout = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        linear = nn.Linear(fin, fout, bias=bias)
        bn = _random_bn(nn.BatchNorm1d(fout if kind == "linear_bn" else fin, eps=eps, affine=affine), draw, seed)
        layers = [linear, bn] if kind == "linear_bn" else [bn, linear]
        x = torch.randn(draw(st.integers(1, 4)), fin)
    else:
        rank = draw(st.sampled_from([1, 2, 2, 3]))
        conv_cls, convt_cls, bn_cls = _CONVS[rank]
        groups = draw(st.integers(1, 3))
        cin = groups * draw(st.integers(1, 3))
        cout = cin if draw(st.booleans()) and kind != "convT_bn" else groups * draw(st.integers(1, 3))
        if draw(st.booleans()):
            groups = cout = cin  # depthwise
        k = draw(st.integers(1, 3))
        stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        if kind == "convT_bn":
            padding = draw(st.integers(0, dilation * (k - 1)))
            conv = convt_cls(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
        else:
            mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
            padding = 0 if kind == "bn_conv" and mode == "zeros" else draw(st.integers(0, 1))
            conv = conv_cls(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                            bias=bias, padding_mode=mode)
        bn = _random_bn(bn_cls(cin if kind == "bn_conv" else cout, eps=eps, affine=affine), draw, seed)
        layers = [bn, conv] if kind == "bn_conv" else [conv, bn]
        size = draw(st.integers(dilation * (k - 1) + 2, 7))
        x = torch.randn(draw(st.integers(1, 2)), cin, *([size] * rank))
    model = nn.Sequential(*layers).to(dtype).eval()
    return model, (x.to(dtype),)


FOLD_BN = register(
    Pass(
        name="fold_bn",
        description="Fold inference-mode BatchNorm into the adjacent conv, transposed conv or Linear",
        patterns=(ConvThenBN(), LinearThenBN(), BNThenConv(), BNThenLinear(), UnfoldableBN()),
        instances=fold_bn_instances,
    )
)
