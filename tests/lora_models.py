"""Hand-written adapted models for tests/test_merge_lora.py: shapes merge_lora must merge or refuse."""

from __future__ import annotations

import torch
import torch.nn as nn


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
