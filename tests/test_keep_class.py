"""optimize(keep_class=True): the user's own class comes back with the rewritten submodules swapped
in (its other methods and attributes keep working), or the generated module with the reason."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule

import fxopt
from fxopt.runtime import ZeroMeanRMSNorm
from tests.reparam_blocks import conv_bn
from tests.transformer_blocks import TiedLM, ViT


def fingerprint(model: nn.Module) -> tuple[str, dict[str, torch.Tensor], list[int]]:
    """Structure, values and tensor identities: the user's model must come out bit-identical."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    return repr(model), state, [id(t) for t in model.state_dict(keep_vars=True).values()]


def assert_unchanged(model: nn.Module, before: tuple[str, dict[str, torch.Tensor], list[int]]) -> None:
    structure, state, ids = before
    assert repr(model) == structure
    now = model.state_dict(keep_vars=True)
    assert [id(t) for t in now.values()] == ids
    assert all(torch.equal(now[k], v) for k, v in state.items())


def randomized_batch_norms(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3), m.bias.normal_(0, 0.3)
    return model.eval()


def count(model: nn.Module, kind: type, functions: tuple = ()) -> int:
    """Modules of ``kind``, plus calls of ``functions`` inside generated submodules."""
    modules = sum(isinstance(m, kind) for m in model.modules())
    calls = sum(1 for m in model.modules() if isinstance(m, GraphModule)
                for n in m.graph.nodes if n.op == "call_function" and n.target in functions)
    return modules + calls


# ---------------------------------------------------------------------------------------------
# a timm-style model: forward_features, extra attributes and methods


class RepBlock(nn.Module):
    """RepVGG as its paper's code writes it: 3x3 conv-BN + 1x1 conv-BN + BN identity, then ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.dense, self.one, self.identity = conv_bn(c, c, 3, 1, 1), conv_bn(c, c, 1, 1, 0), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dense(x) + self.one(x) + self.identity(x))


class Fuse(nn.Module):
    """Its BatchNorm is a functional call of its own (as timm's BatchNormAct2d): folding it changes
    Fuse's own operations, so a generated module takes its place, called as before (skip=...)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        n = self.norm
        y = F.batch_norm(self.conv(x), n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)
        return torch.sigmoid(y) * skip


class TimmStyle(nn.Module):
    def __init__(self, c: int = 8, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.stages = nn.Sequential(RepBlock(c), RepBlock(c))
        self.fuse = Fuse(c)
        self.head = nn.Linear(c, classes)
        self.num_classes = classes
        self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "input_size": (3, 16, 16)}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.stem(x)
        return self.fuse(self.stages(stem), skip=stem)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def test_timm_style_model_keeps_its_class_methods_and_attributes():
    model = randomized_batch_norms(TimmStyle())
    x = torch.randn(2, 3, 16, 16)
    before = fingerprint(model)
    result = fxopt.optimize(model, (x,), keep_class=True)
    assert_unchanged(model, before)
    assert type(result) is TimmStyle and result.report.verification.passed, str(result.report)
    assert result.num_classes == 5 and result.pretrained_cfg == model.pretrained_cfg
    torch.testing.assert_close(result.forward_features(x), model.forward_features(x), rtol=1e-4, atol=1e-5)
    # optimized: no BatchNorm left, one conv per RepVGG block (a 3x3 and a 1x1 before)
    assert count(result, nn.BatchNorm2d, (F.batch_norm,)) == count(model, nn.BatchNorm2d) - 8  # Fuse's is unused
    assert count(result, nn.Conv2d, (F.conv2d,)) == count(model, nn.Conv2d) - 2
    swapped = dict(result.report.kept_class.swapped)
    assert "generated module" in swapped["stages.0"] and "nn.Identity" in swapped["stem.1"]
    assert "nn.Conv2d(3, 8" in swapped["stem.0"]  # bias=False gained the folded bias: a plain Conv2d
    assert "generated module" in swapped["fuse"]  # called with skip=...: its forward() takes it by name
    assert "kept class: TimmStyle" in str(result.report)


def test_unchanged_model_is_a_copy_and_inplace_shares_its_tensors():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    x = torch.randn(2, 4)
    copied = fxopt.optimize(model, (x,), keep_class=True, verify=False)
    assert type(copied) is nn.Sequential and copied is not model
    assert copied[0].weight.data_ptr() != model[0].weight.data_ptr()
    assert torch.equal(copied[0].weight, model[0].weight) and copied.report.kept_class.swapped == []
    shared = fxopt.optimize(model, (x,), keep_class=True, verify=False, inplace=True)
    assert shared[0].weight is model[0].weight


# ---------------------------------------------------------------------------------------------
# state_dict: loads into the original class when only parameters changed


def test_parameter_only_changes_keep_the_state_dict_loadable_into_a_fresh_instance():
    torch.manual_seed(0)
    model = ViT(layer_scale=False).eval()
    x = torch.randn(2, 3, 8, 8)
    before = fingerprint(model)
    result = fxopt.optimize(model, (x,), passes=["ln_to_rmsnorm"], keep_class=True)
    assert_unchanged(model, before)
    assert type(result) is ViT and result.report.verification.passed, str(result.report)
    # parameters re-centred in place; the LayerNorms became runtime.ZeroMeanRMSNorm, their nn.LayerNorm subclass
    assert all("the same class" in what or "ZeroMeanRMSNorm" in what for _, what in result.report.kept_class.swapped)
    assert {path for path, _ in result.report.kept_class.swapped} >= {"patch", "blocks.0.fc2", "ViT"}
    fresh = ViT(layer_scale=False).eval()
    fresh.load_state_dict(result.state_dict(), strict=True)
    assert torch.equal(fresh(x), result(x))
    assert not torch.equal(result.patch.weight, model.patch.weight)  # re-centred: the pass did change it


def test_swapped_submodules_change_state_dict_keys():
    """A folded BatchNorm becomes nn.Identity (its keys go) and a bias-free conv gains a bias: such a
    state_dict no longer loads strictly into the original class (load it into the result's class)."""
    model = randomized_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(1, 3, 8, 8)
    result = fxopt.optimize(model, (x,), passes=["fold_bn"], keep_class=True)
    assert type(result) is nn.Sequential and isinstance(result[1], nn.Identity)
    assert set(result.state_dict()) == {"0.weight", "0.bias"}
    with pytest.raises(RuntimeError, match="Missing key"):
        randomized_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
                               ).load_state_dict(result.state_dict())


