"""Scale reparameterization of quantizers (RepQ-ViT): hardware-friendly quantizers, identical codes.

* Post-LayerNorm per-channel (s_c, z_c) -> one per-tensor (s, z), s = mean(s_c), z = round(mean(z_c)).
  torch's kernels compute codes as ``q_c = clamp(nearbyint(x_c * i_c) + z_c)`` with the float32
  reciprocal ``i_c = fl32(1 / s_c)``. With ``i`` that of s, feeding the quantizer
  ``x~_c = x_c * i_c / i + (z_c - z) / i`` gives ``x~_c * i + z = x_c * i_c + z_c`` (z_c - z is an
  integer), so the codes are identical; that is gamma' = gamma * i_c / i and
  beta' = beta * i_c / i + (z_c - z) / i. The dequantized value becomes
  ``s (q - z) = (s / s_c) * s_c (q - z_c) + s (z_c - z)``, which each consuming Linear undoes:
  W'[:, c] = W[:, c] * s_c / s and bias' = bias - W' @ (s (z_c - z)).
* Post-Softmax log-sqrt(2) codes q -> log2 codes k = ceil(q / 2) and a parity bit p = q mod 2:
  delta 2^(-q/2) = delta 2^-k (1 + (sqrt2 - 1) p), so A~ @ V = P @ V + (sqrt2 - 1) (p * P) @ V
  with P = delta 2^-k: two shift-and-add products. The codes are the quantizer's own, reused.

Codes are exactly equal in real arithmetic; in floating point the LayerNorm computes x~ and the
kernel x~ * i with other roundings than x and x * i_c, so an activation within an ulp of a
rounding boundary can get the neighbouring code. No rounding of gamma' and beta' avoids that:
both sides round twice, differently. Measured by benchmarks/quant_code_flips.py (200 random
calibrated models per bit width, 7.4M codes each): float32 flips 1.3e-7 of the codes at 2 bits
to 4.8e-6 at 8 bits (the parameters computed in float32 instead of float64 flip about as many);
float64 flipped none of 52M. Translation validation does not catch a one-step flip: the float64
oracle with the parameters moved by half an ulp flips codes too, which explains the error (0 of
1400 float32 rewrites rolled back; one was committed with a flip on its own example, which the
whole-model verification then reported). So a rewrite of a model below float64 adds a note to
the report saying so.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.fx import Node

from fxopt import quant
from fxopt.ops import FAKE_QUANT_PER_CHANNEL, FAKE_QUANT_PER_TENSOR, LAYER_NORM, LINEAR, LOG_SQRT2_QUANT, MATMUL
from fxopt.pattern import Match, Pass, Pattern, Skip, register
from fxopt.rewriter import Rewriter


@dataclass(frozen=True)
class PerTensorParameters:
    """Everything the per-channel -> per-tensor rewrite writes, computed in float64."""

    scale: torch.Tensor  # float32, 0-dim
    zero_point: torch.Tensor  # int32, 0-dim
    gamma: torch.Tensor
    beta: torch.Tensor
    linears: list[tuple[torch.Tensor, torch.Tensor]]  # (weight, bias) per consumer


def per_tensor_parameters(
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    linears: list[tuple[torch.Tensor, torch.Tensor]],
    code_range: int,
) -> PerTensorParameters | str:
    """The per-tensor quantizer and the adjusted LayerNorm affine and Linears, or why there is none."""
    s_c = scales.to(torch.float32)
    if not bool(torch.isfinite(s_c).all()) or not bool((s_c > 0).all()):
        return "a per-channel scale is zero, negative or not finite"
    inv_c = (1.0 / s_c).double()  # the kernel's reciprocal, rounded to float32 as it is there
    if not bool(torch.isfinite(inv_c).all()):
        return "a per-channel scale is so small that its float32 reciprocal overflows"
    s = _short_mantissa(s_c.double().mean(), code_range)
    inv = float(1.0 / s)
    z_c = zero_points.double()
    z = torch.round(z_c.mean())  # an integer: z_c - z must be whole for the codes to stay the same
    shift = (z_c - z) / inv
    gamma64, beta64 = gamma.double(), beta.double()
    new_gamma, new_beta = gamma64 * inv_c / inv, beta64 * inv_c / inv + shift
    new_linears = []
    dequant_shift = float(s) * (z_c - z)  # what s (q - z) adds to (s / s_c) * s_c (q - z_c)
    for weight, bias in linears:
        w = weight.double() * (s_c.double() / float(s))
        new_linears.append((w, bias.double() - w @ dequant_shift))
    tensors = [new_gamma, new_beta, *(t for pair in new_linears for t in pair)]
    if not all(bool(torch.isfinite(t.to(gamma.dtype)).all()) for t in tensors):
        return "the rescaled LayerNorm or Linear parameters overflow their dtype"
    return PerTensorParameters(s, z.to(torch.int32), new_gamma, new_beta, new_linears)


def _short_mantissa(scale: torch.Tensor, code_range: int) -> torch.Tensor:
    """``scale`` in float32 with few enough mantissa bits that (q - z) * scale is exact in float32:
    the per-tensor kernel dequantizes in float32 even for float64 inputs, the per-channel one does not."""
    mantissa, exponent = torch.frexp(scale)
    keep = 24 - max(1, int(code_range).bit_length())
    return torch.ldexp(torch.round(mantissa * 2.0**keep) / 2.0**keep, exponent).to(torch.float32)


def _shape_read(node: Node) -> bool:
    """``x.shape`` as symbolic_trace records it: the shape survives the rewrite unchanged."""
    return node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)


class PerChannelToPerTensor(Pattern):
    """LayerNorm -> per-channel fake-quant (last axis) -> Linears."""

    anchor = FAKE_QUANT_PER_CHANNEL

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        ln = node.kwargs["input"]
        if not LAYER_NORM(ln):
            return None
        shape = rw.shape(node)
        if len(ln.kwargs["normalized_shape"]) != 1 or shape is None or node.kwargs["axis"] != len(shape) - 1:
            return Skip("the quantizer's channel axis is not the LayerNorm's (last, only) normalized axis")
        if len(ln.users) != 1:
            return Skip("the LayerNorm output has other users than the quantizer")
        linears = [u for u in node.users if not _shape_read(u)]
        problem = _consumers_problem(linears, node, rw) or _constants_problem(ln, node, rw)
        if problem:
            return Skip(problem)
        params = per_tensor_parameters(*_current_parameters(ln, node, linears, rw))
        if isinstance(params, str):
            return Skip(params)
        nodes = {"layer_norm": ln, "quantizer": node}
        nodes.update({f"user{i}": u for i, u in enumerate(node.users)})
        return Match(node, nodes)

    def rewrite(self, match: Match, rw: Rewriter) -> dict[Node, Node]:
        ln, quantizer = match.nodes["layer_norm"], match.nodes["quantizer"]
        users = [match.nodes[k] for k in match.nodes if k.startswith("user")]
        linears = [u for u in users if not _shape_read(u)]
        params = per_tensor_parameters(*_current_parameters(ln, quantizer, linears, rw))
        assert not isinstance(params, str), params  # match checked it on the same constants
        dtype = rw.constant(linears[0].kwargs["weight"]).dtype
        if dtype != torch.float64 and _ROUNDING_NOTE not in rw.notes:
            rw.note(_ROUNDING_NOTE)
        with rw.inserting_before(quantizer):
            gamma = rw.new_constant(_name_of(ln.kwargs["weight"], f"{ln.name}.weight"), params.gamma.to(dtype))
            beta = rw.new_constant(_name_of(ln.kwargs["bias"], f"{ln.name}.bias"), params.beta.to(dtype))
            new_ln = rw.call(LAYER_NORM, **{**ln.kwargs, "weight": gamma, "bias": beta})
            new_quantizer = rw.call(
                FAKE_QUANT_PER_TENSOR,
                input=new_ln,
                scale=rw.new_constant(_name_of(quantizer.kwargs["scale"], "scale"), params.scale),
                zero_point=rw.new_constant(_name_of(quantizer.kwargs["zero_point"], "zero_point"), params.zero_point),
                quant_min=quantizer.kwargs["quant_min"],
                quant_max=quantizer.kwargs["quant_max"],
            )
        replacements: dict[Node, Node] = {}
        for user in users:
            with rw.inserting_before(user):
                if _shape_read(user):
                    replacements[user] = rw.call_function(getattr, new_quantizer, "shape")
                    continue
                (weight, bias) = params.linears[linears.index(user)]
                w_name = user.kwargs["weight"].target
                b_name = user.kwargs["bias"].target if user.kwargs["bias"] is not None else f"{w_name}_bias"
                replacements[user] = rw.call(
                    LINEAR,
                    input=new_quantizer,
                    weight=rw.new_constant(w_name, weight.to(dtype)),
                    bias=rw.new_constant(b_name, bias.to(dtype)),
                )
        return replacements


_ROUNDING_NOTE = (
    "reparam_quant below float64: per-tensor codes equal the per-channel ones except at rounding boundaries, "
    "where a code can move one step (float32: ~5e-6 of 8-bit codes, ~1e-7 of 2-bit ones; see "
    "benchmarks/quant_code_flips.py) and validation lets that through; in float64 none were seen"
)


def _name_of(node: Node | None, default: str) -> str:
    """A new constant is named after the one it replaces."""
    return node.target if isinstance(node, Node) and node.op == "get_attr" else default


def _consumers_problem(linears: list[Node], quantizer: Node, rw: Rewriter) -> str:
    if not linears:
        return "the quantized activation feeds no Linear"
    for user in linears:
        if not LINEAR(user) or user.kwargs["input"] is not quantizer:
            return f"{user.name} reads the quantized activation and is not a Linear that can absorb the scales"
        if not rw.is_constant(user.kwargs["weight"]) or not rw.is_constant(user.kwargs["bias"]):
            return f"{user.name}'s weight or bias is computed at run time"
        if rw.shared(user.kwargs["weight"]) or rw.shared(user.kwargs["bias"]):
            return f"{user.name}'s weight is shared with other layers"
    return ""


def _constants_problem(ln: Node, quantizer: Node, rw: Rewriter) -> str:
    if not (rw.is_constant(ln.kwargs["weight"]) and rw.is_constant(ln.kwargs["bias"])):
        return "the LayerNorm's affine is computed at run time"
    if rw.shared(ln.kwargs["weight"]) or rw.shared(ln.kwargs["bias"]):
        return "the LayerNorm's affine is shared"
    if rw.constant(quantizer.kwargs["scale"]) is None or rw.constant(quantizer.kwargs["zero_point"]) is None:
        return "the quantizer's scale or zero point is computed at run time"
    return ""


def _current_parameters(ln: Node, quantizer: Node, linears: list[Node], rw: Rewriter) -> tuple:
    """per_tensor_parameters' arguments, an absent affine as 1 and 0."""
    channels = ln.kwargs["normalized_shape"][0]
    gamma, beta = rw.constant(ln.kwargs["weight"]), rw.constant(ln.kwargs["bias"])
    weights = []
    for linear in linears:
        w = rw.constant(linear.kwargs["weight"])
        b = rw.constant(linear.kwargs["bias"])
        weights.append((w, b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)))
    code_range = quantizer.kwargs["quant_max"] - quantizer.kwargs["quant_min"]
    return (
        rw.constant(quantizer.kwargs["scale"]),
        rw.constant(quantizer.kwargs["zero_point"]),
        gamma if gamma is not None else torch.ones(channels, dtype=torch.float64),
        beta if beta is not None else torch.zeros(channels, dtype=torch.float64),
        weights,
        code_range,
    )


