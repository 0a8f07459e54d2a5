"""prove: the BatchNorm folds are proved symbolically on the real rewrite code; wrong folds are disproved."""

from __future__ import annotations

import numpy as np
import pytest
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from fxopt import ops
from fxopt.equivalence import prove
from fxopt.equivalence.prove import SYMBOLIC_OPS, SymbolicTensor
from fxopt.ops import CONV
from fxopt.pattern import Match, Pass
from fxopt.patterns.fold_bn import BNThenConv, ConvThenBN, FunctionalBN, bn_affine
from fxopt.rewriter import Rewriter


def bn_model(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(*layers).eval()


FOLDS = {
    "conv2d 2ch 3x3 on 4x4 -> BN": (bn_model(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2)), (1, 2, 4, 4), "ConvThenBN"),
    "grouped strided conv, reflect pad, no bias -> functional BN": (
        bn_model(nn.Conv2d(4, 2, 3, stride=2, padding=1, groups=2, bias=False, padding_mode="reflect"),
                 FunctionalBN(nn.BatchNorm2d(2))), (1, 4, 4, 4), "ConvThenBN"),
    "grouped transposed conv -> BN": (
        bn_model(nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
                 nn.BatchNorm1d(4)), (1, 4, 3), "ConvThenBN"),
    "BN -> conv, no padding": (bn_model(nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3)), (1, 2, 4, 4), "BNThenConv"),
    "BN -> depthwise conv, circular pad": (
        bn_model(nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3, padding=1, groups=2, padding_mode="circular")),
        (1, 2, 4, 4), "BNThenConv"),
    "linear -> BN1d": (bn_model(nn.Linear(3, 2), nn.BatchNorm1d(2)), (2, 3), "LinearThenBN"),
    "BN1d (no affine) -> linear": (bn_model(nn.BatchNorm1d(3, affine=False), nn.Linear(3, 2)), (2, 3), "BNThenLinear"),
}


@pytest.mark.parametrize("name", FOLDS)
def test_fold_bn_is_proved(name: str) -> None:
    model, shape, pattern = FOLDS[name]
    result = prove("fold_bn", [(model, (torch.randn(shape),))])
    assert result.proved, str(result)
    assert result.patterns() == {pattern}


def test_fold_bn_is_proved_on_small_instances_of_its_own_generator() -> None:
    result = prove("fold_bn")
    assert result.proved, str(result)
    assert {"ConvThenBN", "BNThenConv", "LinearThenBN", "BNThenLinear"} <= result.patterns()


class FoldForgetsEps(ConvThenBN):
    """conv -> BN with a = gamma / sqrt(var): off by eps, which float tests at eps=1e-5 hardly see."""

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        conv, bn = match.nodes["conv"], match.nodes["bn"]
        k = bn.kwargs
        a = rw.constant(k["weight"]).double() / torch.sqrt(rw.constant(k["running_var"]).double())
        c = rw.constant(k["bias"]).double() - rw.constant(k["running_mean"]).double() * a
        weight, bias = rw.constant(conv.kwargs["weight"]), rw.constant(conv.kwargs["bias"])
        w = rw.new_constant(conv.kwargs["weight"].target, (weight.double() * a.view(-1, 1, 1, 1)).to(weight.dtype))
        b = rw.new_constant(conv.kwargs["bias"].target, (bias.double() * a + c).to(bias.dtype))
        return rw.call(CONV, **{**conv.kwargs, "weight": w, "bias": b})


class FoldIgnoresZeroPadding(BNThenConv):
    """BN -> zero-padded conv folded anyway: the border taps see 0 where they saw the BN shift."""

    def match(self, node: Node, rw: Rewriter) -> Match | None:
        bn = node.kwargs["input"]
        return Match(node, {"bn": bn, "conv": node}) if ops.BATCH_NORM(bn) else None


def test_a_fold_that_forgets_eps_is_disproved_with_the_differing_expression() -> None:
    wrong = Pass("fold_forgets_eps", "", (FoldForgetsEps(),))
    model = bn_model(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2))
    result = prove(wrong, [(model, (torch.randn(1, 2, 4, 4),))])
    assert result.disproved, str(result)
    detail = result.matches[0].detail
    assert detail.startswith("output[0,0,0,0]: pattern - replacement = ") and "eps" in detail


def test_a_bn_fold_into_a_zero_padded_conv_is_disproved_at_the_border() -> None:
    wrong = Pass("fold_ignores_padding", "", (FoldIgnoresZeroPadding(),))
    model = bn_model(nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3, padding=1))
    result = prove(wrong, [(model, (torch.randn(1, 2, 4, 4),))])
    assert result.disproved, str(result)
    assert "output[0,0,0,0]" in result.matches[0].detail  # a corner: it reads padding


def test_a_rewrite_the_symbols_cannot_follow_is_not_applicable() -> None:
    class ExpFold(ConvThenBN):  # computes with torch.exp, which SymbolicTensor does not implement
        def rewrite(self, match: Match, rw: Rewriter) -> Node:
            a, _ = bn_affine(match.nodes["bn"], rw)
            torch.exp(a)
            raise AssertionError("unreachable")

    model = bn_model(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    result = prove(Pass("exp_fold", "", (ExpFold(),)), [(model, (torch.randn(1, 2, 2, 2),))])
    assert result.verdict == "not applicable" and "exp" in result.matches[0].detail


def test_a_pass_that_matches_nothing_is_not_applicable_and_says_why() -> None:
    model = bn_model(nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3, padding=1))  # fold_bn skips: zero padding
    result = prove("fold_bn", [(model, (torch.randn(1, 2, 4, 4),))])
    assert result.verdict == "not applicable" and not result.matches
    assert any("BNThenConv at conv" in note and "zero-pads" in note for note in result.notes), str(result)


