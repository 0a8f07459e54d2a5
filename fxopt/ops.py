"""Canonical ops: the one spelling of each op that passes match on.

A captured graph spells one operation many ways (``nn.Conv2d`` module, ``F.conv2d``,
``torch.conv2d``, ``aten.conv2d.default``, a ``pad`` node in front for reflect padding...).
:mod:`fxopt.canonical` rewrites every known spelling into a ``call_function`` node whose target
is the canonical function below, with *all* arguments as keyword arguments under fixed names.
A pattern therefore reads ``node.kwargs["groups"]`` and never cares how the model wrote it.

Every canonical function is executable (it is the op's reference semantics), so a canonical
graph runs as-is; :mod:`fxopt.codegen` lowers the ones that are not plain torch functions
back to torch calls, so generated code needs nothing but torch.

| op         | canonical target      | keyword arguments                                                  |
|------------|-----------------------|--------------------------------------------------------------------|
| conv       | ``fxopt.ops.conv``    | input weight bias stride padding dilation groups padding_mode transposed output_padding |
| batch_norm | ``F.batch_norm``      | input running_mean running_var weight bias training momentum eps   |
| linear     | ``F.linear``          | input weight bias                                                  |
| layer_norm | ``F.layer_norm``      | input normalized_shape weight bias eps                             |
| rms_norm   | ``F.rms_norm``        | input normalized_shape weight eps                                  |
| dropout    | ``F.dropout``         | input p training inplace                                           |
| identity   | ``fxopt.ops.identity``| input                                                              |
| avg_pool   | ``F.avg_pool2d``      | input kernel_size stride padding ceil_mode count_include_pad divisor_override |
| avg_pool1d | ``F.avg_pool1d``      | input kernel_size stride padding ceil_mode count_include_pad (no divisor_override in torch) |
| avg_pool3d | ``F.avg_pool3d``      | input kernel_size stride padding ceil_mode count_include_pad divisor_override |
| pad_per_channel | ``fxopt.ops.pad_per_channel`` | input pad value (F.pad widths for every spatial dim; border of channel c = value[c]) |
| add, mul   | ``operator.add/mul``  | (positional: two operands; commutative)                            |
| sub        | ``operator.sub``      | (positional: two operands)                                         |
| matmul     | ``torch.matmul``      | input other                                                        |
| addmm      | ``torch.addmm``       | input mat1 mat2 (torch's names: ``input`` is the bias)             |
| zero_mean_rms_norm | ``fxopt.ops.zero_mean_rms_norm`` | input normalized_shape weight bias eps (input known zero-mean) |
| embedding  | ``F.embedding``       | input weight padding_idx max_norm norm_type scale_grad_by_freq sparse |

``stride``, ``padding``, ``dilation`` and ``output_padding`` of a conv are tuples with one entry
per spatial dimension; ``padding`` may stay a string ("same") when it is asymmetric.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, ...] = (1,),
    padding: tuple[int, ...] | str = (0,),
    dilation: tuple[int, ...] = (1,),
    groups: int = 1,
    padding_mode: str = "zeros",
    transposed: bool = False,
    output_padding: tuple[int, ...] = (0,),
) -> torch.Tensor:
    """Convolution or transposed convolution of any spatial rank, with nn.ConvNd's padding modes."""
    rank = weight.dim() - 2
    if padding_mode != "zeros":
        input = F.pad(input, pad_widths(padding), mode=padding_mode)
        padding = (0,) * rank
    if transposed:
        return _CONV_TRANSPOSE[rank](input, weight, bias, stride, padding, output_padding, groups, dilation)
    return _CONV[rank](input, weight, bias, stride, padding, dilation, groups)


def identity(input: torch.Tensor) -> torch.Tensor:
    """``nn.Identity``: kept as a node so that removing it is a visible pass."""
    return input


