"""The fxopt command line: in-process through fxopt.cli.main (fast), plus one run of the installed
console script. The factories below are what SPEC names (``test_cli:small_bn_net``)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fxopt.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from fxopt.examples import EXAMPLES, randomize_batch_norms
from fxopt.pattern import registered_passes

SHAPE = ["--example-shape", "1,3,8,8"]
_WEIGHT_SCALE = {"conv": 1.0}  # what scaled_net multiplies its conv weight by: changed to fake a non-deterministic factory


def small_bn_net() -> nn.Module:
    return randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()


def scaled_net() -> nn.Module:
    net = small_bn_net()
    with torch.no_grad():
        net[0].weight.mul_(_WEIGHT_SCALE["conv"])
    return net


def training_net() -> nn.Module:
    return small_bn_net().train()


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # neither symbolic_trace nor torch.export can follow this
            return x * 2
        return x


def data_dependent() -> nn.Module:
    return DataDependent().eval()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_passes_lists_every_pass_with_its_default_flag(capsys):
    status, out, _ = run(capsys, "passes")
    assert status == EXIT_OK
    # rows start at column 0; a long description wraps onto indented lines
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if not line.startswith(" ")}
    assert rows == {p.name: "yes" if p.default else "no" for p in registered_passes()}


def test_optimize_saves_what_verify_rechecks_with_progress(tmp_path, capsys):
    status, out, err = run(capsys, "optimize", "test_cli:small_bn_net", *SHAPE, "--out", str(tmp_path))
    assert status == EXIT_OK, err
    assert "fold_bn" in out and "whole-model verification passed" in out
    assert {"module.py", "weights.safetensors", "source.json"} <= {p.name for p in tmp_path.iterdir()}
    source = json.loads((tmp_path / "source.json").read_text())
    assert source["spec"] == "test_cli:small_bn_net" and source["inputs"] == [{"shape": [1, 3, 8, 8], "dtype": "float32"}]

    status, out, err = run(capsys, "verify", str(tmp_path), "--examples", "2")
    assert status == EXIT_OK, out + err
    assert "verification passed after 2 example(s)" in out
    assert "example 1/2" in err and "example 2/2" in err


def test_verify_exits_1_when_the_saved_weights_are_wrong(tmp_path, capsys):
    assert run(capsys, "optimize", "test_cli:small_bn_net", *SHAPE, "--out", str(tmp_path))[0] == EXIT_OK
    weights = tmp_path / "weights.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() == 4)  # the folded conv weight
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(weights), metadata={"format": "fxopt"})
    status, out, _ = run(capsys, "verify", str(tmp_path), "--examples", "1")
    assert status == EXIT_FAILED
    assert "verification FAILED" in out


def test_verify_refuses_a_factory_that_now_builds_other_weights(tmp_path, capsys, monkeypatch):
    assert run(capsys, "optimize", "test_cli:scaled_net", *SHAPE, "--out", str(tmp_path))[0] == EXIT_OK
    monkeypatch.setitem(_WEIGHT_SCALE, "conv", 2.0)
    status, _, err = run(capsys, "verify", str(tmp_path))
    assert status == EXIT_USAGE
    assert "built different weights" in err and "not deterministic" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["optimize", "no_such_module_xyz:build", *SHAPE], "cannot import 'no_such_module_xyz'"),
        (["optimize", "test_cli:smal_bn_net", *SHAPE], "has no attribute 'smal_bn_net'; did you mean small_bn_net"),
        (["optimize", "resnet5", *SHAPE], "did you mean 'resnet50'"),
        (["optimize", "test_cli:small_bn_net", *SHAPE, "--passes", "fold_bn,fold_bm"],
         "no pass named 'fold_bm'. Did you mean 'fold_bn'"),
        (["optimize", "test_cli:small_bn_net", "--example-shape", "1,5,8,8"], "example_inputs do not fit Sequential"),
        (["optimize", "test_cli:data_dependent", *SHAPE], "fxopt could not capture DataDependent"),
        (["optimize", "test_cli:training_net", *SHAPE], "returned a model in training mode"),
        (["optimize", "test_cli:small_bn_net", *SHAPE, "--dtype", "float32", "--dtype", "int64"],
         "2 --dtype for 1 --example-shape"),
        (["optimize", "test_cli:small_bn_net", "--example-shape", "1,3,a"], "'1,3,a' is not a shape"),
        (["optimize", "test_cli:small_bn_net", *SHAPE, "--dtype", "flaot32"], "did you mean 'float32'"),
        (["verify", "."], "has no source.json"),
    ],
    ids=["module", "attribute", "example", "pass", "shape", "capture", "training", "dtypes", "shape-syntax",
         "dtype", "not-saved-by-cli"],
)
def test_input_errors_exit_2_with_a_message_and_no_traceback(capsys, argv, message):
    status, _, err = run(capsys, *argv)
    assert status == EXIT_USAGE
    assert message in err
    assert "Traceback" not in err


def test_unknown_pass_lists_the_registered_ones(capsys):
    _, _, err = run(capsys, "optimize", "test_cli:small_bn_net", *SHAPE, "--passes", "nope")
    assert all(p.name in err for p in registered_passes())


def test_demo_optimizes_a_built_in_example_and_lists_the_passes(capsys, monkeypatch):
    monkeypatch.setitem(EXAMPLES, "small_bn_net", small_bn_net)  # the demo's ResNet-50 takes too long here
    status, out, _ = run(capsys, "demo", "small_bn_net")
    assert status == EXIT_OK
    assert "fxopt report for Sequential" in out and "passes available:" in out


def test_installed_console_script_lists_the_passes():
    script = shutil.which("fxopt")
    if script is None:
        pytest.skip("the fxopt command is not installed: pip install -e . --no-deps")
    done = subprocess.run([script, "passes"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == EXIT_OK, done.stderr
    assert all(p.name in done.stdout for p in registered_passes())


def test_python_dash_m_keeps_running_the_demo(monkeypatch):
    """``python -m fxopt [EXAMPLE]`` is the demo; other arguments go to the command line."""
    import runpy

    import fxopt.cli

    seen = []
    monkeypatch.setattr(fxopt.cli, "main", lambda argv: seen.append(argv) or 0)
    for argv in ([], ["functional_bn_net"], ["passes"]):
        monkeypatch.setattr(sys, "argv", ["fxopt", *argv])
        with pytest.raises(SystemExit):
            runpy.run_module("fxopt", run_name="__main__")
    assert seen == [["demo"], ["demo", "functional_bn_net"], ["passes"]]
