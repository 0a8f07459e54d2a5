"""Quantizers (fxopt.quant) and the reparam_quant pass.

Equivalence of quantized models is identical integer codes: rounding is discontinuous, so a float
tolerance says nothing about it. The tests compare codes bit for bit, and check whole models in
float64, where the float oracle is meaningful: the float64 reference *is* the oracle, so its
tolerance (1e-7) only passes a candidate whose every code is the reference's (one changed code
moves an output by a whole quantization step), and a float64 rewrite only changes a code for an
activation within ~1e-16 of a rounding boundary. The pass's check_pass instances are float64 too.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.ao.quantization as tq

import fxopt
from fxopt import quant
from fxopt.interpret import run_graph
from fxopt.patterns.reparam_quant import per_tensor_parameters
from tests.generated import optimize_to_graph

from quant_models import tiny_vit

F64 = torch.float64


def _case(channels: int, bits: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "scales": ((torch.rand(channels, generator=g) * 3 + 0.1) / 2**bits).float(),
        "zero_points": torch.randint(0, 2**bits, (channels,), generator=g, dtype=torch.int32),
        "gamma": torch.randn(channels, generator=g, dtype=F64).exp(),
        "beta": torch.randn(channels, generator=g, dtype=F64),
        "linears": [(torch.randn(4, channels, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64))
                    for _ in range(3)],  # three consumers of one LayerNorm
        "x": torch.randn(64, channels, generator=g, dtype=F64) * 2,
    }


def _per_channel_then_linears(case: dict, bits: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(codes, Linear outputs) of LayerNorm affine -> per-channel fake-quant -> Linears."""
    y = case["x"] * case["gamma"] + case["beta"]
    s, z = case["scales"], case["zero_points"]
    dequantized = torch.fake_quantize_per_channel_affine(y, s, z, 1, 0, 2**bits - 1)
    codes = torch.round(dequantized / s.double()) + z  # (q - z) * s is exact here: q is recovered
    assert torch.equal(codes.long(), quant.uniform_codes(y, s, z, 0, 2**bits - 1, axis=1))
    return codes.long(), [torch.nn.functional.linear(dequantized, w, b) for w, b in case["linears"]]