class Positions(nn.Module):
    """BERT's embeddings: position ids sliced from a buffer. The passes fold the position embedding
    to a constant; the kept forward() computes it again, and the embedding stays an nn.Embedding."""

    def __init__(self):
        super().__init__()
        self.tokens, self.pos = nn.Embedding(10, 4), nn.Embedding(8, 4)
        self.register_buffer("position_ids", torch.arange(8).unsqueeze(0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.pos(self.position_ids[:, :5])


def test_a_submodule_folded_to_a_constant_is_recomputed_not_dropped():
    model = Positions().eval()
    ids = torch.randint(0, 10, (2, 5))
    result = fxopt.optimize(model, (ids,), keep_class=True)
    assert result.report.passes[[p.name for p in result.report.passes].index("fold_constants")].applied
    assert type(result) is Positions and isinstance(result.pos, nn.Embedding), str(result.report)
    assert torch.equal(result(ids), model(ids)) and result.report.verification.passed


# ---------------------------------------------------------------------------------------------
# falling back to the generated module, with the reason


class BranchesSummedByTheModel(nn.Module):
    """Two conv-BN submodules summed in the model's own forward(): merging them into one conv crosses
    the submodules' boundaries into the model itself."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3, 1, 1), conv_bn(4, 4, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(x) + self.b(x))


def test_rewrite_across_the_models_own_forward_falls_back_with_the_reason():
    model = randomized_batch_norms(BranchesSummedByTheModel())
    x = torch.randn(1, 4, 6, 6)
    before = fingerprint(model)
    result = fxopt.optimize(model, (x,), keep_class=True)
    assert_unchanged(model, before)
    assert isinstance(result, GraphModule) and result.report.verification.passed
    reason = result.report.kept_class.fallback
    assert "BranchesSummedByTheModel (the model itself)" in reason and "a, b" in reason, reason
    assert "returned a generated module instead of BranchesSummedByTheModel" in str(result.report)


def test_a_failure_while_keeping_the_class_returns_the_generated_module_and_says_so(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(fxopt.driver, "keep_class_of", broken)
    model, x = randomized_batch_norms(conv_bn(3, 4, 3, 1, 1)), torch.randn(1, 3, 6, 6)
    result = fxopt.optimize(model, (x,))
    assert isinstance(result, GraphModule) and result.report.verification.passed
    assert "keeping the class failed (RuntimeError: simulated bug)" in str(result.report)


def test_a_weight_read_through_another_modules_attribute_is_not_untied_behind_its_back():
    """TiedLM's head is F.linear(h, self.embed.weight): giving embed its re-centred weight would change
    what the kept forward() reads for the head, so the generated module is returned."""
    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.randint(0, 50, (2, 6))
    result = fxopt.optimize(model, (ids,), passes=["ln_to_rmsnorm"], keep_class=True)
    assert isinstance(result, GraphModule) and result.report.verification.passed
    assert "embed.weight" in result.report.kept_class.fallback and "tied" in result.report.kept_class.fallback


# ---------------------------------------------------------------------------------------------
# HF transformers: generate() keeps working (tiny random models, no downloads)


def _gpt2(vocab: int = 64):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab, n_positions=32, use_cache=False,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _generate(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, max_new_tokens=4, do_sample=False)


def test_hf_gpt2_with_merged_lora_adapter_still_generates():
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False,
                             fan_in_fan_out=True)
    model = peft.get_peft_model(_gpt2(), config).eval()
    ids = torch.randint(1, 64, (1, 6))
    before = fingerprint(model)
    result = fxopt.optimize(model, (ids,), passes=["merge_lora"], keep_class=True)
    assert_unchanged(model, before)
    assert type(result) is type(model) and result.report.verification.passed, str(result.report)
    assert not any("lora" in name for name, _ in result.named_modules())  # every adapter merged away
    assert torch.equal(_generate(result, ids), _generate(model, ids))
    assert len(result.report.kept_class.swapped) == 4


def test_hf_gpt2_after_ln_to_rmsnorm_still_generates():
    model = _gpt2()
    ids = torch.randint(1, 64, (2, 6))
    before = fingerprint(model)
    result = fxopt.optimize(model, (ids,), passes=["ln_to_rmsnorm"], keep_class=True)
    assert_unchanged(model, before)
    assert type(result) is type(model) and result.report.verification.passed, str(result.report)
    # each LayerNorm now reads a zero-mean stream: runtime.ZeroMeanRMSNorm, still an nn.LayerNorm with the
    # same parameters; every other change is a parameter of a module that keeps its class
    norms = {name for name, m in result.named_modules() if isinstance(m, nn.LayerNorm)}
    assert norms == {name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert all(isinstance(result.get_submodule(name), ZeroMeanRMSNorm) for name in norms)
    assert all("the same class" in what for path, what in result.report.kept_class.swapped if path not in norms)
    assert result.transformer.wte.weight.mean(-1).abs().max() < 1e-6
    assert torch.equal(result.lm_head.weight, model.lm_head.weight)  # the tied head keeps the original
    assert any("tie_weights()" in note for note in result.report.notes)
    assert torch.equal(_generate(result, ids[:1]), _generate(model, ids[:1]))
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(result, backend=keep_graph)(ids)  # compiled, the kept class runs the RMSNorm kernel
    called = [getattr(n.target, "__name__", "") for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert called.count("rms_norm") == len(norms) and "layer_norm" not in called


def test_a_reshape_rebuilt_by_a_merge_stays_in_its_module() -> None:
    from tests.fuzz_models import Act, Chain, Flatten, LoRALinear, Stack

    torch.manual_seed(0)
    model = Stack([Chain(nn.Conv1d(1, 1, 1, bias=False), Act("relu")), Flatten(False),
                   LoRALinear(3, 1, 1, 1.0, False)]).eval()
    x = torch.randn(2, 1, 3)
    result = fxopt.optimize(model, (x,), verify=False, keep_class=True)
    assert fxopt.verify(model, result, (x,)).passed
