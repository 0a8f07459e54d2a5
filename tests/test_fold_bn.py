"""fold_bn: every fold variant over random shapes and dtypes, and every skip rule with its reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings

import fxopt
from fxopt.patterns.fold_bn import FunctionalBN, fold_bn_instances
from tests.generated import optimize_to_graph


def batch_norms(module: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in module.graph.nodes if n.target is F.batch_norm or n.op == "call_module"
            and isinstance(module.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]


def randomize_bn(model: nn.Module, *, var_scale: float = 1.0) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * var_scale + 0.1 * var_scale)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def fold(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.fx.GraphModule:
    return optimize_to_graph(model, (x,), passes=["fold_bn"], **kwargs)


def skip_reasons(result: torch.fx.GraphModule) -> list[str]:
    return [reason for p in result.report.passes for _, reason in p.skipped]


@settings(max_examples=200)
@given(fold_bn_instances())
def test_every_fold_variant_is_exact_and_fires(instance):
    model, inputs = instance
    result = optimize_to_graph(model, inputs, passes=["fold_bn"], verify=False)
    assert not batch_norms(result), result.code
    verdict = fxopt.verify(model, result, inputs)
    assert verdict.passed, str(verdict)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_conv_transpose_groups_scale_dim_one_per_group(rank, groups):
    convt = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][rank - 1](4, 8, 3, stride=2, groups=groups)
    bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][rank - 1](8)
    model = randomize_bn(nn.Sequential(convt, bn)).eval()
    x = torch.randn(2, 4, *([5] * rank))
    result = fold(model, x)
    assert not batch_norms(result)
    assert result.report.verification.passed


def test_bf16_folds_in_float64_and_stays_within_the_oracle_rule():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), var_scale=1e-4).eval()
    model = model.to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    result = fold(model, x)
    assert not batch_norms(result)
    assert result.report.verification.passed, str(result.report.verification)
    assert result.get_parameter("0.weight").dtype == torch.bfloat16


def test_functional_batch_norm_is_folded_like_the_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FunctionalBN(randomize_bn(nn.BatchNorm2d(4)))).eval()
    result = fold(model, torch.randn(1, 3, 6, 6))
    assert not batch_norms(result) and result.report.verification.passed


def test_parameters_keep_their_names_and_the_fold_adds_a_bias():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).eval()
    result = fold(model, torch.randn(1, 3, 6, 6))
    assert sorted(result.state_dict()) == ["0.bias", "0.weight"]


def test_optimize_leaves_the_users_model_bit_identical():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.2))).eval()
    before = copy.deepcopy(model.state_dict())
    optimize_to_graph(model, (torch.randn(1, 3, 6, 6),))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_inplace_writes_folded_weights_into_the_models_own_storage():
    """inplace=True: no second copy of the weights (the fold reuses the conv weight's memory)."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))).eval()
    reference = copy.deepcopy(model)
    storages = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    x = torch.randn(2, 3, 9, 9)
    result = optimize_to_graph(model, (x,), passes=["fold_bn"], inplace=True)
    weights = [t for name, t in result.state_dict().items() if name.endswith("weight")]
    assert len(weights) == 2 and all(w.untyped_storage().data_ptr() in storages for w in weights)
    assert not torch.equal(model[0].weight, reference[0].weight)  # consumed, as documented
    assert result.report.verification is None and "inplace=True" in str(result.report)
    assert fxopt.verify(reference, result, (x,)).passed


def test_inplace_leaves_a_tied_weight_alone():
    """A tensor still read under another name must not be overwritten."""
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = randomize_bn(nn.Sequential(conv, nn.BatchNorm2d(4), conv)).eval()
    reference = copy.deepcopy(model)
    x = torch.randn(1, 4, 6, 6)
    result = optimize_to_graph(model, (x,), passes=["fold_bn"], inplace=True)
    assert torch.equal(model[0].weight, reference[0].weight)
    assert fxopt.verify(reference, result, (x,)).passed


# --- skip rules: each skips with its reason and the output stays right -------------------------------


def assert_skipped(model: nn.Module, x: torch.Tensor, reason: str) -> None:
    result = fold(model, x)
    assert any(reason in r for r in skip_reasons(result)), skip_reasons(result)
    assert batch_norms(result) or any(n.target is F.batch_norm for n in result.graph.nodes)
    model_out = model(x)
    assert torch.allclose(result(x), model_out, rtol=1e-5, atol=1e-6)


def test_training_mode_is_skipped():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert_skipped(model, torch.randn(4, 3, 6, 6), "training mode")


def test_track_running_stats_false_is_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert_skipped(model, torch.randn(4, 3, 6, 6), "track_running_stats=False")


def test_conv_output_with_two_users_is_skipped():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4))

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert_skipped(TwoUsers().eval(), torch.randn(1, 3, 6, 6), "conv output has 2 users")


def test_linear_then_batchnorm1d_on_3d_input_is_skipped_even_when_sizes_coincide():
    # (N, C, L) with C == L == out_features: a careless fold would run and be silently wrong
    model = randomize_bn(nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5))).eval()
    assert_skipped(model, torch.randn(2, 5, 5), "3-D input")


def test_linear_then_batchnorm1d_on_2d_input_folds():
    model = randomize_bn(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))).eval()
    result = fold(model, torch.randn(3, 6))
    assert not batch_norms(result) and result.report.verification.passed


def test_batchnorm_before_zero_padded_conv_is_skipped():
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))).eval()
    assert_skipped(model, torch.randn(1, 3, 6, 6), "zero-pads the BatchNorm output")


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_batchnorm_before_conv_with_nonzero_padding_mode_folds(mode):
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode=mode)))
    result = fold(model.eval(), torch.randn(1, 4, 6, 6))
    assert not batch_norms(result) and result.report.verification.passed


def test_batchnorm_before_transposed_conv_is_skipped():
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3, stride=2))).eval()
    assert_skipped(model, torch.randn(1, 3, 5, 5), "transposed conv")


def test_batchnorm1d_on_3d_input_before_linear_is_skipped():
    model = randomize_bn(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4))).eval()
    assert_skipped(model, torch.randn(2, 4, 4), "channel axis is not the Linear's input axis")


def test_shared_conv_weight_is_not_untied():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn1, self.bn2 = randomize_bn(nn.BatchNorm2d(3)), randomize_bn(nn.BatchNorm2d(3))

        def forward(self, x):
            return self.bn2(self.conv(self.bn1(self.conv(x)).relu()))

    assert_skipped(Shared().eval(), torch.randn(1, 3, 6, 6), "shared with another layer")


def test_zero_running_variance_with_zero_eps_gives_the_same_infinities():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, eps=0.0)).eval()
    with torch.no_grad():
        model[1].running_var.zero_()
    x = torch.randn(1, 2, 3, 3)
    result = fold(model, x, verify=False)
    assert not batch_norms(result)
    expected, got = model(x), result(x)
    assert torch.equal(torch.isfinite(expected), torch.isfinite(got))


def test_remove_noops_drops_eval_dropout_and_identity_but_not_training_dropout():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Identity()).eval()
    result = optimize_to_graph(model, (torch.randn(2, 4),), passes=["remove_noops"])
    assert [n.op for n in result.graph.nodes].count("call_function") == 1
    training = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    result = optimize_to_graph(training, (torch.randn(2, 4),), passes=["remove_noops"], verify=False)
    assert any("training mode" in r for r in skip_reasons(result))
