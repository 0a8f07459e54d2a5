"""remove_noops: drop operations that compute nothing at inference (eval-mode dropout, nn.Identity)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.fx import Node

from fxopt.ops import DROPOUT, IDENTITY
from fxopt.pattern import Match, Pass, Pattern, Skip, register
from fxopt.rewriter import Rewriter


class EvalDropout(Pattern):
    anchor = DROPOUT

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        if node.kwargs["training"] and node.kwargs["p"] > 0:
            return Skip("dropout in training mode is random, not a no-op: call model.eval() first")
        return Match(node, {"dropout": node})

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        return match.root.kwargs["input"]


class Identity(Pattern):
    anchor = IDENTITY

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        return Match(node, {"identity": node})

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        return match.root.kwargs["input"]


class _FunctionalDropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, self.training)


@st.composite
def noop_instances(draw) -> tuple[nn.Module, tuple]:
    """A Linear wrapped in eval-mode dropouts (module and functional) and Identity modules."""
    width = draw(st.integers(1, 8))
    layers: list[nn.Module] = [nn.Linear(width, width)]
    for _ in range(draw(st.integers(1, 3))):
        p = draw(st.sampled_from([0.0, 0.1, 0.5]))
        layers.append(draw(st.sampled_from([nn.Dropout(p), _FunctionalDropout(p), nn.Identity(), nn.Dropout2d(p)])))
    return nn.Sequential(*layers).eval(), (torch.randn(draw(st.integers(1, 3)), width),)


REMOVE_NOOPS = register(
    Pass(
        name="remove_noops",
        description="Remove eval-mode dropout and nn.Identity",
        patterns=(EvalDropout(), Identity()),
        instances=noop_instances,
    )
)
