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
from tests.generated import optimize_to_graph

sys.path.insert(0, str(Path(__file__).parent))
from reparam_blocks import (  # noqa: E402
    ACBlock, BNAndPad, DBBlock, DBBlockBiasFree, DEConv, MobileOneBlock, MobileOneScale, Net, RepLKBlock,
    RepVGGBlock, RepVGGFunctional, randomise_bn,
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
    result = optimize_to_graph(net, (x,), passes=passes)
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
    """The paper's block: BNAndPad pads with the BN's shift (slice writes, captured by torch.export)."""
    torch.manual_seed(5)
    last = DBBlock(8, 8, k=5) if groups == 1 else DBBlock(8, 8, groups=8)  # depthwise: the pool reads x
    check_family(Net(DBBlock(4, 8, stride=2, groups=groups), last), torch.randn(2, 4, 10, 10))


@pytest.mark.parametrize("groups", [1, 2])
def test_dbb_bias_free_zero_padding(groups: int) -> None:
    """A bias-free 1x1 then a zero-padded KxK: zero padding of the 1x1's output is exact."""
    torch.manual_seed(5)
    net = Net(DBBlockBiasFree(4, 8, stride=2, groups=groups), DBBlockBiasFree(8, 8, groups=groups),
              DBBlockBiasFree(8, 8, k=5))
    check_family(net, torch.randn(2, 4, 12, 12))


class _PadWith(nn.Module):
    """Pads its input with a learned per-channel value, by slice writes (BNAndPad without the BN)."""

    def __init__(self, channels: int):
        super().__init__()
        self.value = nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pad(x, [1, 1, 1, 1])
        value = self.value.view(1, -1, 1, 1)
        out[:, :, :1, :] = value
        out[:, :, -1:, :] = value
        out[:, :, :, :1] = value
        out[:, :, :, -1:] = value
        return out


class _PadThreeSides(_PadWith):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pad(x, [1, 1, 1, 1])
        value = self.value.view(1, -1, 1, 1)
        out[:, :, :1, :] = value
        out[:, :, -1:, :] = value
        out[:, :, :, :1] = value
        return out


@pytest.mark.parametrize("pad, canonical", [(_PadWith, True), (_PadThreeSides, False)])
def test_border_writes_become_one_pad_per_channel(pad: type, canonical: bool) -> None:
    """Zero padding then a write into every border strip is one pure op; other writes into the padded
    tensor (the graph's own) become functional scatters."""
    torch.manual_seed(15)
    result = optimize_to_graph(_Chain(pad(4), nn.ReLU()), (torch.randn(1, 4, 5, 5),), passes=[])
    assert result.report.verification.passed, result.report
    # the canonical op is lowered to a torch.where over the padded input (saved code is torch only)
    assert any(n.target is torch.where for n in result.graph.nodes) == canonical, result.code
    assert not any(n.target is torch.ops.aten.copy_.default for n in result.graph.nodes), result.code
    scatters = sum(n.target is torch.ops.aten.slice_scatter.default for n in result.graph.nodes)
    assert scatters == (0 if canonical else 3), result.code


@pytest.mark.parametrize("chain, reason", [
    # the 1x1's own bias goes through the BN: the BN's shift alone is not what the branch adds
    ("biased 1x1 -> BNAndPad", "differ (by up to"),
    ("pad of the block input", "a plain conv pads with zeros only"),
])
def test_value_padding_that_is_not_the_bias_is_skipped(chain: str, reason: str) -> None:
    torch.manual_seed(11)
    head = [_conv(1, bias=True), BNAndPad(1, 4)] if chain.startswith("biased") else [_PadWith(4)]
    model = randomise_bn(_Sum(_conv(3, 1, 1), _Chain(*head, _conv(3))))
    result = optimize_to_graph(model, (torch.randn(1, 4, 7, 7),), passes=PASSES)
    reparam = result.report.passes[-1]
    assert any(reason in r for _, r in reparam.skipped), result.report
    assert reparam.applied == 0 and result.report.verification.passed, result.report


# ---------------------------------------------------------------------------------------------
# a sum with a summand that cannot merge: the others still become one conv


def _conv_bn(k: int, p: int) -> nn.Sequential:
    return nn.Sequential(_conv(k, 1, p, bias=False), nn.BatchNorm2d(4))


@pytest.mark.parametrize("odd, convs, note", [
    (lambda: _conv(3, 1, 2, dilation=2), 2, "different dilations"),
    (lambda: nn.AvgPool2d(3, 1, 1, count_include_pad=False), 1, "count_include_pad=False"),
    (lambda: nn.Sequential(_conv(3, 1, 1), nn.ReLU()), 2, None),
], ids=["dilated conv", "avg pool without padding counted", "nonlinear branch"])
def test_partial_merge_keeps_the_odd_summand(odd, convs: int, note: str | None) -> None:
    torch.manual_seed(12)
    model = randomise_bn(_Sum(_conv_bn(3, 1), odd(), _conv_bn(1, 0), nn.BatchNorm2d(4)))
    result = optimize_to_graph(model, (torch.randn(2, 4, 8, 8),), passes=["reparam_conv"])
    assert result.report.verification.passed, result.report
    assert result.report.passes[0].applied == 3, result.report  # two conv+BN chains, then the sum
    assert conv_calls(result) == convs, result.code
    if note is not None:
        assert any("3 of 4 summands" in n and note in n for n in result.report.notes), result.report.notes


def test_a_merge_that_would_cost_more_is_skipped() -> None:
    """A dense 1x1 beside a depthwise 7x7 would become a dense 7x7: exact, but 49x the work of the 1x1."""
    torch.manual_seed(16)
    depthwise = nn.Conv2d(8, 8, 7, padding=3, groups=8)
    model = _Sum(depthwise, nn.Conv2d(8, 8, 1)).eval()
    result = optimize_to_graph(model, (torch.randn(1, 8, 9, 9),), passes=["reparam_conv"])
    reparam = result.report.passes[0]
    assert reparam.applied == 0 and any("more than" in r for _, r in reparam.skipped), result.report
    assert conv_calls(result) == 2 and result.report.verification.passed, result.report


def test_a_merge_that_would_store_more_is_skipped() -> None:
    """A 1x1 conv beside a 3x3 average pool on one channel: fewer multiply-adds merged, but the pool's
    window would become 9 stored weights where the model stores 1 (found by benchmarks/fuzz.py)."""
    model = _Sum(nn.Conv2d(1, 1, 1, bias=False), nn.AvgPool2d(3, 1, 1)).eval()
    result = optimize_to_graph(model, (torch.randn(2, 1, 8, 8),), passes=["reparam_conv"])
    reparam = result.report.passes[0]
    assert reparam.applied == 0 and any("stores a" in r for _, r in reparam.skipped), result.report
    assert result.report.verification.passed, result.report


# ---------------------------------------------------------------------------------------------
# average pooling branches of any rank


def _randomised_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(13)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                for t in (m.running_mean, m.weight, m.bias):
                    t.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


class _FunctionalPool3d(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(x, 3, 2, 1)


@pytest.mark.parametrize("rank", [1, 3])
def test_avg_pool_branch_of_any_rank(rank: int) -> None:
    torch.manual_seed(14)
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[rank]
    pool = nn.Sequential(nn.AvgPool1d(3, 2, 1), bn(4)) if rank == 1 else nn.Sequential(_FunctionalPool3d(), bn(4))
    model = _randomised_bn(_Sum(nn.Sequential(conv(4, 4, 3, 2, 1, bias=False), bn(4)), pool, conv(4, 4, 1, 2)))
    x = torch.randn(2, 4, *(7,) * rank)
    result = optimize_to_graph(model, (x,), passes=["reparam_conv"])
    assert result.report.verification.passed, result.report
    assert conv_calls(result) == 1 and not any("pool" in str(n.target) for n in result.graph.nodes), result.code


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
    result = optimize_to_graph(net, (x,), passes=PASSES)
    deploy_params = sum(p.numel() for p in net.deploy().parameters())
    assert sum(p.numel() for p in result.parameters()) == deploy_params, report


def test_default_pipeline_reparameterizes() -> None:
    torch.manual_seed(9)
    net = randomise_bn(Net(RepVGGBlock(3, 6, stride=2), MobileOneBlock(6, 6)))
    x = torch.randn(1, 3, 8, 8)
    result = optimize_to_graph(net, (x,))
    assert result.report.verification.passed
    assert conv_calls(result) == 2


# ---------------------------------------------------------------------------------------------
# property tests with the passes' own instance strategies

PROPERTY = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@PROPERTY
@given(get_pass("reparam_conv").instances())
def test_reparam_instances_merge_to_one_conv(instance) -> None:
    model, inputs = instance
    result = optimize_to_graph(model, inputs, passes=["reparam_conv"])
    assert result.report.verification.passed, result.report
    assert conv_calls(result) == 1, (result.code, result.report)


@PROPERTY
@given(get_pass("fold_constants").instances())
def test_fold_constants_instances(instance) -> None:
    model, inputs = instance
    result = optimize_to_graph(model, inputs, passes=["fold_constants"])
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
    result = optimize_to_graph(_Noisy(), (torch.randn(2, 3),), passes=["fold_constants"], verify=False)
    assert any(n.target is torch.randn_like for n in result.graph.nodes)


def test_fold_constants_keeps_computation_on_mutated_buffers() -> None:
    result = optimize_to_graph(_Counter(), (torch.randn(2, 3),), passes=["fold_constants"], verify=False)
    assert result.report.passes[0].applied == 0


class _Broadcast(nn.Module):
    """A small parameter expanded (or a tensor built from sizes) to a large operand."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.scale = nn.Parameter(torch.randn(1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "expand":
            return x * self.scale.expand(64, 64)
        if self.how == "repeat":
            return x + self.scale.repeat(64, 64)
        return x + self.scale.new_ones(64, 64) * self.scale  # torch.ones(64, 64) would be traced as a constant


@pytest.mark.parametrize("how", ["expand", "repeat", "factory"])
def test_fold_constants_refuses_to_grow_the_model(how: str) -> None:
    result = optimize_to_graph(_Broadcast(how), (torch.randn(64, 64),), passes=["fold_constants"])
    report = result.report.passes[0]
    assert report.applied == 0 and report.params_after == report.params_before, result.report
    assert any("folding would store 4,096 numbers" in r for _, r in report.skipped), result.report
    assert result.report.verification.passed


class _ExpandedKernel(nn.Module):
    """A conv kernel expanded from one shared 3x3 tap pattern: the conv needs it constant, so it folds."""

    def __init__(self):
        super().__init__()
        self.taps = nn.Parameter(torch.randn(1, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.taps.expand(16, 16, 3, 3), None, 1, 1)


def test_fold_constants_folds_large_weights_a_conv_reads() -> None:
    result = optimize_to_graph(_ExpandedKernel(), (torch.randn(1, 16, 6, 6),), passes=["fold_constants"])
    assert result.report.passes[0].applied == 1, result.report
    assert not any(n.target == "expand" for n in result.graph.nodes), result.code
    assert result.report.verification.passed


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
    result = optimize_to_graph(model, (x,), passes=["reparam_conv"])
    reasons = [r for _, r in result.report.passes[0].skipped]
    assert any(reason in r for r in reasons), reasons
    # the sum stays; where a branch is a 1x1 conv and its BatchNorm, those two still fold
    assert result.report.passes[0].applied == (reason == "the border sees 0 instead of the bias")
    assert result.report.verification.passed
