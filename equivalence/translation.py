"""Translation validation: each rewrite is checked on real activations before it is committed.

The matched subgraph and its replacement are evaluated on the values that reach the match when
the model runs on the example inputs, and compared by the same float64-oracle rule as
``fxopt.verify`` (see :mod:`fxopt.equivalence.oracle`): the matched subgraph in float64 is the
oracle, in the model's dtype the reference, and the replacement is the candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from fxopt.interpret import run_graph, run_nodes

from .oracle import LeafError, compare, max_errors, perturb


@dataclass(frozen=True)
class SubgraphCheck:
    passed: bool
    max_rel_error: float
    errors: list[LeafError]

    def __str__(self) -> str:
        return "; ".join(str(e) for e in self.errors if not e.passed) or "ok"


class TranslationValidator:
    def __init__(self, gm: GraphModule, example_inputs: tuple):
        self.gm = gm
        self.example_inputs = example_inputs
        self.activations = run_graph(gm, example_inputs)

    def check(self, matched: list[Node], replacements: dict[Node, Node], created: list[Node]) -> SubgraphCheck:
        inside = set(matched) | set(created)
        needed = {a for n in inside for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
        needed |= {new for new in replacements.values() if new not in inside and new.op != "get_attr"}
        if not needed <= self.activations.keys():
            # an earlier rewrite made the node that feeds this match: record the activations again
            self.activations = run_graph(self.gm, self.example_inputs)
        reference = run_nodes(self.gm, matched, self.activations)
        oracle = run_nodes(self.gm, matched, self.activations, dtype=torch.float64)
        candidate = run_nodes(self.gm, created, self.activations)

        def value(node: Node) -> object:
            if node in candidate:
                return candidate[node]
            return run_nodes(self.gm, [node], self.activations)[node] if node.op == "get_attr" else self.activations[node]

        olds = list(replacements)
        outputs = (
            tuple(oracle[o] for o in olds),
            tuple(reference[o] for o in olds),
            tuple(value(replacements[o]) for o in olds),
        )
        errors = compare(*outputs)
        if not all(e.passed for e in errors):
            # is the error explained by the subgraph's sensitivity to its constants' rounding?
            generator = torch.Generator().manual_seed(0)
            perturbed = run_nodes(
                self.gm, matched, self.activations, dtype=torch.float64, constants=lambda t: perturb(t, generator)
            )
            errors = compare(*outputs, tuple(perturbed[o] for o in olds))
        passed = all(e.passed for e in errors)
        if passed:  # the driver commits it: its new nodes' values are the graph's from now on
            self.activations.update(candidate)
        return SubgraphCheck(passed, max_errors(errors)[1], errors)
