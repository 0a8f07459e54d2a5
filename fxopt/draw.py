"""``fxopt.draw(before, after, path)``: a picture of what optimize changed, as SVG or HTML.

Both models are drawn in canonical form (fxopt.canonical: one spelling per op, parameters as
named constants) side by side, one node per row in graph order, unchanged nodes on the same row.
Each rewritten region gets one colour and a number, and the legend says what it was and what it
became. No graphviz: rows and arcs are laid out here.

Which nodes a rewrite touched is found by comparing the graphs, since the report does not record
it: a node reading a parameter that is gone or has new values is rewritten (parameters keep their
qualified names through the passes, ``layer1.0.conv1.weight``, so such nodes on both sides pair
up by name); the other nodes are matched in graph order by op, arguments and inputs, a region
taking in the parameter-free nodes (an ``add`` of merged branches) that have no counterpart.
"""

from __future__ import annotations

import copy
import math
import operator
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import torch
from torch.fx import GraphModule, Node

from . import ops
from .canonical import canonicalize
from .capture import capture
from .interpret import attribute

_ROW, _COLUMN, _GAP, _LEFT, _TOP = 22, 330, 140, 20, 40
_PALETTE = ["#f4a261", "#2a9d8f", "#e76f51", "#8ab17d", "#e9c46a", "#7d8cc4", "#d68fd6", "#5fa8d3", "#c9ada7", "#b5838d"]
_UNCHANGED = "#eeeeee"


def draw(before: torch.nn.Module, after: torch.nn.Module, path: str | Path, *, example_inputs: tuple | None = None) -> Path:
    """Write the two graphs side by side with the rewritten regions marked, what each was and became.

    ``before`` is the model given to ``fxopt.optimize`` (or a GraphModule of it), ``after`` its
    result. ``path`` ending in ``.html`` gives a page (the picture plus the list of regions),
    anything else an SVG. ``example_inputs`` is needed only for a ``before`` that
    ``torch.fx.symbolic_trace`` cannot trace (capture then uses torch.export). Returns the path.
    """
    diff = diff_graphs(_canonical_graph(before, example_inputs), _canonical_graph(after, example_inputs))
    svg = _svg(diff, f"{type(before).__name__} -> {type(after).__name__}")
    path = Path(path)
    path.write_text(_html(diff, svg) if path.suffix.lower() in (".html", ".htm") else svg)
    return path


# -- the diff -------------------------------------------------------------------------------------


@dataclass
class Region:
    """Nodes of ``before`` that a rewrite replaced, and the nodes of ``after`` that replaced them."""

    number: int
    before: list[Node]
    after: list[Node]

    def summary(self) -> str:
        was = ", ".join(_label(n) for n in self.before) or "nothing"
        became = ", ".join(_label(n) for n in self.after) or "nothing (removed)"
        return f"region {self.number} was: {was}; became: {became}"


@dataclass
class GraphDiff:
    before: GraphModule
    after: GraphModule
    matched: dict[Node, Node]  # unchanged: before node -> after node
    regions: list[Region] = field(default_factory=list)


def diff_graphs(before: GraphModule, after: GraphModule) -> GraphDiff:
    """Pair the unchanged nodes of two canonical graphs and group the rest into regions."""
    return _Differ(before, after).run()


