"""The checkers are tested with rewrites that are wrong on purpose: each must be caught by
check_pass, rolled back by translation validation inside optimize, and named by bisect; a
correct rewrite in bfloat16 must be flagged by none of them (rounding is not a bug)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.fx import Node

import fxopt
from fxopt.canonical import canonicalize
from fxopt.equivalence import check_pass
from fxopt.ops import ADD, CONV, Op
from fxopt.pattern import Match, Pass, Pattern
from fxopt.patterns.fold_bn import FOLD_BN, ConvThenBN, bn_affine, fold_bn_instances
from fxopt.rewriter import Rewriter


def random_bn(channels: int, seed: int) -> nn.BatchNorm2d:
    bn, g = nn.BatchNorm2d(channels), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in (bn.running_mean, bn.weight, bn.bias):
            t.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return bn


# -- a fold that forgets the conv's bias ----------------------------------------------------------------


class FoldForgetsConvBias(ConvThenBN):
    """conv -> BN folded with bias = BN shift only: the conv's own bias (times the BN scale) is lost."""

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        conv, bn = match.nodes["conv"], match.nodes["bn"]
        a, c = bn_affine(bn, rw)
        weight = rw.constant(conv.kwargs["weight"])
        w = rw.new_constant(conv.kwargs["weight"].target, (weight.double() * a.view(-1, 1, 1, 1)).to(weight.dtype))
        b = rw.new_constant(conv.kwargs["weight"].target + "_bias", c.to(weight.dtype))  # bug: + conv bias * a
        return rw.call(CONV, **{**conv.kwargs, "weight": w, "bias": b})


@st.composite
def conv_bn_with_bias(draw) -> tuple[nn.Module, tuple]:
    cin, cout, k = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), random_bn(cout, seed)).eval()
    return model, (torch.randn(1, cin, 5, 5),)


# -- a merge that drops a branch: x + conv(x) -> conv(x) ---------------------------------------------------


