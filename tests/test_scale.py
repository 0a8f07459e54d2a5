"""Scale: optimize() on graphs deeper than Python's recursion limit, linear in the graph's size.

Time per node and memory are measured by benchmarks/bench_scale.py (timings never live in unit
tests); here the point is that every stage walks deep graphs without recursion and finishes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fxopt
from tests.generated import optimize_to_graph

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from scale_models import deep_residual, example, wide_branchy  # noqa: E402


@pytest.mark.parametrize("build, blocks", [(deep_residual, 250), (wide_branchy, 150)], ids=["deep", "wide"])
def test_graphs_deeper_than_the_recursion_limit_optimize_and_verify(build, blocks):
    model, inputs = build(blocks, channels=2), example(channels=2)
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # Python's default (imports may have raised it): a recursive walk fails
    try:
        assert len(torch.fx.symbolic_trace(model).graph.nodes) > sys.getrecursionlimit()
        result = optimize_to_graph(model, inputs, verify=False)
    finally:
        sys.setrecursionlimit(previous)
    by_pass = {p.name: p for p in result.report.passes}
    assert by_pass["fold_bn"].applied >= blocks  # every block's BatchNorm(s) folded
    if build is wide_branchy:
        assert by_pass["reparam_conv"].applied == blocks  # every block became one conv
    convs = [n for n in result.graph.nodes if n.target is torch.nn.functional.conv2d]
    assert len(convs) == blocks
    assert fxopt.verify(model, result, inputs, examples=1).passed