class _Differ:
    """Matches the nodes of two canonical graphs; union-find keys are ("b", node) and ("a", node)."""

    def __init__(self, before: GraphModule, after: GraphModule):
        self.before, self.after = before, after
        self.b_nodes, self.a_nodes = _drawn(before), _drawn(after)
        self.b_order = {n: i for i, n in enumerate(self.b_nodes)}
        self.a_order = {n: i for i, n in enumerate(self.a_nodes)}
        self.b_constants, self.a_constants = _constants(before), _constants(after)
        self.parent: dict[tuple[str, Node], tuple[str, Node]] = {}  # region membership
        self.members: dict[tuple[str, Node], list[tuple[str, Node]]] = {}  # region root -> its nodes
        self.matched: dict[Node, Node] = {}  # unchanged: before -> after
        self.matched_by: dict[Node, Node] = {}  # after -> before
        self.carrier: dict[Node, Node] = {}  # the after node carrying a before node's value, where known

    def run(self) -> GraphDiff:
        self._seed_regions_from_parameters()
        self._match_in_order()
        self._undo_inconsistent_matches()
        self._merge_orphan_regions()
        self._attach_leftover_after_nodes()
        self._merge_entangled_regions()
        return GraphDiff(self.before, self.after, dict(self.matched), self._regions())

    # -- regions (union-find) -----------------------------------------------------------------

    def _find(self, key: tuple[str, Node]) -> tuple[str, Node]:
        while self.parent.get(key, key) != key:
            key = self.parent[key]
        return key

    def _join(self, *keys: tuple[str, Node]) -> None:
        for key in keys:
            if key not in self.parent:
                self.parent[key] = key
                self.members[key] = [key]
        first = self._find(keys[0])
        for key in keys[1:]:
            root = self._find(key)
            if root != first:
                self.parent[root] = first
                self.members[first] += self.members.pop(root)

    def _in_region(self, key: tuple[str, Node]) -> bool:
        return key in self.parent

    def _members(self, root: tuple[str, Node], side: str) -> list[Node]:
        return [n for s, n in self.members[root] if s == side]

    # -- steps ----------------------------------------------------------------------------------

    def _seed_regions_from_parameters(self) -> None:
        """Nodes reading a parameter that is gone or changed; both sides pair up by its name."""
        by_name: dict[str, list[tuple[str, Node]]] = {}
        for side, nodes, own, other in (
            ("b", self.b_nodes, self.b_constants, self.a_constants),
            ("a", self.a_nodes, self.a_constants, self.b_constants),
        ):
            touched = {n for n in nodes if _changed(n, own, other)}
            for n in touched:
                self._join((side, n))
                for name in _constant_names(n):
                    by_name.setdefault(name, []).append((side, n))
                for user in n.users:  # a chain of rewritten nodes is one region (conv -> bn)
                    if user in touched:
                        self._join((side, n), (side, user))
        for keys in by_name.values():
            if len({side for side, _ in keys}) == 2:
                self._join(*keys)

    def _match_in_order(self) -> None:
        ends = [(n for n in self.b_nodes if n.op == op) for op in ("placeholder", "output")]
        a_ends = [(n for n in self.a_nodes if n.op == op) for op in ("placeholder", "output")]
        for b_side, a_side in zip(ends, a_ends):
            for b, a in zip(b_side, a_side):
                self._pair(b, a)
        for b in self.b_nodes:
            if b in self.matched or self._in_region(("b", b)):
                continue
            a = self._counterpart(b, strict=True)
            if a is not None:
                self._pair(b, a)
            elif not self._absorb(b):
                a = self._counterpart(b, strict=False)  # same op reading other constants: rewritten in place
                self._join(("b", b), *([("a", a)] if a is not None else []))
                carried = [a] if a is not None else [self._carrier(x) for x in _activations(b)]
                if len(carried) == 1 and carried[0] is not None:
                    self.carrier[b] = carried[0]  # rewritten in place, or removed (its input flows past)

    def _undo_inconsistent_matches(self) -> None:
        """A match whose inputs are carried by other nodes than the counterpart reads (an add whose
        operands were regrouped around a merged adapter) was a coincidence: its nodes join the
        region of the input they disagree on."""
        changed = True
        while changed:
            changed = False
            for b, a in list(self.matched.items()):
                for b_in, a_in in _aligned_inputs(b, a, self._carrier):
                    if self._carrier(b_in) is a_in:
                        continue
                    keys = [("b", b_in), ("a", a_in)]
                    for node in (b_in, self.matched_by.get(a_in)):
                        if node is not None and node in self.matched:
                            keys += [("b", node), ("a", self._unpair(node))]
                    self._join(*keys)
                    changed = True
                if changed:
                    break

    def _merge_orphan_regions(self) -> None:
        """A region with nothing after it and no value passed on (an adapter branch) belongs to the
        region its value flowed into."""
        for root in list(self.members):
            if root not in self.members:  # merged into another on the way
                continue
            before = self._members(root, "b")
            if self._members(root, "a") or any(n in self.carrier for n in before):
                continue
            neighbours = [("b", x) for n in before for x in [*n.users, *_activations(n)] if self._in_region(("b", x))]
            neighbours = [k for k in neighbours if self._find(k) != root]
            if neighbours:
                self._join(neighbours[0], root)

    def _attach_leftover_after_nodes(self) -> None:
        for a in self.a_nodes:
            if a in self.matched_by or self._in_region(("a", a)):
                continue
            neighbours = [("a", x) for x in [*_activations(a), *a.users] if self._in_region(("a", x))]
            self._join(("a", a), *neighbours[:1])

    def _merge_entangled_regions(self) -> None:
        """Two regions joined by an edge both before and after are one rewrite (a merged adapter's
        base layer and the sum it fed)."""
        for side, other in (("b", "a"), ("a", "b")):
            for key in list(self.parent):
                if key[0] != side:
                    continue
                for user in key[1].users:
                    if not self._in_region((side, user)) or self._find((side, user)) == self._find(key):
                        continue
                    theirs = set(self._members(self._find((side, user)), other))
                    if any(u in theirs for n in self._members(self._find(key), other) for u in n.users):
                        self._join(key, (side, user))

    def _regions(self) -> list[Region]:
        regions = [Region(0, self._members(root, "b"), self._members(root, "a")) for root in self.members]
        for region in regions:
            region.before.sort(key=self.b_order.__getitem__)
            region.after.sort(key=self.a_order.__getitem__)
        # in the order a reader meets them: by their first node before, else after
        regions.sort(key=lambda r: (
            self.b_order[r.before[0]] if r.before else len(self.b_order), self.a_order[r.after[0]] if r.after else 0
        ))
        for number, region in enumerate(regions, 1):
            region.number = number
        return regions

    # -- helpers --------------------------------------------------------------------------------

    def _pair(self, b: Node, a: Node) -> None:
        self.matched[b], self.matched_by[a], self.carrier[b] = a, b, a

    def _unpair(self, b: Node) -> Node:
        a = self.matched.pop(b)
        del self.matched_by[a], self.carrier[b]
        return a

    def _carrier(self, b: Node) -> Node | None:
        """The after node computing b's value: its match, or its region's single output."""
        if b in self.carrier:
            return self.carrier[b]
        if not self._in_region(("b", b)):
            return None
        root = self._find(("b", b))
        outputs = [
            n for n in self._members(root, "a")
            if any(not self._in_region(("a", u)) or self._find(("a", u)) != root for u in n.users)
        ]
        return outputs[0] if len(outputs) == 1 else None

    def _counterpart(self, b: Node, strict: bool) -> Node | None:
        """The free after node doing what b does on the after nodes carrying b's inputs (strict:
        with equal constants too; else with any constants, given at least one carried input).

        An input from a region with nothing after it yet may be read from an unclaimed after node
        (one no before node accounts for): a layer replaced under another name, as a block that
        keeps its class becomes one ``blocks.0`` conv. The match then claims it for that region."""
        inputs = _activations(b)
        anchors = [a for a in map(self._carrier, inputs) if a is not None]
        if not strict and not anchors:
            return None
        if anchors:
            candidates = list(anchors[0].users)
        elif any(self._orphan(x) for x in inputs):
            candidates = [u for a in self.a_nodes if self._unclaimed(a) for u in a.users]
        else:
            candidates = [n for n in self.a_nodes if not n.all_input_nodes]
        for a in sorted(dict.fromkeys(candidates), key=lambda n: self.a_order.get(n, -1)):
            if a in self.matched_by or self._in_region(("a", a)) or not _same_op(b, a, self.before, self.after):
                continue
            pairs = _aligned_inputs(b, a, self._carrier)
            carried = [self._carrier(b_in) is a_in for b_in, a_in in pairs]
            claimable = [self._orphan(b_in) and self._unclaimed(a_in) for b_in, a_in in pairs]
            if strict and len(pairs) == len(inputs) and all(c or k for c, k in zip(carried, claimable)):
                if _same_constants(b, a, self.b_constants, self.a_constants):
                    for (b_in, a_in), claim in zip(pairs, claimable):
                        if claim:
                            self._join(("b", b_in), ("a", a_in))
                    return a
            if not strict and any(carried):
                return a
        return None

    def _orphan(self, b: Node) -> bool:
        """In a region that has no after nodes yet."""
        return self._in_region(("b", b)) and not self._members(self._find(("b", b)), "a")

    def _unclaimed(self, a: Node) -> bool:
        """Neither matched nor in a region with before nodes."""
        if a in self.matched_by or a.op in ("placeholder", "output"):
            return False
        return not self._in_region(("a", a)) or not self._members(self._find(("a", a)), "b")

    def _absorb(self, b: Node) -> bool:
        """A parameter-free node whose inputs all come from rewritten regions (the add of merged
        branches) and that has no counterpart belongs to them."""
        inputs = _activations(b)
        if _constant_names(b) or not inputs or not all(self._in_region(("b", x)) for x in inputs):
            return False
        self._join(("b", b), *[("b", x) for x in inputs])
        return True