# -- the symbolic interpreter must compute what torch computes ---------------------------------------


def exact(t: torch.Tensor) -> SymbolicTensor:
    return SymbolicTensor(np.vectorize(lambda v: sympy.Rational(float(v)), otypes=[object])(t.double().numpy()))


def as_float(value: SymbolicTensor) -> torch.Tensor:
    return torch.tensor(np.vectorize(float)(value.array), dtype=torch.float64)


CONVS = [  # (in, out, kernel, spatial size, conv kwargs)
    (4, 2, (3,), (7,), dict(stride=(2,), padding=(1,), dilation=(2,), groups=2, padding_mode="zeros")),
    (2, 4, (2, 3), (5, 6), dict(stride=(1, 1), padding="same", dilation=(2, 1), groups=1, padding_mode="zeros")),
    (3, 3, (3, 3), (5, 5), dict(stride=(1, 1), padding=(1, 2), dilation=(1, 1), groups=3, padding_mode="reflect")),
    (2, 2, (3, 3), (4, 4), dict(stride=(2, 1), padding=(1, 1), dilation=(1, 1), groups=1, padding_mode="replicate")),
    (2, 2, (3,), (5,), dict(stride=(1,), padding=(2,), dilation=(1,), groups=1, padding_mode="circular")),
    (2, 2, (2, 2, 2), (3, 3, 3),
     dict(stride=(1, 2, 1), padding=(0, 1, 0), dilation=(1, 1, 1), groups=1, padding_mode="zeros")),
]


@pytest.mark.parametrize("cin,cout,kernel,size,kwargs", CONVS)
def test_symbolic_conv_matches_torch(cin, cout, kernel, size, kwargs) -> None:
    x, w, b = torch.randn(2, cin, *size), torch.randn(cout, cin // kwargs["groups"], *kernel), torch.randn(cout)
    expected = ops.conv(x.double(), w.double(), b.double(), **kwargs)
    got = SYMBOLIC_OPS[ops.conv](exact(x), exact(w), exact(b), **kwargs)
    torch.testing.assert_close(as_float(got), expected)


@pytest.mark.parametrize("rank,groups,stride,padding,dilation,output_padding",
                         [(1, 2, 2, 1, 1, 1), (2, 1, 2, 0, 2, 1), (1, 1, 3, 2, 1, 0), (2, 2, 1, 1, 1, 0)])
def test_symbolic_transposed_conv_matches_torch(rank, groups, stride, padding, dilation, output_padding) -> None:
    x, w, b = torch.randn(1, 4, *(3,) * rank), torch.randn(4, 6 // groups, *(3,) * rank), torch.randn(6)
    kwargs = dict(stride=(stride,) * rank, padding=(padding,) * rank, dilation=(dilation,) * rank, groups=groups,
                  transposed=True, output_padding=(output_padding,) * rank)
    expected = ops.conv(x.double(), w.double(), b.double(), **kwargs)
    got = SYMBOLIC_OPS[ops.conv](exact(x), exact(w), exact(b), **kwargs)
    torch.testing.assert_close(as_float(got), expected)


@pytest.mark.parametrize("affine", [True, False])
def test_symbolic_batch_norm_and_linear_match_torch(affine: bool) -> None:
    x, mean, var = torch.randn(2, 3, 4), torch.randn(3), torch.rand(3) + 0.5
    gamma, beta = (torch.randn(3), torch.randn(3)) if affine else (None, None)
    tensors = (x, mean, var, gamma, beta)
    expected = F.batch_norm(*(t.double() if t is not None else None for t in tensors), False, 0.1, 0.25)
    symbolic = (exact(t) if t is not None else None for t in tensors)
    torch.testing.assert_close(as_float(SYMBOLIC_OPS[F.batch_norm](*symbolic, False, 0.1, 0.25)), expected)
    w, b = torch.randn(5, 4), torch.randn(5)
    expected = F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(as_float(SYMBOLIC_OPS[F.linear](exact(x), exact(w), exact(b))), expected)


FOLD_ARITHMETIC = [
    lambda v: (v * 2 - 1) / (v.t().sum(0).view(-1, 1) + 4),
    lambda v: torch.zeros(3, dtype=torch.float64) + v.flatten(0)[:3] @ torch.ones(3, 3, dtype=torch.float64),
    lambda v: F.pad(v, [1, 0, 0, 2]),
    lambda v: torch.einsum("ij,kj->ik", v, v) + torch.cat([v, v]).sum(),
    lambda v: v.unsqueeze(0).expand(4, -1, -1).reshape(4, 6)[:, None] * torch.ones_like(v).sum(),
    lambda v: torch.sqrt(v * v + 1) * (v * v + 1).rsqrt() - (v * v + 1).reciprocal() ** 2,
    lambda v: v.permute(1, 0).transpose(0, 1).contiguous().float().clone() * v.size(1) + v.T.t() + (-v),
    lambda v: v.unsqueeze(-1).squeeze(-1).squeeze(0) - torch.zeros_like(v) + v.new_zeros(2, 3),
]


@pytest.mark.parametrize("f", FOLD_ARITHMETIC)
def test_symbolic_tensor_follows_fold_arithmetic(f) -> None:
    t = torch.randn(2, 3)
    torch.testing.assert_close(as_float(f(exact(t))), f(t.double()))
