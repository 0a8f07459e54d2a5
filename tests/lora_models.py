"""Hand-written adapted models for tests/test_merge_lora.py: shapes merge_lora must merge or refuse."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Adapted(nn.Module):
    """A base Linear with a rank-``rank`` adapter beside it; subclasses differ in forward()."""

    def __init__(self, width: int = 6, rank: int = 2):
        super().__init__()
        self.base = nn.Linear(width, width)
        self.lora_A = nn.Linear(width, rank, bias=False)
        self.lora_B = nn.Linear(rank, width, bias=False)


class TiedAdapters(_Adapted):
    """Two layers read one weight; only the first carries an adapter (merging would untie them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x) + self.lora_B(self.lora_A(x)) * 0.5
        return self.base(torch.relu(h))


class TiedLayers(_Adapted):
    """``second`` holds ``base``'s weight (a tie, as HF ties embeddings) and a bias of its own; each use carries
    an adapter: the same one when ``same_delta``, else a second one with the same A and its own B."""

    def __init__(self, same_delta: bool, width: int = 6, rank: int = 2):
        super().__init__(width, rank)
        self.second = nn.Linear(width, width)
        self.second.weight = self.base.weight
        self.second_lora_B = self.lora_B if same_delta else nn.Linear(rank, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x) + self.lora_B(self.lora_A(x)) * 0.5
        h = torch.relu(h)
        return self.second(h) + self.second_lora_B(self.lora_A(h)) * 0.5


class LeakyAdapter(_Adapted):
    """The adapter's A output is also returned: merging would keep A computed anyway."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.lora_A(x)
        return self.base(x) + self.lora_B(low) * 0.5, low


class PromotingAdapter(_Adapted):
    """A float64 per-feature scale promotes the float32 sum to float64: the base weight's dtype no longer fits."""

    def __init__(self, width: int = 6, rank: int = 2):
        super().__init__(width, rank)
        self.register_buffer("scale", torch.rand(width, dtype=torch.float64) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


class RandomScaleAdapter(_Adapted):
    """The adapter is switched on at random on each call (a module dropout left in training mode): its scale
    depends on no input but is drawn anew every time, so it has no single merged weight."""

    def __init__(self, width: int = 6, rank: int = 2):
        super().__init__(width, rank)
        # a frozen parameter, not a buffer: torch.fx's tracer evaluates ops on buffers at trace time
        self.keep = nn.Parameter(torch.tensor(0.5), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * torch.bernoulli(self.keep)


class ResidualAdapter(_Adapted):
    """``x + base(x) + lora(x)`` in one sum: the residual term is kept, the rest merges."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) + self.base(x) + self.lora_B(self.lora_A(x)) * 2.0


class SmallCNN(nn.Module):
    """A CNN for PEFT's conv LoRA: a 3x3 conv, a strided 3x3 conv and a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


class NolaLinear(nn.Module):
    """NOLA: ``W x + s * B(A(x))`` with A and B mixed in forward from frozen random bases by trained coefficients."""

    def __init__(self, fin: int = 6, fout: int = 4, rank: int = 2, bases: int = 3):
        super().__init__()
        self.base = nn.Linear(fin, fout)
        generator = torch.Generator().manual_seed(0)  # NOLA regenerates its bases from a seed
        self.register_buffer("basis_A", torch.randn(bases, rank, fin, generator=generator))
        self.register_buffer("basis_B", torch.randn(bases, fout, rank, generator=generator))
        self.alpha = nn.Parameter(torch.randn(bases))
        self.beta = nn.Parameter(torch.randn(bases))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.einsum("k,kri->ri", self.alpha, self.basis_A)
        b = (self.beta.view(-1, 1, 1) * self.basis_B).sum(0)
        return self.base(x) + 0.5 * F.linear(F.linear(x, a), b)


class RowMixingAdapter(_Adapted):
    """The branch swaps x's two row axes (batch and sequence) before A: each of its rows reads another row of
    x, so it is no map of each row on its own and cannot merge into the base."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + 0.5 * self.lora_B(self.lora_A(x.transpose(0, 1)))


class AxesAffineAdapter(nn.Module):
    """A KronA-like branch with a bias, a scale and a shift along two feature axes: still affine in each row."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(6, 4)
        self.A = nn.Parameter(torch.randn(2, 2))
        self.B = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.rand(2, 2) + 0.5)
        self.register_buffer("shift", torch.randn(2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.matmul(self.A, self.B(x.reshape(*x.shape[:-1], 2, 3))) * self.scale + self.shift
        return self.base(x) + h.reshape(*x.shape[:-1], -1)