_COMMUTATIVE = {operator.add, operator.mul}


def _aligned_inputs(b: Node, a: Node, carrier: Any) -> list[tuple[Node, Node]]:
    """Pairs (b's input, a's input) at the same argument slot; for add and mul the operand order
    that agrees best with what carries b's inputs."""
    a_slots = dict((slot, x) for slot, x in _slots(a) if x.op != "get_attr")
    pairs = [(x, a_slots[slot]) for slot, x in _slots(b) if x.op != "get_attr" and slot in a_slots]
    if b.target in _COMMUTATIVE and len(pairs) == 2:
        swapped = [(pairs[0][0], pairs[1][1]), (pairs[1][0], pairs[0][1])]
        if sum(carrier(x) is y for x, y in swapped) > sum(carrier(x) is y for x, y in pairs):
            return swapped
    return pairs


def _canonical_graph(model: torch.nn.Module, example_inputs: tuple | None) -> GraphModule:
    """A canonical copy of the model's graph (the model itself is left as it is), without its
    identities: they compute nothing (an ``nn.Identity`` is what a folded BatchNorm becomes in a
    model that keeps its class)."""
    if isinstance(model, GraphModule):
        gm = GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
    else:
        gm = capture(model, example_inputs if example_inputs is not None else ()).module
    gm = canonicalize(gm, example_inputs)
    for node in list(gm.graph.nodes):
        if ops.IDENTITY(node):
            node.replace_all_uses_with(node.kwargs["input"])
            gm.graph.erase_node(node)
    return gm