class LogSqrt2ToLog2(Pattern):
    """log-sqrt(2) quantized attention @ V -> two log2 (power-of-two) products."""

    anchor = MATMUL

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        quantizer = node.kwargs["input"]
        if not LOG_SQRT2_QUANT(quantizer):
            return None
        if len(quantizer.users) != 1:
            return Skip("the log-sqrt(2) quantized attention has other users than one matmul")
        return Match(node, {"quantizer": quantizer, "matmul": node})

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        quantizer, matmul = match.nodes["quantizer"], match.nodes["matmul"]
        bits, delta = quantizer.kwargs["bits"], quantizer.kwargs["delta"]
        code = rw.call_function(quant.log_code, quantizer.kwargs["input"], bits, delta, 2)
        powers = rw.call_function(quant.log2_dequantize, rw.call_function(quant.log2_shift, code, bits), bits, delta)
        odd_powers = rw.call_function(operator.mul, powers, rw.call_function(torch.remainder, code, 2))
        even_part = rw.call(MATMUL, input=powers, other=matmul.kwargs["other"])
        odd_part = rw.call(MATMUL, input=odd_powers, other=matmul.kwargs["other"])
        return rw.call_function(operator.add, even_part, rw.call_function(operator.mul, odd_part, quant.SQRT2_MINUS_1))


