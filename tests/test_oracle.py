"""Tests of the float64-oracle comparison (fxopt.equivalence.oracle)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxopt.equivalence import ORACLE_FACTOR, LeafError, compare, tolerance_floor
from fxopt.equivalence.oracle import oracle_factor
from fxopt.equivalence.oracle import max_errors


def run_three(model: nn.Module, candidate_fn, x: torch.Tensor) -> list[LeafError]:
    """Compare candidate_fn(x) with model(x), using model's float64 copy as the oracle."""
    with torch.no_grad():
        oracle = copy.deepcopy(model).double()(x.double())
        return compare(oracle, model(x), candidate_fn(x))


def passed(errors: list[LeafError]) -> bool:
    return all(error.passed for error in errors)


def test_tolerance_floor_matches_torch_testing_defaults() -> None:
    assert tolerance_floor(torch.float16) == (1e-3, 1e-5)
    assert tolerance_floor(torch.bfloat16) == (1.6e-2, 1e-5)
    assert tolerance_floor(torch.float32) == (1.3e-6, 1e-5)
    assert tolerance_floor(torch.float64) == (1e-7, 1e-7)
    assert tolerance_floor(torch.int64) == (0.0, 0.0)
    assert tolerance_floor(torch.bool) == (0.0, 0.0)
    assert ORACLE_FACTOR == 4.0


def test_identical_outputs_pass() -> None:
    out = torch.randn(4, 5)
    errors = compare(out.double(), out, out.clone())
    assert passed(errors)
    assert [e.path for e in errors] == ["output"]
    assert errors[0].candidate_abs == errors[0].reference_abs


def test_float32_model_against_itself_passes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    assert passed(run_three(model, model, torch.randn(4, 16)))


@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=50))
@settings(max_examples=30, deadline=None)
def test_candidate_equal_to_reference_always_passes(values: list[float]) -> None:
    oracle = torch.tensor(values, dtype=torch.float64) * (1 + 1e-9)
    reference = oracle.float()
    assert passed(compare(oracle, reference, reference.clone()))


def fold_conv_bn_in_fp32(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded weight and bias computed in float32 and rounded to the conv's dtype."""
    scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
    weight = conv.weight.float() * scale.reshape(-1, 1, 1, 1)
    bias = (conv.bias.float() - bn.running_mean.float()) * scale + bn.bias.float()
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


@pytest.mark.parametrize("seed", range(5))
def test_correct_bf16_rewrite_is_not_flagged(seed: int) -> None:
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    reference = nn.Sequential(conv, bn).eval().bfloat16()
    weight, bias = fold_conv_bn_in_fp32(reference[0], reference[1])
    errors = run_three(
        reference,
        lambda x: F.conv2d(x, weight, bias, padding=1),
        torch.randn(2, 3, 10, 10).bfloat16(),
    )
    assert passed(errors), errors
    # The rewrite does round differently: the test is not vacuous.
    assert errors[0].candidate_abs > 0


def test_missing_bias_is_flagged_by_the_size_of_the_bias() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    errors = run_three(linear, lambda x: F.linear(x, linear.weight), torch.randn(3, 8))
    assert not passed(errors)
    assert errors[0].candidate_abs == pytest.approx(linear.bias.abs().max().item(), rel=1e-4)
    assert "exceeds" in errors[0].message


def test_dropped_branch_is_flagged() -> None:
    torch.manual_seed(0)

    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main = nn.Linear(8, 8)
            self.side = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.main(x) + 0.1 * self.side(x)

    model = TwoBranches()
    assert not passed(run_three(model, model.main, torch.randn(3, 8)))


def test_off_by_one_padding_shift_is_flagged() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)

    def shifted(x: torch.Tensor) -> torch.Tensor:
        # Pads one pixel too many on the left/top and one too few on the right/bottom.
        return F.conv2d(F.pad(x, (2, 0, 2, 0)), conv.weight, conv.bias)

    x = torch.randn(1, 2, 8, 8)
    assert shifted(x).shape == conv(x).shape
    assert not passed(run_three(conv, shifted, x))


