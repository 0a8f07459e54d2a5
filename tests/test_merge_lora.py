"""merge_lora: hand-written adapters (LoRA spellings, DoRA, NOLA, KronA, tied weights), real PEFT models (LoRA,
rsLoRA, DoRA, lora_bias, several adapters, LoHa, LoKr, VeRA, conv LoRA) and every Skip reason."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import fxopt
from fxopt.patterns.merge_lora import KronLinear, LoraConv, LoraLinear, merge_lora_instances
from tests.generated import optimize_to_graph
from tests.lora_models import (
    AxesAffineAdapter, LeakyAdapter, NolaLinear, PromotingAdapter, RandomScaleAdapter, ResidualAdapter,
    RowMixingAdapter, SmallCNN, TiedAdapters, TiedLayers,
)

_LAYER_TARGETS = {F.linear, torch._C._nn.linear, torch.addmm, torch.ops.aten.addmm.default, torch.matmul,
                  F.conv1d, F.conv2d, F.conv3d, torch.conv2d}


def layer_count(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in _LAYER_TARGETS)


def merge(model: nn.Module, inputs: tuple, verify: bool = True) -> tuple[torch.fx.GraphModule, fxopt.PassReport]:
    result = optimize_to_graph(model, inputs, passes=["remove_noops", "merge_lora"], verify=verify)
    return result, result.report.passes[-1]


def randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for p in model.parameters():  # LoRA's B starts at zero: make every branch matter
        nn.init.normal_(p, std=0.5)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# hand-written adapters


@pytest.mark.parametrize("spelling", ["scale_last", "scale_first", "scale_between", "scale_tensor", "branch_first"])
@pytest.mark.parametrize("variant", ["plain", "lora_bias", "dora", "fan_in_fan_out", "fan_in_fan_out_dora", "no_bias"])
def test_handwritten_adapters_merge(spelling: str, variant: str) -> None:
    options = {"lora_bias": variant == "lora_bias", "dora": "dora" in variant,
               "fan_in_fan_out": "fan_in_fan_out" in variant, "bias": variant != "no_bias"}
    model = randomized(LoraLinear(6, 5, [2, 3], spelling, **options))
    x = torch.randn(2, 3, 6)
    result, report = merge(model, (x,), verify=False)
    assert report.applied == 1 and not report.skipped and not report.rolled_back
    assert layer_count(result) == 1
    torch.testing.assert_close(result(x), model(x), rtol=1e-5, atol=1e-5)


def test_dora_merges_without_remove_noops_first() -> None:
    # check_pass's minimal instance: DoRA's weight norm runs the branch on an identity matrix through the
    # layer's eval-mode dropout, which fold_constants counts as random; merge_lora alone must see through it
    model = randomized(LoraLinear(2, 2, [1], "scale_last", bias=False, dora=True))
    x = torch.randn(1, 2)
    result = optimize_to_graph(model, (x,), passes=["merge_lora"])
    report = result.report.passes[-1]
    assert report.applied == 1 and not report.skipped and not report.rolled_back
    assert layer_count(result) == 1
    assert report.params_after == 4  # the merged 2x2 weight only: DoRA's ``base - 0.0`` adds no zero bias
    assert result.report.verification.passed


@pytest.mark.parametrize(
    "build",
    [NolaLinear, *(lambda s=spelling: KronLinear(2, 3, 2, 2, s) for spelling in ("kron", "factored", "transposed")),
     AxesAffineAdapter],
    ids=["nola", "krona_kron", "krona_factored", "krona_transposed", "two_axes_bias_scale_shift"],
)
def test_adapters_built_from_bases_and_kronecker_factors_merge(build) -> None:
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 5, model.base.in_features)
    result = optimize_to_graph(model, (x,), passes=["merge_lora"])
    report = result.report.passes[-1]
    assert report.applied == 1 and not report.skipped and layer_count(result) == 1
    assert result.report.verification.passed


def test_branch_that_moves_rows_is_not_merged() -> None:
    # merged without per-rewrite validation, so a wrong merge would stay: the whole model is checked after
    model = randomized(RowMixingAdapter())
    x = torch.randn(3, 3, 6)
    result, report = merge(model, (x,), verify=False)
    assert report.applied == 0 and layer_count(result) == 3
    assert fxopt.verify(model, result, (x,)).passed


def test_residual_term_is_kept_and_the_rest_merges() -> None:
    model = randomized(ResidualAdapter())
    x = torch.randn(4, 6)
    result, report = merge(model, (x,))
    assert report.applied == 1 and layer_count(result) == 1
    assert result.report.verification.passed


def test_conv_lora_merges_with_stride_padding_dilation() -> None:
    model = randomized(LoraConv(4, 6, 2, kernel=3, stride=2, padding=1, dilation=2, groups=1))
    x = torch.randn(1, 4, 9, 9)
    result, report = merge(model, (x,))
    assert report.applied == 1 and layer_count(result) == 1
    assert result.report.verification.passed


def test_grouped_conv_with_grouped_adapter_merges() -> None:
    model = LoraConv(4, 6, 2, kernel=3, stride=1, padding=1, dilation=1, groups=2, b_groups=2)
    model.lora_A = nn.Conv2d(4, 2, 3, padding=1, groups=2, bias=False)  # block-diagonal delta
    model = randomized(model)
    x = torch.randn(1, 4, 6, 6)
    result, report = merge(model, (x,))
    assert report.applied == 1 and layer_count(result) == 1
    assert result.report.verification.passed


@settings(max_examples=12, deadline=None)
@given(merge_lora_instances())
def test_property_instances_merge_and_agree(instance) -> None:
    model, inputs = instance
    result, report = merge(model, inputs, verify=False)
    assert report.applied == 1 and not report.rolled_back, report.skipped
    assert layer_count(result) == 1
    assert fxopt.verify(model, result, inputs).passed


# ---------------------------------------------------------------------------------------------
# every Skip reason


def _skip_reasons(model: nn.Module, x: torch.Tensor) -> str:
    result, report = merge(randomized(model), (x,))
    assert report.applied == 0
    assert result.report.verification.passed
    return " ".join(reason for _, reason in report.skipped)


def test_tied_weight_with_the_same_delta_everywhere_merges_once_and_stays_tied() -> None:
    model = randomized(TiedLayers(same_delta=True))
    x = torch.randn(3, 6)
    result, report = merge(model, (x,))
    assert report.applied == 1 and not report.skipped and layer_count(result) == 2  # both sums in one rewrite
    weights = {n.kwargs["weight"].target for n in result.graph.nodes if n.target in _LAYER_TARGETS}
    assert len(weights) == 1  # one merged weight, read by both layers
    assert report.params_after == 36 + 2 * 6  # the tied 6x6 weight once, and each layer's own bias
    assert result.report.verification.passed


def test_skip_tied_weight_one_user_without_adapter() -> None:
    assert "that does not see the same adapter" in _skip_reasons(TiedAdapters(), torch.randn(3, 6))


def test_skip_tied_weight_with_different_deltas() -> None:
    assert "their adapters differ" in _skip_reasons(TiedLayers(same_delta=False), torch.randn(3, 6))


def test_skip_adapter_value_used_elsewhere() -> None:
    assert "also read outside" in _skip_reasons(LeakyAdapter(), torch.randn(3, 6))


def test_skip_dtype_promotion() -> None:
    assert "base weight is torch.float32" in _skip_reasons(PromotingAdapter(), torch.randn(3, 6))


def test_skip_scale_drawn_at_random() -> None:
    # the model's own output is random: nothing to verify against, only that nothing merged and why
    model = randomized(RandomScaleAdapter())
    nn.init.constant_(model.keep, 0.5)
    result, report = merge(model, (torch.randn(3, 6),), verify=False)
    assert report.applied == 0 and layer_count(result) == 3
    assert "cannot be evaluated once" in " ".join(reason for _, reason in report.skipped)


def test_skip_grouped_conv_adapter_mixing_groups() -> None:
    # PEFT's layout: A dense over all input channels, B grouped like the base
    model = LoraConv(4, 6, 2, kernel=3, stride=1, padding=1, dilation=1, groups=2, b_groups=2)
    assert "mixes channel groups" in _skip_reasons(model, torch.randn(1, 4, 6, 6))


def test_skip_adapter_window_differs_from_base() -> None:
    # PEFT's conv LoRA gives A the base's kernel, stride and padding but not its dilation
    model = LoraConv(4, 6, 2, kernel=3, stride=1, padding=2, dilation=2, groups=1)
    model.lora_A = nn.Conv2d(4, 2, 3, padding=1, bias=False)  # same output size, another window
    assert "conv window" in _skip_reasons(model, torch.randn(1, 4, 7, 7))


# ---------------------------------------------------------------------------------------------
# real PEFT models


def _peft():
    pytest.importorskip("transformers")
    return pytest.importorskip("peft")


def _tiny(arch: str) -> tuple[nn.Module, list[str], dict]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, use_cache=False,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config), ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True}
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=100, use_cache=False)
    return LlamaForCausalLM(config), ["q_proj", "v_proj", "o_proj", "up_proj"], {}


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0] if isinstance(output, (tuple, list)) else output


def _assert_merged_like_peft(model: nn.Module, result: torch.fx.GraphModule, ids: torch.Tensor, base_layers: int) -> None:
    """All 8 adapters merged, the base model's layer count, verified, and the logits of PEFT's own merge."""
    report = result.report.passes[-1]
    assert report.applied == 8 and not report.skipped and not report.rolled_back
    assert layer_count(result) == base_layers
    assert result.report.verification.passed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(_logits(result(ids)), merged(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "arch, variant",
    [("gpt2", "lora"), ("gpt2", "rslora"), ("gpt2", "dora"), ("llama", "lora"), ("llama", "dora")],
)
def test_peft_transformer(arch: str, variant: str) -> None:
    peft = _peft()
    base, targets, extra = _tiny(arch)
    ids = torch.randint(0, 100, (1, 8))
    base_layers = layer_count(optimize_to_graph(copy.deepcopy(base).eval(), (ids,), passes=[], verify=False))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, lora_dropout=0.1,
                             use_rslora=variant == "rslora", use_dora=variant == "dora", **extra)
    model = peft.get_peft_model(base, config).eval()
    _assert_merged_like_peft(model, merge(model, (ids,))[0], ids, base_layers)


def test_peft_gpt2_inplace_merge_writes_into_the_models_own_storage() -> None:
    """inplace=True: every merged weight reuses a freed weight's memory, though the merge stores
    GPT-2's Conv1D weight transposed (as a Linear's): no second copy of the adapted layers."""
    peft = _peft()
    base, targets, extra = _tiny("gpt2")
    ids = torch.randint(0, 100, (1, 8))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **extra)
    model = peft.get_peft_model(base, config).eval()
    reference = copy.deepcopy(model)
    storages = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    result = fxopt.optimize(model, (ids,), passes=["merge_lora"], inplace=True)
    merged = [t for name, t in result.state_dict().items() if name.endswith(("c_attn.weight", "c_fc.weight"))]
    assert len(merged) == 4 and all(t.untyped_storage().data_ptr() in storages for t in merged)
    assert "storage" in str(result.report)
    torch.testing.assert_close(_logits(result(ids)), reference(ids).logits, rtol=1e-4, atol=1e-5)


def _weight_built_config(peft, variant: str, targets: list[str], extra: dict):
    """LoHa, LoKr and VeRA build their delta weight in forward from small factors (VeRA: from frozen random
    bases shared by every layer): merge_lora evaluates that weight-only subgraph."""
    if variant == "loha":
        return peft.LoHaConfig(r=4, alpha=8, target_modules=targets, init_weights=False, rank_dropout=0.1,
                               module_dropout=0.1)
    if variant == "lokr":
        return peft.LoKrConfig(r=4, alpha=8, target_modules=targets, init_weights=False, decompose_both=True)
    return peft.VeraConfig(r=4, target_modules=targets, init_weights=False, vera_dropout=0.1, **extra)


@pytest.mark.parametrize(
    "arch, variant",  # PEFT's LoHa and LoKr do not adapt GPT-2's Conv1D
    [("llama", "loha"), ("llama", "lokr"), ("llama", "vera"), ("gpt2", "vera")],
)
def test_peft_weight_built_adapters(arch: str, variant: str) -> None:
    peft = _peft()
    base, targets, extra = _tiny(arch)
    ids = torch.randint(0, 100, (1, 8))
    base_layers = layer_count(optimize_to_graph(copy.deepcopy(base).eval(), (ids,), passes=[], verify=False))
    model = peft.get_peft_model(base, _weight_built_config(peft, variant, targets, extra)).eval()
    with torch.no_grad():  # PEFT starts some factors at zero (VeRA's lambda_b): make every adapter matter
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
        with model.disable_adapter():
            base_logits = model(ids).logits
        assert not torch.allclose(model(ids).logits, base_logits, rtol=1e-3, atol=1e-3)
    _assert_merged_like_peft(model, optimize_to_graph(model, (ids,), passes=["merge_lora"]), ids, base_layers)


def test_peft_adapter_on_tied_lm_head_is_skipped() -> None:
    # GPT-2's lm_head reads the embedding's weight; the embedding sees no adapter, so merging would change it
    # too (PEFT's merge_and_unload does, and the logits move by several units)
    peft = _peft()
    base, _, _ = _tiny("gpt2")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"], init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()
    result, report = merge(model, (torch.randint(0, 100, (1, 8)),))
    assert report.applied == 0
    assert "that does not see the same adapter" in " ".join(reason for _, reason in report.skipped)
    assert result.report.verification.passed


def test_peft_several_adapters_and_lora_bias_merge_together() -> None:
    peft = _peft()
    base, targets, extra = _tiny("gpt2")
    ids = torch.randint(0, 100, (1, 8))
    base_layers = layer_count(optimize_to_graph(copy.deepcopy(base).eval(), (ids,), passes=[], verify=False))
    first = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **extra)
    second = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False, lora_bias=True,
                             use_rslora=True, **extra)
    model = peft.get_peft_model(base, first)
    model.add_adapter("second", second)
    model.base_model.set_adapter(["default", "second"])
    model.eval()
    result, report = merge(model, (ids,))
    assert report.applied == 8 and layer_count(result) == base_layers  # one merge per layer: both adapters at once
    assert result.report.verification.passed


def test_peft_conv_lora() -> None:
    peft = _peft()
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "conv3"], init_lora_weights=False)
    model = peft.get_peft_model(SmallCNN(), config).eval()
    x = torch.randn(2, 3, 8, 8)
    result, report = merge(model, (x,))
    assert report.applied == 3 and layer_count(result) == 3
    assert result.report.verification.passed
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(result(x), merged(x), rtol=1e-4, atol=1e-5)
