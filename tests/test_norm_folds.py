"""fold_norm_affine and fold_repbn: the folds on random instances, a SLAB-like block, GPT-2, and every skip reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings

import fxopt
from fxopt.ops import BATCH_NORM, LAYER_NORM, RMS_NORM
from fxopt.patterns.fold_norm_affine import fold_norm_affine_instances
from fxopt.patterns.fold_repbn import RepBN, TokenBN, UnifiedNorm, fold_repbn_instances, randomize_bn_stats


def optimize(model: nn.Module, inputs: tuple, pass_name: str, **kwargs) -> torch.fx.GraphModule:
    return fxopt.optimize(model, inputs, passes=[pass_name], keep_class=False, **kwargs)  # tests read its graph


def skip_reasons(result: torch.fx.GraphModule) -> list[str]:
    return [reason for p in result.report.passes for _, reason in p.skipped]


def applied(result: torch.fx.GraphModule) -> int:
    return sum(p.applied for p in result.report.passes)


def norms(result: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in result.graph.nodes if LAYER_NORM(n) or RMS_NORM(n)]


def random_affine(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    return norm


# ---------------------------------------------------------------------------------------------
# fold_norm_affine


@settings(max_examples=40, deadline=None)
@given(fold_norm_affine_instances())
def test_norm_affine_folds_and_leaves_a_parameter_free_norm(instance):
    model, inputs = instance
    result = optimize(model, inputs, "fold_norm_affine", verify=False)
    assert applied(result) == 1
    assert all(n.kwargs["weight"] is None and n.kwargs.get("bias") is None for n in norms(result)), result.code
    assert fxopt.verify(model, result, inputs).passed


class NormThen(nn.Module):
    """LayerNorm followed by ``consumers``; their outputs concatenated."""

    def __init__(self, d: int = 8, consumers: int = 3):
        super().__init__()
        self.norm = random_affine(nn.LayerNorm(d))
        self.linears = nn.ModuleList(nn.Linear(d, d) for _ in range(consumers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return torch.cat([linear(h) for linear in self.linears], dim=-1)


def test_every_consumer_linear_gets_its_own_fold_and_no_parameter_is_added():
    torch.manual_seed(0)
    model, x = NormThen().eval(), torch.randn(2, 5, 8)
    result = optimize(model, (x,), "fold_norm_affine")
    stats = result.report.passes[0]
    assert stats.applied == 1 and stats.params_after == stats.params_before - 16  # gamma and beta gone
    assert fxopt.verify(model, result, (x,)).passed


def test_skip_when_a_consumer_is_not_a_linear():
    class NormThenGelu(NormThen):
        def forward(self, x):
            h = self.norm(x)
            return self.linears[0](h) + F.gelu(h)

    result = optimize(NormThenGelu().eval(), (torch.randn(2, 8),), "fold_norm_affine")
    assert applied(result) == 0
    assert any("is read by gelu" in r and "not a Linear" in r for r in skip_reasons(result)), skip_reasons(result)


def test_skip_when_gamma_is_computed_at_run_time():
    class ComputedGamma(NormThen):
        def forward(self, x):
            return self.linears[0](F.layer_norm(x, (8,), self.norm.weight * 2, self.norm.bias))

    result = optimize(ComputedGamma().eval(), (torch.randn(2, 8),), "fold_norm_affine")
    assert applied(result) == 0
    assert any("gamma or beta is computed at run time" in r for r in skip_reasons(result))


def test_skip_when_the_norm_spans_more_than_the_last_dim():
    class TwoDimNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.linear = random_affine(nn.LayerNorm((4, 8))), nn.Linear(8, 3)

        def forward(self, x):
            return self.linear(self.norm(x))

    result = optimize(TwoDimNorm().eval(), (torch.randn(2, 4, 8),), "fold_norm_affine")
    assert applied(result) == 0
    assert any("normalizes the last 2 dims" in r for r in skip_reasons(result))


def test_skip_when_a_consumer_weight_is_tied():
    class Tied(NormThen):
        def __init__(self):
            super().__init__(consumers=2)
            self.linears[1].weight = self.linears[0].weight

    result = optimize(Tied().eval(), (torch.randn(2, 8),), "fold_norm_affine")
    assert applied(result) == 0
    assert any("shared (tied)" in r for r in skip_reasons(result))


def test_skip_when_a_consumer_weight_is_computed_at_run_time():
    class ComputedWeight(NormThen):
        def forward(self, x):
            return F.linear(self.norm(x), self.linears[0].weight * 2)

    result = optimize(ComputedWeight().eval(), (torch.randn(2, 8),), "fold_norm_affine")
    assert any("weight or bias is computed at run time" in r for r in skip_reasons(result))


def test_hf_gpt2_folds_every_block_norm_into_conv1d_and_skips_the_tied_head_norm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, use_cache=False)
    model = transformers.GPT2LMHeadModel(config).eval()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            random_affine(m)
    ids = (torch.randint(0, 64, (2, 8)),)
    result = optimize(model, ids, "fold_norm_affine")
    assert applied(result) == 4  # ln_1 and ln_2 of each block, through view -> addmm (Conv1D)
    bare = [n for n in norms(result) if n.kwargs["weight"] is None]
    assert len(bare) == 4 and len(norms(result)) == 5
    # ln_f also feeds the model's outputs besides the tied lm_head
    assert any("not a Linear reading it as input" in r for r in skip_reasons(result)), skip_reasons(result)
    assert fxopt.verify(model, result, ids).passed


# ---------------------------------------------------------------------------------------------
# fold_repbn


def batch_norms(result: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in result.graph.nodes if BATCH_NORM(n)]


@settings(max_examples=40, deadline=None)
@given(fold_repbn_instances())
def test_repbn_folds_into_the_adjacent_linear(instance):
    model, inputs = instance
    result = optimize(model, inputs, "fold_repbn", verify=False)
    assert applied(result) == 1 and not batch_norms(result), result.code
    assert fxopt.verify(model, result, inputs).passed


class SLABBlock(nn.Module):
    """A SLAB-style transformer block: RepBN in place of both LayerNorms, softmax attention, MLP."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RepBN(d), RepBN(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def test_slab_block_loses_every_batch_norm():
    torch.manual_seed(0)
    model = randomize_bn_stats(nn.Sequential(SLABBlock(), SLABBlock()), 0).eval()
    for m in model.modules():
        if isinstance(m, RepBN):
            nn.init.uniform_(m.alpha, 0.5, 1.5)
    x = (torch.randn(2, 6, 16),)
    result = optimize(model, x, "fold_repbn")
    assert applied(result) == 4 and not batch_norms(result), result.code
    assert fxopt.verify(model, result, x).passed


