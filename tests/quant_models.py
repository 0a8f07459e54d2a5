"""A small hand-written ViT for the quantization tests (RepQ-ViT's setting)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v Linears: three consumers of one LayerNorm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn = F.softmax(q @ k.transpose(-2, -1) * (d // h) ** -0.5, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """Patch embedding, ``depth`` pre-norm blocks, final LayerNorm and a classification head."""

    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 2, patch: int = 4, classes: int = 5):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = images.shape
        p = self.patch
        patches = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)
        x = self.blocks(self.embed(patches))
        return self.head(self.norm(x)).mean(1)  # pooled after the head: the final LayerNorm feeds a Linear


def tiny_vit(seed: int = 0, dtype: torch.dtype = torch.float64) -> TinyViT:
    """A TinyViT with non-trivial LayerNorm affines (the inter-channel variation RepQ-ViT targets)."""
    torch.manual_seed(seed)
    model = TinyViT()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.randn(m.weight.shape).exp())  # channel ranges differ by ~10x
                m.bias.copy_(torch.randn(m.bias.shape))
    return model.to(dtype).eval()
