"""reparam_conv: structural re-parameterization of convs (RepVGG, ACNet, DBB, MobileOne, RepLKNet, DEConv).

Every branch that is linear in an input x (a conv, a BatchNorm, a per-channel scale, an average
pool, the identity, and sequences of them) is one conv of x: a float64 ``Branch``. Two rules:

* Parallel: a sum (a chain of adds, any order) of branches of the same x becomes one conv with the
  largest kernel: kernels are regrouped to the finest common groups, zero-padded to the largest
  size at the centre and added, biases added.
* Sequential: pointwise -> spatial and spatial -> pointwise convs (and BN / scale / pool steps)
  with nothing nonlinear between them compose into one conv.

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

from fxopt.ops import ADD, AVG_POOL, BATCH_NORM, CONV, IDENTITY, MUL
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


def _conv_step(node: Node, rw: Rewriter) -> tuple[Node, Branch] | Skip | None:
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
    return k["input"], branch


def _bn_step(node: Node, rw: Rewriter) -> tuple[Node, Branch] | Skip | None:
    x = node.kwargs["input"]
    shape = rw.shape(x)
    if shape is None or len(shape) < 3:
        return None
    affine = bn_affine(node, rw)
    if isinstance(affine, Skip):
        return affine if node.kwargs["training"] else None
    return x, _diagonal(*affine, rank=len(shape) - 2)


def _scale_step(node: Node, rw: Rewriter) -> tuple[Node, Branch] | None:
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
        return x, _diagonal(scale, torch.zeros(channels, dtype=torch.float64), rank=len(shape) - 2)
    return None


def _per_channel(shape: torch.Size, ndim: int, channels: int) -> bool:
    """True when a tensor of ``shape`` broadcast against (N, C, ...) scales whole channels."""
    padded = (1,) * (ndim - len(shape)) + tuple(shape)
    return len(padded) == ndim and padded[0] == 1 and padded[1] in (1, channels) and all(d == 1 for d in padded[2:])


def _avg_pool_step(node: Node, rw: Rewriter) -> tuple[Node, Branch] | Skip | None:
    k, x = node.kwargs, node.kwargs["input"]
    channels = _channels(x, rw)
    if channels is None:
        return None
    if k["ceil_mode"]:
        return Skip("average pooling with ceil_mode=True has partial windows at the border: no conv equals it")
    if any(k["padding"]) and not k["count_include_pad"] and k["divisor_override"] is None:
        return Skip(
            "average pooling with count_include_pad=False divides border windows by fewer pixels: "
            "only count_include_pad=True is a conv"
        )
    divisor = k["divisor_override"] or math.prod(k["kernel_size"])
    scale = torch.full((channels,), 1.0 / divisor, dtype=torch.float64)
    return x, _diagonal(scale, torch.zeros(channels, dtype=torch.float64), 2, tuple(k["kernel_size"]),
                        tuple(k["stride"]), tuple(k["padding"]))


def linear_step(node: Node, rw: Rewriter) -> tuple[Node, Branch] | Skip | None:
    """``node`` as (its input, the Branch it applies), a Skip when it is linear but not mergeable, else None."""
    if CONV(node):
        return _conv_step(node, rw)
    if BATCH_NORM(node):
        return _bn_step(node, rw)
    if MUL(node):
        return _scale_step(node, rw)
    if AVG_POOL(node):
        return _avg_pool_step(node, rw)
    if IDENTITY(node) and _channels(node, rw) is not None:
        return node.kwargs["input"], _identity(_channels(node, rw), len(rw.shape(node)) - 2)
    return None


def trace(node: Node, rw: Rewriter) -> Traced | Skip:
    """Follow linear steps from ``node`` down through inputs read by nothing else, composing them."""
    step = linear_step(node, rw)
    if step is None:
        return Traced(node, None, (), 0.0)
    if isinstance(step, Skip):
        return step
    inner, branch = step
    cost = branch.macs_per_output() / math.prod(branch.stride)
    if len(inner.users) != 1:
        return Traced(inner, branch, (node,), cost)
    below = trace(inner, rw)
    if isinstance(below, Skip):
        return below
    if below.branch is None:
        return Traced(inner, branch, (node,), cost)
    composed = compose(below.branch, branch)
    if isinstance(composed, Skip):
        return composed
    cost = below.cost + cost / math.prod(below.branch.stride)
    return Traced(below.x, composed, (node, *below.nodes), cost)


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
        if second.padding_mode == "zeros" and any(second.padding) and bool(first.bias.any()):
            return Skip(
                "a 1x1 conv (or BatchNorm) with a bias feeds a zero-padded conv: the border sees 0 instead of "
                "the bias, so no single conv is exact (pad the 1x1 output with its bias, or use padding 0)"
            )
        weight = torch.einsum("gom...,gmi->goi...", w2, w1.flatten(3).squeeze(-1))
        stride, layout = second.stride, second
    elif first.pointwise:
        return Skip("a strided 1x1 conv before a spatial conv: the merged conv would need a fractional stride")
    else:
        return Skip("two spatial convs in sequence: the merged kernel would grow and the inner padding differs")
    bias = torch.einsum("gom,gm->go", w2.flatten(3).sum(-1), b1).flatten() + second.bias
    return replace(layout, weight=weight.flatten(0, 1), bias=bias, stride=stride, groups=groups)


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
        if isinstance(operand, Node) and ADD(operand) and len(operand.users) == 1:
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
        if len(node.users) == 1 and ADD(next(iter(node.users))):
            return None  # the outermost add of the chain sees all summands
        adds, terms = _add_terms(node)
        if not all(isinstance(t, (Node, int, float)) for t in terms):
            return None
        traced = [self._trace_term(t, rw) for t in terms if isinstance(t, Node)]
        problem = next((t for t in traced if isinstance(t, Skip)), None)
        group = _mergeable_group(traced)
        if group is None:
            return problem if problem and len(terms) > 1 else None
        if problem is not None:
            return problem
        merged = self._merged(group, rw)
        if isinstance(merged, Skip):
            return merged
        nodes = {n.name: n for n in adds}
        nodes.update({n.name: n for t in group for n in t.nodes})
        return Match(node, nodes, facts=(terms, traced, group, merged))

    @staticmethod
    def _trace_term(term: Node, rw: Rewriter) -> Traced | Skip:
        if len(term.users) != 1:
            return Traced(term, None, (), 0.0)  # read elsewhere too: it stays, so it is the input
        return trace(term, rw)

    @staticmethod
    def _merged(group: list[Traced], rw: Rewriter) -> Branch | Skip:
        x = group[0].x
        rank = len(rw.shape(x)) - 2
        branches = [t.branch or _identity(_channels(x, rw), rank) for t in group]
        return merge_parallel(branches)

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        terms, traced, group, merged = match.facts
        nodes = [t for t in terms if isinstance(t, Node)]
        # a number added to the sum (``0 + branch`` starts many hand-written sums) goes into the bias
        merged = replace(merged, bias=merged.bias + sum(t for t in terms if not isinstance(t, Node)))
        result = _merged_conv(rw, group[0].x, merged, [n for t in group for n in t.nodes])
        for term, t in zip(nodes, traced):
            if t not in group:
                result = rw.call(ADD, a=result, b=term)
        return result


def _mergeable_group(traced: list[Traced | Skip]) -> list[Traced] | None:
    """The first set of at least two summands on one input, one of them through a conv."""
    by_input: dict[Node, list[Traced]] = {}
    for t in traced:
        if isinstance(t, Traced):
            by_input.setdefault(t.x, []).append(t)
    for group in by_input.values():
        if len(group) > 1 and any(CONV(n) for t in group for n in t.nodes):
            return group
    return None


class SequentialConvs(Pattern):
    """conv (or BN / scale / pool) steps with nothing nonlinear between them -> one conv, when no costlier."""

    anchor = CONV

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        traced = trace(node, rw)
        if isinstance(traced, Skip):
            return traced if CONV(node.kwargs["input"]) else None
        if len(traced.nodes) < 2:
            return None
        merged_cost = traced.branch.macs_per_output() / math.prod(traced.branch.stride)
        if merged_cost > traced.cost:
            return None  # e.g. a depthwise conv then a 1x1: exact, but slower as one dense conv
        return Match(node, {n.name: n for n in traced.nodes}, facts=traced)

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        traced = match.facts
        return _merged_conv(rw, traced.x, traced.branch, list(traced.nodes))


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
    conv_cls, bn_cls = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d)}[rank]
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
    if rank == 2 and cin == cout and dilation == 1 and mode == "zeros":
        kinds += ["avg"]
    chosen = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3))
    branches: list[nn.Module] = [conv(K)]
    for kind in chosen:
        if kind == "conv_bn":
            branches.append(nn.Sequential(conv(K, bias=False), bn_cls(cout)))
        elif kind == "small_conv":
            branches.append(conv(draw(st.sampled_from([k for k in (1, 3) if k < K] or [1]))))
        elif kind == "conv_then_1x1":
            branches.append(nn.Sequential(conv(K), conv_cls(cout, cout, 1)))
        elif kind == "asymmetric":
            branches.append(nn.Sequential(conv((1, K)), bn_cls(cout)))
        elif kind == "bn":
            branches.append(bn_cls(cout))
        elif kind == "identity":
            branches.append(nn.Identity())
        elif kind == "scale":
            branches.append(_Scale(cout, rank))
        else:
            branches.append(nn.Sequential(nn.AvgPool2d(K, stride, P), bn_cls(cout)))
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
        patterns=(ParallelBranches(), SequentialConvs()),
        instances=reparam_instances,
    )
)
