"""Tests of verify() and of the input strategy it draws from."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from fxopt.equivalence import compare, input_strategy, verify


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


class ClampedInput(nn.Module):
    """Wrong rewrite: clamps its input at +-100, so only large inputs expose it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.clamp(-100.0, 100.0))


class MissingBias(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.linear.weight)


def test_model_against_its_deep_copy_passes() -> None:
    model = small_mlp()
    result = verify(model, copy.deepcopy(model), (torch.randn(3, 8),))
    assert result.passed, str(result)
    assert result.examples == 5
    assert result.counterexample is None and result.exception is None
    assert [e.path for e in result.errors] == ["output"]
    assert "passed after 5 example(s)" in str(result)


def test_wrong_candidate_fails_with_a_replayable_counterexample(tmp_path) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    path = str(tmp_path / "counterexample.pt")
    result = verify(linear, MissingBias(linear), (x,), save_to=path)
    assert not result.passed
    assert result.counterexample is not None and result.counterexample[0].shape == x.shape
    assert result.counterexample_path == path
    assert path in str(result) and "NO" in str(result)
    (loaded,) = torch.load(path, weights_only=True)
    assert torch.equal(loaded, result.counterexample[0])
    with torch.no_grad():
        oracle = copy.deepcopy(linear).double()(loaded.double())
        errors = compare(oracle, linear(loaded), MissingBias(linear)(loaded))
    assert not all(e.passed for e in errors)


def test_save_counterexample_after_the_fact(tmp_path) -> None:
    linear = nn.Linear(4, 2)
    result = verify(linear, MissingBias(linear), (torch.randn(2, 4), None, 3), examples=2)
    assert not result.passed
    saved = result.save_counterexample(str(tmp_path / "c.pt"))
    tensor, none, three = torch.load(saved, weights_only=True)
    assert tensor.shape == (2, 4) and none is None and three == 3


def test_candidate_wrong_only_for_large_inputs_is_caught() -> None:
    model = small_mlp()
    example = torch.randn(3, 8)
    result = verify(model, ClampedInput(model), (example,))
    assert not result.passed
    assert result.examples <= 5
    assert result.counterexample[0].abs().max() > 100
    assert result.counterexample[0].shape == example.shape


def test_verify_is_reproducible_for_a_seed() -> None:
    model = small_mlp()
    example = torch.randn(3, 8)
    first = verify(model, ClampedInput(model), (example,))
    second = verify(model, ClampedInput(model), (example,))
    assert torch.equal(first.counterexample[0], second.counterexample[0])


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).relu()


@pytest.mark.parametrize("training", [True, False])
def test_verify_never_mutates_the_models(training: bool) -> None:
    torch.manual_seed(0)
    reference = BatchNormNet().train(training)
    candidate = copy.deepcopy(reference)
    models = {"reference": reference, "candidate": candidate}
    before = {name: copy.deepcopy(model.state_dict()) for name, model in models.items()}
    result = verify(reference, candidate, (torch.randn(2, 3, 6, 6),))
    assert result.passed, str(result)
    for name, model in models.items():
        after = model.state_dict()
        assert after.keys() == before[name].keys()
        for key, value in after.items():
            assert value.dtype == before[name][key].dtype
            assert torch.equal(value, before[name][key]), key
        assert all(module.training == training for module in model.modules())


def test_example_inputs_are_not_mutated_by_an_in_place_model() -> None:
    example = torch.randn(4, 4)
    kept = example.clone()
    result = verify(lambda x: x.relu_(), lambda x: x.clamp_(min=0), (example,))
    assert result.passed, str(result)
    assert torch.equal(example, kept)


