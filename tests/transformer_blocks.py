"""Hand-written Pre-LN transformers for the norm passes: a ViT (patch conv, cls token, LayerScale)
and a language model whose head is tied to the token embedding. Both trace with symbolic_trace."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN block; ``layer_scale`` multiplies each branch by a learned per-channel vector (CaiT, DeiT-III)."""

    def __init__(self, d: int, heads: int, layer_scale: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.gamma1 = nn.Parameter(torch.rand(d) + 0.5) if layer_scale else None
        self.gamma2 = nn.Parameter(torch.rand(d) + 0.5) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.norm1(x))
        x = x + (h * self.gamma1 if self.gamma1 is not None else h)
        h = self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x + (h * self.gamma2 if self.gamma2 is not None else h)


def _randomize_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model


class ViT(nn.Module):
    def __init__(self, d: int = 32, depth: int = 2, heads: int = 4, patch: int = 4, image: int = 8,
                 layer_scale: bool = True, embed_norm: bool = False, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d))
        self.embed_norm = nn.LayerNorm(d) if embed_norm else nn.Identity()
        self.blocks = nn.Sequential(*[Block(d, heads, layer_scale) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        _randomize_norms(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(images.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(self.embed_norm(x))
        return self.head(self.norm(x)[:, 0])


class TiedLM(nn.Module):
    """GPT-style LM; ``return_hidden`` also returns the raw residual stream (as HF output_hidden_states)."""

    def __init__(self, vocab: int = 50, d: int = 32, depth: int = 2, heads: int = 4, context: int = 16,
                 return_hidden: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads, False) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.return_hidden = return_hidden
        _randomize_norms(self)

    def forward(self, ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(ids.shape[1])
        hidden = self.blocks(self.embed(ids) + self.pos(positions))
        logits = F.linear(self.norm(hidden), self.embed.weight)  # head tied to the token embedding
        return (logits, hidden) if self.return_hidden else logits
