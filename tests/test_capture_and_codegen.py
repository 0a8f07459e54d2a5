"""Capture frontends, one pattern for every spelling, codegen, save/load, and the public API's errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.examples import randomize_batch_norms
from tests.generated import optimize_to_graph


def conv_bn(x_channels: int = 3) -> nn.Module:
    return randomize_batch_norms(nn.Sequential(nn.Conv2d(x_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))


class FunctionalSpelling(nn.Module):
    """F.conv2d + F.batch_norm on the module's own tensors, keyword and positional arguments mixed."""

    def __init__(self):
        super().__init__()
        self.inner = conv_bn().eval()

    def forward(self, x):
        conv, bn = self.inner[0], self.inner[1]
        y = F.conv2d(x, conv.weight, bias=conv.bias, padding=1)
        y = F.batch_norm(y, bn.running_mean, bn.running_var, weight=bn.weight, bias=bn.bias, eps=bn.eps)
        return torch.relu(y)


class TorchSpelling(FunctionalSpelling):
    def forward(self, x):
        conv, bn = self.inner[0], self.inner[1]
        y = torch.conv2d(x, conv.weight, conv.bias, 1, 1)
        y = torch.batch_norm(y, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.1, bn.eps, True)
        return y.relu()


class NotTraceable(nn.Module):
    """Shape-dependent control flow: symbolic_trace fails, torch.export specialises it to the example."""

    def __init__(self):
        super().__init__()
        self.body = conv_bn().eval()

    def forward(self, x):
        if x.shape[0] > 1:  # symbolic_trace cannot branch on a Proxy
            return self.body(x)
        return self.body(-x)


@pytest.mark.parametrize("model_cls", [FunctionalSpelling, TorchSpelling])
def test_every_spelling_is_folded(model_cls):
    model, x = model_cls().eval(), torch.randn(2, 3, 6, 6)
    result = optimize_to_graph(model, (x,), passes=["fold_bn"])
    assert result.report.passes[0].applied == 1
    assert result.report.verification.passed


def test_exported_graph_aten_spelling_is_folded():
    model, x = NotTraceable().eval(), torch.ones(1, 3, 6, 6)
    result = optimize_to_graph(model, (x,), passes=["fold_bn"])
    assert result.report.frontend == "torch.export"
    assert result.report.passes[0].applied == 1
    assert torch.allclose(result(x), model(x), atol=1e-5)
    assert "symbolic_trace failed" in str(result.report)


def test_capture_error_quotes_both_frontends_and_says_what_to_do():
    class Hopeless(nn.Module):
        def forward(self, x):
            return torch.randn(int(x.sum().item()) % 3 + 1) if x.numel() > 1 else x.tolist()

    with pytest.raises(fxopt.CaptureError) as error:
        optimize_to_graph(Hopeless(), (torch.ones(2),))
    text = str(error.value)
    assert "symbolic_trace" in text and "torch.export" in text and "leaf_modules" in text


def test_unknown_pass_and_bad_example_inputs_are_explained():
    with pytest.raises(fxopt.UnknownPassError, match="fold_bn"):
        optimize_to_graph(conv_bn().eval(), (torch.randn(1, 3, 4, 4),), passes=["fold_bnn"])
    with pytest.raises(fxopt.InputError, match="tuple"):
        optimize_to_graph(conv_bn().eval(), torch.randn(1, 3, 4, 4))


def test_report_table_lists_each_pass_with_counts_and_skip_reasons():
    model = conv_bn()  # training mode: fold_bn skips with its reason
    result = optimize_to_graph(model, (torch.randn(2, 3, 4, 4),), passes=["fold_bn"], verify=False)
    text = str(result.report)
    assert "fold_bn" in text and "training mode" in text and "symbolic_trace" in text


def test_list_passes_describes_each_pass():
    passes = fxopt.list_passes()
    assert {"fold_bn", "remove_noops"} <= passes.keys()
    assert all(isinstance(d, str) and d for d in passes.values())


def test_result_works_with_torch_compile_and_export():
    model, x = conv_bn().eval(), torch.randn(1, 3, 8, 8)
    result = optimize_to_graph(model, (x,))
    exported = torch.export.export(result, (x,))
    assert torch.allclose(exported.module()(x), result(x))
    compiled = torch.compile(result, backend="eager")
    assert torch.allclose(compiled(x), result(x))


def test_generated_code_is_readable_and_keeps_parameter_names():
    result = optimize_to_graph(conv_bn().eval(), (torch.randn(1, 3, 8, 8),))
    assert "conv2d" in result.code and "batch_norm" not in result.code
    assert sorted(result.state_dict()) == ["0.bias", "0.weight"]