def _per_tensor_then_linears(case: dict, bits: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    p = per_tensor_parameters(case["scales"], case["zero_points"], case["gamma"], case["beta"], case["linears"],
                              2**bits - 1)
    assert not isinstance(p, str), p
    y = case["x"] * p.gamma + p.beta
    dequantized = torch.fake_quantize_per_tensor_affine(y, p.scale, p.zero_point, 0, 2**bits - 1)
    codes = torch.round(dequantized / p.scale.double()) + p.zero_point
    assert torch.equal(codes.long(), quant.uniform_codes(y, p.scale, p.zero_point, 0, 2**bits - 1))
    return codes.long(), [torch.nn.functional.linear(dequantized, w, b) for w, b in p.linears]


@pytest.mark.parametrize("bits", range(2, 9))
def test_per_tensor_codes_are_identical_to_per_channel_codes(bits: int) -> None:
    for seed in range(5):
        case = _case(channels=12, bits=bits, seed=seed)
        before, outputs_before = _per_channel_then_linears(case, bits)
        after, outputs_after = _per_tensor_then_linears(case, bits)
        assert torch.equal(before, after)
        for a, b in zip(outputs_before, outputs_after):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_codes_are_identical_at_the_clamp_boundaries() -> None:
    bits = 3
    case = _case(channels=6, bits=bits, seed=7)
    case["x"] = case["x"] * 50  # far outside the range: most codes clamp to 0 or 7
    before, _ = _per_channel_then_linears(case, bits)
    after, _ = _per_tensor_then_linears(case, bits)
    assert torch.equal(before, after)
    assert (before == 0).any() and (before == 2**bits - 1).any()


def test_a_non_integer_mean_zero_point_is_rounded() -> None:
    bits = 4
    case = _case(channels=2, bits=bits, seed=3)
    case["zero_points"] = torch.tensor([3, 8], dtype=torch.int32)  # mean 5.5
    p = per_tensor_parameters(case["scales"], case["zero_points"], case["gamma"], case["beta"], case["linears"], 15)
    assert p.zero_point.dtype == torch.int32 and int(p.zero_point) in (5, 6)
    before, _ = _per_channel_then_linears(case, bits)
    after, _ = _per_tensor_then_linears(case, bits)
    assert torch.equal(before, after)


def test_tiny_scales_keep_codes_and_zero_or_infinite_scales_are_refused() -> None:
    bits = 8
    case = _case(channels=4, bits=bits, seed=5)
    case["scales"] = torch.tensor([1e-15, 1e-6, 0.5, 2.0])  # x / s stays within the kernel's int64
    before, _ = _per_channel_then_linears(case, bits)
    after, _ = _per_tensor_then_linears(case, bits)
    assert torch.equal(before, after)
    args = (case["zero_points"], case["gamma"], case["beta"], case["linears"], 255)
    for bad, reason in ((0.0, "zero"), (math.inf, "not finite"), (math.nan, "not finite"), (1e-40, "overflows")):
        scales = case["scales"].clone()
        scales[1] = bad
        assert reason in per_tensor_parameters(scales, *args)


@pytest.mark.parametrize("bits", range(2, 9))
def test_log2_decomposition_equals_direct_dequantization(bits: int) -> None:
    delta = 0.75
    special = torch.tensor([0.0, 1e-300, delta, 1.0, delta * 2**-0.25, delta * 2 ** -(2**bits / 2)], dtype=F64)
    attention = torch.cat([torch.softmax(torch.randn(5, 40, dtype=F64) * 4, -1).flatten(), special])
    code = quant.log_code(attention, bits, delta, 2)
    direct = quant.log_sqrt2_quantize(attention, bits, delta)
    powers = quant.log2_dequantize(quant.log2_shift(code, bits), bits, delta)
    odd = torch.remainder(code, 2)
    assert torch.equal(powers * (1 + quant.SQRT2_MINUS_1 * odd), direct)
    assert bool(((powers == 0) | (torch.log2(powers / delta) == torch.round(torch.log2(powers / delta)))).all())
    v = torch.randn(attention.numel(), 3, dtype=F64)
    split = powers @ v + quant.SQRT2_MINUS_1 * ((powers * odd) @ v)
    torch.testing.assert_close(split, direct @ v, rtol=1e-13, atol=1e-13)


def test_log_quantizer_modules() -> None:
    x = torch.tensor([0.0, 0.01, 0.3, 0.5, 1.0, 2.0])
    sqrt2 = quant.LogSqrt2Quantizer(4, 1.0)(x)
    log2 = quant.Log2Quantizer(4, 1.0)(x)
    assert sqrt2[0] == 0 and sqrt2[-1] == 1.0 and sqrt2[3] == 0.5
    assert torch.equal(log2, torch.tensor([0.0, 2**-7, 2**-2, 0.5, 1.0, 1.0]))


def _attention_like(dtype: torch.dtype) -> torch.Tensor:
    """Softmax outputs and the values at the edges of the log quantizers: 0, delta, above delta,
    half-octave boundaries, below the smallest level, subnormal, inf, NaN and negative."""
    edges = [0.0, 0.75, 0.9, 1.0, 0.75 * 2**-0.25, 0.75 * 2**-3.75, 1e-30, 1e-45, math.inf, math.nan, -0.5]
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.softmax(torch.randn(4, 30, generator=g, dtype=F64) * 4, -1).flatten(),
                      torch.tensor(edges, dtype=F64)]).to(dtype)