def _drawn(gm: GraphModule) -> list[Node]:
    """The nodes in a picture: everything but parameters, which are shown by name on their readers."""
    return [n for n in gm.graph.nodes if n.op != "get_attr"]


def _constants(gm: GraphModule) -> dict[str, Any]:
    return {n.target: attribute(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}


def _slots(node: Node) -> Iterator[tuple[str, Node]]:
    """Every node argument with where it sits (``0``, ``1.2``, ``weight``)."""

    def walk(key: str, value: Any) -> Iterator[tuple[str, Node]]:
        if isinstance(value, Node):
            yield key, value
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                yield from walk(f"{key}.{i}", item)
        elif isinstance(value, dict):
            for k, item in value.items():
                yield from walk(f"{key}.{k}", item)

    for i, arg in enumerate(node.args):
        yield from walk(str(i), arg)
    for key, arg in node.kwargs.items():
        yield from walk(key, arg)


def _statics(node: Node) -> list[tuple[str, Any]]:
    """The arguments that are not nodes, with where they sit."""
    plain = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: None)
    return list(_flatten("", plain))


def _flatten(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _flatten(f"{key}.{i}", item)
    elif isinstance(value, dict):
        for k, item in value.items():
            yield from _flatten(f"{key}.{k}", item)
    else:
        yield key, value


def _activations(node: Node) -> list[Node]:
    return [n for n in node.all_input_nodes if n.op != "get_attr"]


def _constant_names(node: Node) -> list[str]:
    return [n.target for n in node.all_input_nodes if n.op == "get_attr"]


def _same_tensor(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return a is b


def _changed(node: Node, own: dict[str, Any], other: dict[str, Any]) -> bool:
    """Reads a constant that the other graph lacks or holds with other values."""
    return any(name not in other or not _same_tensor(own[name], other[name]) for name in _constant_names(node))


def _same_constants(b: Node, a: Node, b_constants: dict[str, Any], a_constants: dict[str, Any]) -> bool:
    b_slots = {slot: x.target for slot, x in _slots(b) if x.op == "get_attr"}
    a_slots = {slot: x.target for slot, x in _slots(a) if x.op == "get_attr"}
    return b_slots.keys() == a_slots.keys() and all(
        _same_tensor(b_constants[b_slots[s]], a_constants[a_slots[s]]) for s in b_slots
    )


def _same_op(b: Node, a: Node, before: GraphModule, after: GraphModule) -> bool:
    if b.op != a.op:
        return False
    if b.op == "call_module":
        same = type(before.get_submodule(b.target)) is type(after.get_submodule(a.target))
    else:
        same = b.target == a.target
    return same and _same_statics(_statics(b), _statics(a))


def _same_statics(b: list[tuple[str, Any]], a: list[tuple[str, Any]]) -> bool:
    if [k for k, _ in b] != [k for k, _ in a]:
        return False
    for (_, x), (_, y) in zip(b, a):
        try:
            if not bool(x == y):
                return False
        except Exception:  # noqa: BLE001 - values that do not compare (tensors): compare their text
            if repr(x) != repr(y):
                return False
    return True


# -- labels -----------------------------------------------------------------------------------------


def _op_name(node: Node) -> str:
    if node.op == "call_method":
        return node.target
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target)).lstrip("_")


