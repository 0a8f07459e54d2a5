"""Real code is messy: shape asserts, ``x.size()`` arithmetic, in-place ``+=``, kernels built by index
writes, SyncBatchNorm, hooks, buffers updated in forward, dtypes pinned in the model's own code.
Each failure class of the zoo gets a regression test here, from a timm model where timm shows it
and from a block written the way public code writes it otherwise."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

import fxopt
from fxopt.canonical import canonicalize
from fxopt.examples import randomize_batch_norms
from fxopt.ops import CONV, FAKE_QUANT_PER_CHANNEL
from fxopt.pattern import Match, Pass, Pattern
from tests.generated import optimize_to_graph


def randomized(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affines (fresh ones make every fold exact), eval mode."""
    return randomize_batch_norms(model).eval()


def aten_counts(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How often each aten op runs in one forward (any module: the kept class, timm's, ours)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[str, int] = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(x)
    return counts


def convs_and_norms(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    counts = aten_counts(model, x)
    convs = counts.get("convolution", 0) + counts.get("conv2d", 0)
    norms = counts.get("native_batch_norm", 0) + counts.get("_native_batch_norm_legit_no_training", 0)
    return convs, norms + counts.get("batch_norm", 0)


# -- timm: x.ndim asserts (BatchNormAct2d) no longer block folding ----------------------------------------


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_timm_reparameterizable_models_merge_like_timm(name: str) -> None:
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomized(timm.create_model(name, pretrained=False))
    x = torch.randn(2, 3, 32, 32)
    result = fxopt.optimize(model, (x,))
    timm_deploy = reparameterize_model(copy.deepcopy(model))
    assert type(result) is type(model), str(result.report)
    ours, theirs = convs_and_norms(result, x), convs_and_norms(timm_deploy, x)
    assert ours[0] <= theirs[0] and ours[1] <= theirs[1] == 0, (ours, theirs, str(result.report))
    assert "users" not in " ".join(r for p in result.report.passes for _, r in p.skipped)
    other = torch.randn(3, 3, 48, 40)  # another batch and resolution than the example
    torch.testing.assert_close(result(other), model(other), rtol=1e-4, atol=1e-4 * model(other).abs().max().item())


def test_rank_asserts_and_rank_arithmetic_become_constants() -> None:
    class AssertsRank(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            torch._assert(y.ndim == 4, "expected 4D input")
            torch._assert(y.dim() - 1 == 3, "expected 4D input")
            return self.bn(y)

    model = randomized(AssertsRank())
    result = optimize_to_graph(model, (torch.randn(2, 3, 8, 8),))
    assert result.report.passes[1].applied == 1, str(result.report)
    assert not [n for n in result.graph.nodes if n.target is torch._assert]


def test_shape_reads_of_a_folded_value_read_the_fold() -> None:
    """``B, C, H, W = y.shape`` on a conv output that a fold removes: the read moves to the folded conv,
    and the sizes stay free (the result runs at another batch and resolution)."""

    class ReadsShape(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            b, c, h, w = y.shape
            return self.bn(y).reshape(b, c, h * w).mean(-1) + y.size(1)

    model = randomized(ReadsShape())
    result = optimize_to_graph(model, (torch.randn(2, 3, 8, 8),))
    assert result.report.passes[1].applied == 1, str(result.report)
    assert not [n for n in result.graph.nodes if "batch_norm" in str(n.target)]
    other = torch.randn(5, 3, 6, 10)
    torch.testing.assert_close(result(other), model(other))


# -- x.size() arithmetic: MobileOne's SE block, as its authors wrote it -------------------------------------


class SEBlock(nn.Module):
    """MobileOne's squeeze-excite: the pooling window is the input's own size."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 2, 1)
        self.expand = nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x):
        b, c, h, w = x.size()
        s = F.avg_pool2d(x, kernel_size=[h, w])
        s = torch.sigmoid(self.expand(F.relu(self.reduce(s))))
        return x * s.view(-1, c, 1, 1)


class BranchesThenSE(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.b = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.se = SEBlock(c)

    def forward(self, x):
        return F.relu(self.se(self.a(x) + self.b(x)))


def test_size_arithmetic_skips_with_a_reason_and_never_raises() -> None:
    model = randomized(BranchesThenSE())
    result = fxopt.optimize(model, (torch.randn(2, 8, 8, 8),))
    reparam = next(p for p in result.report.passes if p.name == "reparam_conv")
    assert reparam.applied == 1, str(result.report)  # the two branches still merge
    other = torch.randn(1, 8, 12, 6)
    torch.testing.assert_close(result(other), model(other))


# -- in-place writes ------------------------------------------------------------------------------------


class InPlaceSum(nn.Module):
    """DBB-style: the branch sum written ``out += branch`` (``add_``)."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = self.k3(x)
        out.add_(self.k1(x))
        return F.relu(out)


def test_a_sum_written_in_place_is_merged() -> None:
    model = randomized(InPlaceSum())
    x = torch.randn(2, 6, 8, 8)
    result = optimize_to_graph(model, (x,))
    assert [n.target for n in result.graph.nodes if n.op == "call_function"].count(torch.conv2d) == 1, result.code
    torch.testing.assert_close(result(x), model(x))


def test_an_in_place_write_into_a_value_seen_through_a_view_is_kept() -> None:
    class WritesThroughView(nn.Module):
        def forward(self, x):
            y = x * 2
            v = y.view(-1)
            y.add_(1)
            return v * 3  # sees the write: functionalizing y would be wrong

    model = WritesThroughView()
    x = torch.randn(2, 3)
    result = optimize_to_graph(model, (x,))
    torch.testing.assert_close(result(x), model(x))


class CentralDifferenceConv(nn.Module):
    """A difference convolution: its kernel is assembled by writes into a fresh tensor every call."""

    def __init__(self, c: int = 4, theta: float = 0.7):
        super().__init__()
        self.conv, self.theta = nn.Conv2d(c, c, 3, padding=1, bias=False), theta

    def forward(self, x):
        w = self.conv.weight
        c = w.shape[0]
        flat = w.view(c, c, 9)
        kernel = torch.zeros(c, c, 9, dtype=torch.float32)
        kernel[:, :, [0, 1, 2, 3, 5, 6, 7, 8]] = flat[:, :, [0, 1, 2, 3, 5, 6, 7, 8]]
        kernel[:, :, 4] = flat[:, :, 4] - self.theta * flat.sum(2)
        return F.conv2d(x, kernel.view(c, c, 3, 3), padding=1)


def test_a_kernel_built_by_index_writes_folds_to_a_constant() -> None:
    torch.manual_seed(0)
    model = CentralDifferenceConv().eval()
    x = torch.randn(2, 4, 8, 8)
    result = optimize_to_graph(model, (x,))
    calls = [n for n in result.graph.nodes if n.op in ("call_function", "call_method")]
    assert len(calls) == 1 and "conv" in str(calls[0].target), result.code
    torch.testing.assert_close(result(x), model(x))
    # the user's class runs its own forward(), which builds the kernel again: the report says so
    assert "computes again, on every call, what the passes folded" in str(fxopt.optimize(model, (x,)).report)


# -- modules: SyncBatchNorm, hooks, buffers written in forward ---------------------------------------------


def test_sync_batch_norm_in_eval_mode_folds() -> None:
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU()))
    x = torch.randn(2, 3, 8, 8)
    result = fxopt.optimize(model, (x,))
    assert next(p for p in result.report.passes if p.name == "fold_bn").applied == 1
    assert isinstance(result[1], nn.Identity) and type(result) is nn.Sequential
    torch.testing.assert_close(result(x), model(x))


def test_a_module_with_a_forward_hook_is_kept_and_its_hook_runs() -> None:
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    calls = []
    model[1].register_forward_hook(lambda module, args, out: calls.append(out.shape))
    x = torch.randn(2, 3, 8, 8)
    for result in (fxopt.optimize(model, (x,)), optimize_to_graph(model, (x,))):
        calls.clear()
        result(x)
        assert calls == [torch.Size([2, 4, 6, 6])]
        assert "1 has a forward hook: kept as it is" in str(result.report)


def test_a_buffer_updated_in_forward_is_optimized_around() -> None:
    class CountsCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.calls += 1
            return self.bn(self.conv(x))

    model = randomized(CountsCalls())
    x = torch.randn(2, 3, 8, 8)
    result = fxopt.optimize(model, (x,))
    assert int(model.calls) == 0 and isinstance(model.calls, torch.Tensor)  # the user's model is untouched
    assert next(p for p in result.report.passes if p.name == "fold_bn").applied == 1
    before = int(result.calls)
    torch.testing.assert_close(result(x), model(x))
    assert int(result.calls) == before + 1


# -- verification -----------------------------------------------------------------------------------------


class PinsFloat32(nn.Module):
    """Makes a scratch tensor as float32 in its own code (a float64 copy used to raise)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        scratch = torch.zeros(y.shape[1], dtype=torch.float32)
        return torch.cat([y.flatten(1), scratch.expand(y.shape[0], -1)], 1).float().softmax(-1)


def test_the_oracle_runs_models_that_pin_dtypes() -> None:
    model = randomized(PinsFloat32())
    result = fxopt.optimize(model, (torch.randn(2, 3, 8, 8),))
    assert result.report.verification.passed and result.report.verification.exception is None


class ReluIsIdentityWhenPositive(Pattern):
    """Wrong on purpose: relu(x) -> x, which holds on the example (all positive) and nowhere else."""

    anchor = CONV

    def match(self, node: Node, rw) -> Match | None:
        relus = [u for u in node.users if u.target in (torch.relu, F.relu)]
        return Match(relus[0], {"conv": node, "relu": relus[0]}) if len(relus) == 1 else None

    def rewrite(self, match: Match, rw) -> Node:
        return match.nodes["conv"]


def test_optimize_raises_instead_of_returning_an_unverified_model() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        conv.weight.abs_()
        conv.bias.fill_(1.0)
    model = nn.Sequential(conv, _FunctionalRelu()).eval()
    x = torch.rand(2, 3, 4, 4)  # positive: the example cannot tell relu from the identity
    wrong = Pass("relu_is_identity", "wrong on purpose", (ReluIsIdentityWhenPositive(),))
    with pytest.raises(fxopt.VerificationError) as raised:
        fxopt.optimize(model, (x,), passes=[wrong])
    error = raised.value
    assert not error.verification.passed and error.verification.counterexample is not None
    assert error.report.passes[0].applied == 1
    assert "did not return a model for Sequential" in str(error) and "fxopt.bisect" in str(error)


class _FunctionalRelu(nn.Module):
    def forward(self, x):
        return F.relu(x)


def test_fake_quantizer_axis_from_rank_arithmetic_is_canonical() -> None:
    class PerChannel(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.rand(6) + 0.1)
            self.register_buffer("zero_point", torch.zeros(6, dtype=torch.int32))

        def forward(self, h):
            return torch.fake_quantize_per_channel_affine(h, self.scale, self.zero_point, h.dim() - 1, -8, 7)

    x = torch.randn(2, 5, 6)
    gm = canonicalize(fxopt.capture(PerChannel(), (x,)).module, (x,))
    (quantizer,) = [n for n in gm.graph.nodes if FAKE_QUANT_PER_CHANNEL(n)]
    assert quantizer.kwargs["axis"] == 2


def test_an_exported_model_keeps_what_its_code_reads() -> None:
    """timm's EfficientViT needs torch.export (its attention caches a bias per device); the model's
    own forward() still finds ``attn.resolution`` on the attention module."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomized(timm.create_model("efficientvit_m0", pretrained=False))
    x = torch.randn(1, 3, 224, 224)
    result = fxopt.optimize(model, (x,), verify=False)
    assert result.report.frontend == "torch.export", str(result.report)
    assert type(result) is type(model)
    assert result.stages[0].blocks[0].mixer.m.attn.resolution == model.stages[0].blocks[0].mixer.m.attn.resolution
    torch.testing.assert_close(result(x), model(x), rtol=1e-4, atol=1e-4)


class TwoBranches(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.channels = c  # a plain attribute the parent's forward() reads
        self.dense, self.point = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.dense(x) + self.point(x)


class ReadsChildAttribute(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.block = TwoBranches(c)

    def forward(self, x):
        y = self.block(x)
        return y.flatten(2).mean(-1).reshape(-1, self.block.channels)


def test_a_swapped_in_module_keeps_the_attributes_the_model_reads() -> None:
    """The block's computation changed (its branches merged): the merged conv stands in for it and
    carries ``channels``, which the parent's own forward() reads at run time."""
    torch.manual_seed(0)
    model = randomized(ReadsChildAttribute())
    x = torch.randn(2, 4, 8, 8)
    result = fxopt.optimize(model, (x,))
    assert type(result) is ReadsChildAttribute
    assert type(result.block) is nn.Conv2d, str(result.report)
    assert result.block.channels == 4
    torch.testing.assert_close(result(x), model(x))


# -- BatchNorms timm writes where fold_bn alone cannot see them --------------------------------------------


class RepVggDwAfterStem(nn.Module):
    """RepViT's token mixer: ``bn(conv(x) + conv1(x) + x)`` read twice by a squeeze-excite."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.conv1 = nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.bn(self.conv(x) + self.conv1(x) + x)
        return y * y.mean((2, 3), keepdim=True).sigmoid()


def test_a_batch_norm_after_a_merged_sum_folds_into_the_merged_conv() -> None:
    model = randomized(RepVggDwAfterStem())
    x = torch.randn(2, 3, 16, 16)
    result = optimize_to_graph(model, (x,))
    assert convs_and_norms(result, x) == (2, 0), result.code
    torch.testing.assert_close(result(x), model(x))


class LinearNorm(nn.Module):
    """timm's LeViT: a Linear, then BatchNorm1d over its output rows, flattened and reshaped back."""

    def __init__(self, fin: int = 6, fout: int = 5):
        super().__init__()
        self.linear, self.bn = nn.Linear(fin, fout, bias=False), nn.BatchNorm1d(fout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


def test_linear_then_batch_norm_over_flattened_rows_folds() -> None:
    model = randomized(LinearNorm())
    x = torch.randn(2, 7, 6)
    result = optimize_to_graph(model, (x,))
    assert not [n for n in result.graph.nodes if "batch_norm" in str(n.target)], result.code
    other = torch.randn(3, 4, 6)  # another batch and token count
    torch.testing.assert_close(result(other), model(other))


def test_rewrites_of_code_that_casts_to_float32_are_validated() -> None:
    """A constant built with ``.float()`` and a float32 factory (timm's rotary tables): validating
    its fold runs it in float64, where those casts would narrow the oracle back to float32."""

    class PinnedTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.freq = nn.Parameter(torch.rand(4) + 0.5)
            self.phase = nn.Parameter(torch.rand(3))

        def forward(self, x):
            # float64 phase (widened) times float32 freq (the model's own cast): matmul refuses mixed dtypes
            table = self.freq.float()[:, None] @ (self.phase + torch.arange(3, dtype=torch.float32))[None, :]
            return x @ table.sin()

    torch.manual_seed(0)
    model = PinnedTable().eval()
    x = torch.randn(2, 4)
    result = optimize_to_graph(model, (x,), passes=["fold_constants"])
    folds = result.report.passes[0]
    assert folds.applied == 1 and folds.verified == 1 and not folds.rolled_back, str(result.report)
    torch.testing.assert_close(result(x), model(x))


def test_visformer_folds_every_batchnorm_before_a_conv_and_does_not_crash() -> None:
    """timm's Visformer: a BatchNorm before a 1x1 conv whose output shape the attention reads
    (``B, C, H, W = x.shape``) folds, its shape read moved to the BatchNorm's input; a constant
    added to a matmul result that broadcasts is not taken for a bias (merge_lora crashed)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomized(timm.create_model("visformer_tiny", pretrained=False, img_size=64))
    x = torch.randn(2, 3, 64, 64)
    result = fxopt.optimize(model, (x,))  # raises unless the float64-oracle check passes
    assert convs_and_norms(result, x)[1] == 1, str(result.report)  # the last one feeds the pooling
