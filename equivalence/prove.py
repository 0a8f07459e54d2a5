"""prove: symbolic proof that a pass's rewrites are exact, on small instances.

Numbers can only show that a rewrite is close; for rules whose math is polynomial or rational in
the weights and inputs (folds, merges) a small instance settles it exactly. ``prove`` takes small
instances of the pass (drawn from its ``instances`` generator, or given), captures and
canonicalizes each as ``optimize`` does, and then replaces every floating constant by sympy
symbols (``conv.weight[0,1,2,2]``), every float ``eps`` argument by a positive symbol, and the
activations entering each match by symbols named after their node.

The pass's own ``match`` and ``rewrite`` then run unchanged on those symbols: the Rewriter hands
them :class:`SymbolicTensor` constants, tensor-like objects that hold sympy expressions and answer
the torch functions and Tensor methods fold arithmetic uses. So the new weights are the
expressions the real rewrite code computes. The matched subgraph and the replacement are both
evaluated by a small symbolic interpreter of the canonical ops (``SYMBOLIC_OPS``: convolution as
explicit sums, batch_norm, linear, add, mul, identity, eval dropout) and every output element of
the two must agree: ``expand(a - b)`` is zero, or else it is zero at a rational witness point
(a non-zero value there disproves) and ``simplify(a - b)`` is zero.

Not covered: the canonicalizer, codegen and the driver's commit (``check_pass`` and
``fxopt.verify`` test those numerically); a rewrite that inspects values (``if var.min() > 0``)
or uses a torch function SymbolicTensor does not implement is "not applicable"; a proof holds
for the instance's shapes and attributes, and for every value of its weights and inputs.
"""

from __future__ import annotations

import copy
import itertools
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import numpy as np
import sympy
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from fxopt import ops
from fxopt.canonical import canonicalize
from fxopt.capture import capture
from fxopt.interpret import attribute, run_graph, topological
from fxopt.pattern import Match, Pass, Pattern, Skip, get_pass
from fxopt.rewriter import Rewriter

Instance = tuple[torch.nn.Module, tuple]

PROVED, DISPROVED, NOT_APPLICABLE = "proved", "disproved", "not applicable"


class Unsupported(Exception):
    """The symbolic machinery cannot follow this computation: the proof is not applicable."""


# -- sympy arrays that pass for torch tensors ----------------------------------------------------------


def _exact(value: Any) -> Any:
    """A number as an exact sympy number (floats are binary fractions: no rounding is introduced)."""
    if isinstance(value, (bool, int, np.integer)):
        return sympy.Integer(int(value))
    if isinstance(value, (float, np.floating)):
        return sympy.Rational(float(value))
    return value


def _as_array(value: Any) -> np.ndarray:
    """The object array of exact sympy values behind a tensor-like value or a number (0-d)."""
    if isinstance(value, SymbolicTensor):
        return value.array
    if isinstance(value, torch.Tensor):
        numbers = value.detach().cpu().double().numpy() if value.is_floating_point() else value.cpu().numpy()
        return np.vectorize(_exact, otypes=[object])(numbers) if numbers.size else numbers.astype(object)
    # a 0-d array, not a bare sympy number: sympy would try to turn an array operand into a sympy Array
    return np.array(_exact(value), dtype=object)


def _shape_args(args: tuple) -> tuple:
    """``view(2, 3)`` and ``view((2, 3))`` both mean the shape (2, 3)."""
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args


def _elementwise(function: Callable[[Any], Any]) -> Callable[[np.ndarray], np.ndarray]:
    return np.vectorize(function, otypes=[object])