def test_skip_in_training_mode():
    model = nn.Sequential(nn.Linear(4, 4), RepBN(4)).train()
    result = optimize(model, (torch.randn(2, 3, 4),), "fold_repbn")
    assert applied(result) == 0
    assert any("training mode" in r and "model.eval()" in r for r in skip_reasons(result))


class ResidualAroundBN(nn.Module):
    """h + TokenBN(h) with h = Linear(x): folding into the Linear gives h back only by dividing by the scale."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.linear, self.norm = nn.Linear(d, d), randomize_bn_stats(TokenBN(d, "none"), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        return h + self.norm(h)


def test_residual_reader_gets_the_linear_output_back_by_division():
    model, x = ResidualAroundBN().eval(), (torch.randn(2, 3, 4),)
    result = optimize(model, x, "fold_repbn")
    assert applied(result) == 1 and not batch_norms(result)
    assert fxopt.verify(model, result, x).passed


def test_division_by_a_zero_scale_is_refused():
    model = ResidualAroundBN().eval()
    with torch.no_grad():
        model.norm.bn.weight[1] = 0.0  # no alpha: a = gamma / sqrt(var + eps) is zero on channel 1
    result = optimize(model, (torch.randn(2, 3, 4),), "fold_repbn")
    assert applied(result) == 0
    assert any("scale is zero at channel(s) [1]" in r for r in skip_reasons(result)), skip_reasons(result)


def test_skip_when_no_linear_is_adjacent():
    model = randomize_bn_stats(nn.Sequential(nn.GELU(), RepBN(4), nn.GELU()), 0).eval()
    result = optimize(model, (torch.randn(2, 3, 4),), "fold_repbn")
    assert applied(result) == 0
    assert any("not a Linear" in r and "its input" in r for r in skip_reasons(result)), skip_reasons(result)


def test_skip_when_alpha_is_not_per_channel():
    class PerTokenAlpha(TokenBN):
        def __init__(self):
            super().__init__(4, "none")
            self.alpha = nn.Parameter(torch.randn(3, 1))  # broadcasts over tokens, not channels

        def forward(self, x):
            return self.bn(x.transpose(1, 2)).transpose(1, 2) + self.alpha * x

    model = randomize_bn_stats(nn.Sequential(PerTokenAlpha(), nn.Linear(4, 2)), 0).eval()
    result = optimize(model, (torch.randn(2, 3, 4),), "fold_repbn")
    assert applied(result) == 0
    assert any("neither a scalar nor per-channel" in r for r in skip_reasons(result)), skip_reasons(result)


# ---------------------------------------------------------------------------------------------
# fold_repbn: Unified Normalization (Yang et al., CVPR 2022) at inference


class UN1d(nn.Module):
    """Unified Normalization written as UN implementations often write it: statistics smoothed over
    a window of iterations in training, fixed at inference, spelled with rsqrt and gamma first."""

    def __init__(self, d: int, eps: float = 1e-6, window: int = 4):
        super().__init__()
        self.eps, self.window = eps, window
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.register_buffer("running_mean", torch.zeros(d))
        self.register_buffer("running_var", torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var = x.mean((0, 1)), x.var((0, 1), unbiased=False)
            with torch.no_grad():  # a geometric-style running update
                self.running_mean.mul_(1 - 1 / self.window).add_(mean / self.window)
                self.running_var.mul_(1 - 1 / self.window).add_(var / self.window)
        else:
            mean, var = self.running_mean, self.running_var
        return self.weight * (x - mean) * torch.rsqrt(var + self.eps) + self.bias


def random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (UN1d, UnifiedNorm)):
            with torch.no_grad():
                n = m.weight.numel()
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.1)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model


class UNBlock(nn.Module):
    """A transformer block with UN in place of both LayerNorms; ``shape_check`` adds Python control
    flow on a shape, which symbolic_trace cannot follow (so capture falls back to torch.export)."""

    def __init__(self, d: int = 16, heads: int = 2, shape_check: bool = False):
        super().__init__()
        self.heads, self.shape_check = heads, shape_check
        self.norm1, self.norm2 = UN1d(d), UN1d(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape_check and x.dim() != 3:
            raise ValueError("expected (batch, tokens, features)")
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


@pytest.mark.parametrize("shape_check", [False, True], ids=["symbolic_trace", "torch.export"])
def test_unified_norm_block_folds_every_norm(shape_check):
    torch.manual_seed(0)
    model = random_statistics(nn.Sequential(UNBlock(shape_check=shape_check), UNBlock())).eval()
    x = (torch.randn(2, 6, 16),)
    result = optimize(model, x, "fold_repbn")
    assert result.report.frontend == ("torch.export" if shape_check else "torch.fx.symbolic_trace")
    assert applied(result) == 4, str(result.report)
    assert not any("running_mean" in name or "running_var" in name for name in result.state_dict())
    assert fxopt.verify(model, result, x).passed


def test_unified_norm_with_a_zero_divisor_is_refused():
    model = random_statistics(nn.Sequential(UN1d(4, eps=0.0), nn.Linear(4, 2))).eval()
    with torch.no_grad():
        model[0].running_var[2] = 0.0  # rsqrt(0 + 0) = inf
    result = optimize(model, (torch.randn(2, 3, 4),), "fold_repbn")
    assert applied(result) == 0
    assert any("not finite at feature(s) [2]" in r for r in skip_reasons(result)), skip_reasons(result)


def test_unified_norm_with_a_zero_scale_keeps_the_residual_reader():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.norm = nn.Linear(4, 4), UnifiedNorm(4)

        def forward(self, x):
            h = self.linear(x)
            return h + self.norm(h)

    model = random_statistics(Residual()).eval()
    with torch.no_grad():
        model.norm.weight[1] = 0.0
    result = optimize(model, (torch.randn(2, 3, 4),), "fold_repbn")
    assert applied(result) == 0
    assert any("scale is zero at channel(s) [1]" in r for r in skip_reasons(result)), skip_reasons(result)
    with torch.no_grad():
        model.norm.weight[1] = 0.5  # h comes back as (y - c) / a
    result = optimize(model, (torch.randn(2, 3, 4),), "fold_repbn")
    assert applied(result) == 1 and fxopt.verify(model, result, (torch.randn(2, 3, 4),)).passed


def test_unified_norm_in_training_mode_and_image_normalization_are_left_alone():
    class Normalized(nn.Module):  # per-channel image normalization before a conv: not token features
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.rand(3, 1, 1))
            self.register_buffer("std", torch.rand(3, 1, 1) + 0.5)
            self.conv, self.linear = nn.Conv2d(3, 4, 1), nn.Linear(5, 2)

        def forward(self, x):
            return self.linear(self.conv((x - self.mean) / self.std))

    for model, x in ((nn.Sequential(UN1d(4), nn.Linear(4, 2)).train(), torch.randn(2, 3, 4)),
                     (Normalized().eval(), torch.randn(2, 3, 5, 5))):
        result = optimize(model, (x,), "fold_repbn", verify=False)
        assert applied(result) == 0 and not skip_reasons(result), str(result.report)
