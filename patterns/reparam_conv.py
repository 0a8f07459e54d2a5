"""reparam_conv: structural re-parameterization of convs (RepVGG, ACNet, DBB, MobileOne, RepLKNet, DEConv).

Every branch that is linear in an input x (a conv, a BatchNorm, a per-channel scale, an average
pool, the identity, and sequences of them) is one conv of x: a float64 ``Branch``. Two rules:

* Parallel: a sum (a chain of adds, any order) of branches of the same x becomes one conv with the
  largest kernel: kernels are regrouped to the finest common groups, zero-padded to the largest
  size at the centre and added, biases added.
* Sequential: pointwise -> spatial and spatial -> pointwise convs (and BN / scale / pool steps)
  with nothing nonlinear between them compose into one conv. A spatial step may read its input
  padded with per-channel values (``ops.pad_per_channel``, DBB's BNAndPadLayer): after a 1x1 conv
  or BN whose bias is those values, that is the spatial conv with zero padding on the 1x1's input.

A sum whose summands do not all merge has its mergeable subset merged; the others stay as adds.

Exactness conditions (shared notes, "Conv re-parameterization") are checked per branch; a branch
combination that cannot be merged exactly is skipped with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.fx import Node

from fxopt.ops import ADD, AVG_POOLS, BATCH_NORM, CONV, IDENTITY, MUL, PAD_PER_CHANNEL
from fxopt.metadata import value_users
from fxopt.pattern import Match, Pass, Pattern, Skip, register
from fxopt.rewriter import Rewriter, bias_name

from .fold_bn import bn_affine

Ints = tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Branch:
    """An affine map of x written as one conv; the weight (float64) has this branch's own groups."""

    weight: torch.Tensor  # (out, in / groups, *kernel)
    bias: torch.Tensor  # (out,)
    stride: Ints
    padding: Ints
    dilation: Ints
    groups: int
    padding_mode: str
    # padding_mode "zeros" pads channel c of x with pad_value[c] instead (in the model's dtype); None: zeros
    pad_value: torch.Tensor | None = None

    @property
    def kernel(self) -> Ints:
        return tuple(self.weight.shape[2:])

    @property
    def pointwise(self) -> bool:
        """A 1x1 kernel that reads no padding: it commutes with any padding of its input."""
        return all(k == 1 for k in self.kernel) and not any(self.padding)

    def macs_per_output(self) -> int:
        return self.weight[0].numel() * self.weight.shape[0]


@dataclass(frozen=True, eq=False)
class Traced:
    """A node seen as ``branch`` applied to ``x``; ``nodes`` are the ones it replaces (root first)."""

    x: Node
    branch: Branch | None  # None: the identity on x
    nodes: tuple[Node, ...]
    cost: float  # multiply-adds per input pixel of the unmerged ops


# a linear step: (its input, the Branch it applies, the nodes it consumes: the step first)
Step = tuple[Node, Branch, tuple[Node, ...]]


# ---------------------------------------------------------------------------------------------
# one linear step: a conv, BN, per-channel scale or average pool, as a Branch on its input


def _channels(node: Node, rw: Rewriter) -> int | None:
    shape = rw.shape(node)
    return shape[1] if shape is not None and len(shape) >= 3 else None


def _diagonal(scale: torch.Tensor, shift: torch.Tensor, rank: int, kernel: Ints | None = None,
              stride: Ints | None = None, padding: Ints | None = None) -> Branch:
    """A depthwise branch: channel c is scaled by scale[c] (spread over ``kernel``) and shifted."""
    kernel = kernel or (1,) * rank
    weight = scale.double().view(-1, 1, *(1,) * rank).expand(-1, 1, *kernel).clone()
    return Branch(weight, shift.double(), stride or (1,) * rank, padding or (0,) * rank, (1,) * rank,
                  scale.numel(), "zeros")