class SymbolicTensor:
    """A tensor of sympy expressions that torch functions and fold arithmetic accept.

    It implements the Tensor methods folds use (arithmetic, views, sum, matmul, dtype casts,
    which are no-ops since the values are exact) and, through ``__torch_function__``, torch
    functions such as ``torch.sqrt``, ``torch.ones_like`` and ``F.pad`` and Tensor operators
    whose left operand is a real tensor. Anything else raises :class:`Unsupported`.
    """

    def __init__(self, array: Any, dtype: torch.dtype = torch.float64):
        self.array = np.asarray(array, dtype=object)
        self.dtype = dtype

    @classmethod
    def symbols(cls, name: str, shape: Iterable[int], dtype: torch.dtype = torch.float64) -> SymbolicTensor:
        """A tensor of fresh real symbols ``name[i,j,...]``."""
        shape = tuple(shape)
        array = np.empty(shape, dtype=object)
        for index in np.ndindex(*shape):
            array[index] = sympy.Symbol(f"{name}[{','.join(map(str, index))}]", real=True)
        return cls(array, dtype)

    def _new(self, array: Any) -> SymbolicTensor:
        return SymbolicTensor(array, self.dtype)

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", repr(func))
        args = pytree.tree_map_only(torch.Tensor, lambda t: SymbolicTensor(_as_array(t), t.dtype), args)
        if name in _TORCH_FUNCTIONS:
            return _TORCH_FUNCTIONS[name](*args, **(kwargs or {}))
        raise Unsupported(f"symbolic tensors do not implement torch function {name!r}")

    # -- what a tensor is --------------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.array.shape)

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def dim(self) -> int:
        return self.array.ndim

    def numel(self) -> int:
        return int(self.array.size)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return len(self.array)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # protocol lookups (copy, pickle, numpy) must see a plain AttributeError
            raise AttributeError(name)
        raise Unsupported(f"symbolic tensors do not implement Tensor.{name}")

    def __repr__(self) -> str:
        return f"SymbolicTensor({self.array!r})"

    # -- casts and copies: the values are exact, so these change nothing ----------------------------

    def to(self, *args: Any, **kwargs: Any) -> SymbolicTensor:
        return self

    def double(self) -> SymbolicTensor:
        return self

    def float(self) -> SymbolicTensor:
        return self

    def detach(self) -> SymbolicTensor:
        return self

    def clone(self) -> SymbolicTensor:
        return self._new(self.array.copy())

    def contiguous(self) -> SymbolicTensor:
        return self

    # -- shapes ----------------------------------------------------------------------------------------

    def reshape(self, *shape: Any) -> SymbolicTensor:
        return self._new(self.array.reshape(_shape_args(shape)))

    view = reshape

    def expand(self, *sizes: Any) -> SymbolicTensor:
        sizes = _shape_args(sizes)
        lead = len(sizes) - self.ndim
        target = [own if size == -1 else size for size, own in zip(sizes, (None,) * lead + self.array.shape)]
        return self._new(np.broadcast_to(self.array, target))

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> SymbolicTensor:
        shape = self.array.shape
        start, end = start_dim % max(self.ndim, 1), end_dim % max(self.ndim, 1)
        return self._new(self.array.reshape(shape[:start] + (-1,) + shape[end + 1 :]))

    def permute(self, *dims: Any) -> SymbolicTensor:
        return self._new(self.array.transpose(_shape_args(dims)))

    def transpose(self, dim0: int, dim1: int) -> SymbolicTensor:
        return self._new(np.swapaxes(self.array, dim0, dim1))

    def t(self) -> SymbolicTensor:
        return self._new(self.array.T)

    @property
    def T(self) -> SymbolicTensor:  # noqa: N802 - torch's name
        return self.t()

    def unsqueeze(self, dim: int) -> SymbolicTensor:
        return self._new(np.expand_dims(self.array, dim if dim >= 0 else self.ndim + dim + 1))

    def squeeze(self, dim: int | None = None) -> SymbolicTensor:
        if dim is not None and self.array.shape[dim] != 1:
            return self
        return self._new(np.squeeze(self.array, axis=dim))

    def __getitem__(self, key: Any) -> SymbolicTensor:
        return self._new(self.array[key])

    def __setitem__(self, key: Any, value: Any) -> None:
        self.array[key] = _as_array(value)

    def new_zeros(self, *size: Any, **_: Any) -> SymbolicTensor:
        return self._new(np.full(_shape_args(size), sympy.S.Zero, dtype=object))

    def any(self) -> bool:
        """Whether some element is not identically zero: the answer for all but a null set of values,
        so a proof covers the path a rewrite takes for generic weights."""
        return any(sympy.expand(v) != 0 for v in self.array.flat)

    def sum(self, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> SymbolicTensor:
        return self._new(np.sum(self.array, axis=dim, keepdims=keepdim))

    # -- arithmetic --------------------------------------------------------------------------------------

    def _binary(self, operation: Callable[[Any, Any], Any], other: Any, reflected: bool = False) -> SymbolicTensor:
        a, b = (_as_array(other), self.array) if reflected else (self.array, _as_array(other))
        return self._new(operation(a, b))

    def __add__(self, other: Any) -> SymbolicTensor:
        return self._binary(operator.add, other)

    def __radd__(self, other: Any) -> SymbolicTensor:
        return self._binary(operator.add, other, reflected=True)

    def __sub__(self, other: Any) -> SymbolicTensor:
        return self._binary(operator.sub, other)

    def __rsub__(self, other: Any) -> SymbolicTensor:
        return self._binary(operator.sub, other, reflected=True)

    def __mul__(self, other: Any) -> SymbolicTensor:
        return self._binary(operator.mul, other)

    def __rmul__(self, other: Any) -> SymbolicTensor:
        return self._binary(operator.mul, other, reflected=True)

    def __truediv__(self, other: Any) -> SymbolicTensor:
        return self._binary(operator.truediv, other)

    def __rtruediv__(self, other: Any) -> SymbolicTensor:
        return self._binary(operator.truediv, other, reflected=True)

    def __pow__(self, other: Any) -> SymbolicTensor:
        return self._binary(operator.pow, other)

    def __matmul__(self, other: Any) -> SymbolicTensor:
        return self._binary(np.matmul, other)

    def __rmatmul__(self, other: Any) -> SymbolicTensor:
        return self._binary(np.matmul, other, reflected=True)

    def __neg__(self) -> SymbolicTensor:
        return self._new(-self.array)

    def sqrt(self) -> SymbolicTensor:
        return self._new(_elementwise(sympy.sqrt)(self.array))

    def rsqrt(self) -> SymbolicTensor:
        return self._new(_elementwise(lambda v: 1 / sympy.sqrt(v))(self.array))

    def reciprocal(self) -> SymbolicTensor:
        return self._new(_elementwise(lambda v: 1 / v)(self.array))


def _like(value: SymbolicTensor, fill: int) -> SymbolicTensor:
    return value._new(np.full(value.array.shape, sympy.Integer(fill), dtype=object))


def _pad_zeros(tensor: SymbolicTensor, pad: list[int], mode: str = "constant", value: Any = None) -> SymbolicTensor:
    """``F.pad`` with zeros, e.g. a 1x1 kernel padded to 3x3 (pad lists the last dimension first)."""
    if mode != "constant" or value not in (None, 0):
        raise Unsupported(f"F.pad mode {mode!r} with value {value!r} on a symbolic tensor")
    pairs = [(pad[i], pad[i + 1]) for i in range(len(pad) - 2, -1, -2)]
    widths = [(0, 0)] * (tensor.ndim - len(pairs)) + pairs
    return tensor._new(np.pad(tensor.array, widths, constant_values=sympy.S.Zero))


def _einsum(equation: str, *operands: Any) -> SymbolicTensor:
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    return SymbolicTensor(np.einsum(equation, *map(_as_array, operands)))


def _cat(tensors: Iterable[Any], dim: int = 0) -> SymbolicTensor:
    return SymbolicTensor(np.concatenate([_as_array(t) for t in tensors], axis=dim))


# torch functions (and Tensor methods called on a real tensor with a symbolic operand), by name
_TORCH_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "add": lambda a, b, alpha=1: a + b * alpha,
    "sub": lambda a, b, alpha=1: a - b * alpha,
    "mul": operator.mul,
    "div": operator.truediv,
    "true_divide": operator.truediv,
    "matmul": operator.matmul,
    "pow": operator.pow,
    "neg": operator.neg,
    "sqrt": SymbolicTensor.sqrt,
    "rsqrt": SymbolicTensor.rsqrt,
    "reciprocal": SymbolicTensor.reciprocal,
    "ones_like": lambda t, **_: _like(t, 1),
    "zeros_like": lambda t, **_: _like(t, 0),
    "pad": _pad_zeros,
    "einsum": _einsum,
    "cat": _cat,
}