def _where(node: Node) -> str | None:
    """The layer a node belongs to: its module, or the common owner of the parameters it reads
    (``layer1.0.conv1``); None for a node that reads no parameters."""
    if node.op == "call_module":
        return node.target
    owners = [name.rpartition(".")[0].split(".") for name in _constant_names(node)]
    common = [parts[0] for parts in zip(*owners) if len(set(parts)) == 1]
    return ".".join(common) or None if owners else None


def _label(node: Node) -> str:
    """``conv layer1.0.conv1``, ``ReLU layer1.0.relu``, ``add_16``, ``input x``, ``output``."""
    if node.op == "placeholder":
        return f"input {node.name}"
    if node.op == "output":
        return "output"
    op, where = _op_name(node), _where(node)
    if where is not None:
        return f"{op} {where}"
    return node.name if node.name.startswith(op) else f"{op} {node.name}"


def _tooltip(node: Node) -> str:
    constants = _constant_names(node)
    return f"{node.name}: {_op_name(node)}" + (f" reading {', '.join(constants)}" if constants else "")


# -- layout and SVG -----------------------------------------------------------------------------------


@dataclass
class _Row:
    before: Node | None
    after: Node | None
    region: Region | None


def _rows(diff: GraphDiff) -> list[_Row]:
    """Rows in before's graph order: a matched pair shares a row, a region's nodes sit together
    (its before and after nodes side by side), after-only nodes come where after has them."""
    region_of = {n: region for region in diff.regions for n in [*region.before, *region.after]}
    after_nodes = _drawn(diff.after)
    after_index = {n: i for i, n in enumerate(after_nodes)}
    matched_after = set(diff.matched.values())
    rows: list[_Row] = []
    emitted: set[int] = set()
    next_after = 0

    def emit(b: Node | None, a: Node | None) -> None:
        region = region_of.get(b) or region_of.get(a)
        if region is None:
            rows.append(_Row(b, a, None))
        elif region.number not in emitted:
            emitted.add(region.number)
            rows.extend(_Row(rb, ra, region) for rb, ra in zip_longest(region.before, region.after))

    def emit_after_only_until(stop: int) -> None:
        nonlocal next_after
        for a in after_nodes[next_after:stop]:
            if a not in matched_after:
                emit(None, a)
        next_after = max(next_after, stop)

    for b in _drawn(diff.before):
        partner = diff.matched.get(b)
        if partner is not None:
            emit_after_only_until(after_index[partner])
            next_after = max(next_after, after_index[partner] + 1)
        emit(b, partner)
    emit_after_only_until(len(after_nodes))
    return rows


