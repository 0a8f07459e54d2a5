"""What a pass is: patterns (match, then rewrite) plus the instances that test them.

A pattern anchors on one canonical op. The engine offers it every node of that op; ``match``
looks around the node and answers

* ``None``: not this pattern's shape (nothing is reported),
* ``Skip(reason)``: the shape is there but a precondition fails (the reason goes in the report),
* ``Match(root, nodes)``: the subgraph ``nodes`` may be replaced; ``root`` is its output.

``rewrite`` then builds the replacement through the :class:`~fxopt.rewriter.Rewriter` and returns
the node that takes over ``root``'s uses, or, for a rewrite that replaces several nodes of the
match at once, a dict {replaced node: replacement} (build each under ``rw.inserting_before``).
It must not change existing nodes: the engine validates
the replacement against the matched subgraph first and commits or rolls it back.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.fx import Node

from .errors import UnknownPassError
from .ops import Op

if TYPE_CHECKING:
    from .rewriter import Rewriter


@dataclass(frozen=True)
class Skip:
    """A structural match whose precondition failed; ``reason`` is read by users in the report."""

    reason: str


@dataclass(frozen=True)
class Match:
    """A matched subgraph: ``nodes`` by role name; ``root`` is the node whose value is replaced.

    ``facts`` carries what ``match`` computed that ``rewrite`` needs too (a merged kernel), so
    it is not computed twice.
    """

    root: Node
    nodes: dict[str, Node]
    facts: Any = None


class Pattern(ABC):
    """One rewrite rule. Subclasses set ``anchor`` (and optionally ``benefit``: higher is tried first)."""

    anchor: Op
    benefit: int = 1

    @abstractmethod
    def match(self, node: Node, rw: Rewriter) -> Match | Skip | None: ...

    @abstractmethod
    def rewrite(self, match: Match, rw: Rewriter) -> Node | dict[Node, Node]: ...


@dataclass(frozen=True)
class Pass:
    """A named family of patterns, applied together to a fixed point.

    ``default``: part of ``optimize``'s default pipeline (exact, never slower or larger).
    ``instances``: a zero-argument function returning a hypothesis strategy of
    ``(module, example_inputs)`` pairs that exhibit the pattern (used by ``check_pass``).
    """

    name: str
    description: str
    patterns: tuple[Pattern, ...]
    instances: Callable[[], Any] | None = None
    default: bool = True


_REGISTRY: dict[str, Pass] = {}


def register(p: Pass) -> Pass:
    """Make ``p`` available to ``optimize`` by name; the default pipeline runs passes in registration order."""
    if p.name in _REGISTRY:
        raise ValueError(f"a pass named {p.name!r} is already registered")
    _REGISTRY[p.name] = p
    return p


def get_pass(name: str) -> Pass:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownPassError(
            f"no pass named {name!r}.{hint} Registered passes: {', '.join(_REGISTRY)} (see fxopt.list_passes())."
        )
    return _REGISTRY[name]


def registered_passes() -> list[Pass]:
    return list(_REGISTRY.values())


def list_passes() -> dict[str, str]:
    """The registered pass names, each with its one-line description."""
    return {p.name: p.description for p in _REGISTRY.values()}


def default_passes() -> list[Pass]:
    return [p for p in _REGISTRY.values() if p.default]
