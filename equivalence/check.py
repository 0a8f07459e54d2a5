"""check_pass: the property test every pass carries, run on the instances it generates.

For each instance (a small module exhibiting the pass's pattern, drawn by hypothesis from the
pass's ``instances`` strategy) the pass must fire and the optimized module must pass
``fxopt.verify`` against the original. A failing instance is shrunk by hypothesis to a minimal
one, and the AssertionError names it: the module, the input shapes, the pass report and the
verification table.
"""

from __future__ import annotations

from dataclasses import dataclass

import hypothesis
import torch
from hypothesis import HealthCheck, given, settings
from torch.utils import _pytree as pytree

from fxopt.driver import optimize
from fxopt.pattern import Pass, get_pass

from .verify import verify


@dataclass(frozen=True)
class CheckReport:
    """What ``check_pass`` checked: the number of instances and the matches applied to them."""

    pass_name: str
    instances: int
    applied: int
    max_rel_error: float

    def __str__(self) -> str:
        return (
            f"check_pass({self.pass_name!r}): {self.instances} instances, {self.applied} matches applied, "
            f"all verified (max rel err {self.max_rel_error:.2e})"
        )


def check_pass(pass_or_name: Pass | str, *, max_examples: int = 20, seed: int | None = 0) -> CheckReport:
    """Assert that the pass fires on, and preserves, every instance its generator draws.

    ``seed`` makes the run reproducible (the same instances every time); ``None`` explores new
    ones on each call. Raises AssertionError naming the minimal failing instance, and ValueError
    when the pass declares no instance generator.
    """
    p = pass_or_name if isinstance(pass_or_name, Pass) else get_pass(pass_or_name)
    if p.instances is None:
        raise ValueError(
            f"pass {p.name!r} declares no instance generator: give its Pass an `instances` strategy "
            "(a zero-argument function returning a hypothesis strategy of (model, example_inputs))"
        )
    outcomes: list[tuple[int, float]] = []  # (matches applied, max rel error) per instance

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=False,  # the seed below decides reproducibility
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow],  # building and tracing modules is slow
    )
    @given(p.instances())
    def check_instance(instance: tuple[torch.nn.Module, tuple]) -> None:
        outcomes.append(_check_one(p, *instance, seed))

    if seed is not None:
        check_instance = hypothesis.seed(seed)(check_instance)
    check_instance()
    applied = sum(n for n, _ in outcomes)
    return CheckReport(p.name, len(outcomes), applied, max((e for _, e in outcomes), default=0.0))


def _check_one(p: Pass, model: torch.nn.Module, inputs: tuple, seed: int | None) -> tuple[int, float]:
    """Optimize one instance with ``p`` alone and verify it; return (applied, max rel error)."""
    try:
        # the generated module: the pass is under test, not keep_class's swapping back into the model
        result = optimize(model, inputs, passes=[p], verify=False, keep_class=False)
    except Exception as error:  # a crashing pass (or one that never reaches a fixed point) fails its check
        problem = f"optimize raised {type(error).__name__}: {error}"
        raise AssertionError(_describe(p, model, inputs, problem)) from error
    stats = result.report.passes[0]
    # fired = a rewrite was committed; not "the op count changed": a reparameterization (new
    # weights, same ops) keeps it, and a rewrite that changes nothing never reaches a fixed point
    if stats.applied < 1:
        what = f"the pass did not fire ({stats.applied} applied, ops {stats.nodes_before} -> {stats.nodes_after})"
        raise AssertionError(_describe(p, model, inputs, what, str(result.report)))
    verification = verify(model, result, inputs, seed=seed)
    if not verification.passed:
        raise AssertionError(
            _describe(p, model, inputs, "the optimized model is not equivalent", str(result.report), str(verification))
        )
    return stats.applied, verification.max_rel_error


def _describe(p: Pass, model: torch.nn.Module, inputs: tuple, problem: str, *details: str) -> str:
    header = (f"check_pass({p.name!r}): {problem}", f"instance:\n{model}", f"inputs: {_shapes(inputs)}")
    return "\n".join((*header, *details))


def _shapes(inputs: tuple) -> str:
    def describe(leaf: object) -> str:
        if isinstance(leaf, torch.Tensor):
            return f"Tensor{list(leaf.shape)} {str(leaf.dtype).removeprefix('torch.')}"
        return repr(leaf)

    return ", ".join(describe(leaf) for leaf in pytree.tree_leaves(inputs))
