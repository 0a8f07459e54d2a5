"""Synthetic models of a chosen graph size, for the scale benchmark and tests.

``deep_residual(blocks)``: a residual stream of x + 0.1 * tanh(BN(conv(x))) blocks (5 graph nodes
per block: modules are call_module nodes).
``wide_branchy(blocks)``: RepVGG-style blocks (3x3 conv-BN + 1x1 conv-BN + BN identity, summed,
then tanh): 8 graph nodes per block, every block re-parameterizable.
Channels and spatial size are small so a 100k-node graph stays a few hundred MB.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class _ConvBN(nn.Sequential):
    def __init__(self, channels: int, k: int):
        super().__init__(nn.Conv2d(channels, channels, k, padding=k // 2, bias=False), nn.BatchNorm2d(channels))


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = _ConvBN(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.tanh(self.body(x))  # a residual stream that stays finite thousands of blocks deep


class _RepBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.dense, self.pointwise, self.identity = _ConvBN(channels, 3), _ConvBN(channels, 1), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x) + self.pointwise(x) + self.identity(x))


def _randomised(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so every fold changes numbers."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=generator) * 0.1)
    return model.eval()


NODES_PER_BLOCK = {"deep_residual": 5, "wide_branchy": 8}


def deep_residual(blocks: int, channels: int = 4) -> nn.Module:
    return _randomised(nn.Sequential(*(_Residual(channels) for _ in range(blocks))))


def wide_branchy(blocks: int, channels: int = 4) -> nn.Module:
    return _randomised(nn.Sequential(*(_RepBlock(channels) for _ in range(blocks))))


def example(channels: int = 4) -> tuple[torch.Tensor]:
    return (torch.randn(1, channels, 4, 4),)