def test_error_at_a_single_element_is_flagged() -> None:
    torch.manual_seed(0)
    model = nn.Linear(32, 32)

    def one_wrong(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        out[2, 17] += 1e-3
        return out

    errors = run_three(model, one_wrong, torch.randn(4, 32))
    assert not passed(errors)
    assert errors[0].candidate_abs == pytest.approx(1e-3, rel=1e-2)


def test_nan_where_oracle_is_finite_fails() -> None:
    oracle = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    reference = oracle.float()
    candidate = torch.tensor([1.0, math.nan, 3.0])
    [error] = compare(oracle, reference, candidate)
    assert not error.passed
    assert error.candidate_abs == math.inf
    assert "NaN" in error.message


def test_matching_infinities_pass_and_mismatched_ones_fail() -> None:
    oracle = torch.tensor([1.0, math.inf, -math.inf, math.nan], dtype=torch.float64)
    reference = oracle.float()
    assert passed(compare(oracle, reference, reference.clone()))
    # Where the oracle is NaN, any non-finite candidate value is accepted.
    assert passed(compare(oracle, reference, torch.tensor([1.0, math.inf, -math.inf, math.inf])))
    wrong_candidates = (
        [1.0, -math.inf, -math.inf, math.nan],  # wrong sign of infinity
        [1.0, 1e30, -math.inf, math.nan],  # finite where the oracle is infinite
        [1.0, math.inf, -math.inf, 0.0],  # finite where the oracle is NaN
    )
    for wrong in wrong_candidates:
        assert not passed(compare(oracle, reference, torch.tensor(wrong)))


def test_reference_error_widens_the_bound() -> None:
    oracle = torch.linspace(1.0, 2.0, 100, dtype=torch.float64)
    reference = oracle.float()
    reference[1] += 0.01  # the reference itself is off by about 0.01
    e_ref = (reference.double() - oracle).abs().max().item()
    within, beyond = oracle.float(), oracle.float()
    within[0] += ORACLE_FACTOR * e_ref * 0.99
    beyond[0] += ORACLE_FACTOR * e_ref * 1.01 + 1e-3
    assert passed(compare(oracle, reference, within))
    assert not passed(compare(oracle, reference, beyond))


def test_parameter_sensitivity_adds_to_the_reference_error() -> None:
    # The candidate's error is its activations' rounding plus its parameters' rounding:
    # the bound is the factor times the sum of the two scales, not their maximum.
    oracle = torch.linspace(1.0, 2.0, 100, dtype=torch.float64)
    reference = oracle.float()
    reference[1] += 0.01
    perturbed = oracle.clone()
    perturbed[2] += 0.008
    e_ref = (reference.double() - oracle).abs().max().item()
    e_par = (perturbed - oracle).abs().max().item()
    within, beyond = oracle.float(), oracle.float()
    within[0] += ORACLE_FACTOR * (e_ref + e_par) * 0.99
    beyond[0] += ORACLE_FACTOR * (e_ref + e_par) * 1.01 + 1e-3
    assert not passed(compare(oracle, reference, within))  # beyond the reference's error alone
    assert passed(compare(oracle, reference, within, perturbed))
    assert not passed(compare(oracle, reference, beyond, perturbed))


def test_small_leaves_get_a_larger_factor() -> None:
    assert oracle_factor(1) == 10 * ORACLE_FACTOR
    assert oracle_factor(25) == 2 * ORACLE_FACTOR
    assert oracle_factor(100) == oracle_factor(10_000) == ORACLE_FACTOR
    oracle = torch.tensor([1.0], dtype=torch.float64)
    reference = torch.tensor([1.01])
    assert passed(compare(oracle, reference, torch.tensor([1.0 + 0.01 * oracle_factor(1) * 0.99])))
    assert not passed(compare(oracle, reference, torch.tensor([1.0 + 0.01 * oracle_factor(1) * 1.01 + 1e-3])))


def test_all_zero_oracle_reports_abs_as_rel() -> None:
    zeros = torch.zeros(3, dtype=torch.float64)
    [error] = compare(zeros, zeros.float(), torch.tensor([0.0, 0.5, 0.0]))
    assert not error.passed
    assert error.candidate_abs == error.candidate_rel == 0.5


def test_integer_leaves_must_equal_the_reference() -> None:
    oracle = torch.tensor([3, 1, 2])
    reference = torch.tensor([3, 1, 2])
    assert passed(compare(oracle, reference, reference.clone()))
    [error] = compare(oracle, reference, torch.tensor([3, 1, 3]))
    assert not error.passed and error.candidate_abs == 1
    assert not passed(compare(oracle.bool(), reference.bool(), torch.tensor([True, False, True])))


def test_nested_tuple_and_dict_outputs() -> None:
    a, b = torch.randn(2, 3), torch.randn(4)
    oracle = (a.double(), {"hidden": b.double(), "count": 2, "extra": None})
    reference = (a, {"hidden": b, "count": 2, "extra": None})
    candidate = (a.clone(), {"hidden": b.clone(), "count": 2, "extra": None})
    errors = compare(oracle, reference, candidate)
    assert passed(errors)
    assert {e.path for e in errors} == {
        "output[0]",
        "output[1]['hidden']",
        "output[1]['count']",
        "output[1]['extra']",
    }
    wrong = compare(oracle, reference, (a.clone(), {"hidden": b + 1, "count": 2, "extra": None}))
    assert [e.path for e in wrong if not e.passed] == ["output[1]['hidden']"]
    wrong_count = compare(oracle, reference, (a, {"hidden": b, "count": 3, "extra": None}))
    assert [e.path for e in wrong_count if not e.passed] == ["output[1]['count']"]


def test_hf_model_output() -> None:
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")
    hidden, states = torch.randn(1, 4, 8), (torch.randn(1, 4, 8), torch.randn(1, 4, 8))

    def output(scale: float, dtype: torch.dtype):
        return modeling_outputs.BaseModelOutput(
            last_hidden_state=(hidden * scale).to(dtype),
            hidden_states=tuple(s.to(dtype) for s in states),
        )

    oracle, reference = output(1.0, torch.float64), output(1.0, torch.float32)
    errors = compare(oracle, reference, output(1.0, torch.float32))
    assert passed(errors)
    assert "output['last_hidden_state']" in {e.path for e in errors}
    assert "output['hidden_states'][1]" in {e.path for e in errors}
    wrong = compare(oracle, reference, output(1.1, torch.float32))
    assert [e.path for e in wrong if not e.passed] == ["output['last_hidden_state']"]


@pytest.mark.parametrize(
    ("candidate", "path", "words"),
    [
        ({"a": torch.ones(2)}, "output['b']", "missing from the candidate"),
        (
            {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1)},
            "output['c']",
            "not in the reference",
        ),
        ({"a": torch.ones(2), "b": torch.ones(4)}, "output['b']", "shape"),
        ({"a": torch.ones(2), "b": torch.ones(3, dtype=torch.float64)}, "output['b']", "dtype"),
        ({"a": torch.ones(2), "b": 1.0}, "output['b']", "float where the reference gives Tensor"),
    ],
)
def test_mismatched_structure_fails_with_a_message(candidate, path: str, words: str) -> None:
    reference = {"a": torch.ones(2), "b": torch.ones(3)}
    oracle = {key: value.double() for key, value in reference.items()}
    failing = [e for e in compare(oracle, reference, candidate) if not e.passed]
    assert [e.path for e in failing] == [path]
    assert words in failing[0].message
    assert words in str(failing[0])