def _pre_ln_vit() -> tuple[torch.nn.Module, torch.Tensor, list[str]]:
    from tests.transformer_blocks import ViT

    return ViT(depth=1).eval(), torch.randn(1, 3, 8, 8), ["ln_to_rmsnorm"]  # calls fxopt.runtime


@pytest.mark.parametrize("build", [lambda: (conv_bn().eval(), torch.randn(1, 3, 8, 8), None), _pre_ln_vit])
def test_save_load_round_trip_and_fresh_process_with_torch_only(tmp_path, build):
    model, x, passes = build()
    result = optimize_to_graph(model, (x,), passes=passes)
    fxopt.save(result, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["module.py", "weights.safetensors"]
    assert torch.equal(fxopt.load(tmp_path)(x), result(x))
    torch.save(x, tmp_path / "x.pt")
    torch.save(result(x), tmp_path / "y.pt")
    script = textwrap.dedent(
        f"""
        import importlib.util, sys, torch
        sys.modules["fxopt"] = None; sys.modules["safetensors"] = None  # only torch may be used
        torch.set_num_threads({torch.get_num_threads()})  # the same bits need the same reduction splits
        spec = importlib.util.spec_from_file_location("saved", r"{tmp_path}/module.py")
        saved = importlib.util.module_from_spec(spec); spec.loader.exec_module(saved)
        model = saved.load(r"{tmp_path}")
        x, y = torch.load(r"{tmp_path}/x.pt"), torch.load(r"{tmp_path}/y.pt")
        assert torch.equal(model(x), y)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_load_refuses_weights_that_do_not_match_the_module(tmp_path):
    from safetensors.torch import save_file

    fxopt.save(optimize_to_graph(conv_bn().eval(), (torch.randn(1, 3, 8, 8),)), tmp_path)
    save_file({"0.weight": torch.zeros(4, 3, 3, 3), "0.bias": torch.zeros(5)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(fxopt.SaveError, match="does not match"):
        fxopt.load(tmp_path)


def test_hf_models_are_captured_with_export_when_symbolic_trace_fails():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, use_cache=False)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (1, 6))
    result = optimize_to_graph(model, (ids,))
    assert result.report.frontend == "torch.export"
    assert result.report.verification.passed
    assert torch.allclose(result(ids).logits, model(ids).logits, atol=1e-5)


def test_decomposed_aten_spellings_native_batch_norm_and_addmm_are_canonical():
    """After run_decompositions, BN is _native_batch_norm_legit_no_training + getitem and Linear is
    addmm(bias, x, t(W)): the same patterns fold them."""
    from fxopt.canonical import canonicalize
    from fxopt.driver import apply_pass
    from fxopt.pattern import get_pass
    from fxopt.rewriter import Rewriter

    model = randomize_batch_norms(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5))
    ).eval()
    x = torch.randn(2, 3, 6, 6)
    exported = torch.export.export(model, (x,)).run_decompositions()
    gm = exported.module()
    targets = {n.target for n in gm.graph.nodes}
    assert torch.ops.aten._native_batch_norm_legit_no_training.default in targets
    assert torch.ops.aten.addmm.default in targets
    gm = canonicalize(gm)
    stats = apply_pass(gm, get_pass("fold_bn"), Rewriter(gm, (x,)))
    assert stats.applied == 2, stats
    gm.recompile()
    assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_bound_container_paths_follow_dtype_changes_copies_and_reassignment():
    import copy

    model, x = conv_bn().eval(), torch.randn(1, 3, 8, 8)
    result = optimize_to_graph(model, (x,))
    wide = copy.deepcopy(result).double()  # .double() must reach the tensors the bound paths read
    out = wide(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), result(x))  # the same folded float32 numbers, widened
    replacement = copy.deepcopy(getattr(result, "0"))
    with torch.no_grad():
        replacement.weight.zero_()
        replacement.bias.zero_()
    setattr(result, "0", replacement)  # nn.Module.__setattr__ must win over the bound path
    assert torch.equal(result(x), torch.zeros_like(result(x)))


class _CountsCalls(nn.Module):
    """Updates a buffer in place on every call and draws noise from a buffer of probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros(1))
        self.register_buffer("keep", torch.full((3,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.linear(x) * self.calls + torch.bernoulli(self.keep)


def test_buffer_updates_and_random_ops_on_buffers_are_kept() -> None:
    """fx's default tracer computes ops on buffers while tracing: the update would vanish and the
    noise be frozen into a constant. Capture proxies buffers, and dead-code elimination keeps writes."""
    result = optimize_to_graph(_CountsCalls().eval(), (torch.randn(2, 3),), verify=False)
    targets = {n.target for n in result.graph.nodes}
    assert "add_" in targets and torch.bernoulli in targets, result.code
    x = torch.randn(2, 3)
    torch.manual_seed(0)
    first = result(x)
    torch.manual_seed(0)
    assert not torch.equal(first, result(x))  # the counter moved on