# ---------------------------------------------------------------------------------------------
# instances: float64 models, where the float oracle is meaningful for quantizers (see the docstring
# of tests/test_quant.py): the reference is the oracle, and any changed code fails its tolerance


class QuantizedLayerNorm(nn.Module):
    """LayerNorm -> per-channel fake-quant -> ``consumers`` Linears, summed."""

    def __init__(self, dim: int, consumers: int, bits: int, generator: torch.Generator, ln_bias: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim, bias=ln_bias)
        self.linears = nn.ModuleList(nn.Linear(dim, 3) for _ in range(consumers))
        with torch.no_grad():
            self.norm.weight.copy_(torch.randn(dim, generator=generator).exp())
        # scales spread over a decade and a zero point anywhere: the mean zero point is not whole
        self.register_buffer("scale", (torch.rand(dim, generator=generator) * 2 + 0.2) / 2**bits * 4)
        self.register_buffer("zero_point", torch.randint(0, 2**bits, (dim,), generator=generator, dtype=torch.int32))
        self.quant_max = 2**bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.fake_quantize_per_channel_affine(self.norm(x), self.scale.float(), self.zero_point, 2, 0,
                                                   self.quant_max)  # x is (batch, tokens, channels)
        return sum(linear(q) for linear in self.linears)


