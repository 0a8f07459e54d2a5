"""torch.compile(model, backend="fxopt"): registered by name, folds under inference only, never
computes with stale or foreign weights. Two tests compile with inductor for real (tiny models, a
few seconds each on 2 cores); the others replace inductor by the eager graph to test the backend's
own logic quickly."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fxopt
import fxopt.backend
from fxopt.backend import FxoptBackendWarning, fxopt_backend
from fxopt.examples import FunctionalBNNet, randomize_batch_norms

from reparam_blocks import Net, RepVGGBlock, randomise_bn


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo shares compiled code between models of one class and backend: start every test clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def eager_inductor(monkeypatch):
    """Run the graphs the backend would hand to inductor eagerly (the backend's logic, minus compile time)."""
    monkeypatch.setattr(fxopt.backend, "_inductor", lambda gm, inputs, freezing=False: gm)
    monkeypatch.setattr(fxopt.backend, "_torch_compile", lambda gm, inputs: gm)


def reports(caplog) -> list[fxopt.Report]:
    """The fxopt reports the backend logged, one per folding."""
    return [r.args[0] for r in caplog.records if r.name == "fxopt.backend" and isinstance(r.args, tuple) and r.args]


def applied(report: fxopt.Report, pass_name: str) -> int:
    return next(p.applied for p in report.passes if p.name == pass_name)


def applied_counts(report: fxopt.Report) -> dict[str, int]:
    return {p.name: p.applied for p in report.passes}


def repvgg() -> Net:
    return randomise_bn(Net(RepVGGBlock(3, 8, stride=2), RepVGGBlock(8, 8))).eval()


def test_backend_is_found_by_name_through_its_entry_point():
    from torch._dynamo.backends.registry import lookup_backend

    assert "fxopt" in torch._dynamo.list_backends(), "pip install -e . --no-deps registers the entry point"
    assert lookup_backend("fxopt") is fxopt_backend


def test_repvgg_net_compiled_by_name_matches_eager(caplog):
    torch.manual_seed(0)
    net, x = repvgg(), torch.randn(2, 3, 16, 16)
    caplog.set_level("INFO", logger="fxopt.backend")
    with torch.no_grad():
        compiled = torch.compile(net, backend="fxopt")
        compiled(x)
    assert fxopt.verify(net, compiled, (x,), examples=3).passed
    (report,) = reports(caplog)
    assert report.verification.passed, report
    # the graph dynamo hands over folds as the eager model does
    assert applied_counts(report) == applied_counts(fxopt.optimize(net, (x,), verify=False).report)
    assert applied(report, "fold_bn") > 0 and applied(report, "reparam_conv") > 0, report


def test_batch_norm_net_compiled_by_name_matches_eager(caplog):
    torch.manual_seed(0)
    net, x = randomize_batch_norms(FunctionalBNNet(width=8, depth=2)).eval(), torch.randn(2, 3, 16, 16)
    caplog.set_level("INFO", logger="fxopt.backend")
    with torch.no_grad():
        compiled = torch.compile(net, backend="fxopt")
        compiled(x)
    assert fxopt.verify(net, compiled, (x,), examples=3).passed
    (report,) = reports(caplog)
    assert applied_counts(report) == applied_counts(fxopt.optimize(net, (x,), verify=False).report)
    assert applied(report, "fold_bn") == 3, report  # the stem's and both layers' BatchNorms


def test_recording_gradients_compiles_unchanged_and_says_why(eager_inductor, caplog):
    torch.manual_seed(0)
    net, x = repvgg(), torch.randn(1, 3, 8, 8)
    caplog.set_level("INFO", logger="fxopt.backend")
    with pytest.warns(FxoptBackendWarning, match="torch.no_grad"):
        out = torch.compile(net, backend="fxopt")(x)
    assert out.requires_grad and reports(caplog) == []
    torch.testing.assert_close(out, net(x))


def test_frozen_parameters_fold_with_grad_mode_on(eager_inductor, caplog):
    torch.manual_seed(0)
    net, x = repvgg().requires_grad_(False), torch.randn(1, 3, 8, 8)
    caplog.set_level("INFO", logger="fxopt.backend")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxoptBackendWarning)
        out = torch.compile(net, backend="fxopt", options={"verify": False})(x)
    (report,) = reports(caplog)
    assert applied(report, "reparam_conv") == 2
    torch.testing.assert_close(out, net(x))


