"""The pass driver: capture -> canonicalize -> (match -> rewrite -> validate -> commit)* -> codegen -> verify."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch.fx import GraphModule, Node

from .canonical import canonicalize
from .capture import Captured, LeafSpec, capture
from .codegen import finalize
from .errors import FxoptError, InputError, UnknownPassError, VerificationError
from .interpret import attribute, eliminate_dead_code, preserved_buffers, topological
from .pattern import Match, Pass, Pattern, Skip, default_passes, get_pass
from .report import KeptClass, PassReport, Report
from .restore import Kept, Snapshot, keep_class as keep_class_of, snapshot
from .rewriter import Rewriter

if TYPE_CHECKING:
    from fxopt.equivalence.translation import TranslationValidator


def optimize(
    model: torch.nn.Module,
    example_inputs: tuple,
    *,
    passes: Sequence[str | Pass] | None = None,
    verify: bool = True,
    inplace: bool = False,
    leaf_modules: Iterable[LeafSpec] = (),
    autowrap_functions: Iterable[Callable] = (),
    keep_class: bool = True,
) -> torch.nn.Module:
    """Return a module that computes what ``model`` computes, cheaper.

    ``example_inputs`` is a tuple of forward()'s arguments, as for torch.export. ``passes=None``
    runs the default pipeline (see ``fxopt.list_passes()``); a list of names (or Pass objects, for
    a pass being written) runs those, in that order. ``verify=True`` validates every rewrite on the
    activations of the example inputs before committing it (a failing one is rolled back and reported) and checks the whole result against
    a float64 oracle at the end (3 examples; ``fxopt.verify(model, result, example_inputs,
    examples=N)`` checks more). ``model`` is never changed: rewrites make new tensors, and the
    result holds copies of the ones it keeps unchanged. ``inplace=True`` consumes ``model`` to save
    memory (no second copy of its weights, like PEFT's ``merge_and_unload``): the result shares its
    tensors and rewrites write their new values into the ones they free, so ``model`` must not be
    used afterwards, and the whole-model check at the end is left out when that happened (every
    rewrite is still validated before it is committed). ``leaf_modules`` (types or
    qualified names) and ``autowrap_functions`` are kept opaque by tracing.

    The result is a copy of ``model``, of its own class, with the submodules the passes rewrote
    swapped in (each one a copy holding its new parameters, ``nn.Identity``, a plain
    ``nn.ConvNd``/``nn.Linear``, or a generated module), so its other methods (``generate()``,
    ``forward_features()``) and attributes keep working. Where a rewrite crosses the model's own
    forward() (it changes operations of the model itself), the result is the generated module and
    ``report.kept_class.fallback`` says which module and why. ``keep_class=False`` always returns
    the generated ``GraphModule`` (what ``fxopt.save`` writes as source).
    The result carries ``.report`` (an :class:`fxopt.Report`).
    """
    if not isinstance(example_inputs, tuple):
        raise InputError(
            f"example_inputs must be a tuple of forward()'s arguments, got {type(example_inputs).__name__}; "
            "for a single tensor write (x,)"
        )
    selected = default_passes() if passes is None else [p if isinstance(p, Pass) else get_pass(p) for p in passes]
    try:
        return _optimize(model, example_inputs, selected, verify, inplace, leaf_modules, autowrap_functions, keep_class)
    except (InputError, UnknownPassError):
        raise
    except Exception as error:
        rejection = _rejection(model, example_inputs)
        if rejection is None:
            raise
        raise rejection from error


def _optimize(
    model: torch.nn.Module,
    example_inputs: tuple,
    selected: list[Pass],
    verify: bool,
    inplace: bool,
    leaf_modules: Iterable[LeafSpec],
    autowrap_functions: Iterable[Callable],
    keep_class: bool,
) -> torch.nn.Module:
    captured = capture(model, example_inputs, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    gm = canonicalize(captured.module, example_inputs)
    before = snapshot(gm) if keep_class else None
    report = Report(type(model).__name__, captured.frontend, notes=list(captured.notes))
    validator = _validator(gm, example_inputs) if verify else None
    rewriter = Rewriter(gm, example_inputs, reuse_storage=inplace)
    for p in selected:
        report.passes.append(apply_pass(gm, p, rewriter, validator))
    report.notes += rewriter.notes
    kept = _kept_class(model, before, gm, captured, rewriter, inplace, report) if before is not None else None
    result = kept if kept is not None else _generated(model, gm, rewriter, inplace)  # a Sequential can be falsy
    if verify and rewriter.reused:
        report.notes.append(
            f"inplace=True: {rewriter.reused} rewritten tensors were written into the model's own storage, so the "
            "model no longer computes what it did and the whole-model check was left out (each rewrite was "
            "validated before commit); run with inplace=False to compare against the original model"
        )
    elif verify:
        from fxopt.equivalence import verify as verify_models

        # every rewrite was already validated on real activations: a few whole-model examples suffice
        report.verification = verify_models(model, result, example_inputs, examples=3)
        rejection = _rejection(model, example_inputs) if report.verification.exception else None
        if rejection is not None:
            raise rejection
        if kept is not None and not report.verification.passed:
            result = _generated_instead(model, example_inputs, gm, rewriter, inplace, report)
        if not report.verification.passed:
            raise _verification_error(model, report)
    result.report = report
    return result


def _generated(model: torch.nn.Module, gm: GraphModule, rewriter: Rewriter, inplace: bool) -> GraphModule:
    return finalize(gm, f"Optimized{type(model).__name__}", rewriter.committed_attributes, share=inplace)


def _kept_class(
    model: torch.nn.Module, before: Snapshot, gm: GraphModule, captured: Captured, rewriter: Rewriter,
    inplace: bool, report: Report,
) -> torch.nn.Module | None:
    """The user's class with the rewritten submodules swapped in (None: why not is in the report)."""
    try:
        kept = keep_class_of(model, before, gm, captured, rewriter.committed_attributes, inplace)
    except Exception as error:  # noqa: BLE001 - a bug in keeping the class must not lose the optimized model
        kept = (f"keeping the class failed ({type(error).__name__}: {error}); the generated module computes the "
                "same; please report this with the model")
    if not isinstance(kept, Kept):
        report.kept_class = KeptClass(fallback=kept)
        return None
    report.kept_class = KeptClass(kept.swapped)
    report.notes += kept.notes
    return kept.module


def _generated_instead(
    model: torch.nn.Module, example_inputs: tuple, gm: GraphModule, rewriter: Rewriter, inplace: bool,
    report: Report,
) -> torch.nn.Module | None:
    """The kept-class copy failed the whole-model check. When the generated module passes it, a swap
    went wrong (or the model's Python does something its graph does not show): return the generated
    module and say so. When both fail, the passes are at fault: None."""
    from fxopt.equivalence import verify as verify_models

    generated = _generated(model, gm, rewriter, inplace)
    check = verify_models(model, generated, example_inputs, examples=3)
    if not check.passed:
        return None
    failure = " ".join(str(report.verification).splitlines()[:2])
    report.kept_class = KeptClass(
        fallback=f"the copy of {type(model).__name__} with the rewritten submodules swapped in failed the "
        f"whole-model check ({failure}) while the generated module passes it; please report this with the model"
    )
    report.verification = check
    return generated


def _verification_error(model: torch.nn.Module, report: Report) -> VerificationError:
    check = report.verification
    what = "could not run" if check.exception else "failed"
    return VerificationError(
        f"fxopt.optimize did not return a model for {type(model).__name__}: the whole-model check of the "
        f"result {what}, so it may not compute what the model computes.\n{check}\n"
        "What you can do: fxopt.bisect(model, example_inputs) names the first pass and rewrite after which the "
        "model stops verifying; pass passes=[...] without it; please report it with the model "
        "(error.verification.save_counterexample(path) saves the failing input).\n" + str(report),
        report,
        check,
    )


def _rejection(model: torch.nn.Module, example_inputs: tuple) -> InputError | None:
    """The error to raise when the model itself fails on the example inputs (None if it runs).
    Asked only after something failed, so a working model pays nothing for it."""
    try:
        with torch.no_grad(), preserved_buffers(model):
            model(*example_inputs)
    except Exception as error:  # noqa: BLE001 - any failure of the user's own model is the answer
        first_line = (str(error).strip().splitlines() or [""])[0]
        return InputError(
            f"example_inputs do not fit {type(model).__name__}: calling the model on them raises "
            f"{type(error).__name__}: {first_line}. Pass a tuple of the arguments forward() takes, with the "
            "shapes and dtypes it expects."
        )
    return None


def _validator(gm: GraphModule, example_inputs: tuple) -> TranslationValidator:
    # imported here: fxopt.equivalence imports fxopt, which is still initialising at module level
    from fxopt.equivalence.translation import TranslationValidator

    return TranslationValidator(gm, example_inputs)


def apply_pass(
    gm: GraphModule, p: Pass, rewriter: Rewriter, validator: TranslationValidator | None = None
) -> PassReport:
    """Apply every pattern of ``p`` to a fixed point; return what happened."""
    stats = PassReport(p.name, nodes_before=_count_nodes(gm), params_before=_count_params(gm))
    patterns = sorted(p.patterns, key=lambda pat: -pat.benefit)
    worklist = deque(n for n in gm.graph.nodes if _anchors_a_pattern(n, patterns))
    skipped: list[tuple[Node, str]] = []
    budget = 10 * len(gm.graph.nodes) + 100  # a correct pass shrinks or keeps the graph: this is ample
    while worklist:
        if stats.matched > budget:
            raise FxoptError(
                f"pass {p.name!r} did not reach a fixed point after {stats.matched} matches: a pattern's "
                "replacement matches the pattern again; make rewrite() produce something match() rejects"
            )
        node = worklist.popleft()
        if getattr(node, "_erased", False):
            continue
        skip: Skip | None = None
        for pattern in patterns:
            if not pattern.anchor(node):
                continue
            found = pattern.match(node, rewriter)
            if isinstance(found, Skip):
                skip = skip or found
                continue
            if found is None:
                continue
            stats.matched += 1
            outcome = _apply(found, pattern, rewriter, validator, stats, worklist, patterns)
            if isinstance(outcome, Skip):
                skip = skip or outcome
            elif outcome:
                skip = None
                break
        if skip is not None:
            skipped.append((node, skip.reason))
    eliminate_dead_code(gm.graph)
    # a node skipped once and rewritten later (a BatchNorm folded into the conv after it) is not left over
    stats.skipped += [(node.name, reason) for node, reason in skipped if not getattr(node, "_erased", False)]
    stats.nodes_after, stats.params_after = _count_nodes(gm), _count_params(gm)
    return stats


def _anchors_a_pattern(node: Node, patterns: list[Pattern]) -> bool:
    """Asked of each anchor op itself, so an anchor may accept more than one target (see ops.ANY)."""
    return any(pat.anchor(node) for pat in patterns)


def _apply(
    match: Match,
    pattern: Pattern,
    rewriter: Rewriter,
    validator: TranslationValidator | None,
    stats: PassReport,
    worklist: deque[Node],
    patterns: list[Pattern],
) -> bool | Skip:
    """Rewrite one match; validate it (when a validator is given), then commit (True) or roll back
    (False: reported as rolled back; a Skip: a precondition only the built replacement shows)."""
    rewriter.begin(match.root)
    replacement = pattern.rewrite(match, rewriter)
    replacements = replacement if isinstance(replacement, dict) else {match.root: replacement}
    matched = topological(match.nodes.values())
    created = list(rewriter.created)
    moves = rewriter.metadata_moves(replacements, matched)
    if isinstance(moves, str):
        rewriter.rollback()
        return Skip(moves)
    if validator is not None:
        check = validator.check(matched, replacements, created)
        if not check.passed:
            rewriter.rollback()
            stats.rolled_back.append((match.root.name, str(check)))
            return False
        stats.verified += 1
        stats.max_rel_error = max(stats.max_rel_error, check.max_rel_error)
    rewriter.commit(replacements, matched, moves)
    stats.applied += 1
    # the new nodes, and the nodes now reading them (a BatchNorm after a sum just merged into a conv)
    readers = [u for new in replacements.values() if not getattr(new, "_erased", False) for u in new.users]
    worklist.extend(n for n in (*created, *readers) if _anchors_a_pattern(n, patterns))
    return True


def _count_nodes(gm: GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr"))


def _count_params(gm: GraphModule) -> int:
    return sum(t.numel() for t in _read_tensors(gm))


def _read_tensors(gm: GraphModule) -> list[torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in seen:
            value = attribute(gm, n.target)
            if isinstance(value, torch.Tensor):
                seen[n.target] = value
        elif n.op == "call_module":
            for name, t in gm.get_submodule(n.target).state_dict().items():
                seen[f"{n.target}.{name}"] = t
    return list(seen.values())
