"""fold_repbn: fold SLAB's re-parameterized BatchNorm on token features into the adjacent Linear.

RepBN(x) = BN(x) + alpha * x on tokens (B, N, C), written as transpose -> BatchNorm1d ->
transpose back, plus alpha * x (alpha a constant scalar or per-channel; without it this is a
plain BatchNorm over the feature dim of a token tensor). In eval mode it is a per-channel affine
a * x + c with a = gamma / sqrt(var + eps) + alpha and c = beta - gamma * mean / sqrt(var + eps)
(fold_bn's ``bn_affine`` plus alpha), which folds

* forwards into the Linears that read it: W' = W diag(a), b' = b + W c;
* backwards into the Linear that writes x: W' = a[:, None] W, b' = a b + c. When x has other
  readers they get x = (RepBN(x) - c) / a back, refused when a has a zero channel.

Unified Normalization (Yang et al., CVPR 2022) normalizes token features with statistics fixed at
inference: (x - mu) / sqrt(var + eps) * gamma + beta over the last dim, mu and var stored (its
training smooths them over iterations). Written out elementwise, it is recognized as x minus a
constant per-feature vector, then one or more multiplications or divisions by constants, then
optionally a constant added: the same per-channel affine a * x + c, folded the same way. Scales
that are not finite (var + eps <= 0, a zero divisor) are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from hypothesis import strategies as st
from torch.fx import Node

from fxopt.interpret import run_nodes
from fxopt.ops import ADD, BATCH_NORM, LINEAR, MUL, SUB, layout_op
from fxopt.pattern import Match, Pass, Pattern, Skip, register
from fxopt.patterns.fold_bn import bn_affine
from fxopt.patterns.fold_constants import constant_closure
from fxopt.patterns.fold_norm_affine import affine_consumers, consumer_nodes, fold_into_consumers
from fxopt.rewriter import Rewriter, bias_name


@dataclass(frozen=True)
class TokenBNMatch:
    """The nodes of a RepBN, a plain BatchNorm or a Unified Normalization on token features;
    ``output`` is its value.

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
    what = "RepBN"

    def analyse(self, node: Node, rw: Rewriter) -> tuple[TokenBNMatch, tuple[torch.Tensor, torch.Tensor] | Skip] | None:
        """The normalization anchored at ``node`` and its per-channel affine (a, c), else None."""
        found = find_token_bn(node, rw)
        return None if found is None else (found, repbn_affine(found, rw))

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        analysed = self.analyse(node, rw)
        if analysed is None:
            return None
        found, affine = analysed
        if isinstance(affine, Skip):
            return affine
        consumers = affine_consumers(found.output, rw, f"{self.what} {found.output.name}")
        if not isinstance(consumers, Skip):
            return Match(found.output, {**found.nodes, **consumer_nodes(consumers)}, facts=(found, affine, consumers))
        problem = self._writer_problem(found, affine[0], rw)
        if problem:
            return Skip(f"{consumers.reason}; and {problem}")
        return Match(found.output, {**found.nodes, "writer": found.x}, facts=(found, affine, None))

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
                f"normalization's scale, and that scale is zero at channel(s) {zeros}"
            )
        return None

    def rewrite(self, match: Match, rw: Rewriter) -> dict[Node, Node]:
        found, (a, c), consumers = match.facts
        if consumers is not None:
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
                # x = (y - c) / a as -c / a + y / a: one kernel, and no (x - mu) / sigma chain that
                # UnifiedNormIntoLinear would fold back into the Linear, forever
                shift = rw.new_constant(f"{weight_node.target}_repbn_shift", (-c / a).to(stored.dtype))
                scale = rw.new_constant(f"{weight_node.target}_repbn_scale", a.to(stored.dtype))
                replacements[linear] = rw.call_function(torch.addcdiv, shift, folded, scale)
        return replacements


# ---------------------------------------------------------------------------------------------
# Unified Normalization's inference form: (x - mu), scaled by constants, plus a constant


def _is_division(node: Node) -> bool:
    """a / b in any spelling (not floor or trunc division: those take a rounding_mode)."""
    return layout_op(node) in ("truediv", "div", "true_divide", "__truediv__") and not node.kwargs


@dataclass(frozen=True)
class _Step:
    """One step of a fixed-statistics normalization: the previous value combined with a constant
    (a Python number, or a tensor computed from constants alone by ``closure``)."""

    node: Node
    kind: str  # "sub", "mul", "div" or "add"
    constant: Node | float
    closure: tuple[Node, ...]


def _per_feature(value: Node | float, features: int, rw: Rewriter) -> bool:
    """A Python number, a one-element tensor or one value per feature (broadcast along the last dim)."""
    if not isinstance(value, Node):
        return True
    shape = rw.shape(value)
    return shape is not None and (math.prod(shape) == 1 or (shape[-1] == features and math.prod(shape) == features))


def _step(node: Node, previous: Node, features: int, rw: Rewriter) -> _Step | None:
    """``node`` as ``previous`` combined with a per-feature constant, else None."""
    if not (SUB(node) or MUL(node) or ADD(node) or _is_division(node)) or len(node.args) != 2:
        return None
    kind = "sub" if SUB(node) else "mul" if MUL(node) else "add" if ADD(node) else "div"
    first, second = node.args
    constant = second if first is previous else first if second is previous and kind in ("mul", "add") else None
    if isinstance(constant, (int, float)) and not isinstance(constant, bool):
        return _Step(node, kind, float(constant), ())
    closure = constant_closure(constant, rw) if isinstance(constant, Node) else None
    if closure is None or not _per_feature(constant, features, rw):
        return None
    return _Step(node, kind, constant, tuple(closure))


