"""Scale: optimize() on graphs deeper than Python's recursion limit, linear in the graph's size.

Time per node and memory are measured by benchmarks/bench_scale.py (timings never live in unit
tests); here the point is that every stage walks deep graphs without recursion and finishes.
"""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch

import fxopt
from fxopt import ops
from fxopt.canonical import canonicalize
from fxopt.capture import capture
from fxopt.driver import apply_pass
from fxopt.pattern import get_pass
from fxopt.rewriter import Rewriter
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


def test_erased_nodes_are_freed_while_the_graph_and_the_rewriter_live():
    """fx's Graph keeps every node it made in its name table, and the Rewriter's caches hold nodes:
    an erased node (two for every one left, after canonicalization and folding) must not stay alive
    with its meta for as long as the graph does."""
    model, inputs = deep_residual(20, channels=2), example(channels=2)
    captured = capture(model, inputs)
    module_calls = [weakref.ref(n) for n in captured.module.graph.nodes if n.op == "call_module"]
    gm = canonicalize(captured.module)
    rewriter = Rewriter(gm, inputs)
    batch_norms = [n for n in gm.graph.nodes if ops.BATCH_NORM(n)]
    for bn in batch_norms:  # fill the caches: whether it reads inputs, and who reads its parameters
        assert rewriter.reads_inputs(bn) and not rewriter.shared(bn.kwargs["running_mean"])
    folded = [weakref.ref(n) for bn in batch_norms for n in (bn, *bn.all_input_nodes)]  # its conv and parameters
    del batch_norms, bn
    assert apply_pass(gm, get_pass("fold_bn"), rewriter).applied == 20
    gc.collect()
    alive = [r() for r in module_calls + folded if r() is not None]
    assert not alive, f"{len(alive)} erased nodes still alive, e.g. {alive[0]}"
    assert len(gm.graph.nodes) > 0 and rewriter.gm is gm  # both still in use
