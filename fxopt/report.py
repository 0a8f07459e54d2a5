"""The report ``optimize`` attaches to its result: what each pass found, did, skipped and checked."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate


@dataclass
class PassReport:
    name: str
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0
    matched: int = 0
    applied: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason)
    rolled_back: list[tuple[str, str]] = field(default_factory=list)  # (node name, error)
    verified: int = 0
    max_rel_error: float = 0.0

    def skip_reasons(self) -> Counter[str]:
        return Counter(reason for _, reason in self.skipped)


@dataclass
class KeptClass:
    """What ``optimize(keep_class=True)`` returned: the user's class with submodules swapped in, or
    (``fallback`` set) the generated module, and why the class could not be kept."""

    swapped: list[tuple[str, str]] = field(default_factory=list)  # (submodule path, what it became)
    fallback: str | None = None

    def lines(self, model: str) -> list[str]:
        if self.fallback is not None:
            return [f"kept class: no, returned a generated module instead of {model}: {self.fallback}"]
        if not self.swapped:
            return [f"kept class: {model}, no submodule changed"]
        # one line per kind of swap (a ResNet-50 has 53 of each), naming a few of the submodules
        kinds: dict[str, list[str]] = {}
        for path, what in self.swapped:
            kinds.setdefault(_without_arguments(what), []).append(path or "(the model)")
        lines = [f"kept class: {model}, with {len(self.swapped)} submodules swapped (report.kept_class.swapped lists them)"]
        for what, paths in kinds.items():
            more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
            lines.append(f"  {', '.join(paths[:3])}{more}: {what}")
        return lines


def _without_arguments(what: str) -> str:
    """``nn.Conv2d -> nn.Conv2d(64, 64, kernel_size=(3, 3))`` -> ``nn.Conv2d -> nn.Conv2d``."""
    out, depth = [], 0
    for i, char in enumerate(what):
        opens_arguments = char == "(" and i > 0 and what[i - 1].isalnum()
        if opens_arguments or (char == "(" and depth):
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(char)
    return "".join(out)


@dataclass
class Report:
    """``str(report)`` is a table, one row per pass, then notes and the final verification."""

    model: str
    frontend: str
    passes: list[PassReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verification: Any = None  # fxopt.equivalence.VerificationResult, when verify=True
    kept_class: KeptClass | None = None  # set by optimize(keep_class=True)

    def __str__(self) -> str:
        rows = []
        for p in self.passes:
            skips = "; ".join(f"{n}x {reason}" for reason, n in p.skip_reasons().items()) or "-"
            checked = f"{p.verified} ok, max rel err {p.max_rel_error:.1e}" if p.verified else "-"
            if p.rolled_back:
                checked += f"; {len(p.rolled_back)} rolled back"
            rows.append(
                [
                    p.name,
                    p.matched,
                    p.applied,
                    skips,
                    f"{p.nodes_before} -> {p.nodes_after}",
                    f"{p.params_before:,} -> {p.params_after:,}",
                    checked,
                ]
            )
        headers = ["pass", "matched", "applied", "skipped (reason)", "nodes", "parameters", "validated"]
        lines = [f"fxopt report for {self.model} (captured with {self.frontend})"]
        lines.append(tabulate(rows, headers=headers, tablefmt="simple", maxcolwidths=[None] * 3 + [60] + [None] * 3))
        for p in self.passes:
            for where, error in p.rolled_back:
                lines.append(f"rolled back: {p.name} at {where}: {error}")
        lines += [f"note: {n}" for n in self.notes]
        if self.kept_class is not None:
            lines += self.kept_class.lines(self.model)
        if self.verification is not None:
            verdict = "passed" if self.verification.passed else "FAILED"
            lines.append(
                f"whole-model verification {verdict}: {self.verification.examples} examples, "
                f"max abs err {self.verification.max_abs_error:.2e}, max rel err {self.verification.max_rel_error:.2e}"
            )
        return "\n".join(lines)