def _conv_step(node: Node, rw: Rewriter) -> Step | Skip | None:
    k = node.kwargs
    if k["transposed"] or not (rw.is_constant(k["weight"]) and rw.is_constant(k["bias"])):
        return None  # not a fixed linear map of its input (fold_constants makes weight-only kernels constant)
    if isinstance(k["padding"], str):
        return Skip("conv with asymmetric 'same' padding: its kernel cannot be centred in a merged conv")
    weight = rw.constant(k["weight"]).double()
    bias = rw.constant(k["bias"])
    bias = bias.double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    branch = Branch(weight, bias, tuple(k["stride"]), tuple(k["padding"]), tuple(k["dilation"]), k["groups"],
                    k["padding_mode"])
    return _reading_value_pad(node, k["input"], branch, rw)


def _reading_value_pad(node: Node, x: Node, branch: Branch, rw: Rewriter) -> Step:
    """The step of ``branch`` on ``x``; when ``x`` pads with per-channel values and the step itself pads
    nothing, the pad becomes part of the step (its padding and pad_value)."""
    value_pad = _value_pad(x, len(branch.kernel), rw) if not any(branch.padding) else None
    if value_pad is None:
        return x, branch, (node,)
    inner, padding, value = value_pad
    return inner, replace(branch, padding=padding, padding_mode="zeros", pad_value=value), (node, x)