def zero_mean_rms_norm(
    input: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """RMSNorm (with LayerNorm's bias) of an input that is zero-mean over ``normalized_shape``.

    On such an input it equals ``F.layer_norm`` exactly, which is why codegen may lower it to the
    faster of the two kernels; here it computes the RMSNorm, so validation checks the zero mean.
    """
    out = F.rms_norm(input, normalized_shape, weight, eps)
    return out if bias is None else out + bias


def pad_per_channel(input: torch.Tensor, pad: tuple[int, ...], value: torch.Tensor) -> torch.Tensor:
    """``F.pad`` with ``pad`` (F.pad's widths, a pair for every spatial dimension), where every padded
    position of channel c holds ``value``'s c-th element (one element per channel, or one for all)
    instead of 0.

    DBB's BNAndPadLayer pads a BatchNorm's output with the BN's own shift this way (zero padding then
    a slice assignment per side); canonicalization turns those in-place writes into this pure op.
    The rank comes from ``pad``, so the body traces with both tensors symbolic (for lowering).
    """
    padded = F.pad(input, list(pad))
    inside = F.pad(torch.ones_like(input[:1, :1], dtype=torch.bool), list(pad), value=False)
    border = value.reshape(1, -1, *(1,) * (len(pad) // 2)).to(padded.dtype)
    return torch.where(inside, padded, border)


def pad_widths(padding: tuple[int, ...]) -> list[int]:
    """Symmetric per-dimension padding in F.pad's order: last dimension first, (left, right) pairs."""
    widths: list[int] = []
    for p in reversed(padding):
        widths += [p, p]
    return widths


def layout_op(node: Any) -> str | None:
    """The one name of a call, whatever its spelling: ``"view"`` for ``x.view(...)``,
    ``torch.ops.aten.view.default`` and ``torch.Tensor.view`` alike (``"reshape"`` for
    ``torch.reshape``, ``"to"`` for every ``aten.to`` overload). Layout ops are not canonicalized
    (they keep their spelling in the graph); passes that look through them ask this, and decide
    themselves what each name means for them. None for a node that is not a call."""
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method"):
        return None
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", "").split(".")[0] or None


class Op:
    """A canonical op: its target and the names of its keyword arguments."""

    def __init__(self, name: str, target: Any, fields: tuple[str, ...], commutative: bool = False):
        self.name = name
        self.target = target
        self.fields = fields
        self.commutative = commutative

    def __call__(self, node: Any) -> bool:
        """True when ``node`` is a canonical node of this op."""
        return isinstance(node, Node) and node.op == "call_function" and node.target is self.target

    def __repr__(self) -> str:
        return f"Op({self.name})"


CONV = Op(
    "conv",
    conv,
    ("input", "weight", "bias", "stride", "padding", "dilation", "groups", "padding_mode", "transposed", "output_padding"),
)
BATCH_NORM = Op(
    "batch_norm", F.batch_norm, ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
)
LINEAR = Op("linear", F.linear, ("input", "weight", "bias"))
LAYER_NORM = Op("layer_norm", F.layer_norm, ("input", "normalized_shape", "weight", "bias", "eps"))
RMS_NORM = Op("rms_norm", F.rms_norm, ("input", "normalized_shape", "weight", "eps"))
DROPOUT = Op("dropout", F.dropout, ("input", "p", "training", "inplace"))
IDENTITY = Op("identity", identity, ("input",))
ADD = Op("add", operator.add, (), commutative=True)
MUL = Op("mul", operator.mul, (), commutative=True)
SUB = Op("sub", operator.sub, ())
MATMUL = Op("matmul", torch.matmul, ("input", "other"))
# bias + mat1 @ mat2 with a stored (in, out) weight, as GPT-2's Conv1D and fan_in_fan_out layers compute
ADDMM = Op("addmm", torch.addmm, ("input", "mat1", "mat2"))

# an RMSNorm whose input a pass made zero-mean (ln_to_rmsnorm): a LayerNorm there is the same function
ZERO_MEAN_RMS_NORM = Op("zero_mean_rms_norm", zero_mean_rms_norm, ("input", "normalized_shape", "weight", "bias", "eps"))
EMBEDDING = Op("embedding", F.embedding, ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"))

AVG_POOL = Op(
    "avg_pool", F.avg_pool2d, ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
)

# torch has no divisor_override for 1-D average pooling
AVG_POOL1D = Op("avg_pool1d", F.avg_pool1d, ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"))
AVG_POOL3D = Op("avg_pool3d", F.avg_pool3d, AVG_POOL.fields)
AVG_POOLS: tuple[Op, ...] = (AVG_POOL1D, AVG_POOL, AVG_POOL3D)  # by spatial rank

PAD_PER_CHANNEL = Op("pad_per_channel", pad_per_channel, ("input", "pad", "value"))

ALL_OPS: tuple[Op, ...] = (
    CONV, BATCH_NORM, LINEAR, LAYER_NORM, RMS_NORM, DROPOUT, IDENTITY, ADD, MUL, AVG_POOL, SUB, MATMUL, ADDMM,
    ZERO_MEAN_RMS_NORM, EMBEDDING, AVG_POOL1D, AVG_POOL3D, PAD_PER_CHANNEL,
)



def reads_as_input(layer: Any, value: Any) -> bool:
    """True when ``layer`` (a Linear, or an addmm as in GPT-2's Conv1D) multiplies ``value`` as its
    activation, and reads it nowhere else (not as its weight or bias)."""
    if LINEAR(layer):
        return layer.kwargs["input"] is value and value not in (layer.kwargs["weight"], layer.kwargs["bias"])
    if ADDMM(layer):
        return layer.kwargs["mat1"] is value and value not in (layer.kwargs["mat2"], layer.kwargs["input"])
    return False


class _AnyCall(Op):
    """The anchor of patterns that must see every call (constant folding): any call_function or
    call_method node, canonical or not. Not a canonical op, so it is not in ALL_OPS."""

    def __call__(self, node: Any) -> bool:
        return isinstance(node, Node) and node.op in ("call_function", "call_method")


ANY = _AnyCall("any", None, ())


# ---------------------------------------------------------------------------------------------
# fake quantizers (fxopt.quant): not in ALL_OPS, which lists the float ops


def fake_quantize_per_channel(
    input: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, quant_min: int, quant_max: int
) -> torch.Tensor:
    """torch.fake_quantize_per_channel_affine, whose kernel computes with a float32 scale: the cast
    makes that explicit, so a float64 copy of the model (the oracle) runs and gives the same codes."""
    return torch.fake_quantize_per_channel_affine(input, scale.float(), zero_point, axis, quant_min, quant_max)


from . import quant as _quant  # noqa: E402  (quant needs nothing from here)

FAKE_QUANT_PER_CHANNEL = Op(
    "fake_quant_per_channel", fake_quantize_per_channel, ("input", "scale", "zero_point", "axis", "quant_min", "quant_max")
)
# scale and zero_point: tensors (aten's tensor_qparams overload) or a float and an int
FAKE_QUANT_PER_TENSOR = Op(
    "fake_quant_per_tensor", torch.fake_quantize_per_tensor_affine, ("input", "scale", "zero_point", "quant_min", "quant_max")
)
LOG_SQRT2_QUANT = Op("log_sqrt2_quant", _quant.log_sqrt2_quantize, ("input", "bits", "delta"))
LOG2_QUANT = Op("log2_quant", _quant.log2_quantize, ("input", "bits", "delta"))
