"""reparam_conv and fold_constants on hand-written re-parameterizable blocks, random branch sums, and every Skip."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

import fxopt
from fxopt.pattern import get_pass

sys.path.insert(0, str(Path(__file__).parent))
from reparam_blocks import (  # noqa: E402
    ACBlock, DBBlock, DEConv, MobileOneBlock, MobileOneScale, Net, RepLKBlock, RepVGGBlock, RepVGGFunctional,
    randomise_bn,
)

PASSES = ["fold_constants", "fold_bn", "reparam_conv"]
CONV_TARGETS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
warnings.filterwarnings("ignore", category=UserWarning)


def conv_calls(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_TARGETS)


def module_convs(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))


def check_family(net: Net, x: torch.Tensor, passes: list[str] = PASSES) -> fxopt.Report:
    """Optimized == original (oracle), and exactly as many convs as the hand-written deploy-time net."""
    net = randomise_bn(net)
    deploy = net.deploy()
    assert fxopt.verify(net, deploy, (x,)).passed, "the hand-written reparameterize() itself is wrong"
    result = fxopt.optimize(net, (x,), passes=passes)
    assert fxopt.verify(net, result, (x,)).passed, result.report
    assert conv_calls(result) == module_convs(deploy), (result.code, result.report)
    return result.report


# ---------------------------------------------------------------------------------------------
# the families


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_repvgg_padding_modes(mode: str) -> None:
    torch.manual_seed(0)
    net = Net(RepVGGBlock(3, 8, stride=2, padding_mode=mode), RepVGGBlock(8, 8, padding_mode=mode),
              RepVGGBlock(8, 8, groups=2, padding_mode=mode))
    check_family(net, torch.randn(2, 3, 12, 12))


def test_repvgg_dilation_and_depthwise() -> None:
    torch.manual_seed(1)
    net = Net(RepVGGBlock(4, 4, dilation=2), RepVGGBlock(4, 4, groups=4), RepVGGBlock(4, 6, stride=2, groups=2))
    check_family(net, torch.randn(1, 4, 11, 11))


def test_repvgg_functional_batch_norm() -> None:
    torch.manual_seed(2)
    net = Net(RepVGGFunctional(3, 6, stride=2), RepVGGFunctional(6, 6), RepVGGFunctional(6, 6, groups=3))
    check_family(net, torch.randn(2, 3, 10, 10))


def test_repvgg_without_fold_bn_pass() -> None:
    """reparam_conv folds conv -> BN branches itself."""
    torch.manual_seed(3)
    check_family(Net(RepVGGBlock(4, 4), RepVGGBlock(4, 4)), torch.randn(1, 4, 8, 8), passes=["reparam_conv"])


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_acnet(mode: str) -> None:
    torch.manual_seed(4)
    net = Net(ACBlock(3, 8, stride=2, padding_mode=mode), ACBlock(8, 8, k=5, padding_mode=mode))
    check_family(net, torch.randn(2, 3, 12, 12))


@pytest.mark.parametrize("groups", [1, 2])
def test_dbb(groups: int) -> None:
    torch.manual_seed(5)
    net = Net(DBBlock(4, 8, stride=2, groups=groups), DBBlock(8, 8, groups=groups), DBBlock(8, 8, k=5))
    check_family(net, torch.randn(2, 4, 12, 12))


def test_mobileone() -> None:
    """Depthwise KxK block, ReLU, pointwise 1x1 block: MobileOne's unit, stacked."""
    torch.manual_seed(6)
    net = Net(MobileOneBlock(4, 4, k=3, groups=4), MobileOneBlock(4, 8, k=1),
              MobileOneBlock(8, 8, k=3, stride=2, groups=8), MobileOneBlock(8, 8, k=1), MobileOneScale(8))
    check_family(net, torch.randn(2, 4, 10, 10))


def test_replknet() -> None:
    torch.manual_seed(7)
    net = Net(RepLKBlock(6, large=7, small=3), RepLKBlock(6, large=9, small=5, stride=2))
    check_family(net, torch.randn(1, 6, 16, 16))


@pytest.mark.parametrize("sum_weights", [True, False])
def test_deconv(sum_weights: bool) -> None:
    """Kernels built from parameters in forward become one vanilla conv with no extra parameters."""
    torch.manual_seed(8)
    net = Net(DEConv(4, sum_weights), DEConv(4, sum_weights))
    x = torch.randn(1, 4, 9, 9)
    report = check_family(net, x)
    result = fxopt.optimize(net, (x,), passes=PASSES)
    deploy_params = sum(p.numel() for p in net.deploy().parameters())
    assert sum(p.numel() for p in result.parameters()) == deploy_params, report


