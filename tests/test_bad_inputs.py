"""The bad-input catalogue: inputs users really give to fxopt.optimize, each with its expected
outcome (a clear error, a skip with its reason, or an applied rewrite) and, after every case,
the user's model unchanged bit for bit (state_dict and training flag). Known engine bugs are
strict xfails whose reason is the minimal repro."""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn

import fxopt
from fuzz_models import snapshot, unchanged

X = (2, 3, 8, 8)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affines, so a fold is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def conv_bn(**conv_kwargs) -> nn.Sequential:
    kwargs = {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1} | conv_kwargs
    return randomized(nn.Sequential(nn.Conv2d(**kwargs), nn.BatchNorm2d(kwargs["out_channels"]))).eval()


def with_weight(value: float) -> nn.Module:
    model = conv_bn()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = value
    return model


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # a branch on a tensor's value: neither frontend can capture it
            return self.conv(x)
        return -self.conv(x)


class Untraceable(nn.Module):
    def forward(self, x):
        return x * 2 if x.mean().item() > 0 else torch.tensor(x.tolist())


class ShapeBranch(nn.Module):
    """symbolic_trace fails on the shape branch; torch.export captures it, specialised to batch 2."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(256, 5)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if x.shape[0] > 1:
            y = y * 2
        return self.head(y.reshape(x.shape[0], -1))


class TiedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))  # one module, two call sites


class AdapterOnSharedWeight(nn.Module):
    """A LoRA on `base` whose weight is tied (under another name) to `other`, which reads another input."""

    def __init__(self, features: int = 16, rank: int = 2):
        super().__init__()
        self.base, self.other = nn.Linear(features, features), nn.Linear(features, features)
        self.other.weight = self.base.weight
        self.lora_A, self.lora_B = nn.Linear(features, rank, bias=False), nn.Linear(rank, features, bias=False)
        nn.init.normal_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * 2.0 + self.other(torch.relu(x))


# ---------------------------------------------------------------------------------------------
# expected outcomes


@dataclass
class Raises:
    error: type[BaseException]
    names: tuple[str, ...]  # every one must appear in the message


@dataclass
class Skips:
    passes: str
    reason: str


@dataclass
class Applies:
    passes: str


@dataclass
class Case:
    name: str
    build: Callable[[], tuple[nn.Module, object]]
    expect: Raises | Skips | Applies
    bug: str = ""  # a known engine bug: the minimal repro (strict xfail)
    deterministic: bool = True  # False: the output is random (training-mode dropout), not compared
    passes: list[str] | None = None  # None: the default pipeline


def _x(*shape, dtype=torch.float32):
    return torch.randn(*(shape or X), generator=torch.Generator().manual_seed(1)).to(dtype)


CASES = [
    Case("training mode", lambda: (conv_bn().train(), (_x(),)),
         Skips("fold_bn", "BatchNorm in training mode uses batch statistics: call model.eval() first")),
    Case("training-mode dropout", lambda: (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train(), (_x(2, 4),)),
         Skips("remove_noops", "dropout in training mode is random"), deterministic=False),
    Case("neither frontend captures", lambda: (Untraceable().eval(), (_x(),)),
         Raises(fxopt.CaptureError, ("could not capture Untraceable", "symbolic_trace", "torch.export", "leaf_modules"))),
    Case("data-dependent control flow", lambda: (DataDependent().eval(), (_x(),)),
         Raises(fxopt.CaptureError, ("could not capture DataDependent", "control flow"))),
    # regression: the tie under two names (b.weight = a.weight, as HF tie_weights does) was once folded apart
    Case("tied weights (Linear a -> BN, b shares a.weight)", lambda: (randomized(TiedLinears()).eval(), (_x(2, 4),)),
         Skips("fold_bn", "weight is shared with another layer: folding would untie it")),
    Case("NaN weight", lambda: (with_weight(float("nan")), (_x(),)), Applies("fold_bn")),
    Case("Inf weight", lambda: (with_weight(float("inf")), (_x(),)), Applies("fold_bn")),
    Case("zero running variance", lambda: (_zero_bn("running_var"), (_x(),)), Applies("fold_bn")),
    Case("zero gamma", lambda: (_zero_bn("weight"), (_x(),)), Applies("fold_bn")),
    Case("track_running_stats=False",
         lambda: (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval(), (_x(),)),
         Skips("fold_bn", "track_running_stats=False")),
    Case("grouped ConvTranspose -> BN",
         lambda: (randomized(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6))).eval(),
                  (_x(2, 4, 5, 5),)),
         Applies("fold_bn")),
    Case("Linear -> BatchNorm1d on 3-D input",
         lambda: (randomized(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(3))).eval(), (_x(2, 3, 5),)),
         Skips("fold_bn", "Linear -> BatchNorm1d on a 3-D input")),
    *[Case(f"{mode} padding", lambda mode=mode: (conv_bn(padding_mode=mode), (_x(),)), Applies("fold_bn"))
      for mode in ("reflect", "replicate", "circular")],
    Case("even kernel, padding='same'", lambda: (conv_bn(kernel_size=2, padding="same"), (_x(),)), Applies("fold_bn")),
    Case("even kernel -> parallel odd branch",
         lambda: (_branches(4, 3), (_x(),)), Skips("reparam_conv", "asymmetric 'same' padding: its kernel cannot be centred")),
    Case("non-contiguous input", lambda: (conv_bn(), (_x(2, 8, 8, 3).permute(0, 3, 1, 2),)), Applies("fold_bn")),
    Case("channels_last input", lambda: (conv_bn(), (_x().to(memory_format=torch.channels_last),)), Applies("fold_bn")),
    Case("channels_last model and input",
         lambda: (conv_bn().to(memory_format=torch.channels_last), (_x().to(memory_format=torch.channels_last),)),
         Applies("fold_bn")),
    Case("float16", lambda: (conv_bn().half(), (_x(dtype=torch.float16),)), Applies("fold_bn")),
    Case("bfloat16", lambda: (conv_bn().bfloat16(), (_x(dtype=torch.bfloat16),)), Applies("fold_bn")),
    Case("module shared by two call sites", lambda: (randomized(SharedConv()).eval(), (_x(),)),
         Skips("fold_bn", "weight is shared with another layer: folding would untie it")),
    Case("adapter on a shared base weight", lambda: (AdapterOnSharedWeight().eval(), (_x(2, 16),)),
         Skips("merge_lora", "is shared with another layer")),
    Case("example inputs as a list", lambda: (conv_bn(), [_x()]),
         Raises(fxopt.InputError, ("must be a tuple", "got list", "(x,)"))),
    Case("example input as a bare tensor", lambda: (conv_bn(), _x()),
         Raises(fxopt.InputError, ("must be a tuple", "got Tensor"))),
    Case("wrong channel count", lambda: (conv_bn(), (_x(2, 5, 8, 8),)), Raises(fxopt.InputError, ("channels",))),
    Case("wrong input dtype (float64 into a float32 model)", lambda: (conv_bn(), (_x(dtype=torch.float64),)),
         Raises(fxopt.InputError, ("double",))),
    Case("too many example inputs", lambda: (conv_bn(), (_x(), _x())), Raises(fxopt.InputError, ("argument",))),
]


def _zero_bn(which: str) -> nn.Module:
    model = conv_bn()
    with torch.no_grad():
        getattr(model[1], which).zero_()
    return model


def _branches(k1: int, k2: int) -> nn.Module:
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, k1, padding="same")
            self.b = nn.Conv2d(3, 4, k2, padding="same")

        def forward(self, x):
            return self.a(x) + self.b(x)

    return TwoBranches().eval()


def _params(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's note on the even-kernel case
@pytest.mark.parametrize("case", [_params(c) for c in CASES])
def test_bad_input(case: Case):
    model, inputs = case.build()
    before = snapshot(model)
    try:
        _check_outcome(case, model, inputs)
    finally:
        assert unchanged(model, before) is None, f"the user's model changed: {unchanged(model, before)}"


def _check_outcome(case: Case, model: nn.Module, inputs) -> None:
    expect = case.expect
    if isinstance(expect, Raises):
        with pytest.raises(expect.error) as raised:
            fxopt.optimize(model, inputs, passes=case.passes)
        for name in expect.names:
            assert name in str(raised.value), f"{name!r} not in: {raised.value}"
        return
    result = fxopt.optimize(model, inputs, passes=case.passes)
    report = result.report
    assert report.verification.passed, str(report)
    by_name = {p.name: p for p in report.passes}
    if isinstance(expect, Skips):
        reasons = [reason for _, reason in by_name[expect.passes].skipped]
        assert any(expect.reason in r for r in reasons), f"no skip {expect.reason!r} in {reasons}\n{report}"
        assert by_name[expect.passes].applied == 0
    else:
        assert by_name[expect.passes].applied >= 1, str(report)
    if not case.deterministic:
        return
    with torch.no_grad():  # the right output, on the example (a copy runs: training mode updates statistics)
        want, got = copy.deepcopy(model)(*inputs), result(*inputs)
    torch.testing.assert_close(got, want, equal_nan=True, **_tolerance(want.dtype))


def _tolerance(dtype: torch.dtype) -> dict:
    return {torch.float16: {"rtol": 1e-2, "atol": 1e-2}, torch.bfloat16: {"rtol": 5e-2, "atol": 5e-2}}.get(
        dtype, {"rtol": 1e-4, "atol": 1e-4})


# ---------------------------------------------------------------------------------------------
# dynamic batch size: optimize with batch 2, run the result on batches 3 and 1


def test_dynamic_batch_traced_result_is_batch_generic():
    """symbolic_trace keeps the batch symbolic: the result runs on any batch and still matches."""
    model = conv_bn()
    before = snapshot(model)
    result = fxopt.optimize(model, (_x(),))
    for batch in (3, 1):
        x = _x(batch, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(result(x), model(x), rtol=1e-4, atol=1e-4)
    assert unchanged(model, before) is None


def test_dynamic_batch_exported_result_is_specialised_and_says_so():
    """torch.export specialises shapes: the report says so, and another batch fails the generated
    module loudly (not silently); the default result, the model's own class with its conv and
    BatchNorm folded into one nn.Conv2d, runs the model's own shape branch on any batch."""
    model = randomized(ShapeBranch()).eval()
    before = snapshot(model)
    generated = fxopt.optimize(model, (_x(),), keep_class=False)
    assert generated.report.frontend == "torch.export"
    assert any("shapes are specialised to the example inputs" in note for note in generated.report.notes)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        generated(_x(3, 3, 8, 8))
    kept = fxopt.optimize(model, (_x(),))
    assert type(kept) is ShapeBranch and isinstance(kept.bn, nn.Identity), kept.report
    for batch in (3, 1):
        x = _x(batch, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(kept(x), model(x), rtol=1e-4, atol=1e-4)
    assert unchanged(model, before) is None


# ---------------------------------------------------------------------------------------------
# fxopt.save / fxopt.load: a folder whose weights do not match module.py is refused


@pytest.fixture
def saved(tmp_path):
    result = fxopt.optimize(conv_bn(), (_x(),), keep_class=False)  # save writes a generated module
    fxopt.save(result, tmp_path)
    return result, tmp_path


def _rewrite_weights(folder, change: Callable[[dict], dict]) -> None:
    """Re-write weights.safetensors with its tensors changed (safetensors' own writer, no pickle)."""
    from safetensors.torch import load_file, save_file

    tensors = change(load_file(str(folder / "weights.safetensors")))
    save_file(tensors, str(folder / "weights.safetensors"))


def _first_weight(saved_result) -> str:
    return next(iter(saved_result.state_dict()))


def test_load_round_trip(saved):
    result, folder = saved
    loaded = fxopt.load(folder)
    torch.testing.assert_close(loaded(_x()), result(_x()), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, names",
    [
        (lambda t, k: {**t, k: torch.zeros(t[k].numel() + 1)}, ("does not match", "{key}", "expects")),
        (lambda t, k: {**t, k: t[k].double()}, ("does not match", "{key}", "float64", "torch.float32")),
        (lambda t, k: {name: v for name, v in t.items() if name != k}, ("does not match", "{key}")),
        (lambda t, k: {**t, "extra.weight": torch.zeros(1)}, ("does not match", "extra.weight")),
    ],
    ids=["wrong shape", "wrong dtype", "missing tensor", "extra tensor"],
)
def test_load_refuses_mismatched_weights(saved, change, names):
    result, folder = saved
    key = _first_weight(result)
    _rewrite_weights(folder, lambda tensors: change(tensors, key))
    with pytest.raises(fxopt.SaveError) as raised:
        fxopt.load(folder)
    for name in names:  # the message names the problem and the tensor
        assert name.format(key=key) in str(raised.value), str(raised.value)


def test_load_refuses_a_folder_without_module_py(tmp_path):
    with pytest.raises(fxopt.SaveError, match="no module.py"):
        fxopt.load(tmp_path)


def test_load_never_unpickles(saved):
    """weights.safetensors is read as a JSON header plus raw bytes: no pickle opcode is ever executed."""
    _, folder = saved
    data = (folder / "weights.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    assert header["__metadata__"] == {"format": "fxopt"}
    assert "pickle" not in (folder / "module.py").read_text()