def _value_pad(pad: Node, rank: int, rw: Rewriter) -> tuple[Node, Ints, torch.Tensor | None] | None:
    """(input, symmetric padding, per-channel value or None for zeros) of a pad_per_channel node read
    by nothing else, with a constant value; None otherwise."""
    if not PAD_PER_CHANNEL(pad) or len(value_users(pad)) != 1:
        return None
    widths, value = list(pad.kwargs["pad"]), rw.constant(pad.kwargs["value"])
    channels = _channels(pad, rw)
    if value is None or channels is None or len(widths) > 2 * rank or widths[0::2] != widths[1::2]:
        return None
    if not value.is_floating_point() or value.numel() not in (1, channels):
        return None
    padding = (0,) * (rank - len(widths) // 2) + tuple(reversed(widths[0::2]))
    per_channel = value.flatten().expand(channels).clone()
    return pad.kwargs["input"], padding, per_channel if bool(per_channel.any()) and any(padding) else None


def _bn_step(node: Node, rw: Rewriter) -> Step | Skip | None:
    x = node.kwargs["input"]
    shape = rw.shape(x)
    if shape is None or len(shape) < 3:
        return None
    affine = bn_affine(node, rw)
    if isinstance(affine, Skip):
        return affine if node.kwargs["training"] else None
    return x, _diagonal(*affine, rank=len(shape) - 2), (node,)


def _scale_step(node: Node, rw: Rewriter) -> Step | None:
    """x * s with s a python number or a constant of shape (C, 1, ...) / (1, C, 1, ...)."""
    for x, s in (node.args, reversed(node.args)):
        channels, shape = _channels(x, rw), rw.shape(x)
        if not isinstance(x, Node) or channels is None:
            continue
        if isinstance(s, (int, float)) and not isinstance(s, bool):
            scale = torch.full((channels,), float(s), dtype=torch.float64)
        elif rw.constant(s) is not None and _per_channel(rw.constant(s).shape, len(shape), channels):
            scale = rw.constant(s).double().flatten().expand(channels).clone()
        else:
            continue
        return x, _diagonal(scale, torch.zeros(channels, dtype=torch.float64), rank=len(shape) - 2), (node,)
    return None


def _per_channel(shape: torch.Size, ndim: int, channels: int) -> bool:
    """True when a tensor of ``shape`` broadcast against (N, C, ...) scales whole channels."""
    padded = (1,) * (ndim - len(shape)) + tuple(shape)
    return len(padded) == ndim and padded[0] == 1 and padded[1] in (1, channels) and all(d == 1 for d in padded[2:])


def _avg_pool_step(node: Node, rw: Rewriter) -> Step | Skip | None:
    k, x = node.kwargs, node.kwargs["input"]
    channels = _channels(x, rw)
    if channels is None:
        return None
    window = [k[name] for name in ("kernel_size", "stride", "padding")]
    if not all(isinstance(v, tuple) and all(isinstance(i, int) for i in v) for v in window):
        return Skip("average pooling whose window is computed from the input's size (x.size()): not a fixed conv")
    if k["ceil_mode"]:
        return Skip("average pooling with ceil_mode=True has partial windows at the border: no conv equals it")
    divisor_override = k.get("divisor_override")  # 1-D pooling has none
    if any(k["padding"]) and not k["count_include_pad"] and divisor_override is None:
        return Skip(
            "average pooling with count_include_pad=False divides border windows by fewer pixels: "
            "only count_include_pad=True is a conv"
        )
    divisor = divisor_override or math.prod(k["kernel_size"])
    scale = torch.full((channels,), 1.0 / divisor, dtype=torch.float64)
    branch = _diagonal(scale, torch.zeros(channels, dtype=torch.float64), len(k["kernel_size"]),
                       tuple(k["kernel_size"]), tuple(k["stride"]), tuple(k["padding"]))
    return _reading_value_pad(node, x, branch, rw)


def linear_step(node: Node, rw: Rewriter) -> Step | Skip | None:
    """``node`` as a Step (its input, the Branch it applies, the nodes it consumes), a Skip when it is
    linear but not mergeable, else None."""
    if CONV(node):
        return _conv_step(node, rw)
    if BATCH_NORM(node):
        return _bn_step(node, rw)
    if MUL(node):
        return _scale_step(node, rw)
    if any(pool(node) for pool in AVG_POOLS):
        return _avg_pool_step(node, rw)
    if IDENTITY(node) and _channels(node, rw) is not None:
        return node.kwargs["input"], _identity(_channels(node, rw), len(rw.shape(node)) - 2), (node,)
    return None


def trace(node: Node, rw: Rewriter) -> Traced | Skip:
    """Follow linear steps from ``node`` down through inputs read by nothing else, composing them."""
    step = linear_step(node, rw)
    if step is None:
        return Traced(node, None, (), 0.0)
    if isinstance(step, Skip):
        return step
    inner, branch, consumed = step
    cost = branch.macs_per_output() / math.prod(branch.stride)
    if len(value_users(inner)) != 1:
        return _ended(Traced(inner, branch, consumed, cost))
    below = trace(inner, rw)
    if isinstance(below, Traced) and below.branch is None:
        return _ended(Traced(inner, branch, consumed, cost))
    composed = compose(below.branch, branch) if isinstance(below, Traced) else below
    if isinstance(composed, Skip):
        return composed
    cost = below.cost + cost / math.prod(below.branch.stride)
    return Traced(below.x, composed, (*consumed, *below.nodes), cost)


def _ended(traced: Traced) -> Traced | Skip:
    """A chain that reads ``traced.x`` as it is: a plain conv of x, unless it pads x with per-channel values."""
    if traced.branch.pad_value is not None:
        return Skip(
            "a conv reads its input padded with per-channel values (like DBB's BNAndPadLayer) and no 1x1 conv "
            "or BatchNorm right before the padding yields those values: a plain conv pads with zeros only"
        )
    return traced


# ---------------------------------------------------------------------------------------------
# the algebra: regrouping, sequential composition, parallel sum


def regroup(weight: torch.Tensor, groups: int, target: int) -> torch.Tensor:
    """The same conv written with ``target`` groups (``target`` divides ``groups``): block-diagonal expansion."""
    if groups == target:
        return weight
    ratio = groups // target
    out, in_g, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    blocks = weight.reshape(target, ratio, out // groups, in_g, *kernel)
    expanded = weight.new_zeros(target, ratio, out // groups, ratio, in_g, *kernel)
    r = torch.arange(ratio)  # output sub-group r of each new group reads input sub-block r
    expanded[:, r, :, r] = blocks.transpose(0, 1)  # advanced indexing puts the r axis first
    return expanded.reshape(out, ratio * in_g, *kernel)


def compose(first: Branch, second: Branch) -> Branch | Skip:
    """``second`` applied to the output of ``first`` as one conv, when that is exact."""
    groups = math.gcd(first.groups, second.groups)
    w1 = regroup(first.weight, first.groups, groups)
    w2 = regroup(second.weight, second.groups, groups)
    w1 = w1.reshape(groups, w1.shape[0] // groups, *w1.shape[1:])  # (g, mid/g, in/g, *k1)
    w2 = w2.reshape(groups, w2.shape[0] // groups, *w2.shape[1:])  # (g, out/g, mid/g, *k2)
    b1 = first.bias.view(groups, -1)
    if second.pointwise:
        # subsampling after a conv is that conv with a larger stride
        weight = torch.einsum("gom,gmi...->goi...", w2.flatten(3).squeeze(-1), w1)
        stride = tuple(a * b for a, b in zip(first.stride, second.stride))
        layout = first
    elif first.pointwise and all(s == 1 for s in first.stride):
        if second.pad_value is not None:
            # padding first's output with its bias is first applied to x padded with zeros
            mismatch = _pad_value_mismatch(second.pad_value, first.bias)
            if mismatch is not None:
                return mismatch
        elif second.padding_mode == "zeros" and any(second.padding) and bool(first.bias.any()):
            return Skip(
                "a 1x1 conv (or BatchNorm) with a bias feeds a zero-padded conv: the border sees 0 instead of "
                "the bias, so no single conv is exact (pad the 1x1 output with its bias, or use padding 0)"
            )
        weight = torch.einsum("gom...,gmi->goi...", w2, w1.flatten(3).squeeze(-1))
        stride, layout = second.stride, replace(second, pad_value=None)
    elif first.pointwise:
        return Skip("a strided 1x1 conv before a spatial conv: the merged conv would need a fractional stride")
    else:
        return Skip("two spatial convs in sequence: the merged kernel would grow and the inner padding differs")
    bias = torch.einsum("gom,gm->go", w2.flatten(3).sum(-1), b1).flatten() + second.bias
    return replace(layout, weight=weight.flatten(0, 1), bias=bias, stride=stride, groups=groups)


def _pad_value_mismatch(pad_value: torch.Tensor, bias: torch.Tensor) -> Skip | None:
    """None when the pad values equal the bias of the 1x1 (or BN) before them, up to the rounding of
    computing them in their own dtype (a few operations on numbers of the bias's size); else why not."""
    scale = max(float(bias.abs().max()), float(pad_value.abs().max()))
    tolerance = 8 * torch.finfo(pad_value.dtype).eps * scale
    difference = float((pad_value.double() - bias).abs().max())
    if difference <= tolerance:
        return None
    return Skip(
        f"a conv's input is padded with per-channel values that differ (by up to {difference:.3g}) from the bias "
        "the 1x1 conv or BatchNorm before the padding adds: the border is not that layer's output on a "
        "zero-padded input, so no single conv is exact (pad with the layer's bias, as DBB's BNAndPadLayer does)"
    )


def merge_parallel(branches: list[Branch]) -> Branch | Skip:
    """The sum of branches on one input as one conv with the largest kernel, when that is exact."""
    strides = {b.stride for b in branches}
    if len(strides) > 1:
        return Skip(f"parallel branches have different strides {sorted(strides)} (an identity branch has stride 1)")
    rank = len(branches[0].kernel)
    kernel = tuple(max(b.kernel[d] for b in branches) for d in range(rank))
    if any((kernel[d] - b.kernel[d]) % 2 for b in branches for d in range(rank)):
        sizes = sorted({b.kernel for b in branches})
        return Skip(f"kernel sizes {sizes} cannot be centred in one kernel (size differences must be even)")
    dilation = []
    for d in range(rank):
        used = {b.dilation[d] for b in branches if b.kernel[d] > 1}
        if len(used) > 1:
            return Skip(f"parallel branches have different dilations {sorted(used)}")
        dilation.append(used.pop() if used else 1)
    padding = []
    for d in range(rank):
        aligned = {b.padding[d] + dilation[d] * (kernel[d] - b.kernel[d]) // 2 for b in branches}
        if len(aligned) > 1:
            return Skip(
                "parallel branches are not aligned: a k-kernel branch needs padding P - dilation*(K - k)/2 for "
                f"the largest kernel K with padding P, but they imply merged paddings {sorted(aligned)}"
            )
        padding.append(aligned.pop())
    modes = {b.padding_mode for b in branches if any(b.padding)}
    if len(modes) > 1:
        return Skip(f"parallel branches pad with different padding modes {sorted(modes)}")
    groups = math.gcd(*(b.groups for b in branches))
    weight = sum(_centred(regroup(b.weight, b.groups, groups), kernel) for b in branches)
    return Branch(weight, sum(b.bias for b in branches), branches[0].stride, tuple(padding), tuple(dilation),
                  groups, modes.pop() if modes else "zeros")


def _centred(weight: torch.Tensor, kernel: Ints) -> torch.Tensor:
    widths: list[int] = []
    for k, big in zip(reversed(weight.shape[2:]), reversed(kernel)):  # F.pad: last dimension first
        widths += [(big - k) // 2] * 2
    return F.pad(weight, widths)


def _identity(channels: int, rank: int) -> Branch:
    return _diagonal(torch.ones(channels), torch.zeros(channels), rank)


# ---------------------------------------------------------------------------------------------
# building the merged conv


def _merged_conv(rw: Rewriter, x: Node, branch: Branch, nodes: list[Node]) -> Node:
    """A canonical conv node of ``branch`` on ``x``, named and typed after the first conv among ``nodes``."""
    template = next(n for n in nodes if CONV(n))
    weight_node = template.kwargs["weight"]
    dtype = rw.constant(weight_node).dtype
    name = weight_node.target
    weight = rw.new_constant(name, branch.weight.to(dtype))
    bias = rw.new_constant(bias_name(name), branch.bias.to(dtype)) if bool(branch.bias.any()) else None
    rank = len(branch.kernel)
    return rw.call(CONV, input=x, weight=weight, bias=bias, stride=branch.stride, padding=branch.padding,
                   dilation=branch.dilation, groups=branch.groups, padding_mode=branch.padding_mode,
                   transposed=False, output_padding=(0,) * rank)


# ---------------------------------------------------------------------------------------------
# the patterns


def _add_terms(root: Node) -> tuple[list[Node], list[Node]]:
    """The adds of the chain ending at ``root`` (inner ones read by nothing else) and its operands."""
    adds, terms = [root], []
    for operand in root.args:
        if isinstance(operand, Node) and ADD(operand) and len(value_users(operand)) == 1:
            inner_adds, inner_terms = _add_terms(operand)
            adds += inner_adds
            terms += inner_terms
        else:
            terms.append(operand)
    return adds, terms


class ParallelBranches(Pattern):
    """A sum of branches linear in the same input -> one conv (plus the other summands)."""

    anchor = ADD
    benefit = 2

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        if len(value_users(node)) == 1 and ADD(value_users(node)[0]):
            return None  # the outermost add of the chain sees all summands
        adds, terms = _add_terms(node)
        if not all(isinstance(t, (Node, int, float)) for t in terms):
            return None
        traced = [self._trace_term(t, rw) for t in terms if isinstance(t, Node)]
        problems = [t for t in traced if isinstance(t, Skip)]
        found = _merged_subset(traced, rw)
        if found is None:
            return problems[0] if problems and len(terms) > 1 else None
        if isinstance(found, Skip):
            return found
        group, merged, left_out = found
        nodes = {n.name: n for n in adds}
        nodes.update({n.name: n for t in group for n in t.nodes})
        return Match(node, nodes, facts=(terms, traced, group, merged, [p.reason for p in problems] + left_out))

    @staticmethod
    def _trace_term(term: Node, rw: Rewriter) -> Traced | Skip:
        if len(value_users(term)) != 1:
            return Traced(term, None, (), 0.0)  # read elsewhere too: it stays, so it is the input
        return trace(term, rw)

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        terms, traced, group, merged, left_out = match.facts
        nodes = [t for t in terms if isinstance(t, Node)]
        if left_out:
            rw.note(
                f"reparam_conv at {match.root.name}: {len(group)} of {len(nodes)} summands merged into one conv, "
                "the others kept as they are: " + "; ".join(dict.fromkeys(left_out))
            )
        # a number added to the sum (``0 + branch`` starts many hand-written sums) goes into the bias
        merged = replace(merged, bias=merged.bias + sum(t for t in terms if not isinstance(t, Node)))
        result = _merged_conv(rw, group[0].x, merged, [n for t in group for n in t.nodes])
        for term, t in zip(nodes, traced):
            if t not in group:
                result = rw.call(ADD, a=result, b=term)
        return result


def _merged_subset(traced: list[Traced | Skip], rw: Rewriter) -> tuple[list[Traced], Branch, list[str]] | Skip | None:
    """The summands to merge (at least two on one input, one of them through a conv), their merged
    branch and why each other summand on that input stays out; a Skip when summands share an input
    but no two of them merge; None when no summands share an input."""
    by_input: dict[Node, list[Traced]] = {}
    for t in traced:
        if isinstance(t, Traced):
            by_input.setdefault(t.x, []).append(t)
    first_skip = None
    for group in by_input.values():
        if len(group) < 2 or not any(_through_conv(t) for t in group):
            continue
        x = group[0].x
        rank = len(rw.shape(x)) - 2
        branches = [t.branch or _identity(_channels(x, rw), rank) for t in group]
        found = _largest_mergeable(group, branches)
        if not isinstance(found, Skip):
            return _unless_costlier(*found, rw)
        first_skip = first_skip or found
    return first_skip


def _unless_costlier(group: list[Traced], merged: Branch, left_out: list[str], rw: Rewriter) -> tuple | Skip:
    """The merge, unless the one conv does more multiply-adds than the branches it replaces (a dense
    1x1 beside a depthwise 7x7 would become a dense 7x7), or stores a bigger kernel than all of
    theirs (a 1x1 conv beside a 3x3 average pool: the pool's window becomes stored weights)."""
    before = sum(t.cost for t in group)
    after = merged.macs_per_output() / math.prod(merged.stride)
    if after > before:
        return Skip(
            f"merging these branches gives one conv with {after:.0f} multiply-adds per output pixel, more than "
            f"the {before:.0f} of the branches (e.g. a dense 1x1 beside a depthwise conv): exact, but slower"
        )
    stored = sum(rw.constant(a).numel() for t in group for n in t.nodes for a in n.all_input_nodes
                 if rw.constant(a) is not None and a not in t.nodes)
    if merged.weight.numel() > stored:
        return Skip(
            f"merging these branches stores a {tuple(merged.weight.shape)} kernel ({merged.weight.numel()} "
            f"numbers) where they store {stored}: parameter-free branches (pooling, identity) would become weights"
        )
    return group, merged, left_out


def _through_conv(traced: Traced) -> bool:
    return any(CONV(n) for n in traced.nodes)


def _largest_mergeable(group: list[Traced], branches: list[Branch]) -> tuple[list[Traced], Branch, list[str]] | Skip:
    """All of ``group`` merged when they merge; else the largest subset that merges (greedily grown from
    each summand in turn), with the reason each summand left out does not merge with it."""
    merged = merge_parallel(branches)
    if not isinstance(merged, Skip):
        return group, merged, []
    best: list[int] = []
    for seed in range(len(branches)):
        chosen = [seed]
        for i in range(len(branches)):
            if i != seed and not isinstance(merge_parallel([branches[j] for j in (*chosen, i)]), Skip):
                chosen.append(i)
        if len(chosen) > len(best) and any(_through_conv(group[i]) for i in chosen):
            best = sorted(chosen)
    if len(best) < 2:
        return merged
    left_out = [merge_parallel([branches[j] for j in (*best, i)]) for i in range(len(branches)) if i not in best]
    return [group[i] for i in best], merge_parallel([branches[i] for i in best]), [s.reason for s in left_out]


class SequentialConvs(Pattern):
    """conv (or BN / scale / pool) steps with nothing nonlinear between them -> one conv, when no costlier."""

    anchor = CONV

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        traced = trace(node, rw)
        if isinstance(traced, Skip):
            return traced if CONV(node.kwargs["input"]) or PAD_PER_CHANNEL(node.kwargs["input"]) else None
        if len(traced.nodes) < 2 or not any(CONV(n) for n in traced.nodes):
            return None  # one step, or BN / pool steps only (from a BatchNorm anchor): no conv to merge into
        merged_cost = traced.branch.macs_per_output() / math.prod(traced.branch.stride)
        if merged_cost > traced.cost:
            return None  # e.g. a depthwise conv then a 1x1: exact, but slower as one dense conv
        return Match(node, {n.name: n for n in traced.nodes}, facts=traced)

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        traced = match.facts
        return _merged_conv(rw, traced.x, traced.branch, list(traced.nodes))


class SequentialIntoBN(SequentialConvs):
    """The same, ending in a BatchNorm: one that follows a sum this pass has just merged into a conv
    (RepViT's ``bn(conv(x) + conv1(x) + x)``), which fold_bn, run before, could not see."""

    anchor = BATCH_NORM


# ---------------------------------------------------------------------------------------------
# instances for the property tests: random sums of branches on one input


class _Scale(nn.Module):
    def __init__(self, channels: int, rank: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(channels, *(1,) * rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class _BranchSum(nn.Module):
    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return module


@st.composite
def reparam_instances(draw) -> tuple[nn.Module, tuple]:
    """A sum of 2-4 mergeable branches with random kernel, stride, dilation, groups and padding mode."""
    rank = draw(st.sampled_from([1, 2, 2]))
    conv_cls, bn_cls, pool_cls = {1: (nn.Conv1d, nn.BatchNorm1d, nn.AvgPool1d),
                                  2: (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d)}[rank]
    groups = draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    cout = cin if depthwise or draw(st.booleans()) else groups * draw(st.integers(1, 3))
    groups = cin if depthwise else groups
    K = draw(st.sampled_from([3, 5]))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    P = dilation * (K - 1) // 2

    def conv(k: int | tuple[int, ...], bias: bool = True, g: int = groups, s: int = stride) -> nn.Module:
        ks = (k,) * rank if isinstance(k, int) else k
        pad = tuple(P - dilation * (K - kk) // 2 for kk in ks)
        return conv_cls(cin, cout, ks, stride=s, padding=pad, dilation=dilation, groups=g, bias=bias,
                        padding_mode=mode)

    kinds = ["conv_bn", "small_conv", "conv_then_1x1"]
    if rank == 2:
        kinds += ["asymmetric"]
    if cin == cout and stride == 1:
        kinds += ["bn", "identity", "scale"]
    if cin == cout and dilation == 1 and mode == "zeros":
        kinds += ["avg"]
    chosen = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3))
    branches: list[nn.Module] = [conv(K)]
    for kind in chosen:
        if kind == "conv_bn":
            branches.append(nn.Sequential(conv(K, bias=False), bn_cls(cout)))
        elif kind == "small_conv":
            branches.append(conv(draw(st.sampled_from([k for k in (1, 3) if k < K] or [1]))))
        elif kind == "conv_then_1x1":
            # a grouped 1x1: after a depthwise conv a dense one would make the merge costlier (skipped)
            branches.append(nn.Sequential(conv(K), conv_cls(cout, cout, 1, groups=groups)))
        elif kind == "asymmetric":
            branches.append(nn.Sequential(conv((1, K)), bn_cls(cout)))
        elif kind == "bn":
            branches.append(bn_cls(cout))
        elif kind == "identity":
            branches.append(nn.Identity())
        elif kind == "scale":
            branches.append(_Scale(cout, rank))
        else:
            branches.append(nn.Sequential(pool_cls(K, stride, P), bn_cls(cout)))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = _randomised(_BranchSum(branches), seed).eval()
    size = draw(st.integers(dilation * (K - 1) + 2, 12))
    return model, (torch.randn(draw(st.integers(1, 2)), cin, *(size,) * rank),)


REPARAM_CONV = register(
    Pass(
        name="reparam_conv",
        description="Merge parallel conv branches (RepVGG, ACNet, DBB, MobileOne, RepLKNet) and sequential "
        "pointwise/spatial convs into one conv",
        patterns=(ParallelBranches(), SequentialConvs(), SequentialIntoBN()),
        instances=reparam_instances,
    )
)