def _lowered_call(function, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    """finalize (codegen), as optimize ends with it, of a graph x -> function(x, *args), or of
    function(input=x, **kwargs): the canonical op's spelling."""
    from fxopt.codegen import finalize

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    node_args, node_kwargs = ((), {"input": x, **kwargs}) if kwargs else ((x, *args), {})
    graph.output(graph.call_function(function, node_args, node_kwargs))
    return finalize(torch.fx.GraphModule(torch.nn.Module(), graph), "Lowered", set(), share=True)


_LOG_FUNCTIONS = [  # (function, positional arguments after the tensor, keyword arguments, input kind)
    (quant.log_sqrt2_quantize, (), {"bits": 4, "delta": 0.75}, "attention"),
    (quant.log2_quantize, (), {"bits": 3, "delta": 0.75}, "attention"),
    (quant.log_code, (8, 0.75, 2), {}, "attention"),
    (quant.log2_shift, (4,), {}, "codes"),
    (quant.log2_dequantize, (4, 0.75), {}, "codes"),
    (quant.log_sqrt2_dequantize, (4, 0.75), {}, "codes"),
]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("function, args, kwargs, kind", _LOG_FUNCTIONS, ids=[f[0].__name__ for f in _LOG_FUNCTIONS])
def test_log_quantizers_lower_to_torch_ops_with_the_same_bits(function, args, kwargs, kind, dtype) -> None:
    x = _attention_like(dtype) if kind == "attention" else torch.arange(0, 2**4 + 1, dtype=dtype)
    lowered = _lowered_call(function, args, kwargs)
    assert not [n.target for n in lowered.graph.nodes if getattr(n.target, "__module__", "") == "fxopt.quant"]
    torch.testing.assert_close(lowered(x), function(x, *args, **kwargs), rtol=0, atol=0, equal_nan=True)


def test_reparameterized_vit_saves_and_loads_in_a_fresh_process_with_torch_only(tmp_path) -> None:
    bits = 4
    g = torch.Generator().manual_seed(bits)
    data = [torch.randn(4, 3, 8, 8, generator=g, dtype=F64) for _ in range(2)]
    x = torch.randn(3, 3, 8, 8, generator=g, dtype=F64)
    calibrated = quant.calibrate(tiny_vit(seed=bits), (x,), data, bits=bits)
    results = {  # log2 attention from reparam_quant, and log-sqrt(2) ones kept as calibrated
        "reparameterized": optimize_to_graph(calibrated, (x,), passes=["reparam_quant"], verify=False),
        "calibrated": optimize_to_graph(calibrated, (x,), passes=[], verify=False),
    }
    assert torch.equal(results["calibrated"](x), calibrated(x))  # the lowered log-sqrt(2) quantizers
    torch.save(x, tmp_path / "x.pt")
    for name, result in results.items():
        fxopt.save(result, tmp_path / name)
        assert torch.equal(fxopt.load(tmp_path / name)(x), result(x))
        torch.save(result(x), tmp_path / f"{name}.pt")
    script = textwrap.dedent(
        f"""
        import importlib.util, sys, torch
        sys.modules["fxopt"] = None; sys.modules["safetensors"] = None  # only torch may be used
        x = torch.load(r"{tmp_path}/x.pt")
        for name in {list(results)!r}:
            spec = importlib.util.spec_from_file_location(name, r"{tmp_path}/" + name + "/module.py")
            saved = importlib.util.module_from_spec(spec); spec.loader.exec_module(saved)
            assert torch.equal(saved.load(r"{tmp_path}/" + name)(x), torch.load(r"{tmp_path}/" + name + ".pt")), name
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)


_UNIFORM = (torch.fake_quantize_per_channel_affine, torch.fake_quantize_per_tensor_affine)


def _uniform_codes(gm: torch.fx.GraphModule, inputs: tuple) -> list[tuple[torch.fx.Node, torch.Tensor]]:
    """(uniform fake-quant node, its integer codes) in graph order, for a module as optimize and
    calibrate return it. Codes are round(value / s) + z: exact, as (q - z) * s is exact here."""
    values = run_graph(gm, inputs)
    found = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _UNIFORM:
            args = list(n.args) + [n.kwargs[k] for k in ("input", "scale", "zero_point") if k in n.kwargs]
            scale, zero_point = values[args[1]], values[args[2]]
            shape = [-1 if scale.dim() and i == values[n].dim() - 1 else 1 for i in range(values[n].dim())]
            codes = torch.round(values[n] / scale.double().reshape(shape)) + zero_point.reshape(shape)
            found.append((n, codes.long()))
    return found


@pytest.mark.parametrize("bits", [4, 8])
def test_calibrated_vit_reparameterizes_with_identical_codes(bits: int) -> None:
    model = tiny_vit(seed=bits)
    g = torch.Generator().manual_seed(bits)
    data = [torch.randn(4, 3, 8, 8, generator=g, dtype=F64) for _ in range(4)]
    x = torch.randn(3, 3, 8, 8, generator=g, dtype=F64)
    calibrated = quant.calibrate(model, (x,), data, bits=bits)
    before = _uniform_codes(calibrated, (x,))
    assert [n.target for n, _ in before] == [torch.fake_quantize_per_channel_affine] * 5  # 2 per block + final
    assert sum(isinstance(m, quant.LogSqrt2Quantizer) for m in calibrated.modules()) == 2

    result = optimize_to_graph(calibrated, (x,), passes=["reparam_quant"])  # float64: validation is meaningful
    stats = result.report.passes[0]
    assert (stats.applied, stats.skipped, stats.rolled_back) == (7, [], [])
    assert result.report.verification.passed
    assert fxopt.verify(calibrated, result, (x,), examples=10).passed
    torch.testing.assert_close(result(x), calibrated(x), rtol=1e-12, atol=1e-12)

    after = _uniform_codes(result, (x,))
    assert [n.target for n, _ in after] == [torch.fake_quantize_per_tensor_affine] * 5  # all per-tensor
    for (_, old), (_, new) in zip(before, after):
        assert torch.equal(old, new)
    assert not any(isinstance(m, quant.LogSqrt2Quantizer) for m in result.modules())
    assert not any("reparam_quant" in note for note in result.report.notes)  # float64: no rounding caveat
    # softmax: log2. Each attention @ V became two products of powers of two (times delta); the
    # other matmul of each block is q @ k^T
    assert _power_of_two_matmuls(calibrated, (x,)) == (4, 0)
    assert _power_of_two_matmuls(result, (x,)) == (6, 4)


def test_a_float32_rewrite_notes_that_boundary_codes_can_move() -> None:
    # float32 rounds the rewritten LayerNorm differently: a code at a rounding boundary can move one
    # step, and validation lets it through (benchmarks/quant_code_flips.py): the report says so, once
    model = tiny_vit(seed=0, dtype=torch.float32)
    x = torch.randn(2, 3, 8, 8)
    calibrated = quant.calibrate(model, (x,), [x], bits=8)
    result = optimize_to_graph(calibrated, (x,), passes=["reparam_quant"], verify=False)
    assert result.report.passes[0].applied == 7
    (note,) = [n for n in result.report.notes if "reparam_quant" in n]
    assert "rounding boundaries" in note and "float64" in note


def _power_of_two_matmuls(gm: torch.fx.GraphModule, inputs: tuple) -> tuple[int, int]:
    """(matmuls, matmuls whose left operand is non-negative and delta * 2**-k or 0 everywhere)."""
    values = run_graph(gm, inputs)
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.matmul]
    shifts = 0
    for n in matmuls:
        left = values[n.kwargs["input"] if "input" in n.kwargs else n.args[0]]
        octaves = torch.log2(left[left > 0] / left.max())
        shifts += bool((left >= 0).all()) and torch.equal(octaves, octaves.round())
    return len(matmuls), shifts


def test_percentile_calibration_clips_outliers() -> None:
    model = tiny_vit(seed=1)
    data = [torch.randn(4, 3, 8, 8, dtype=F64)]
    x = data[0][:1]
    minmax = quant.calibrate(model, (x,), data, bits=8)
    percentile = quant.calibrate(model, (x,), data, bits=8, method="percentile", percentile=99.0)
    assert bool((percentile.quant0_scale <= minmax.quant0_scale).all())
    assert bool((percentile.quant0_scale < minmax.quant0_scale).any())
    with pytest.raises(ValueError, match="method"):
        quant.calibrate(model, (x,), data, method="mse")


class _AoFakeQuantized(nn.Module):
    """LayerNorm -> torch.ao FakeQuantize (per-channel, eval, observer off) -> two Linears."""

    def __init__(self):
        super().__init__()
        self.norm, self.a, self.b = nn.LayerNorm(6), nn.Linear(6, 3), nn.Linear(6, 2)
        self.fq = tq.FakeQuantize(observer=tq.MovingAveragePerChannelMinMaxObserver, ch_axis=2, quant_min=0,
                                  quant_max=15, dtype=torch.quint8, qscheme=torch.per_channel_affine)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.fq(self.norm(x))
        return self.a(q), self.b(q)


def test_torch_ao_fake_quantize_modules_are_recognized() -> None:
    # float32: torch's FakeQuantize module cannot run in float64 (its kernel refuses a double scale),
    # so neither can the whole-model oracle; codes and outputs are compared directly instead
    model = _AoFakeQuantized()
    x = torch.randn(2, 5, 6)
    model.fq(model.norm(x * 3))  # observe a range
    model.fq.disable_observer()
    model.eval()
    result = optimize_to_graph(model, (x,), passes=["reparam_quant"], verify=False)
    assert result.report.passes[0].applied == 1
    traced = torch.fx.symbolic_trace(model)
    (_, before), = _uniform_codes(traced, (x,))
    (node, after), = _uniform_codes(result, (x,))
    assert node.target is torch.fake_quantize_per_tensor_affine and torch.equal(before, after)
    for a, b in zip(result(x), model(x)):
        torch.testing.assert_close(a, b)


class _QuantizedLayerNormIntoGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(4), nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 0.1))
        self.register_buffer("zero_point", torch.zeros(4, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.fake_quantize_per_channel_affine(self.norm(x), self.scale, self.zero_point, 1, 0, 255)
        return self.linear(q) + torch.nn.functional.gelu(q)


def test_a_consumer_that_is_not_a_linear_is_skipped_with_a_reason() -> None:
    result = optimize_to_graph(_QuantizedLayerNormIntoGelu().eval(), (torch.randn(3, 4),), passes=["reparam_quant"])
    (_, reason), = result.report.passes[0].skipped
    assert "gelu" in reason and "not a Linear" in reason


# ---------------------------------------------------------------------------------------------
# smooth_quant


@pytest.mark.parametrize("alpha, expected",
                         [(0.5, [1.0, 1.0, 2.0]), (0.0, [1.0, 0.5, 0.25]), (1.0, [3.0, 1.0, 16.0])])
def test_smoothing_factors_stay_finite_and_positive_for_zero_columns_and_channels(alpha: float, expected: list[float]) -> None:
    from fxopt.patterns.smooth_quant import smoothing_factors

    # channels: an all-zero weight column (1 / 0 at alpha < 1), a zero activation range, a plain one
    weight = torch.tensor([[0.0, 2.0, 1.0], [0.0, -1.0, 4.0]])
    s = smoothing_factors(torch.tensor([3.0, 0.0, 16.0]), [weight], alpha=alpha)
    assert torch.equal(s, torch.tensor(expected, dtype=F64))


def _smoothed(norm: nn.Module, passes: list, zero_column: bool = True) -> tuple[nn.Module, torch.fx.GraphModule]:
    from fxopt.patterns.smooth_quant import NormIntoLinears

    model = NormIntoLinears(norm, 6, 2, zero_column=zero_column, generator=torch.Generator().manual_seed(0)).eval()
    result = optimize_to_graph(model, (torch.randn(2, 4, 6),), passes=passes)
    assert result.report.passes[-1].applied == 1 and result.report.verification.passed
    return model, result


def _spread(w: torch.Tensor) -> float:
    return float(w.detach().abs().max() / w.detach().abs().min())


@pytest.mark.parametrize("norm", [nn.LayerNorm(6), nn.RMSNorm(6, eps=1e-6)], ids=["LayerNorm", "RMSNorm"])
def test_smooth_quant_evens_out_channel_ranges_and_stays_equivalent(norm: nn.Module) -> None:
    model, result = _smoothed(norm, ["smooth_quant"])
    norm_weight = result.get_parameter("norm.weight")
    assert norm_weight[0] == model.norm.weight[0]  # the all-zero column's channel is not rescaled
    assert _spread(norm_weight[1:]) < _spread(model.norm.weight[1:])


def test_smooth_quant_strength_alpha_moves_the_range_into_activations_or_weights() -> None:
    from fxopt.patterns.smooth_quant import smooth_quant_pass

    # alpha = 1: every activation channel gets the same range, |gamma'| = 1 (a bias-free LayerNorm)
    _, result = _smoothed(nn.LayerNorm(6, bias=False), [smooth_quant_pass(alpha=1.0)], zero_column=False)
    assert result.report.passes[0].name == "smooth_quant(alpha=1)"
    assert torch.equal(result.get_parameter("norm.weight").detach().abs(), torch.ones(6))
    # alpha = 0: every weight column gets the same range, except the all-zero one (no 1 / 0 scale)
    model, result = _smoothed(nn.LayerNorm(6), [smooth_quant_pass(alpha=0.0)])
    columns = torch.stack([result.get_parameter(f"linears.{i}.weight").detach().abs().amax(0) for i in range(2)])
    torch.testing.assert_close(columns.amax(0)[1:], torch.ones(5))
    assert result.get_parameter("norm.weight")[0] == model.norm.weight[0]
    with pytest.raises(ValueError, match="alpha"):
        smooth_quant_pass(alpha=1.5)


class _OnePlusWeightRMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight enters as (1 + w)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4))
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.nn.functional.rms_norm(x, (4,), 1 + self.weight, 1e-6))


def test_smooth_quant_refuses_a_one_plus_weight_rmsnorm_until_it_is_folded() -> None:
    model, x = _OnePlusWeightRMSNorm().eval(), torch.randn(3, 4)
    result = optimize_to_graph(model, (x,), passes=["smooth_quant"])
    (_, reason), = result.report.passes[0].skipped
    assert "(1 + w)" in reason
    # fold_constants makes (1 + w) one constant weight, which smooth_quant then rescales
    folded = optimize_to_graph(model, (x,), passes=["fold_constants", "smooth_quant"])
    assert folded.report.passes[1].applied == 1 and folded.report.verification.passed