class Residual(nn.Module):
    def __init__(self, channels: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def _conv_of(node: Node, x: Node) -> bool:
    return CONV(node) and node.kwargs["input"] is x


class DropsResidualBranch(Pattern):
    """'Merges' x + conv(x) into conv(x), forgetting the identity branch."""

    anchor = ADD

    def match(self, node: Node, rw: Rewriter) -> Match | None:
        a, b = node.args
        for x, conv in ((a, b), (b, a)):
            if isinstance(x, Node) and _conv_of(conv, x):
                return Match(node, {"add": node, "conv": conv})
        return None

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        return match.nodes["conv"]


@st.composite
def residuals(draw) -> tuple[nn.Module, tuple]:
    channels, k = draw(st.integers(1, 4)), draw(st.sampled_from([1, 3]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return Residual(channels, k).eval(), (torch.randn(1, channels, 5, 5),)


# -- an off-by-one padding: conv_kxk(x) + conv_1x1(x) -> one kxk conv, 1x1 tap off centre -----------------


class Branches(nn.Module):
    def __init__(self, channels: int, k: int):
        super().__init__()
        self.big = nn.Conv2d(channels, channels, k, padding=k // 2)
        self.small = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.big(x) + self.small(x)


def _plain_conv(node: Node, rw: Rewriter) -> bool:
    k = node.kwargs
    return (CONV(node) and not k["transposed"] and k["groups"] == 1 and k["padding_mode"] == "zeros"
            and set(k["stride"]) == set(k["dilation"]) == {1} and rw.is_constant(k["weight"]) and k["bias"] is not None)


class MergeOffByOnePadding(Pattern):
    """Merges a kxk and a 1x1 branch by padding the 1x1 kernel to kxk: one tap left of and above centre."""

    anchor = ADD

    def match(self, node: Node, rw: Rewriter) -> Match | None:
        a, b = node.args
        for big, small in ((a, b), (b, a)):
            if not (isinstance(big, Node) and isinstance(small, Node)):
                continue
            if _plain_conv(big, rw) and _plain_conv(small, rw) and big.kwargs["input"] is small.kwargs["input"]:
                k = rw.constant(big.kwargs["weight"]).shape[-1]
                centred = big.kwargs["padding"] == (k // 2, k // 2) and small.kwargs["padding"] == (0, 0)
                if k > 1 and centred and rw.constant(small.kwargs["weight"]).shape[-2:] == (1, 1):
                    return Match(node, {"add": node, "big": big, "small": small})
        return None

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        big, small = match.nodes["big"], match.nodes["small"]
        w_big, w_small = rw.constant(big.kwargs["weight"]), rw.constant(small.kwargs["weight"])
        centre = w_big.shape[-1] // 2
        padded = F.pad(w_small.double(), [centre - 1, centre + 1] * 2)  # bug: [centre, centre] * 2
        weight = rw.new_constant(big.kwargs["weight"].target, (w_big.double() + padded).to(w_big.dtype))
        bias = rw.constant(big.kwargs["bias"]).double() + rw.constant(small.kwargs["bias"]).double()
        b = rw.new_constant(big.kwargs["bias"].target, bias.to(w_big.dtype))
        return rw.call(CONV, **{**big.kwargs, "weight": weight, "bias": b})


@st.composite
def branches(draw) -> tuple[nn.Module, tuple]:
    channels, k = draw(st.integers(1, 4)), draw(st.sampled_from([3, 5]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return Branches(channels, k).eval(), (torch.randn(1, channels, 6, 6),)


# -- the cases: each wrong pass runs after a correct one in a model that has work for both ----------------


@dataclass(frozen=True)
class Case:
    wrong: Pass
    model: nn.Module  # something for `before` to rewrite, then the wrong pass's pattern
    inputs: tuple
    before: str  # a correct pass that runs first, so bisect must tell its match from the wrong one
    root_op: Op  # the op of the node the wrong match is rooted at


def cases() -> dict[str, Case]:
    torch.manual_seed(0)
    return {
        "fold forgets the conv bias": Case(
            Pass("fold_forgets_conv_bias", "", (FoldForgetsConvBias(),), instances=conv_bn_with_bias),
            nn.Sequential(nn.Dropout(0.2), nn.Conv2d(3, 4, 3), random_bn(4, 0)).eval(),
            (torch.randn(1, 3, 6, 6),), "remove_noops", fxopt.ops.BATCH_NORM),
        "merge drops a branch": Case(
            Pass("drops_residual_branch", "", (DropsResidualBranch(),), instances=residuals),
            nn.Sequential(nn.Conv2d(3, 4, 1), random_bn(4, 1), Residual(4, 3)).eval(),
            (torch.randn(1, 3, 6, 6),), "fold_bn", ADD),
        "off-by-one kernel padding": Case(
            Pass("merge_off_by_one", "", (MergeOffByOnePadding(),), instances=branches),
            nn.Sequential(nn.Conv2d(3, 4, 1), random_bn(4, 2), Branches(4, 3)).eval(),
            (torch.randn(1, 3, 6, 6),), "fold_bn", ADD),
    }


CASES = cases()


@pytest.mark.parametrize("name", CASES)
def test_check_pass_catches_it_and_names_a_minimal_instance(name: str) -> None:
    case = CASES[name]
    with pytest.raises(AssertionError) as failure:
        check_pass(case.wrong, max_examples=10)
    message = str(failure.value)
    assert f"check_pass({case.wrong.name!r}): the optimized model is not equivalent" in message
    assert "instance:\n" in message and "inputs: Tensor[1, " in message
    assert "verification FAILED" in message


@pytest.mark.parametrize("name", CASES)
def test_translation_validation_rolls_it_back(name: str) -> None:
    case = CASES[name]
    result = fxopt.optimize(case.model, case.inputs, passes=[case.before, case.wrong])
    correct, wrong = result.report.passes
    assert correct.applied == 1 and not correct.rolled_back
    assert wrong.applied == 0 and len(wrong.rolled_back) == 1
    assert result.report.verification.passed
    torch.testing.assert_close(result(*case.inputs), case.model(*case.inputs))
    assert f"rolled back: {case.wrong.name} at " in str(result.report)


@pytest.mark.parametrize("name", CASES)
def test_bisect_names_the_wrong_pass_and_match(name: str) -> None:
    case = CASES[name]
    result = fxopt.bisect(case.model, case.inputs, [case.before, case.wrong])
    assert not result.passed and result.applied == 2
    culprit = result.culprit
    expected = (case.wrong.name, type(case.wrong.patterns[0]).__name__, 2)
    assert (culprit.pass_name, culprit.pattern, culprit.index) == expected
    assert culprit.node == _last_node_of(case.root_op, case.model, case.inputs)


def _last_node_of(op: Op, model: nn.Module, inputs: tuple) -> str:
    gm = canonicalize(fxopt.capture(copy.deepcopy(model), inputs).module)
    return [n.name for n in gm.graph.nodes if op(n)][-1]


# -- a correct rewrite in bfloat16: rounding, not a bug ----------------------------------------------------


def _in_bf16(instance: tuple[nn.Module, tuple]) -> tuple[nn.Module, tuple]:
    model, inputs = instance
    return model.to(torch.bfloat16), tuple(x.to(torch.bfloat16) for x in inputs)


FOLD_BN_BF16 = Pass("fold_bn_bf16", "", FOLD_BN.patterns, instances=lambda: fold_bn_instances().map(_in_bf16))


def bf16_conv_bn() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), random_bn(16, 3)).eval().to(torch.bfloat16)
    return model, (torch.randn(2, 8, 9, 9, dtype=torch.bfloat16),)


def test_a_correct_bf16_fold_passes_check_pass() -> None:
    report = check_pass(FOLD_BN_BF16, max_examples=15)
    assert report.instances == 15


def test_a_correct_bf16_fold_is_not_rolled_back() -> None:
    model, inputs = bf16_conv_bn()
    result = fxopt.optimize(model, inputs, passes=["fold_bn"])
    (stats,) = result.report.passes
    assert stats.applied == 1 and not stats.rolled_back
    assert result.report.verification.passed


def test_a_correct_bf16_fold_is_not_blamed_by_bisect() -> None:
    model, inputs = bf16_conv_bn()
    result = fxopt.bisect(model, inputs, ["fold_bn"])
    assert result.passed and result.culprit is None and result.applied == 1
