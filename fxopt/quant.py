"""Fake quantizers for vision transformers (RepQ-ViT) and their calibration.

Uniform quantizers are torch's own ``fake_quantize_per_{channel,tensor}_affine``; this module adds
the log-domain quantizers used on post-Softmax attention, and ``calibrate``, which inserts
accurate quantizers (per-channel after LayerNorm, log-sqrt(2) after Softmax) into a model. The
``reparam_quant`` pass then turns them into hardware-friendly ones with identical integer codes.

Log codes: ``q = round(-k * log2(x / delta))`` (k = 2 for log-sqrt(2), 1 for log2); codes at or
above ``2**bits`` mean "too small to represent" and dequantize to zero, codes below 0 clamp to 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

SQRT2_MINUS_1 = math.sqrt(2.0) - 1.0


def log_code(input: torch.Tensor, bits: int, delta: float, steps_per_octave: int) -> torch.Tensor:
    """Integer log codes (as floats): 0 .. 2**bits - 1, or 2**bits for values that quantize to zero."""
    levels = 2**bits
    code = torch.round(-steps_per_octave * torch.log2(input / delta))
    code = torch.where(code >= levels, levels, code.clamp(min=0))
    return torch.where(torch.isnan(code), levels, code)  # 0 / 0 and NaN inputs: zero, like log2(0)


def log2_dequantize(code: torch.Tensor, bits: int, delta: float) -> torch.Tensor:
    """delta * 2**-code: a power of two times delta, so multiplying by it is a shift; zero at 2**bits."""
    return torch.where(code >= 2**bits, 0.0, delta * torch.exp2(-code)).to(code.dtype)


def log2_shift(code: torch.Tensor, bits: int) -> torch.Tensor:
    """The log2 code ceil(q / 2) of a log-sqrt(2) code q (2**bits, "zero", stays zero)."""
    return torch.where(code >= 2**bits, 2**bits, torch.ceil(code / 2))


def log_sqrt2_dequantize(code: torch.Tensor, bits: int, delta: float) -> torch.Tensor:
    """delta * 2**-(code / 2), written as RepQ-ViT does: 2**-ceil(q/2) * (1 + (sqrt2 - 1) * (q mod 2))."""
    odd = torch.remainder(code, 2)
    value = delta * torch.exp2(-torch.ceil(code / 2)) * (1 + SQRT2_MINUS_1 * odd)
    return torch.where(code >= 2**bits, 0.0, value).to(code.dtype)


def log_sqrt2_quantize(input: torch.Tensor, bits: int, delta: float) -> torch.Tensor:
    """Fake log-sqrt(2) quantization: half-octave steps, accurate for power-law attention scores."""
    return log_sqrt2_dequantize(log_code(input, bits, delta, 2), bits, delta)


def log2_quantize(input: torch.Tensor, bits: int, delta: float) -> torch.Tensor:
    """Fake log2 quantization: one step per octave, so dequantized products are bit shifts."""
    return log2_dequantize(log_code(input, bits, delta, 1), bits, delta)


# one call node each when traced (canonical ops, see fxopt.ops), instead of their primitives
torch.fx.wrap("log_sqrt2_quantize")
torch.fx.wrap("log2_quantize")


class LogSqrt2Quantizer(nn.Module):
    """Fake log-sqrt(2) quantizer with ``bits`` bits and range top ``delta``."""

    def __init__(self, bits: int, delta: float):
        super().__init__()
        self.bits, self.delta = int(bits), float(delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_sqrt2_quantize(x, self.bits, self.delta)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, delta={self.delta:g}"


class Log2Quantizer(LogSqrt2Quantizer):
    """Fake log2 quantizer with ``bits`` bits and range top ``delta``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log2_quantize(x, self.bits, self.delta)


def uniform_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                  axis: int | None = None) -> torch.Tensor:
    """The integer codes torch's fake_quantize kernels compute: clamp(nearbyint(x * fl32(1/s)) + z).

    The kernels multiply by a float32 reciprocal of the float32 scale, not divide by the scale;
    reparameterizations that must keep codes identical reason about this reciprocal."""
    scale32 = scale.to(torch.float32)
    inverse = (1.0 / scale32).to(x.dtype)
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    product = x * inverse.reshape(shape)
    return (torch.round(product) + zero_point.reshape(shape)).clamp(quant_min, quant_max).to(torch.int64)


# ---------------------------------------------------------------------------------------------
# calibration


_SOFTMAX_TARGETS = {F.softmax, torch.softmax, torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}