def test_default_pipeline_reparameterizes() -> None:
    torch.manual_seed(9)
    net = randomise_bn(Net(RepVGGBlock(3, 6, stride=2), MobileOneBlock(6, 6)))
    x = torch.randn(1, 3, 8, 8)
    result = fxopt.optimize(net, (x,))
    assert result.report.verification.passed
    assert conv_calls(result) == 2


# ---------------------------------------------------------------------------------------------
# property tests with the passes' own instance strategies

PROPERTY = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@PROPERTY
@given(get_pass("reparam_conv").instances())
def test_reparam_instances_merge_to_one_conv(instance) -> None:
    model, inputs = instance
    result = fxopt.optimize(model, inputs, passes=["reparam_conv"])
    assert result.report.verification.passed, result.report
    assert conv_calls(result) == 1, (result.code, result.report)


@PROPERTY
@given(get_pass("fold_constants").instances())
def test_fold_constants_instances(instance) -> None:
    model, inputs = instance
    result = fxopt.optimize(model, inputs, passes=["fold_constants"])
    assert result.report.verification.passed, result.report
    assert result.report.passes[0].applied >= 1, result.report


# ---------------------------------------------------------------------------------------------
# fold_constants: what must not be folded


class _Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.w + torch.randn_like(self.w))


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count.add_(1)
        return x * (self.count * 2)


def test_fold_constants_keeps_random_ops() -> None:
    result = fxopt.optimize(_Noisy(), (torch.randn(2, 3),), passes=["fold_constants"], verify=False)
    assert any(n.target is torch.randn_like for n in result.graph.nodes)


def test_fold_constants_keeps_computation_on_mutated_buffers() -> None:
    result = fxopt.optimize(_Counter(), (torch.randn(2, 3),), passes=["fold_constants"], verify=False)
    assert result.report.passes[0].applied == 0


# ---------------------------------------------------------------------------------------------
# every Skip reason


class _Sum(nn.Module):
    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((b(x) for b in self.branches[1:]), self.branches[0](x))


class _Chain(nn.Module):
    def __init__(self, *steps: nn.Module):
        super().__init__()
        self.steps = nn.Sequential(*steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.steps(x)


def _conv(k, s: int = 1, p=0, **kw) -> nn.Conv2d:
    return nn.Conv2d(4, 4, k, s, p, **kw)


SKIPS = {
    "different strides": (_Sum(_conv(3, 1, 0), _conv(1, 2, 0)), 5),
    "cannot be centred": (_Sum(_conv(3, 2, 1), _conv(2, 2, 0)), 6),
    "different dilations": (_Sum(_conv(3, 1, 1), _conv(3, 1, 2, dilation=2)), 6),
    "not aligned": (_Sum(_conv(3, 3, 2), _conv(1, 3, 0)), 7),
    "different padding modes": (_Sum(_conv(3, 1, 1, padding_mode="reflect"), _conv(3, 1, 1)), 6),
    "count_include_pad=False": (_Sum(_conv(3, 1, 1), nn.AvgPool2d(3, 1, 1, count_include_pad=False)), 6),
    "ceil_mode=True": (_Sum(_conv(3, 2, 1), nn.AvgPool2d(3, 2, 1, ceil_mode=True)), 7),
    "the border sees 0 instead of the bias": (_Sum(_conv(3, 1, 1), _Chain(_conv(1), nn.BatchNorm2d(4),
                                                                          _conv(3, 1, 1))), 6),
    "two spatial convs in sequence": (_Chain(_conv(3, 1, 1), _conv(3, 1, 1)), 6),
    "strided 1x1 conv before a spatial conv": (_Chain(_conv(1, 2), _conv(3, 1, 1)), 6),
    "training mode": (_Sum(_conv(3, 1, 1), nn.BatchNorm2d(4).train()), 6),
    "asymmetric 'same' padding": (_Sum(_conv(3, 1, 1), _conv(2, 1, "same")), 6),
}


@pytest.mark.parametrize("reason", list(SKIPS))
def test_skip_reasons(reason: str) -> None:
    torch.manual_seed(10)
    model, size = SKIPS[reason]
    model = randomise_bn(model)
    for m in model.modules():  # the training-mode case keeps its BN in training mode
        if isinstance(m, nn.BatchNorm2d) and reason == "training mode":
            m.train()
    x = torch.randn(1, 4, size, size)
    result = fxopt.optimize(model, (x,), passes=["reparam_conv"])
    reasons = [r for _, r in result.report.passes[0].skipped]
    assert any(reason in r for r in reasons), reasons
    assert result.report.passes[0].applied == 0
    assert result.report.verification.passed
