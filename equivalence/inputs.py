"""Hypothesis strategies for model inputs shaped like a given example.

Every generated value is a function of a (kind, seed) pair per floating tensor
and a seed per integer tensor, so hypothesis shrinks towards the example's own
values first and towards small seeds after that.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

FLOAT_KINDS: tuple[str, ...] = ("example", "zeros", "normal", "large", "tiny")
"""How a floating tensor's values are drawn; the first kind is the one hypothesis shrinks to."""

_MAGNITUDES: dict[str, float] = {"normal": 1.0, "large": 1e3, "tiny": 1e-3}

_SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def input_strategy(example_inputs: tuple) -> st.SearchStrategy[tuple]:
    """A strategy of tuples shaped like example_inputs (nested containers included).

    Floating tensors keep shape, strides, dtype and device and take the example's
    values, zeros, or standard normal values scaled by 1, 1e3 or 1e-3. Integer
    tensors are drawn uniformly from [min, max] of the example tensor, so that
    e.g. token ids stay valid. Bool tensors and non-tensor leaves are kept as given.
    """
    leaves, spec = pytree.tree_flatten(example_inputs)
    leaf_strategies = [_leaf_strategy(leaf) for leaf in leaves]
    return st.tuples(*leaf_strategies).map(lambda drawn: pytree.tree_unflatten(list(drawn), spec))


def with_layout_of(example: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A new tensor holding values, with example's size, strides, dtype and device.

    Dimensions of stride 0 (broadcast views made by expand) stay broadcast:
    only their first slice of values is kept.
    """
    broadcast_dims = [
        dim for dim, (size, stride) in enumerate(zip(example.size(), example.stride()))
        if stride == 0 and size > 1
    ]
    stored_size = [1 if dim in broadcast_dims else size for dim, size in enumerate(example.size())]
    stored = torch.empty_strided(
        stored_size, example.stride(), dtype=example.dtype, device=example.device
    )
    stored_values = values
    for dim in broadcast_dims:
        stored_values = stored_values.narrow(dim, 0, 1)
    stored.copy_(stored_values)
    return stored.expand(example.size())


def _leaf_strategy(leaf: Any) -> st.SearchStrategy[Any]:
    """The strategy for one leaf of the example inputs."""
    if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
        return _float_tensors(leaf)
    if isinstance(leaf, torch.Tensor) and _is_integer(leaf) and leaf.numel() > 0:
        return st.builds(_integer_tensor, st.just(leaf), _SEEDS)
    return st.just(leaf)


def _is_integer(tensor: torch.Tensor) -> bool:
    """True for integer dtypes, false for bool, float and complex."""
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


@st.composite
def _float_tensors(draw: st.DrawFn, example: torch.Tensor) -> torch.Tensor:
    """Tensors like example whose values are of a drawn kind."""
    kind = draw(st.sampled_from(FLOAT_KINDS))
    if kind == "example":
        return example
    if kind == "zeros":
        return with_layout_of(example, torch.zeros(example.shape))
    # Only random kinds draw a seed, so hypothesis never spends an example on a repeat.
    # Drawn on the CPU in float64, so that a seed means the same values on every device and dtype.
    generator = torch.Generator().manual_seed(draw(_SEEDS))
    normal = torch.randn(example.shape, generator=generator, dtype=torch.float64)
    return with_layout_of(example, normal * _MAGNITUDES[kind])


def _integer_tensor(example: torch.Tensor, seed: int) -> torch.Tensor:
    """A tensor like example with values uniform in [example.min(), example.max()]."""
    low, high = int(example.min()), int(example.max())
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(low, high + 1, example.shape, generator=generator, dtype=torch.int64)
    return with_layout_of(example, values)