def calibrate(
    model: nn.Module,
    example_inputs: tuple,
    data: Iterable[Any],
    bits: int = 8,
    method: str = "minmax",
    percentile: float = 99.99,
) -> GraphModule:
    """A new module with fake quantizers on ``model``'s post-LayerNorm and post-Softmax activations.

    After each LayerNorm: an asymmetric per-channel (last axis) uniform quantizer with ``bits``
    bits; after each Softmax: a :class:`LogSqrt2Quantizer` with ``delta`` = the largest value
    seen. Ranges come from running ``data`` (an iterable of input tuples, or of single tensors):
    ``method="minmax"`` uses each channel's min and max over all batches, ``"percentile"`` the
    ``percentile``-th and ``(100 - percentile)``-th percentiles instead (robust to outliers).
    ``model`` is not changed.
    """
    from .canonical import canonicalize
    from .capture import capture
    from .codegen import finalize
    from .interpret import run_graph
    from .ops import LAYER_NORM

    if method not in ("minmax", "percentile"):
        raise ValueError(f"method must be 'minmax' or 'percentile', got {method!r}")
    gm = canonicalize(capture(copy.deepcopy(model), example_inputs).module, example_inputs)
    sites = [n for n in gm.graph.nodes if LAYER_NORM(n) or _is_softmax(n)]
    batches = [b if isinstance(b, tuple) else (b,) for b in data]
    if not batches:
        raise ValueError("calibrate needs at least one batch of data")
    seen: dict[Node, list[torch.Tensor]] = {n: [] for n in sites}
    for batch in batches:
        values = run_graph(gm, batch)
        for n in sites:
            seen[n].append(values[n].detach())
    for i, n in enumerate(sites):
        activations = torch.cat([v.reshape(-1, v.shape[-1]) for v in seen[n]])
        if LAYER_NORM(n):
            _insert_uniform(gm, n, f"quant{i}", activations, bits, method, percentile)
        else:
            _insert_log_sqrt2(gm, n, f"quant{i}", activations, bits, method, percentile)
    return finalize(gm, f"Calibrated{type(model).__name__}", set(), share=True)


def _is_softmax(n: Node) -> bool:
    return (n.op == "call_function" and n.target in _SOFTMAX_TARGETS) or (n.op == "call_method" and n.target == "softmax")


def _range(activations: torch.Tensor, method: str, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (low, high) of (samples, channels) activations, widened to include 0."""
    x = activations.double()
    if method == "minmax":
        low, high = x.amin(0), x.amax(0)
    else:
        low, high = torch.quantile(x, 1 - percentile / 100, dim=0), torch.quantile(x, percentile / 100, dim=0)
    return low.clamp(max=0), high.clamp(min=0)


def _insert_uniform(gm: GraphModule, ln: Node, name: str, activations: torch.Tensor, bits: int, method: str,
                    percentile: float) -> None:
    low, high = _range(activations, method, percentile)
    quant_max = 2**bits - 1
    # a channel that is constant 0 gets the smallest normal float32 step instead of a zero scale
    scale = ((high - low) / quant_max).clamp(min=torch.finfo(torch.float32).tiny).float()
    zero_point = torch.round(-low / scale.double()).clamp(0, quant_max).to(torch.int32)
    gm.register_buffer(f"{name}_scale", scale)
    gm.register_buffer(f"{name}_zero_point", zero_point)
    axis = activations.dim() - 1 if ln.meta.get("tensor_meta") is None else len(ln.meta["tensor_meta"].shape) - 1
    with gm.graph.inserting_after(ln):
        scale_node = gm.graph.get_attr(f"{name}_scale")
    with gm.graph.inserting_after(scale_node):
        zp_node = gm.graph.get_attr(f"{name}_zero_point")
    with gm.graph.inserting_after(zp_node):
        # the kernel wants a float32 scale: the cast keeps the module runnable after .double()
        scale32 = gm.graph.call_method("float", (scale_node,))
    with gm.graph.inserting_after(scale32):
        quant = gm.graph.call_function(
            torch.fake_quantize_per_channel_affine, (ln, scale32, zp_node, axis, 0, quant_max)
        )
    ln.replace_all_uses_with(quant, delete_user_cb=lambda user: user is not quant)


def _insert_log_sqrt2(gm: GraphModule, softmax: Node, name: str, activations: torch.Tensor, bits: int, method: str,
                      percentile: float) -> None:
    x = activations.double().flatten()
    top = x.max() if method == "minmax" else torch.quantile(x[: 2**24], percentile / 100)
    delta = float(top) if float(top) > 0 else 1.0
    gm.add_module(name, LogSqrt2Quantizer(bits, delta))
    with gm.graph.inserting_after(softmax):
        quant = gm.graph.call_module(name, (softmax,))
    softmax.replace_all_uses_with(quant, delete_user_cb=lambda user: user is not quant)