def _svg(diff: GraphDiff, title: str) -> str:
    rows = _rows(diff)
    width = _LEFT * 2 + 2 * _COLUMN + _GAP + 120
    summaries = [region.summary() for region in diff.regions] or ["no rewritten regions: the graphs are the same"]
    legend = [(text, line) for text in summaries for line in textwrap.wrap(text, int(width / 7.3), subsequent_indent="    ")]
    legend_top = _TOP + (len(rows) + 1) * _ROW
    height = legend_top + (len(legend) + 1) * _ROW
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<text x="{_LEFT}" y="20" font-weight="bold">{escape(title)}: before (left), after (right)</text>',
    ]
    x_before, x_after = _LEFT + 60, _LEFT + 60 + _COLUMN + _GAP
    y_of: dict[Node, float] = {}
    for i, row in enumerate(rows):
        y = _TOP + i * _ROW
        colour = _PALETTE[(row.region.number - 1) % len(_PALETTE)] if row.region else _UNCHANGED
        if row.region is not None:
            parts.append(
                f'<rect class="region" data-region="{row.region.number}" x="{x_before - 4}" y="{y - 2}" '
                f'width="{2 * _COLUMN + _GAP + 8}" height="{_ROW}" fill="{colour}" fill-opacity="0.25"/>'
            )
            if row.region.before[:1] == [row.before] or (not row.region.before and row.region.after[:1] == [row.after]):
                parts.append(f'<text x="{x_before + _COLUMN + _GAP / 2}" y="{y + 13}" text-anchor="middle" '
                             f'font-weight="bold">region {row.region.number}</text>')
        for node, x in ((row.before, x_before), (row.after, x_after)):
            if node is None:
                continue
            y_of[node] = y + _ROW / 2 - 1
            parts.append(
                f'<g class="node"><title>{escape(_tooltip(node))}</title>'
                f'<rect x="{x}" y="{y}" width="{_COLUMN}" height="{_ROW - 4}" rx="4" fill="{colour}" stroke="#888"/>'
                f'<text x="{x + 6}" y="{y + 13}">{escape(_clip(_label(node), _COLUMN // 7))}</text></g>'
            )
    parts += _edges(diff.before, y_of, x_before, side=-1) + _edges(diff.after, y_of, x_after + _COLUMN, side=1)
    for i, (summary, line) in enumerate(legend):
        parts.append(
            f'<text class="legend" x="{_LEFT}" y="{legend_top + i * _ROW}" xml:space="preserve">'
            f"<title>{escape(summary)}</title>{escape(line)}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _edges(gm: GraphModule, y_of: dict[Node, float], x: float, side: int) -> list[str]:
    """Each data edge as an arc beside the column (outside it), wider for longer spans."""
    paths = []
    for node in _drawn(gm):
        for source in _activations(node):
            if source not in y_of or node not in y_of:
                continue
            y1, y2 = y_of[source], y_of[node]
            bulge = x + side * (10 + 12 * math.log2(1 + abs(y2 - y1) / _ROW))
            paths.append(
                f'<path d="M {x} {y1} C {bulge} {y1}, {bulge} {y2}, {x} {y2}" fill="none" stroke="#555" '
                f'stroke-opacity="0.6"/>'
            )
    return paths


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _html(diff: GraphDiff, svg: str) -> str:
    items = "\n".join(f"<li>{escape(region.summary())}</li>" for region in diff.regions) or "<li>no rewritten regions</li>"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>fxopt: what changed</title></head>\n"
        f"<body style='font-family: sans-serif'>\n<h1>What fxopt changed</h1>\n<ol style='list-style: none'>\n{items}\n"
        f"</ol>\n{svg}\n</body></html>\n"
    )
