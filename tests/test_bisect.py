"""bisect: the first applied match after which the optimized model stops verifying, named exactly."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.fx import Node

import fxopt
from fxopt.canonical import canonicalize
from fxopt.ops import BATCH_NORM, CONV
from fxopt.pattern import Match, Pass
from fxopt.patterns.fold_bn import ConvThenBN, bn_affine
from fxopt.rewriter import Rewriter


class FoldWrongForThreeChannels(ConvThenBN):
    """A conv -> BN fold that drops the BN shift when the conv has 3 output channels, and only then."""

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        conv, bn = match.nodes["conv"], match.nodes["bn"]
        a, c = bn_affine(bn, rw)
        if a.numel() == 3:
            c = torch.zeros_like(c)  # the bug
        weight, bias = rw.constant(conv.kwargs["weight"]), rw.constant(conv.kwargs["bias"])
        w = rw.new_constant(conv.kwargs["weight"].target, (weight.double() * a.view(-1, 1, 1, 1)).to(weight.dtype))
        b = rw.new_constant(conv.kwargs["bias"].target, (bias.double() * a + c).to(bias.dtype))
        return rw.call(CONV, **{**conv.kwargs, "weight": w, "bias": b})


WRONG_FOR_THREE = Pass("fold_bn_wrong_for_3", "", (FoldWrongForThreeChannels(),))


def blocks(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Dropout(0.1)]
    for cin, cout in zip(widths, widths[1:]):
        bn = nn.BatchNorm2d(cout)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.bias.uniform_(1, 2)
        layers += [nn.Conv2d(cin, cout, 3, padding=1), bn]
    return nn.Sequential(*layers).eval()


def batch_norm_names(model: nn.Module, inputs: tuple) -> list[str]:
    gm = canonicalize(fxopt.capture(copy.deepcopy(model), inputs).module)
    return [n.name for n in gm.graph.nodes if BATCH_NORM(n)]


def test_all_good_when_every_rewrite_is_right() -> None:
    model, inputs = blocks([2, 3, 4]), (torch.randn(1, 2, 5, 5),)
    result = fxopt.bisect(model, inputs, ["remove_noops", "fold_bn"])
    assert result.passed and result.culprit is None
    assert result.applied == 3
    assert str(result).startswith("all good")


def test_names_the_first_wrong_match_among_many() -> None:
    model, inputs = blocks([2, 4, 5, 3, 3, 6]), (torch.randn(1, 2, 5, 5),)
    result = fxopt.bisect(model, inputs, ["remove_noops", WRONG_FOR_THREE])
    assert not result.passed and not result.verification.passed
    culprit = result.culprit
    assert (culprit.pass_name, culprit.pattern) == ("fold_bn_wrong_for_3", "FoldWrongForThreeChannels")
    assert culprit.node == batch_norm_names(model, inputs)[2]  # the first conv with 3 output channels
    assert culprit.index == 4  # dropout removed, then three folds: the third one is wrong
    assert result.applied == 6
    assert "fold_bn_wrong_for_3" in str(result) and culprit.node in str(result)


def test_leaves_the_model_alone() -> None:
    model, inputs = blocks([2, 3]), (torch.randn(1, 2, 4, 4),)
    before = copy.deepcopy(model.state_dict())
    fxopt.bisect(model, inputs, [WRONG_FOR_THREE])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])