def find_fixed_statistics_norm(sub: Node, rw: Rewriter) -> tuple[TokenBNMatch, list[_Step]] | None:
    """x - mu (mu a stored tensor), then one or more products or quotients by constants, then
    optionally + a constant, all per feature of x's last dim; else None."""
    x, mu = sub.args
    if not (isinstance(x, Node) and isinstance(mu, Node) and len(sub.users) == 1) or not rw.reads_inputs(x):
        return None
    after = next(iter(sub.users))
    if not (MUL(after) or _is_division(after)) or constant_closure(mu, rw) is None:
        return None  # checked before asking for shapes, which may run the model once
    shape = rw.shape(x)
    if not shape:
        return None
    first = _step(sub, x, shape[-1], rw)
    if first is None:
        return None
    steps = [first]
    while steps[-1].kind != "add" and len(steps[-1].node.users) == 1:  # + beta ends it
        step = _step(next(iter(steps[-1].node.users)), steps[-1].node, shape[-1], rw)
        if step is None or step.kind == "sub":
            break
        steps.append(step)
    if len(steps) == 1:
        return None  # the scaling's constant varies or is not per feature
    nodes = {step.node.name: step.node for step in steps}
    nodes.update({n.name: n for step in steps for n in step.closure})
    return TokenBNMatch(x, nodes, steps[-1].node), steps


def fixed_statistics_affine(steps: list[_Step], features: int, rw: Rewriter) -> tuple[torch.Tensor, torch.Tensor] | Skip:
    """(a, c) in float64 with the chain's output = a * x + c per feature, or why not."""
    a = torch.ones(features, dtype=torch.float64)
    c = torch.zeros(features, dtype=torch.float64)
    for step in steps:
        if isinstance(step.constant, Node):
            value = run_nodes(rw.gm, step.closure, {}, dtype=torch.float64)[step.constant].reshape(-1)
        else:
            value = torch.tensor([step.constant], dtype=torch.float64)
        if step.kind == "sub":
            c = c - value
        elif step.kind == "add":
            c = c + value
        elif step.kind == "mul":
            a, c = a * value, c * value
        else:
            a, c = a / value, c / value
    bad = ~(torch.isfinite(a) & torch.isfinite(c))
    if bool(bad.any()):
        return Skip(
            f"the normalization ending at {steps[-1].node.name} has a scale that is not finite at feature(s) "
            f"{torch.nonzero(bad).flatten().tolist()[:8]} (a zero divisor, or var + eps <= 0): its statistics "
            "are degenerate, so it cannot be folded"
        )
    return a, c


class UnifiedNormIntoLinear(RepBNIntoLinear):
    """Unified Normalization (fixed statistics) next to Linears, folded like RepBN."""

    anchor = SUB
    what = "normalization"

    def analyse(self, node: Node, rw: Rewriter) -> tuple[TokenBNMatch, tuple[torch.Tensor, torch.Tensor] | Skip] | None:
        found = find_fixed_statistics_norm(node, rw)
        if found is None:
            return None
        norm, steps = found
        return norm, fixed_statistics_affine(steps, rw.shape(norm.x)[-1], rw)


# ---------------------------------------------------------------------------------------------
# instances: RepBN in SLAB's form, on tokens with a per-channel or Python alpha, a plain token
# BatchNorm, or Unified Normalization; before Linears or after a Linear (whose output may have
# another reader)


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


class UnifiedNorm(nn.Module):
    """Unified Normalization (Yang et al., CVPR 2022) over the features of (B, N, C) tokens.

    Training normalizes with the batch's statistics and keeps running ones (the paper smooths
    them over a window of iterations; an exponential average here); inference uses the stored
    statistics, which makes it a fixed per-feature affine."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            dims = tuple(range(x.dim() - 1))
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def randomize_bn_stats(model: nn.Module, seed: int) -> nn.Module:
    """Random running statistics and affine, so the fold has something to fold."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, UnifiedNorm)):
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
    kind = draw(st.sampled_from(["slab", "per_channel", "python", "none", "unified"]))
    norm = RepBN(d) if kind == "slab" else UnifiedNorm(d) if kind == "unified" else TokenBN(d, kind)
    where = draw(st.sampled_from(["before_linears", "after_linear", "after_linear_with_residual"]))
    model = randomize_bn_stats(_Placed(norm, d, where, draw(st.integers(1, 3))), seed)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    x = torch.randn(draw(st.integers(1, 3)), draw(st.integers(1, 5)), d, dtype=dtype)
    return model.to(dtype).eval(), (x,)


FOLD_REPBN = register(
    Pass(
        name="fold_repbn",
        description="Fold SLAB's RepBN / a token BatchNorm / Unified Normalization (eval mode) into the adjacent Linear",
        patterns=(RepBNIntoLinear(), UnifiedNormIntoLinear()),
        instances=fold_repbn_instances,
    )
)
