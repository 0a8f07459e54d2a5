"""SmoothQuant (Xiao et al. 2023): move per-channel activation range from a norm into its Linears.

For a LayerNorm or RMSNorm whose output feeds only Linears: s_j = a_j^alpha / w_j^(1 - alpha) with
a_j channel j's activation range and w_j = max |W[:, j]| over all consumers; the norm's gamma
(and beta) are divided by s, each consumer's column j multiplied by s_j. Exact in real arithmetic
(the float oracle checks it), and it evens out the channel ranges a per-tensor activation quantizer
then sees. The strength alpha (0 to 1) is how much of the range moves into the weights: alpha = 1
leaves every activation channel the same range, alpha = 0 every weight column; ``smooth_quant``
uses SmoothQuant's 0.5; for another, ``optimize(model, x, passes=[smooth_quant_pass(alpha=0.8)])``
(``from fxopt.patterns.smooth_quant import smooth_quant_pass``).

Activation ranges without calibration data: SmoothQuant measures a_j = max |X_j| on calibration
batches; a graph pass has none (optimize's example inputs validate rewrites, they are not a
calibration set), so here a_j = |gamma_j| + |beta_j|, the size of channel j's output for a
normalized input of size 1. That captures the inter-channel variation the norm's affine creates,
but it is not a bound (one channel of a LayerNorm's normalized input can reach sqrt(C - 1)) and it
does not see outliers that the normalized input itself carries in fixed channels: the factors are
SmoothQuant's only where the normalized channels have equal ranges. The rewrite is exact either
way; only how well it evens out the measured ranges depends on a_j.

Not in the default pipeline: it makes the float model no cheaper, it prepares it for quantization.
Channels where s_j would be infinite or zero (an all-zero weight column at alpha < 1, a channel
with no range at alpha > 0) keep s_j = 1.
An RMSNorm weight that enters as (1 + w) is a computed weight here: refused with that reason,
unless fold_constants has made it a constant first (``passes=["fold_constants", "smooth_quant"]``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import strategies as st
from torch.fx import Node

from fxopt.ops import LAYER_NORM, LINEAR, RMS_NORM
from fxopt.pattern import Match, Pass, Pattern, Skip, register
from fxopt.rewriter import Rewriter

ALPHA = 0.5  # SmoothQuant's default migration strength


def smoothing_factors(activation_bound: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = a_j^alpha / max_i |W_ij|^(1 - alpha), and 1 where that is not finite and positive."""
    w = torch.stack([weight.double().abs().amax(0) for weight in weights]).amax(0)
    s = activation_bound.double().abs() ** alpha / w ** (1 - alpha)
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


class SmoothNormIntoLinears(Pattern):
    anchor = LAYER_NORM

    def __init__(self, alpha: float = ALPHA):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"smooth_quant's strength alpha must be between 0 and 1, got {alpha}")
        self.alpha = alpha

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        if len(node.kwargs["normalized_shape"]) != 1 or not node.users:
            return None
        if not all(LINEAR(u) and u.kwargs["input"] is node for u in node.users):
            return None  # nothing to migrate into
        affine = [node.kwargs["weight"], node.kwargs.get("bias")]
        if not all(rw.is_constant(a) for a in affine):
            return Skip("the norm's weight is computed at run time (an RMSNorm's (1 + w) for instance)")
        for u in node.users:
            if not (rw.is_constant(u.kwargs["weight"]) and rw.is_constant(u.kwargs["bias"])) or rw.shared(u.kwargs["weight"]):
                return Skip(f"{u.name}'s weight is computed at run time or shared")
        if any(rw.shared(a) for a in affine):
            return Skip("the norm's affine is shared")
        if _already_smooth(node, rw, self.alpha):
            return None  # the fixed point: migrating again would change nothing
        return Match(node, {"norm": node, **{f"linear{i}": u for i, u in enumerate(node.users)}})

    def rewrite(self, match: Match, rw: Rewriter) -> dict[Node, Node]:
        norm = match.nodes["norm"]
        linears = [n for k, n in match.nodes.items() if k != "norm"]
        s = _factors(norm, rw, self.alpha)
        channels = s.numel()
        gamma = rw.constant(norm.kwargs["weight"])
        dtype = rw.constant(linears[0].kwargs["weight"]).dtype
        gamma64 = gamma.double() if gamma is not None else torch.ones(channels, dtype=torch.float64)
        kwargs = dict(norm.kwargs)
        kwargs["weight"] = rw.new_constant(_target(norm.kwargs["weight"], f"{norm.name}.weight"), (gamma64 / s).to(dtype))
        if "bias" in kwargs and rw.constant(kwargs["bias"]) is not None:
            beta = rw.constant(kwargs["bias"]).double()
            kwargs["bias"] = rw.new_constant(kwargs["bias"].target, (beta / s).to(dtype))
        op = LAYER_NORM if LAYER_NORM(norm) else RMS_NORM
        with rw.inserting_before(norm):
            new_norm = rw.call(op, **kwargs)
        replacements = {}
        for linear in linears:
            with rw.inserting_before(linear):
                weight = rw.constant(linear.kwargs["weight"])
                new_weight = rw.new_constant(linear.kwargs["weight"].target, (weight.double() * s).to(weight.dtype))
                replacements[linear] = rw.call(LINEAR, input=new_norm, weight=new_weight, bias=linear.kwargs["bias"])
        return replacements


