"""fold_repbn: fold SLAB's re-parameterized BatchNorm on token features into the adjacent Linear.

RepBN(x) = BN(x) + alpha * x on tokens (B, N, C), written as transpose -> BatchNorm1d ->
transpose back, plus alpha * x (alpha a constant scalar or per-channel; without it this is a
plain BatchNorm over the feature dim of a token tensor). In eval mode it is a per-channel affine
a * x + c with a = gamma / sqrt(var + eps) + alpha and c = beta - gamma * mean / sqrt(var + eps)
(fold_bn's ``bn_affine`` plus alpha), which folds

* forwards into the Linears that read it: W' = W diag(a), b' = b + W c;
* backwards into the Linear that writes x: W' = a[:, None] W, b' = a b + c. When x has other
  readers they get x = (RepBN(x) - c) / a back, refused when a has a zero channel.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
from hypothesis import strategies as st
from torch.fx import Node

from fxopt.ops import ADD, BATCH_NORM, LINEAR, MUL, SUB
from fxopt.pattern import Match, Pass, Pattern, Skip, register
from fxopt.patterns.fold_bn import bn_affine
from fxopt.patterns.fold_norm_affine import affine_consumers, consumer_nodes, fold_into_consumers
from fxopt.rewriter import Rewriter, bias_name


@dataclass(frozen=True)
class TokenBNMatch:
    """The nodes of a RepBN (or plain BatchNorm) on token features; ``output`` is its value.

    ``alpha_dim``: the channel axis of the 3-D tensor alpha multiplies (1 when alpha * x is taken
    in the transposed (B, C, N) layout as SLAB writes it, 2 when on the tokens (B, N, C))."""

    x: Node
    nodes: dict[str, Node]
    output: Node
    alpha: Node | float | None = None
    alpha_dim: int = 2


def _swapped_source(node: Node, rw: Rewriter) -> Node | None:
    """The input of a 3-D transpose(1, 2) / permute(0, 2, 1), else None."""
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], Node):
        return None
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "").split(".")[0]
    shape = rw.shape(node.args[0])
    if shape is None or len(shape) != 3:
        return None
    if name == "transpose" and sorted(d % 3 for d in node.args[1:3]) == [1, 2]:
        return node.args[0]
    dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if name == "permute" and [d % 3 for d in dims] == [0, 2, 1]:
        return node.args[0]
    return None


def _only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _plus_alpha_times(node: Node | None, base: Node, value: Node, rw: Rewriter) -> tuple[Node, Node | float] | None:
    """(the alpha * value node, alpha) when ``node`` is base + alpha * value with a constant alpha."""
    if not ADD(node):
        return None
    other = node.args[1] if node.args[0] is base else node.args[0]
    if not (MUL(other) and len(other.users) == 1):
        return None
    a, b = other.args
    alpha = b if a is value else a if b is value else None
    if isinstance(alpha, (int, float)) or (isinstance(alpha, Node) and rw.constant(alpha) is not None):
        return other, alpha
    return None


def find_token_bn(bn: Node, rw: Rewriter) -> TokenBNMatch | None:
    """transpose -> BatchNorm [+ alpha * .] -> transpose [+ alpha * x] around ``bn``, else None."""
    t1 = bn.kwargs["input"]
    x = _swapped_source(t1, rw) if isinstance(t1, Node) else None
    if x is None:
        return None
    nodes: dict[str, Node] = {"transpose_in": t1, "bn": bn}
    last, alpha, alpha_dim = bn, None, 2
    slab = _plus_alpha_times(_only_user(bn), bn, t1, rw)  # SLAB: BN(t) + alpha * t, then transpose
    if slab is not None:
        nodes.update(alpha_x=slab[0], add=_only_user(bn))
        last, alpha, alpha_dim = nodes["add"], slab[1], 1
    t2 = _only_user(last)
    if t2 is None or _swapped_source(t2, rw) is not last or any(u not in nodes.values() for u in t1.users):
        return None
    nodes["transpose_out"] = t2
    if alpha is None:
        after = _plus_alpha_times(_only_user(t2), t2, x, rw)
        if after is not None:
            nodes.update(alpha_x=after[0], add=_only_user(t2))
            return TokenBNMatch(x, nodes, nodes["add"], after[1], 2)
    return TokenBNMatch(x, nodes, t2, alpha, alpha_dim)


def repbn_affine(found: TokenBNMatch, rw: Rewriter) -> tuple[torch.Tensor, torch.Tensor] | Skip:
    """(a, c) in float64 with RepBN(x) = a * x + c per channel, or why not."""
    affine = bn_affine(found.nodes["bn"], rw)
    if isinstance(affine, Skip):
        return affine
    a, c = affine
    if found.alpha is None:
        return a, c
    alpha = rw.constant(found.alpha) if isinstance(found.alpha, Node) else torch.tensor(float(found.alpha))
    alpha = alpha.double()
    shape = (1,) * (3 - alpha.dim()) + tuple(alpha.shape)
    per_channel = len(shape) == 3 and shape[found.alpha_dim] == a.numel() and alpha.numel() == a.numel()
    if alpha.numel() != 1 and not per_channel:
        return Skip(f"alpha of shape {tuple(alpha.shape)} is neither a scalar nor per-channel over the token features")
    return a + alpha.reshape(-1), c


class RepBNIntoLinear(Pattern):
    """RepBN / token BatchNorm next to Linears: into its readers, else into its writer."""

    anchor = BATCH_NORM

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        found = find_token_bn(node, rw)
        if found is None:
            return None
        affine = repbn_affine(found, rw)
        if isinstance(affine, Skip):
            return affine
        consumers = affine_consumers(found.output, rw, f"RepBN {found.output.name}")
        if not isinstance(consumers, Skip):
            return Match(found.output, {**found.nodes, **consumer_nodes(consumers)})
        problem = self._writer_problem(found, affine[0], rw)
        if problem:
            return Skip(f"{consumers.reason}; and {problem}")
        return Match(found.output, {**found.nodes, "writer": found.x})

    @staticmethod
    def _writer_problem(found: TokenBNMatch, a: torch.Tensor, rw: Rewriter) -> str | None:
        x = found.x
        if not LINEAR(x):
            return f"its input {x.name} is not a Linear"
        weight, bias = x.kwargs["weight"], x.kwargs["bias"]
        if not (rw.is_constant(weight) and rw.is_constant(bias)):
            return f"Linear {x.name}: weight or bias is computed at run time"
        if rw.shared(weight) or rw.shared(bias):
            return f"Linear {x.name}: its weight is shared (tied) with another layer; folding would untie it"
        if any(user not in found.nodes.values() for user in x.users) and bool((a == 0).any()):
            zeros = torch.nonzero(a == 0).flatten().tolist()
            return (
                f"Linear {x.name} has other readers, which would get its output back by dividing by the "
                f"RepBN scale, and that scale is zero at channel(s) {zeros}"
            )
        return None

    def rewrite(self, match: Match, rw: Rewriter) -> dict[Node, Node]:
        found = find_token_bn(match.nodes["bn"], rw)
        a, c = repbn_affine(found, rw)
        consumers = affine_consumers(found.output, rw, found.output.name)  # the same choice as match
        if not isinstance(consumers, Skip):
            return fold_into_consumers(consumers, found.x, a, c, rw)
        return self._fold_into_writer(found, a, c, rw)

    @staticmethod
    def _fold_into_writer(found: TokenBNMatch, a: torch.Tensor, c: torch.Tensor, rw: Rewriter) -> dict[Node, Node]:
        linear = found.x
        weight_node, bias_node = linear.kwargs["weight"], linear.kwargs["bias"]
        stored = rw.constant(weight_node)
        w = stored.double()
        b = rw.constant(bias_node).double() if bias_node is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        # before the Linear: its other readers may come before the RepBN's output
        with rw.inserting_before(linear):
            weight = rw.new_constant(weight_node.target, (w * a[:, None]).to(stored.dtype))
            bias = rw.new_constant(bias_node.target if bias_node is not None else bias_name(weight_node.target),
                                   (b * a + c).to(stored.dtype))
            folded = rw.call(LINEAR, input=linear.kwargs["input"], weight=weight, bias=bias)
            replacements = {found.output: folded}
            if any(user not in found.nodes.values() for user in linear.users):
                shift = rw.new_constant(f"{weight_node.target}_repbn_shift", c.to(stored.dtype))
                scale = rw.new_constant(f"{weight_node.target}_repbn_scale", a.to(stored.dtype))
                replacements[linear] = rw.call_function(operator.truediv, rw.call(SUB, a=folded, b=shift), scale)
        return replacements


# ---------------------------------------------------------------------------------------------
# instances: RepBN in SLAB's form, on tokens with a per-channel or Python alpha, or a plain token
# BatchNorm; before Linears or after a Linear (whose output may have another reader)


class RepBN(nn.Module):
    """SLAB's RepBN as published: BN(x) + alpha * x in the transposed (B, C, N) layout."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        x = self.bn(x) + self.alpha * x
        return x.transpose(1, 2)