class QuantizedAttention(nn.Module):
    """softmax(q k^T) -> log-sqrt(2) quantizer -> @ v."""

    def __init__(self, bits: int, delta: float):
        super().__init__()
        self.quantizer = quant.LogSqrt2Quantizer(bits, delta)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.quantizer(F.softmax(q @ k.transpose(-2, -1), dim=-1)) @ v


@st.composite
def reparam_quant_instances(draw) -> tuple[nn.Module, tuple]:
    bits = draw(st.integers(2, 8))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tokens = draw(st.integers(1, 6))
    if draw(st.booleans()):
        dim, consumers = draw(st.integers(1, 8)), draw(st.integers(1, 3))
        model = QuantizedLayerNorm(dim, consumers, bits, generator, ln_bias=draw(st.booleans()))
        inputs = (torch.randn(2, tokens, dim, generator=generator) * 3,)
    else:
        head = draw(st.integers(1, 8))
        delta = draw(st.sampled_from([1.0, 0.5, 0.9]))
        model = QuantizedAttention(bits, delta)
        inputs = tuple(torch.randn(2, tokens, head, generator=generator) * 2 for _ in range(3))
    return model.double().eval(), tuple(t.double() for t in inputs)


REPARAM_QUANT = register(
    Pass(
        name="reparam_quant",
        description="RepQ-ViT: per-channel post-LayerNorm quantizers to per-tensor and log-sqrt(2) attention "
        "quantizers to log2, with identical integer codes",
        patterns=(PerChannelToPerTensor(), LogSqrt2ToLog2()),
        instances=reparam_quant_instances,
        default=False,  # changes which quantizers the model uses: a deployment choice, not a speed-up
    )
)