class SmoothRMSNormIntoLinears(SmoothNormIntoLinears):
    anchor = RMS_NORM


def _target(node: Node | None, default: str) -> str:
    return node.target if isinstance(node, Node) else default


def _activation_bound(norm: Node, rw: Rewriter) -> torch.Tensor:
    channels = norm.kwargs["normalized_shape"][0]
    gamma, beta = rw.constant(norm.kwargs["weight"]), rw.constant(norm.kwargs.get("bias"))
    bound = gamma.double().abs() if gamma is not None else torch.ones(channels, dtype=torch.float64)
    return bound + beta.double().abs() if beta is not None else bound


def _factors(norm: Node, rw: Rewriter, alpha: float) -> torch.Tensor:
    weights = [rw.constant(u.kwargs["weight"]) for u in norm.users]
    return smoothing_factors(_activation_bound(norm, rw), weights, alpha)


def _already_smooth(norm: Node, rw: Rewriter, alpha: float) -> bool:
    """After one migration s is ~1 (a_j / s_j = (a_j w_j)^(1 - alpha), w_j s_j = (a_j w_j)^alpha):
    nothing left to move."""
    return bool(torch.allclose(_factors(norm, rw, alpha), torch.ones(1, dtype=torch.float64), rtol=1e-3, atol=0))


class NormIntoLinears(nn.Module):
    def __init__(self, norm: nn.Module, dim: int, consumers: int, zero_column: bool, generator: torch.Generator):
        super().__init__()
        self.norm = norm
        self.linears = nn.ModuleList(nn.Linear(dim, 3) for _ in range(consumers))
        with torch.no_grad():
            self.norm.weight.copy_(torch.randn(dim, generator=generator).exp() * 4)  # uneven channels
            if zero_column:
                for linear in self.linears:
                    linear.weight[:, 0] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return sum(linear(y) for linear in self.linears)


@st.composite
def smooth_quant_instances(draw) -> tuple[nn.Module, tuple]:
    dim, consumers = draw(st.integers(2, 8)), draw(st.integers(1, 3))  # a zero column leaves one to smooth
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    norm = nn.LayerNorm(dim, bias=draw(st.booleans())) if draw(st.booleans()) else nn.RMSNorm(dim, eps=1e-6)
    model = NormIntoLinears(norm, dim, consumers, draw(st.booleans()), generator)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return model.to(dtype).eval(), (torch.randn(2, 4, dim, generator=generator).to(dtype),)


def smooth_quant_pass(alpha: float = ALPHA) -> Pass:
    """SmoothQuant with migration strength ``alpha``, for ``optimize(..., passes=[...])``."""
    return Pass(
        name="smooth_quant" if alpha == ALPHA else f"smooth_quant(alpha={alpha:g})",
        description="SmoothQuant: migrate per-channel activation range from a LayerNorm/RMSNorm into its Linears",
        patterns=(SmoothNormIntoLinears(alpha), SmoothRMSNormIntoLinears(alpha)),
        instances=smooth_quant_instances,
        default=False,  # not cheaper: it prepares a model for per-tensor activation quantization
    )


SMOOTH_QUANT = register(smooth_quant_pass())