class Embedder(nn.Module):
    """Records the token ids it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.seen: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.seen.append(ids.clone())
        return self.embedding(ids).sum(dim=1)


def test_token_ids_stay_in_range() -> None:
    torch.manual_seed(0)
    model = Embedder()
    ids = torch.tensor([[2, 5, 7, 3]])
    result = verify(model, copy.deepcopy(model), (ids,))
    assert result.passed, str(result)
    assert len(model.seen) == 5
    for seen in model.seen:
        assert seen.dtype == torch.int64 and seen.shape == ids.shape
        assert seen.min() >= 2 and seen.max() <= 7


def test_a_model_that_raises_gives_a_failed_result() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("unsupported rank")

    result = verify(small_mlp(), broken, (torch.randn(3, 8),))
    assert not result.passed
    assert result.exception == "candidate raised ValueError: unsupported rank"
    assert "unsupported rank" in str(result)


def test_correct_bf16_rewrite_passes_verify() -> None:
    torch.manual_seed(0)
    reference = BatchNormNet().eval()
    with torch.no_grad():
        reference.bn.running_mean.normal_()
        reference.bn.running_var.uniform_(0.5, 2.0)
    reference = reference.bfloat16()
    conv, bn = reference.conv, reference.bn
    scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
    weight = (conv.weight.float() * scale.reshape(-1, 1, 1, 1)).bfloat16()
    bias = ((conv.bias.float() - bn.running_mean.float()) * scale + bn.bias.float()).bfloat16()

    def folded(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, bias, padding=1).relu()

    result = verify(reference, folded, (torch.randn(2, 3, 6, 6, dtype=torch.bfloat16),))
    assert result.passed, str(result)


def test_plain_function_reference_and_model_output() -> None:
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")

    def reference(x: torch.Tensor):
        return modeling_outputs.BaseModelOutput(last_hidden_state=torch.tanh(x), hidden_states=(x,))

    def candidate(x: torch.Tensor):
        tanh = 2 * torch.sigmoid(2 * x) - 1
        return modeling_outputs.BaseModelOutput(last_hidden_state=tanh, hidden_states=(x,))

    result = verify(reference, candidate, (torch.randn(2, 5),))
    assert result.passed, str(result)
    paths = {e.path for e in result.errors}
    assert paths == {"output['last_hidden_state']", "output['hidden_states'][0]"}


def test_verify_prints_nothing(capsys) -> None:
    model = small_mlp()
    verify(model, ClampedInput(model), (torch.randn(3, 8),))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_channels_last_inputs_keep_their_layout() -> None:
    strides: list[tuple[int, ...]] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        strides.append(x.stride())
        return x * 2

    example = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert verify(record, record, (example,)).passed
    assert set(strides) == {example.stride()}


NESTED_EXAMPLE = (
    {"x": torch.randn(2, 3).t(), "ids": torch.tensor([4, 9])},
    torch.ones(2, dtype=torch.bool),
    7,
    None,
)


@given(input_strategy(NESTED_EXAMPLE))
@settings(max_examples=20, deadline=None, database=None)
def test_input_strategy_keeps_structure_layout_and_ranges(inputs: tuple) -> None:
    inner, mask, seven, none = inputs
    assert set(inner) == {"x", "ids"}
    assert inner["x"].shape == (3, 2) and inner["x"].stride() == (1, 3)
    assert inner["x"].dtype == torch.float32
    assert inner["ids"].dtype == torch.int64 and 4 <= inner["ids"].min() and inner["ids"].max() <= 9
    assert mask.all() and seven == 7 and none is None


def test_input_strategy_keeps_broadcast_views() -> None:
    example = torch.randn(1, 4).expand(3, 4)

    @given(input_strategy((example,)))
    @settings(max_examples=10, deadline=None, database=None)
    def check(inputs: tuple) -> None:
        (drawn,) = inputs
        assert drawn.shape == example.shape and drawn.stride() == example.stride()

    check()


class _FakeQuantized(nn.Module):
    """torch's fake-quantizers take a float32 scale only, so a plain .double() copy cannot run them."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("scale", torch.tensor([0.05, 0.1, 0.2, 0.02]))
        self.register_buffer("zero_point", torch.tensor([0, 3, 7, 15], dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, 1, 0, 15)
        return self.linear(torch.fake_quantize_per_tensor_affine(x, 0.1, 2, 0, 15))


def test_the_float64_oracle_runs_fake_quantizers() -> None:
    model = _FakeQuantized().eval()
    result = verify(model, copy.deepcopy(model), (torch.randn(3, 4),), examples=3)
    assert result.passed and result.exception is None, result
    broken = copy.deepcopy(model)
    broken.zero_point[1] = 4  # one code step off on one channel
    assert not verify(model, broken, (torch.randn(3, 4),), examples=3).passed