def test_two_models_of_one_class_each_use_their_own_weights(eager_inductor):
    """Dynamo guards an nn.Module by type, so the second model reuses the first one's graph."""
    torch.manual_seed(0)
    first, second, x = repvgg(), repvgg(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        compiled_first = torch.compile(first, backend="fxopt", options={"verify": False})
        compiled_second = torch.compile(second, backend="fxopt", options={"verify": False})
        for _ in range(2):
            torch.testing.assert_close(compiled_first(x), first(x))
            torch.testing.assert_close(compiled_second(x), second(x))


def test_training_mode_batch_norm_is_left_to_inductor_and_updates_its_statistics(eager_inductor):
    torch.manual_seed(0)
    net, x = randomise_bn(Net(RepVGGBlock(3, 8, stride=2))).train(), torch.randn(4, 3, 8, 8)
    eager = Net(RepVGGBlock(3, 8, stride=2)).train()
    eager.load_state_dict(net.state_dict())
    with torch.no_grad(), pytest.warns(FxoptBackendWarning, match=r"writes its inputs in place \(blocks\.0\.dense\.1\."):
        torch.testing.assert_close(torch.compile(net, backend="fxopt")(x), eager(x))
    torch.testing.assert_close(net.state_dict(), eager.state_dict())


def _load_other_weights(net: Net) -> None:
    net.load_state_dict(repvgg().state_dict())  # in place: same tensors, new versions


def _recalibrate_statistics(net: Net) -> None:
    # a training-mode forward changes the statistics without counting a write: compared by value
    net.train()(torch.randn(4, 3, 8, 8))
    net.eval()


def _replace_a_parameter(net: Net) -> None:
    # dynamo does not recompile for a new parameter tensor of the same shape: the backend sees another tensor
    conv = net.blocks[1].dense[0]
    conv.weight = nn.Parameter(torch.randn_like(conv.weight))


@pytest.mark.parametrize("change", [_load_other_weights, _recalibrate_statistics, _replace_a_parameter])
def test_weights_changed_after_compile_are_folded_again(eager_inductor, change):
    torch.manual_seed(0)
    net, x = repvgg(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        compiled = torch.compile(net, backend="fxopt", options={"verify": False})
        compiled(x)
        change(net)
        with pytest.warns(FxoptBackendWarning, match="changed since it was folded"):
            torch.testing.assert_close(compiled(x), net(x))


def test_a_new_tensor_at_a_dead_folded_tensors_address_is_another_tensor():
    """The check compares identity through weak references: id() alone would take the new tensor for the old."""
    args = [torch.randn(2), torch.ones(3)]
    snapshot = fxopt.backend._Snapshot.of(args, [1], statistics=set())
    address = id(args[1])
    args[1] = None
    candidates = [torch.ones(3) for _ in range(100)]  # all kept alive, so each has its own address
    args[1] = next((t for t in candidates if id(t) == address), None)
    if args[1] is None:
        pytest.skip("this Python did not reuse the freed tensor's address, the case under test")
    assert snapshot.changed(args)


def test_statistics_of_several_dtypes_and_shapes_are_compared_by_value():
    """BatchNorm statistics are compared joined, one torch.cat per device and dtype (0-d ones stacked)."""
    args = [torch.randn(4), torch.randn(3, dtype=torch.float64), torch.randn(5), torch.tensor(2.0), torch.randn(2, 2)]
    snapshot = fxopt.backend._Snapshot.of(args, [0, 1, 2, 3, 4], statistics={1, 2, 3, 4})
    assert not snapshot.changed(args)
    for i in (1, 2, 3, 4):
        statistic, folded = args[i], args[i].clone()
        version = statistic._version
        statistic.data.view(-1)[0] += 1  # through .data: unseen by the version counter, as a BatchNorm update is
        assert statistic._version == version and snapshot.changed(args), i
        statistic.data.copy_(folded)
        assert not snapshot.changed(args), i


def test_a_graph_that_switches_autocast_is_left_to_inductor(eager_inductor):
    class Autocasting(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.linear(x)

    net, x = Autocasting().eval(), torch.randn(2, 4)
    with torch.no_grad(), pytest.warns(FxoptBackendWarning, match="_enter_autocast"):
        out = torch.compile(net, backend="fxopt")(x)
        assert out.dtype == torch.bfloat16


def test_a_graph_fxopt_cannot_optimize_is_left_to_inductor(eager_inductor, monkeypatch):
    def refuse(*args, **kwargs):
        raise fxopt.CaptureError("no graph today")

    monkeypatch.setattr(fxopt, "optimize", refuse)
    net, x = repvgg(), torch.randn(1, 3, 8, 8)
    with torch.no_grad(), pytest.warns(FxoptBackendWarning, match=r"could not optimize this graph \(no graph today\)"):
        torch.testing.assert_close(torch.compile(net, backend="fxopt")(x), net(x))


def test_unknown_option_or_pass_is_an_error_naming_the_known_ones():
    gm, inputs = torch.fx.symbolic_trace(nn.Linear(2, 2)), [torch.randn(1, 2)]
    with pytest.raises(fxopt.FxoptError, match=r"unknown option\(s\) \['pases'\]; the options are \['passes', 'verify'\]"):
        fxopt_backend(gm, inputs, options={"pases": ["fold_bn"]})
    with pytest.raises(fxopt.UnknownPassError, match="no pass named 'fold_bm'. Did you mean 'fold_bn'"):
        fxopt_backend(gm, inputs, options={"passes": ["fold_bm"]})