# -- the symbolic interpreter of canonical ops -----------------------------------------------------------

_NUMPY_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _conv(
    input: Any, weight: Any, bias: Any = None, stride: tuple[int, ...] = (1,), padding: tuple[int, ...] | str = (0,),
    dilation: tuple[int, ...] = (1,), groups: int = 1, padding_mode: str = "zeros", transposed: bool = False,
    output_padding: tuple[int, ...] = (0,),
) -> SymbolicTensor:
    """``fxopt.ops.conv`` written out as sums: out[n, o, p] = bias[o] + sum w[o, i, k] * x[n, i, p*s + k*d]."""
    x, w = _as_array(input), _as_array(weight)
    rank = w.ndim - 2
    kernel = w.shape[2:]
    if transposed:
        out = _conv_transpose(x, w, stride, padding, dilation, groups, output_padding)
    else:
        x = np.pad(x, [(0, 0), (0, 0), *_pad_widths(padding, kernel, dilation)], mode=_NUMPY_PAD_MODES[padding_mode])
        out = _correlate(x, w, stride, dilation, groups)
    if bias is not None:
        out = out + _as_array(bias).reshape(-1, *(1,) * rank)
    return SymbolicTensor(out)


def _pad_widths(
    padding: tuple[int, ...] | str, kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> list[tuple[int, int]]:
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":  # torch puts the odd element of the total on the right
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(total // 2, total - total // 2) for total in totals]
    return [(p, p) for p in padding]


def _correlate(
    x: np.ndarray, w: np.ndarray, stride: tuple[int, ...], dilation: tuple[int, ...], groups: int
) -> np.ndarray:
    out_channels, in_per_group = w.shape[:2]
    out_per_group = out_channels // groups
    sizes = [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(x.shape[2:], w.shape[2:], stride, dilation)]
    out = np.full((x.shape[0], out_channels, *sizes), sympy.S.Zero, dtype=object)
    for g, offset in itertools.product(range(groups), np.ndindex(*w.shape[2:])):
        window = (slice(None), slice(g * in_per_group, (g + 1) * in_per_group)) + tuple(
            slice(k * d, k * d + s * (n - 1) + 1, s) for k, d, s, n in zip(offset, dilation, stride, sizes)
        )
        taps = w[(slice(g * out_per_group, (g + 1) * out_per_group), slice(None), *offset)]  # (out_g, in_g)
        out[:, g * out_per_group : (g + 1) * out_per_group] += np.moveaxis(
            np.tensordot(taps, x[window], axes=([1], [1])), 0, 1
        )
    return out


def _conv_transpose(
    x: np.ndarray, w: np.ndarray, stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...],
    groups: int, output_padding: tuple[int, ...],
) -> np.ndarray:
    """Each input position scatters w[i, j, k] * x[n, i, p] to output position p*s + k*d - padding."""
    in_channels, out_per_group = w.shape[:2]
    in_per_group = in_channels // groups
    lengths = x.shape[2:]
    full = [
        (n - 1) * s + d * (k - 1) + 1 + extra
        for n, s, d, k, extra in zip(lengths, stride, dilation, w.shape[2:], output_padding)
    ]
    out = np.full((x.shape[0], groups * out_per_group, *full), sympy.S.Zero, dtype=object)
    for g, offset in itertools.product(range(groups), np.ndindex(*w.shape[2:])):
        taps = w[(slice(g * in_per_group, (g + 1) * in_per_group), slice(None), *offset)]  # (in_g, out_g)
        inputs = x[:, g * in_per_group : (g + 1) * in_per_group]
        spread = np.moveaxis(np.tensordot(inputs, taps, axes=([1], [0])), -1, 1)  # (N, out_g, *lengths)
        target = (slice(None), slice(g * out_per_group, (g + 1) * out_per_group)) + tuple(
            slice(k * d, k * d + s * (n - 1) + 1, s) for k, d, s, n in zip(offset, dilation, stride, lengths)
        )
        out[target] += spread
    crop = tuple(slice(p, f - p) for p, f in zip(padding, full))
    return out[(slice(None), slice(None), *crop)]


def _batch_norm(
    input: Any, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None, training: bool = False,
    momentum: Any = 0.1, eps: Any = 1e-5,
) -> SymbolicTensor:
    """Inference BatchNorm: (x - mean) / sqrt(var + eps) * weight + bias, per channel (axis 1)."""
    if training or running_mean is None:
        raise Unsupported("BatchNorm with batch statistics is not a function of its input element by element")
    x = _as_array(input)

    def per_channel(value: Any) -> Any:
        return _as_array(value).reshape(-1, *(1,) * (x.ndim - 2))

    out = (x - per_channel(running_mean)) / _elementwise(sympy.sqrt)(per_channel(running_var) + _exact(eps))
    if weight is not None:
        out = out * per_channel(weight)
    if bias is not None:
        out = out + per_channel(bias)
    return SymbolicTensor(out)


def _linear(input: Any, weight: Any, bias: Any = None) -> SymbolicTensor:
    out = np.matmul(_as_array(input), _as_array(weight).T)
    return SymbolicTensor(out + _as_array(bias) if bias is not None else out)


def _dropout(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
    if training and p > 0:
        raise Unsupported("dropout in training mode is random")
    return input


SYMBOLIC_OPS: dict[Callable, Callable[..., Any]] = {
    ops.conv: _conv,
    F.batch_norm: _batch_norm,
    F.linear: _linear,
    operator.add: lambda a, b: SymbolicTensor(_as_array(a) + _as_array(b)),
    operator.mul: lambda a, b: SymbolicTensor(_as_array(a) * _as_array(b)),
    ops.identity: lambda input: input,
    F.dropout: _dropout,
}
"""The ops ``prove`` can evaluate symbolically, by canonical target; any other makes a proof not applicable."""


# -- running the real pattern on symbols ---------------------------------------------------------------


class _SymbolicRewriter(Rewriter):
    """A Rewriter whose constants are symbolic: old ones are symbols, new ones what ``rewrite`` computed."""

    def __init__(self, gm: GraphModule, values: dict[str, SymbolicTensor]):
        super().__init__(gm)
        self.values = values  # by attribute name

    def constant(self, node: Any) -> Any:
        if isinstance(node, Node) and node.op == "get_attr" and node.target in self.values:
            return self.values[node.target]
        return super().constant(node)

    def new_constant(self, name: str, value: Any) -> Node:
        symbolic = value if isinstance(value, SymbolicTensor) else SymbolicTensor(_as_array(value), value.dtype)
        node = super().new_constant(name, torch.zeros(tuple(symbolic.shape)))  # a stand-in parameter
        self.values[node.target] = symbolic
        return node


@dataclass(frozen=True)
class MatchProof:
    """The verdict for one match of one pattern: ``detail`` is the differing expression, or why not applicable."""

    pattern: str
    node: str
    instance: str
    verdict: str
    detail: str = ""

    def __str__(self) -> str:
        line = f"{self.verdict:<15}{self.pattern} at {self.node} ({self.instance})"
        return f"{line}: {self.detail}" if self.detail else line


@dataclass(frozen=True)
class ProofResult:
    """``verdict``: "proved" when every match on every instance was proved (and there was one),
    "disproved" when some match computes something else, "not applicable" otherwise."""

    pass_name: str
    verdict: str
    matches: list[MatchProof] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def proved(self) -> bool:
        return self.verdict == PROVED

    @property
    def disproved(self) -> bool:
        return self.verdict == DISPROVED

    def patterns(self, verdict: str = PROVED) -> set[str]:
        """The pattern classes with at least one match of the given verdict."""
        return {m.pattern for m in self.matches if m.verdict == verdict}

    def __str__(self) -> str:
        lines = [f"prove({self.pass_name!r}): {self.verdict} ({len(self.matches)} matches)"]
        lines += [f"  {m}" for m in self.matches] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def prove(
    pass_or_name: Pass | str,
    instances: Iterable[Instance] | None = None,
    *,
    max_instances: int = 6,
    max_symbols: int = 200,
    seed: int = 0,
) -> ProofResult:
    """Prove or disprove every match of the pass on small instances, symbolically.

    ``instances`` are (model, example_inputs) pairs; by default up to ``max_instances`` are drawn
    from the pass's generator (reproducibly for a ``seed``) among those with at most
    ``max_symbols`` floating parameter and input elements. Each pattern is tried at every node it anchors on, each match is proved in
    the original graph (rewrites are rolled back after their proof).
    """
    p = pass_or_name if isinstance(pass_or_name, Pass) else get_pass(pass_or_name)
    notes: list[str] = []
    if instances is None:
        instances = _small_instances(p, max_instances, max_symbols, seed)
        if not instances:
            notes.append(f"no instance with at most {max_symbols} parameter and input elements was drawn")
    proofs: list[MatchProof] = []
    for model, inputs in instances:
        proofs += _prove_instance(p, model, inputs, notes)
    if not proofs:
        notes.append("the pass matched nothing on the instances")
    return ProofResult(p.name, _verdict(proofs), proofs, notes)


def _verdict(proofs: list[MatchProof]) -> str:
    verdicts = {proof.verdict for proof in proofs}
    if DISPROVED in verdicts:
        return DISPROVED
    return PROVED if verdicts == {PROVED} else NOT_APPLICABLE


def _prove_instance(p: Pass, model: torch.nn.Module, inputs: tuple, notes: list[str]) -> list[MatchProof]:
    """A proof for every match of every pattern on one instance; skipped matches go to ``notes``."""
    gm = canonicalize(capture(copy.deepcopy(model), inputs).module, inputs)
    run_graph(gm, inputs)  # record shapes while every value is still a number
    rw = _SymbolicRewriter(gm, _symbolic_constants(gm))
    _symbolic_eps(gm)
    where = _describe(model, inputs)
    proofs = []
    for node in list(gm.graph.nodes):
        for pattern in p.patterns:
            if not pattern.anchor(node):
                continue
            outcome = _prove_match(pattern, node, rw)
            if isinstance(outcome, Skip):
                notes.append(f"{type(pattern).__name__} at {node.name} ({where}) skipped: {outcome.reason}")
            elif outcome is not None:
                proofs.append(MatchProof(type(pattern).__name__, node.name, where, *outcome))
    return proofs


def _describe(model: torch.nn.Module, inputs: tuple) -> str:
    shapes = [list(t.shape) for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    return f"{type(model).__name__} on {', '.join(map(str, shapes))}"


def _symbolic_constants(gm: GraphModule) -> dict[str, SymbolicTensor]:
    values = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        value = attribute(gm, node.target)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            values[node.target] = SymbolicTensor.symbols(node.target, value.shape, value.dtype)
    return values


def _symbolic_eps(gm: GraphModule) -> None:
    """Make each op's float ``eps`` a positive symbol, so the proof holds for every eps."""
    for node in gm.graph.nodes:
        if isinstance(node.kwargs.get("eps"), float):
            node.update_kwarg("eps", sympy.Symbol(f"{node.name}.eps", positive=True))


def _prove_match(pattern: Pattern, node: Node, rw: _SymbolicRewriter) -> tuple[str, str] | Skip | None:
    """(verdict, detail) for the pattern at node; its Skip, or None when it does not match there."""
    try:
        found = pattern.match(node, rw)
        if not isinstance(found, Match):
            return found
        rw.begin(found.root)
        try:
            replacement = pattern.rewrite(found, rw)
            return _compare(found, replacement, rw)
        finally:
            rw.rollback()
    except (Unsupported, TypeError) as error:
        # TypeError: sympy refuses to decide a comparison of symbols (a rewrite testing values)
        return NOT_APPLICABLE, f"{type(error).__name__}: {error}"


def _compare(found: Match, replacement: Node, rw: _SymbolicRewriter) -> tuple[str, str]:
    matched = topological(found.nodes.values())
    inside = set(matched) | set(rw.created)
    outside = {arg for n in inside for arg in n.all_input_nodes if arg not in inside and arg.op != "get_attr"}
    if replacement not in inside and replacement.op != "get_attr":
        outside.add(replacement)
    values: dict[Node, Any] = {n: _boundary_symbols(n, rw) for n in outside}
    for n in topological(inside):
        values[n] = _evaluate(n, values, rw)
    expected = _as_array(values[found.root])
    actual = _as_array(values[replacement] if replacement in values else rw.constant(replacement))
    return _difference(np.asarray(expected, dtype=object), np.asarray(actual, dtype=object))


def _boundary_symbols(node: Node, rw: Rewriter) -> SymbolicTensor:
    shape = rw.shape(node)
    if shape is None:
        raise Unsupported(f"no recorded shape for {node.name}, which feeds the match")
    return SymbolicTensor.symbols(node.name, shape)


def _evaluate(node: Node, values: dict[Node, Any], rw: _SymbolicRewriter) -> Any:
    def load(arg: Node) -> Any:
        if arg in values:
            return values[arg]
        return rw.constant(arg)  # a get_attr outside the match: symbols, or what a rewrite computed

    if node.op == "get_attr":
        return rw.constant(node)
    if node.op != "call_function" or node.target not in SYMBOLIC_OPS:
        raise Unsupported(f"no symbolic evaluation for {node.op} {getattr(node.target, '__name__', node.target)}")
    args = torch.fx.node.map_arg(node.args, load)
    kwargs = torch.fx.node.map_arg(node.kwargs, load)
    return SYMBOLIC_OPS[node.target](*args, **kwargs)


def _difference(expected: np.ndarray, actual: np.ndarray) -> tuple[str, str]:
    """PROVED when every element agrees identically; else DISPROVED with the first difference."""
    if expected.shape != actual.shape:
        return DISPROVED, f"output shape {list(actual.shape)} != {list(expected.shape)}"
    for index in np.ndindex(*expected.shape):
        gap = sympy.expand(expected[index] - actual[index])
        # expand cancels what folds and merges produce; a gap it leaves is either non-zero
        # somewhere (a witness point settles that fast) or an identity only simplify sees
        if gap != 0 and (_nonzero_somewhere(gap) or sympy.simplify(gap) != 0):
            where = ",".join(map(str, index))
            return DISPROVED, f"output[{where}]: pattern - replacement = {_readable(gap)}"
    return PROVED, ""


def _nonzero_somewhere(expression: sympy.Expr) -> bool:
    """True when the expression is non-zero with every symbol set to a (seeded) rational in [1/2, 5/2]."""
    generator = np.random.default_rng(0)
    point = {s: sympy.Rational(int(generator.integers(50, 250)), 100) for s in expression.free_symbols}
    return abs(complex(expression.xreplace(point).evalf(40))) > 1e-25


def _readable(gap: sympy.Expr, limit: int = 600) -> str:
    """The difference, simplified when that is cheap, and cut to ``limit`` characters."""
    text = str(sympy.simplify(gap) if sympy.count_ops(gap) <= 80 else gap)
    return text if len(text) <= limit else text[:limit] + " ..."


def _small_instances(p: Pass, count: int, max_symbols: int, seed: int) -> list[Instance]:
    """Up to ``count`` instances of different structure from the pass's generator, each the
    largest drawn of its structure with at most ``max_symbols`` float elements (more channels
    exercise more of a rewrite's indexing than one)."""
    if p.instances is None:
        return []
    largest: dict[tuple[str, ...], tuple[int, Instance]] = {}

    @settings(
        max_examples=20 * count, database=None, deadline=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(p.instances())
    def draw(instance: Instance) -> None:
        size = _float_elements(*instance)
        structure = tuple(type(m).__name__ for m in instance[0].modules())
        if size <= max_symbols and size > largest.get(structure, (-1, None))[0]:
            largest[structure] = (size, instance)

    hypothesis.seed(seed)(draw)()
    by_size = sorted(largest.values(), key=lambda entry: -entry[0])
    return [instance for _, instance in by_size[:count]]


def _float_elements(model: torch.nn.Module, inputs: tuple) -> int:
    tensors = [*model.state_dict().values(), *(t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor))]
    return sum(t.numel() for t in tensors if t.is_floating_point())