class TokenBN(nn.Module):
    """BatchNorm over the features of (B, N, C) tokens, plus ``alpha * x`` on the tokens when alpha is set."""

    def __init__(self, channels: int, alpha: str):
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)
        self.kind = alpha
        self.alpha = nn.Parameter(torch.randn(channels)) if alpha == "per_channel" else 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x.permute(0, 2, 1)).permute(0, 2, 1)
        return y if self.kind == "none" else y + self.alpha * x


def randomize_bn_stats(model: nn.Module, seed: int) -> nn.Module:
    """Random running statistics and affine, so the fold has something to fold."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            with torch.no_grad():
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.1)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model


class _Placed(nn.Module):
    def __init__(self, norm: nn.Module, d: int, where: str, heads: int):
        super().__init__()
        self.norm, self.where = norm, where
        self.before = nn.Linear(d, d)
        self.after = nn.ModuleList(nn.Linear(d, d + i, bias=i % 2 == 0) for i in range(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.where == "after_linear":
            return self.norm(self.before(x))
        if self.where == "after_linear_with_residual":
            h = self.before(x)
            return h + self.norm(h)
        h = self.norm(x)
        return torch.cat([linear(h) for linear in self.after], dim=-1)


@st.composite
def fold_repbn_instances(draw) -> tuple[nn.Module, tuple]:
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    d = draw(st.integers(1, 10))
    kind = draw(st.sampled_from(["slab", "per_channel", "python", "none"]))
    norm = RepBN(d) if kind == "slab" else TokenBN(d, kind)
    where = draw(st.sampled_from(["before_linears", "after_linear", "after_linear_with_residual"]))
    model = randomize_bn_stats(_Placed(norm, d, where, draw(st.integers(1, 3))), seed)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    x = torch.randn(draw(st.integers(1, 3)), draw(st.integers(1, 5)), d, dtype=dtype)
    return model.to(dtype).eval(), (x,)


FOLD_REPBN = register(
    Pass(
        name="fold_repbn",
        description="Fold SLAB's RepBN / a token BatchNorm (eval mode) into the adjacent Linear",
        patterns=(RepBNIntoLinear(),),
        instances=fold_repbn_instances,
    )
)