def test_different_list_length_and_container_type_fail() -> None:
    reference = [torch.ones(2), torch.ones(2)]
    oracle = [t.double() for t in reference]
    shorter = compare(oracle, reference, [torch.ones(2)])
    assert [e.path for e in shorter if not e.passed] == ["output[1]"]
    as_tuple = compare(oracle, reference, tuple(reference))
    [failure] = [e for e in as_tuple if not e.passed]
    assert failure.path == "output" and "container types differ" in failure.message


def test_leaf_error_str_is_one_line_and_max_errors() -> None:
    errors = compare(torch.zeros(2).double(), torch.zeros(2), torch.tensor([0.0, 2.0]))
    assert "\n" not in str(errors[0]) and str(errors[0]).startswith("FAIL output")
    assert max_errors(errors) == (2.0, 2.0)
    assert max_errors([]) == (0.0, 0.0)


def test_reference_overflow_leaves_only_nan_checked_and_says_so() -> None:
    oracle = torch.tensor([1.0, 7e4], dtype=torch.float64)
    reference = oracle.half()  # 7e4 overflows float16 to inf
    [error] = compare(oracle, reference, torch.tensor([1.0, 6e4], dtype=torch.float16))
    assert error.passed and error.reference_abs == math.inf
    assert "bound is infinite" in error.message
    [nan_error] = compare(oracle, reference, torch.tensor([1.0, math.nan], dtype=torch.float16))
    assert not nan_error.passed


def test_oracle_nan_where_the_reference_is_finite_asks_for_a_finite_candidate() -> None:
    # a NaN weight times a zero of the padding: float32 kernels skip it, float64 does not
    oracle = torch.tensor([1.0, math.nan], dtype=torch.float64)
    reference = torch.tensor([1.0, 0.5])
    assert passed(compare(oracle, reference, torch.tensor([1.0, 0.25])))
    assert not passed(compare(oracle, reference, torch.tensor([1.0, math.nan])))
    both_nan = torch.tensor([1.0, math.nan])
    assert passed(compare(oracle, both_nan, both_nan))
    assert not passed(compare(oracle, both_nan, torch.tensor([1.0, 0.5])))
