"""bisect: find the first rewrite after which the optimized model stops computing what the original does.

The driver is deterministic, so optimizing with a budget of k applied matches gives the first k
rewrites of the full run. Each pass's patterns are wrapped to stop matching once the budget is
spent and to log every rewrite they make; a binary search over k then finds a prefix of rewrites
that fails ``fxopt.verify`` while the prefix one shorter passes (the first such prefix when, as
usual, a model once wrong stays wrong under later rewrites). Translation validation is off while
searching: a rewrite that it would roll back is exactly what is being hunted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.fx import Node

from fxopt.capture import LeafSpec
from fxopt.driver import optimize
from fxopt.pattern import Match, Pass, Pattern, Skip, default_passes, get_pass
from fxopt.rewriter import Rewriter

from .verify import VerificationResult, verify


@dataclass(frozen=True)
class Culprit:
    """One applied match: which pass and pattern rewrote which node (its name in the canonical graph)."""

    pass_name: str
    pattern: str
    node: str
    index: int  # 1-based position among all matches the pipeline applies

    def __str__(self) -> str:
        return f"match #{self.index}: pass {self.pass_name!r}, pattern {self.pattern} at node {self.node!r}"


@dataclass(frozen=True)
class BisectResult:
    """``culprit`` is the first rewrite after which verification fails; None when none does.

    ``passed`` says whether the fully optimized model verifies; when it does not and ``culprit``
    is None, the model already fails with no rewrite applied (capture or code generation).
    ``verification`` is the check of the smallest failing prefix, or of the full result.
    """

    passed: bool
    culprit: Culprit | None
    applied: int
    verification: VerificationResult

    def __str__(self) -> str:
        if self.passed:
            return f"all good: {self.applied} matches applied, the optimized model verifies"
        if self.culprit is None:
            return f"the model fails verification with no rewrite applied (capture or codegen)\n{self.verification}"
        return (
            f"verification first fails after {self.culprit} (of {self.applied} applied)\n{self.verification}"
        )


def bisect(
    model: torch.nn.Module,
    example_inputs: tuple,
    passes: Sequence[str | Pass] | None = None,
    *,
    examples: int = 5,
    seed: int | None = 0,
    leaf_modules: Iterable[LeafSpec] = (),
    autowrap_functions: Iterable[Callable] = (),
) -> BisectResult:
    """Name the first pass and match after which ``fxopt.verify(model, optimized, example_inputs)`` fails.

    ``passes`` is as for ``fxopt.optimize`` (None: the default pipeline). Runs the optimizer
    about log2(matches) + 1 times; ``examples`` and ``seed`` go to each ``fxopt.verify``.
    """
    selected = default_passes() if passes is None else [p if isinstance(p, Pass) else get_pass(p) for p in passes]

    def run(budget: int | None) -> tuple[list[Culprit], VerificationResult]:
        log: list[Culprit] = []
        budgeted = [_budgeted_pass(p, log, budget) for p in selected]
        result = optimize(
            model, example_inputs, passes=budgeted, verify=False, keep_class=False,  # the passes are bisected
            leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
        )
        return log, verify(model, result, example_inputs, examples=examples, seed=seed)

    log, full = run(None)
    if full.passed:
        return BisectResult(True, None, len(log), full)
    # invariant: the first `good` rewrites verify (-1: not known for any), the first `bad` do not
    good, bad, failing = -1, len(log), full
    while bad - good > 1:
        middle = (good + bad) // 2
        _, checked = run(middle)
        if checked.passed:
            good = middle
        else:
            bad, failing = middle, checked
    return BisectResult(False, log[bad - 1] if bad else None, len(log), failing)


def _budgeted_pass(p: Pass, log: list[Culprit], budget: int | None) -> Pass:
    """``p`` with patterns that log every rewrite into ``log`` (shared by a whole pipeline) and
    stop matching once it holds ``budget`` entries; None: no budget."""
    return dataclasses.replace(p, patterns=tuple(_Budgeted(pattern, p.name, log, budget) for pattern in p.patterns))


class _Budgeted(Pattern):
    """A pattern that logs its rewrites and stops matching when the budget is spent (with
    validation off, every rewrite is applied)."""

    def __init__(self, inner: Pattern, pass_name: str, log: list[Culprit], budget: int | None):
        self.anchor, self.benefit = inner.anchor, inner.benefit
        self.inner, self.pass_name, self.log, self.budget = inner, pass_name, log, budget

    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None:
        if self.budget is not None and len(self.log) >= self.budget:
            return None
        return self.inner.match(node, rw)

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        self.log.append(Culprit(self.pass_name, type(self.inner).__name__, match.root.name, len(self.log) + 1))
        return self.inner.rewrite(match, rw)
