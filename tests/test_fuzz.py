"""Differential fuzzing: random valid models (tests/fuzz_models.py) through the default pipeline
with verify=False, then checked as a whole against the float64 oracle by fxopt.verify.

CI runs a fixed derandomized set (the "ci" hypothesis profile); `python benchmarks/fuzz.py N` runs
any number. Every wrong model found becomes a regression test below.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import fxopt
from tests.generated import optimize_to_graph
from fuzz_models import fuzz_models, grows, snapshot, stored_elements, unchanged

FUZZ_MODELS = 250


def check_model(model: torch.nn.Module, inputs: tuple, recipe: str) -> None:
    before = snapshot(model)
    result = fxopt.optimize(model, inputs, verify=False)
    assert unchanged(model, before) is None, f"optimize changed the user's model: {unchanged(model, before)}\n{recipe}"
    verdict = fxopt.verify(model, result, inputs)
    code = getattr(result, "code", "")  # the default result is the model's own class when it can be kept
    assert verdict.passed, f"wrong model from {recipe}\n{verdict}\n{result.report}\n{code}"
    assert unchanged(model, before) is None, f"verify changed the user's model\n{recipe}"
    # the default pipeline never makes a model larger, except by biases (see fuzz_models.grows)
    assert grows(model, result) is None, f"{grows(model, result)}\n{recipe}\n{result.report}"


@settings(max_examples=FUZZ_MODELS)
@given(fuzz_models())
def test_random_models_stay_equivalent(case):
    model, inputs, recipe = case
    check_model(model, inputs, recipe)


# ---------------------------------------------------------------------------------------------
# regressions: failures the fuzzer found


# The size rule (fuzz_models.grows): these folds remove an op and give a bias-less layer a bias, so the
# result stores a few more numbers than the model. The fuzzer first reported them as "larger"; they are
# the cheaper model, so they must fold, and grow by exactly the bias they add.


def _check_fold_adds_only_a_bias(model: torch.nn.Module, inputs: tuple, recipe: str, ops_left: int) -> None:
    check_model(model, inputs, recipe)
    result = optimize_to_graph(model, inputs)
    calls = [n for n in result.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    assert len(calls) == ops_left, f"{recipe}: expected {ops_left} op(s) left\n{result.code}"
    added = stored_elements(result) - stored_elements(model)
    assert 0 < added <= stored_elements(result, only_biases=True), f"{recipe}: grew by {added}"


@pytest.mark.parametrize("a, b, c", [(1, 1, 3), (4, 2, 4)])
def test_pointwise_merge_grows_only_by_a_bias(a, b, c):
    model = torch.nn.Sequential(torch.nn.Conv1d(a, b, 1), torch.nn.Conv1d(b, c, 1, bias=False)).eval()
    _check_fold_adds_only_a_bias(model, (torch.randn(2, a, 9),), f"conv1d({a}->{b},bias) | conv1d({b}->{c})", 1)


def test_bn_before_linear_fold_grows_only_by_a_bias():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2, affine=False), torch.nn.Linear(2, 8, bias=False)).eval()
    _check_fold_adds_only_a_bias(model, (torch.randn(4, 2),), "bn1d(2, affine=False) | linear(2->8,bias=False)", 1)


def test_norm_affine_fold_grows_only_by_a_bias():
    model = torch.nn.Sequential(torch.nn.LayerNorm(2), torch.nn.Linear(2, 5, bias=False)).eval()
    # the LayerNorm stays (parameter-free), the Linear absorbs its affine
    _check_fold_adds_only_a_bias(model, (torch.randn(2, 4, 2),), "layernorm(2) | linear(2->5,bias=False)", 2)
