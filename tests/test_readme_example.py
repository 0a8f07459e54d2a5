"""The README's worked example of writing a pass must work as printed."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import fxopt
from fxopt.equivalence import check_pass


def readme_pass_source() -> str:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "patterns/fold_scale.py" in b)
    # keep the registry clean: build the Pass without registering it
    return block.replace("register(Pass(", "FOLD_SCALE = (Pass(")


def test_readme_pass_example_fires_and_is_equivalent():
    namespace: dict = {}
    exec(compile(readme_pass_source(), "README.md", "exec"), namespace)
    fold_scale = namespace["FOLD_SCALE"]
    report = check_pass(fold_scale, max_examples=10)
    assert report.applied >= 10

    linear = torch.nn.Linear(4, 3).eval()

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x * 2.5)

    x = torch.randn(2, 4)
    result = fxopt.optimize(Scaled(), (x,), passes=[fold_scale])
    assert result.report.passes[0].applied == 1
    assert not any(n.target is __import__("operator").mul for n in result.graph.nodes)
    assert torch.allclose(result(x), Scaled()(x), rtol=1e-6, atol=1e-6)
