"""Keep the user's class: the optimized graph as a copy of the user's own model with its rewritten
submodules swapped in, so its other methods (``generate()``, ``forward_features()``,
``save_pretrained()``) keep working, as timm's ``reparameterize_model`` and PEFT's
``merge_and_unload`` do.

One-way stage after the passes. It reads the canonical graph before the passes (a ``Snapshot``),
the optimized canonical graph and the user's model, and returns a ``Kept`` model or the reason it
cannot. Every node carries the module calls it was traced in (``meta["nn_module_stack"]``; the
Rewriter stamps the nodes rewrites create), so both graphs split into one region per module call.

A module is *kept* (a copy of it runs its own forward()) when its own operations, those outside
its submodules, are the same before and after the passes: the same ops on the same values, only
parameters may hold new tensors (re-centred weights, a merged LoRA weight). Its submodules are then
decided one by one, top-down, each from the values it receives and returns. A submodule that is
not kept becomes, in this order of preference: ``nn.Identity`` (its computation vanished, a folded
BatchNorm), one of its own submodules (a LoRA wrapper whose base layer absorbed the adapter),
a plain ``nn.ConvNd``/``nn.Linear`` (its region is one such layer on its input), or a generated
module (a GraphModule of its optimized region, given the forward() signature its caller used).
A module whose own operations changed and that none of these fits makes its parent not kept; when
that reaches the model itself, the caller returns the generated module, with the reason.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_aggregate, map_arg

from . import ops, runtime
from .capture import BOUNDARY, CallRecord, Captured, Slot
from .codegen import finalize
from .interpret import attribute, preserved_buffers
from .rewriter import base_name

ROOT = ""  # the call key of the model's own forward()
_OWN, _INPUT, _ATTR = "<own>", "<input>", "<attr>"  # where a node sits relative to a call (else a child's key)
_COMPUTE = ("call_function", "call_method", "call_module")
# canonical ops codegen lowers to another op with the same arguments: the kept module computes that op
_LOWERED_AS = {ops.zero_mean_rms_norm: F.layer_norm}


# ---------------------------------------------------------------------------------------------
# the graph before the passes


@dataclass
class Snapshot:
    """A copy of the canonical graph before the passes (they edit the working graph in place)."""

    graph: Graph
    twin: dict[Node, Node]  # working-graph node -> its copy here
    tensors: dict[Node, torch.Tensor]  # get_attr node here -> the tensor it read


def snapshot(gm: GraphModule) -> Snapshot:
    graph = Graph()
    twin: dict[Node, Node] = {}
    graph.output(graph.graph_copy(gm.graph, twin))
    tensors = {}
    for node in graph.find_nodes(op="get_attr"):
        value = attribute(gm, node.target)
        if isinstance(value, torch.Tensor):
            tensors[node] = value
    return Snapshot(graph, twin, tensors)


# ---------------------------------------------------------------------------------------------
# what restore hands back


@dataclass
class Kept:
    module: nn.Module
    swapped: list[tuple[str, str]]  # (submodule path, what it became)
    notes: list[str] = field(default_factory=list)


def keep_class(
    model: nn.Module, before: Snapshot, gm: GraphModule, captured: Captured, fresh: set[str], inplace: bool
) -> Kept | str:
    """A copy of ``model`` computing what the optimized canonical graph ``gm`` computes, or why not.

    ``fresh``: the names of the tensors rewrites made (they belong to the result); any other tensor
    is the user's, and is copied unless ``inplace``. The user's model is not changed."""
    restorer = _Restorer(model, before, gm, captured, fresh, inplace)
    try:
        return restorer.run()
    except _Mismatch as why:
        return str(why)


class _Mismatch(Exception):
    """A module's optimized region is not what keeping or swapping it would compute (the message says why)."""


# ---------------------------------------------------------------------------------------------
# plans: what each module call becomes


@dataclass
class _Keep:
    """A copy of the module running its own forward(); ``params``: (old tensor, new tensor) its own
    operations read; ``children``: the plans of the calls it makes (absent: copied unchanged)."""

    key: str
    module: nn.Module
    params: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    children: dict[str, _Plan] = field(default_factory=dict)
    recomputed: list[Node] = field(default_factory=list)  # values the passes folded to constants
    reads: list[tuple[torch.Tensor, str]] = field(default_factory=list)  # tensors its own operations read unchanged


@dataclass
class _Swap:
    """Another module in the module's place: a new one, or (a _Keep) a copy of one of its submodules."""

    key: str
    module: nn.Module
    new: nn.Module | _Keep
    what: str


_Plan = _Keep | _Swap
# (module, attribute name) -> (old tensor, new tensor): what a kept module's own parameters become
_Updates = dict[tuple[nn.Module, str], tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# the two graphs, split by module call


# the scope torch.export's own passes give the nodes they create: a placeholder, not a module path
_NO_MODULE = "_empty_nn_module_stack_from_metadata_hook"


def _stack(node: Node, paths: dict[str, str]) -> tuple[str, ...]:
    """The keys of the module calls a node was traced in, outermost first (the model's own left
    out); records each call's module path in ``paths``."""
    stack = node.meta.get("nn_module_stack") or {}
    keys = []
    for key, (path, _) in stack.items():
        if path and path != _NO_MODULE:
            keys.append(key)
            paths.setdefault(key, path)
    return tuple(keys)


class _Regions:
    """One graph's compute nodes by the module calls they belong to."""

    def __init__(self, graph: Graph, paths: dict[str, str]):
        self.graph = graph
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.stacks = {n: _stack(n, paths) for n in graph.nodes if n.op in _COMPUTE}
        self.members: dict[str, list[Node]] = {ROOT: []}
        for node, stack in self.stacks.items():
            self.members[ROOT].append(node)
            for key in stack:
                self.members.setdefault(key, []).append(node)
        self._inputs: dict[str, list[Node]] = {}
        self._outputs: dict[str, list[Node]] = {}

    def region(self, key: str) -> list[Node]:
        return self.members.get(key, [])

    def inside(self, node: Node, key: str) -> bool:
        return node in self.stacks and (key == ROOT or key in self.stacks[node])

    def inputs(self, key: str) -> list[Node]:
        """The values a call's region reads from outside it (parameters left out), in graph order."""
        if key not in self._inputs:
            found = {a: None for n in self.region(key) for a in n.all_input_nodes
                     if a.op != "get_attr" and not self.inside(a, key)}
            self._inputs[key] = sorted(found, key=self.order.__getitem__)
        return self._inputs[key]

    def outputs(self, key: str) -> list[Node]:
        """The region's nodes read from outside it."""
        if key not in self._outputs:
            self._outputs[key] = [n for n in self.region(key) if any(not self.inside(u, key) for u in n.users)]
        return self._outputs[key]


def _place(stack: tuple[str, ...], level: str, skip: str | None) -> str | None:
    """Where a node with ``stack`` sits relative to call ``level``: _OWN, the key of the child call it
    is in, or None (outside). ``skip``: a child of ``level`` whose own operations count as ``level``'s."""
    if level == ROOT:
        rest = stack
    elif level in stack:
        rest = stack[stack.index(level) + 1:]
    else:
        return None
    if skip is not None and rest and rest[0] == skip:
        rest = rest[1:]
    return rest[0] if rest else _OWN


@dataclass
class _Call:
    key: str
    path: str
    parent: str
    children: list[str] = field(default_factory=list)


def _call_tree(paths: dict[str, str], *regions: _Regions) -> dict[str, _Call]:
    calls = {ROOT: _Call(ROOT, "", ROOT)}
    for stack in dict.fromkeys(s for r in regions for s in r.stacks.values()):  # in graph order, once each
        parent = ROOT
        for key in stack:
            if key not in calls:
                calls[key] = _Call(key, paths[key], parent)
                calls[parent].children.append(key)
            parent = key
    return calls


# ---------------------------------------------------------------------------------------------
# matching one kept call's own operations


class _Level:
    """Unifies the own operations of call ``key0`` before the passes with those of ``key1`` after
    (the same call, or for a swap by a submodule ``skip`` of ``key1``, that submodule), pairing every
    value the call computes or reads before with the one the optimized graph holds there."""

    def __init__(self, restorer: _Restorer, key0: str, key1: str, skip: str | None, given: dict[Node, Node]):
        self.r = restorer
        self.key0, self.key1, self.skip = key0, key1, skip
        self.given = given  # the call's inputs before -> after
        self.pairs: dict[Node, Node] = {}
        self.outs: dict[str, dict[Node, Node]] = {}  # child call -> its outputs before -> after
        self.vanished: set[str] = set()  # children whose computation vanished (output = input)
        self.params: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.reads: list[tuple[torch.Tensor, str]] = []
        self.recomputed: list[Node] = []
        self.passed_over: set[Node] = set()  # optimized-graph casts to the dtype their input has
        self._trail: list[tuple[str, Any]] = []

    @property
    def who(self) -> str:
        return self.r.who(self.key0)

    # -- where a node sits --

    def _place0(self, node: Node) -> str | None:
        return self._place(node, self.r.before.stacks, self.key0, None)

    def _place1(self, node: Node) -> str | None:
        return self._place(node, self.r.after.stacks, self.key1, self.skip)

    @staticmethod
    def _place(node: Node, stacks: dict[Node, tuple[str, ...]], level: str, skip: str | None) -> str | None:
        if node.op == "get_attr":
            return _ATTR
        if node.op == "placeholder":
            return _INPUT if level == ROOT else None
        return _place(stacks[node], level, skip)

    # -- unification --

    def unify(self, value0: Any, value1: Any) -> None:
        work: list[tuple[Node, Node]] = []
        self._zip(value0, value1, work)
        while work:
            self._step(*work.pop(), work)

    def _zip(self, v0: Any, v1: Any, work: list[tuple[Node, Node]]) -> None:
        if isinstance(v0, Node) and isinstance(v1, Node):
            work.append((v0, v1))
        elif isinstance(v0, Node) or isinstance(v1, Node):
            node, other = (v0, v1) if isinstance(v0, Node) else (v1, v0)
            raise _Mismatch(f"{self.who}: {_describe(node)} became the constant {other!r}")
        elif isinstance(v0, (list, tuple)) and isinstance(v1, (list, tuple)) and len(v0) == len(v1):
            for a, b in zip(v0, v1):
                self._zip(a, b, work)
        elif isinstance(v0, dict) and isinstance(v1, dict) and v0.keys() == v1.keys():
            for k in v0:
                self._zip(v0[k], v1[k], work)
        elif isinstance(v0, slice) and isinstance(v1, slice):
            self._zip((v0.start, v0.stop, v0.step), (v1.start, v1.stop, v1.step), work)
        elif not _same_constant(v0, v1):
            raise _Mismatch(f"{self.who}: an argument {v0!r} became {v1!r}")

    def _step(self, n0: Node, n1: Node, work: list[tuple[Node, Node]]) -> None:
        if n0 in self.pairs:
            if self.pairs[n0] is not n1:
                raise _Mismatch(
                    f"{self.who}: the value of {_describe(n0)} is computed twice in the optimized graph "
                    f"({_describe(self.pairs[n0])} and {_describe(n1)})"
                )
            return
        place0, place1 = self._place0(n0), self._place1(n1)
        if place1 == _OWN and not (place0 == _OWN and _same_op(n0, n1)) and self.r.is_idle_cast(n1):
            self.passed_over.add(n1)  # a cast that changes nothing (the kept forward() need not run it)
            self._trail.append(("passed", n1))
            work.append((n0, n1.args[0]))
            return
        if place0 == _ATTR:
            self._param(n0, n1)
        elif place0 == _INPUT:
            if not (place1 == _INPUT and n0.target == n1.target):
                raise _Mismatch(f"{self.who}: its input {n0.target} is read as {_describe(n1)}")
            self._pair(n0, n1)
        elif place0 is None:
            if self.given.get(n0) is not n1:
                raise _Mismatch(
                    f"{self.who}: the optimized graph reads {_describe(n1)} where it was given {_describe(n0)}"
                )
            self._pair(n0, n1)
        elif place0 == _OWN:
            self._own(n0, n1, place1, work)
        else:
            self._child_output(place0, n0, n1, place1, work)

    def _own(self, n0: Node, n1: Node, place1: str | None, work: list[tuple[Node, Node]]) -> None:
        if place1 == _OWN and _same_op(n0, n1):
            self._pair(n0, n1)
            self._zip((n0.args, n0.kwargs), (n1.args, n1.kwargs), work)
        elif _is_noop(n0):  # the kept forward() still runs it: it returns its input
            self._pair(n0, n1)
            work.append((_noop_input(n0), n1))
        elif self._recomputable(n0, n1):
            self._pair(n0, n1)
        else:
            children = sorted({self.r.path(p) for a in n0.all_input_nodes
                               if (p := self._place0(a)) not in (_OWN, _ATTR, _INPUT, None)})
            of = f" of the outputs of {', '.join(children)}" if children else ""
            where = ("" if place1 == _OWN else f" in submodule {self.r.path(place1)}"
                     if place1 not in (None, _INPUT, _ATTR) else " outside it")
            raise _Mismatch(
                f"{self.who}: its forward() computes {_describe(n0)}{of}, but the optimized graph has "
                f"{_describe(n1)}{where} there: a rewrite changed operations of {self.who.split(' (')[0]} itself"
                + (", merging across those submodules" if children else "")
            )

    def _child_output(self, child: str, n0: Node, n1: Node, place1: str | None, work: list[tuple[Node, Node]]) -> None:
        if place1 == child:
            self._pair(n0, n1)
            self._out(child, n0, n1)
        elif self._recomputable(n0, n1):  # before "vanished": a folded child's output is a constant, not its input
            self._pair(n0, n1)
        elif not self.r.after.region(child) and len(self.r.before.inputs(child)) == 1:
            self._pair(n0, n1)  # the child computes nothing now: its output is its input
            self._out(child, n0, n1)
            if child not in self.vanished:
                self.vanished.add(child)
                self._trail.append(("vanished", child))
            work.append((self.r.before.inputs(child)[0], n1))
        else:
            where = f"in submodule {self.r.path(place1)}" if place1 not in (None, _OWN, _INPUT, _ATTR) else "not in it"
            raise _Mismatch(
                f"{self.who}: the output {_describe(n0)} of its submodule {self.r.path(child)} is now computed by "
                f"{_describe(n1)} ({where}): a rewrite crossed the submodule's boundary"
            )

    def _recomputable(self, n0: Node, n1: Node) -> bool:
        """A value that does not depend on the model's inputs, which the passes folded to constant
        ``n1``: the kept forward() computes it again, so it must equal that constant (and come from
        tensors no rewrite changed, checked once every module is decided)."""
        if n1.op != "get_attr" or n0 in self.r.varies or not self.r.equals_folded(n0, n1):
            return False
        self.recomputed.append(n0)
        return True

    def _param(self, n0: Node, n1: Node) -> None:
        if n1.op != "get_attr":
            raise _Mismatch(
                f"{self.who}: its parameter {n0.target} is computed by {_describe(n1)} in the optimized graph"
            )
        t0, t1 = self.r.before_tensor(n0), self.r.after_tensor(n1)
        if t1 is t0 and t0 is not None:
            self.reads.append((t0, n0.target))
            return
        if t0 is None and n0.target == n1.target:
            return
        if base_name(n1.target) != base_name(n0.target) or t0 is None or t1 is None:
            raise _Mismatch(f"{self.who}: it reads {n0.target} where the optimized graph reads {n1.target}")
        if t1.shape != t0.shape or t1.dtype != t0.dtype:
            raise _Mismatch(
                f"{self.who}: {n0.target} became a {tuple(t1.shape)} {t1.dtype} tensor (was {tuple(t0.shape)} "
                f"{t0.dtype}), which its forward() does not expect"
            )
        self.params.append((t0, t1))

    def _pair(self, n0: Node, n1: Node) -> None:
        self.pairs[n0] = n1
        self._trail.append(("pair", n0))

    def _out(self, child: str, n0: Node, n1: Node) -> None:
        self.outs.setdefault(child, {})[n0] = n1
        self._trail.append(("out", (child, n0)))

    # -- speculation, for pairing a child's inputs --

    def _checkpoint(self) -> tuple[int, int, int, int]:
        return len(self._trail), len(self.params), len(self.recomputed), len(self.reads)

    def _rollback(self, mark: tuple[int, int, int, int]) -> None:
        trail, params, recomputed, reads = mark
        while len(self._trail) > trail:
            kind, item = self._trail.pop()
            if kind == "pair":
                del self.pairs[item]
            elif kind == "out":
                child, n0 = item
                del self.outs[child][n0]
                if not self.outs[child]:
                    del self.outs[child]
            elif kind == "passed":
                self.passed_over.discard(item)
            else:
                self.vanished.discard(item)
        del self.params[params:], self.recomputed[recomputed:], self.reads[reads:]

    # -- the whole level --

    def run(self, starts: Iterable[tuple[Any, Any]]) -> None:
        for value0, value1 in starts:
            self.unify(value0, value1)
        done: set[str] = set()
        while pending := [c for c in self.outs if c not in done]:
            for child in pending:
                done.add(child)
                if child not in self.vanished:
                    self._pair_inputs(child)
        self._check_complete()

    def _pair_inputs(self, child: str) -> None:
        """Pair each value the child's optimized region reads with one the call passes it before."""
        before, after = self.r.before.inputs(child), self.r.after.inputs(child)
        for n1 in after:
            if any(self.pairs.get(n0) is n1 for n0 in before):
                continue
            twin = self.r.twin.get(n1)
            candidates = sorted((n0 for n0 in before if n0 not in self.pairs), key=lambda n0: n0 is not twin)
            for n0 in candidates:
                mark = self._checkpoint()
                try:
                    self.unify(n0, n1)
                    break
                except _Mismatch:
                    self._rollback(mark)
            else:
                raise _Mismatch(
                    f"{self.r.who(child)}: its optimized region reads {_describe(n1)}, which is none of the values "
                    f"{self.who} passes it: a rewrite crossed the submodule's boundary"
                )

    def _check_complete(self) -> None:
        """Every operation of the optimized level is one its forward() runs, and every value a child
        computes for others is one the child returns."""
        paired = set(self.pairs.values()) | self.passed_over
        children: set[str] = set()
        for n1 in self.r.after.region(self.key1):
            place = self._place1(n1)
            if place == _OWN and n1 not in paired:
                raise _Mismatch(
                    f"{self.who}: the optimized graph computes {_describe(n1)} in it, which its forward() does not"
                )
            if place not in (_OWN, None):
                children.add(place)
        for child in children:
            returned = set(self.outs.get(child, {}).values())
            for n1 in self.r.after.outputs(child):
                if n1 not in returned:
                    raise _Mismatch(
                        f"{self.r.who(child)}: the optimized graph reads {_describe(n1)} from inside it, which it does "
                        "not return: a rewrite crossed the submodule's boundary"
                    )

    def given_to(self, child: str) -> dict[Node, Node]:
        return {n0: self.pairs[n0] for n0 in self.r.before.inputs(child) if n0 in self.pairs}


# ---------------------------------------------------------------------------------------------
# deciding every call, then assembling the copy


class _Restorer:
    def __init__(self, model: nn.Module, before: Snapshot, gm: GraphModule, captured: Captured, fresh: set[str],
                 inplace: bool):
        self.model, self.gm, self.fresh, self.inplace = model, gm, fresh, inplace
        self.snapshot = before
        self.exported = not captured.calls and captured.frontend == "torch.export"
        self.records = captured.calls
        paths: dict[str, str] = {}
        self.before, self.after = _Regions(before.graph, paths), _Regions(gm.graph, paths)
        self.calls = _call_tree(paths, self.before, self.after)
        self._layers: dict[tuple, nn.Module] = {}  # a configured nn layer per configuration, to copy
        self.twin = before.twin
        self.tags = {tag: n for n in before.graph.nodes for tag in n.meta.get(BOUNDARY, ())}
        self.varies = _input_dependent(before.graph)
        self.user_tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self.notes: list[str] = []
        self._values: dict[Node, Any] = {}  # input-independent values before the passes, computed on demand

    # -- names --

    def path(self, key: str) -> str:
        return self.calls[key].path

    def module(self, key: str) -> nn.Module:
        return self.model if key == ROOT else self.model.get_submodule(self.path(key))

    def who(self, key: str) -> str:
        if key == ROOT:
            return f"{type(self.model).__name__} (the model itself)"
        return f"{self.path(key)} ({type(self.module(key)).__name__})"

    def before_tensor(self, node: Node) -> torch.Tensor | None:
        return self.snapshot.tensors.get(node)

    def after_tensor(self, node: Node) -> torch.Tensor | None:
        value = attribute(self.gm, node.target)
        return value if isinstance(value, torch.Tensor) else None

    def equals_folded(self, n0: Node, n1: Node) -> bool:
        """Whether input-independent node ``n0`` of the graph before the passes computes constant ``n1``."""
        folded = self.after_tensor(n1)
        value = self._value_before(n0)
        return (isinstance(value, torch.Tensor) and folded is not None and value.shape == folded.shape
                and value.dtype == folded.dtype and torch.equal(value, folded))

    def _value_before(self, node: Node) -> Any:
        """Evaluate an input-independent node of the graph before the passes, from the tensors it read
        then (None when that fails)."""
        if node not in self._values:
            try:
                for n in sorted(_ancestors(node) - self._values.keys(), key=self.before.order.__getitem__):
                    self._values[n] = self._evaluate(n)
            except Exception:  # noqa: BLE001 - a value we cannot recompute is simply not recomputable
                return None
        return self._values[node]

    def _evaluate(self, node: Node) -> Any:
        if node.op == "get_attr":
            return self.snapshot.tensors[node] if node in self.snapshot.tensors else attribute(self.model, node.target)
        args, kwargs = map_arg((node.args, node.kwargs), self._values.__getitem__)
        with torch.no_grad():
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                module = self.model.get_submodule(node.target)
                with preserved_buffers(module):  # the user's model stays as it was, statistics included
                    return module(*args, **kwargs)
        raise ValueError(f"cannot evaluate {node.op} {node.name}")

    def is_idle_cast(self, node: Node) -> bool:
        """An optimized-graph cast to the dtype its input already has (PEFT casts a LoRA layer's result
        back to the base layer's dtype: after merging, the layer computes in that dtype)."""
        target = _cast_target(node)
        return target is not None and target == self._dtype_after(node.args[0])

    def _dtype_after(self, node: Any) -> torch.dtype | None:
        if not isinstance(node, Node):
            return None
        for key in ("val", "tensor_meta"):
            dtype = getattr(node.meta.get(key), "dtype", None)
            if isinstance(dtype, torch.dtype):
                return dtype
        if ops.LINEAR(node) or ops.CONV(node) or ops.ADDMM(node):  # these compute in their weight's dtype
            weight = node.kwargs["mat2" if ops.ADDMM(node) else "weight"]
            tensor = self.after_tensor(weight) if isinstance(weight, Node) and weight.op == "get_attr" else None
            return None if tensor is None else tensor.dtype
        return None

    # -- deciding --

    def run(self) -> Kept:
        output0 = next(iter(self.snapshot.graph.find_nodes(op="output")))
        output1 = next(iter(self.gm.graph.find_nodes(op="output")))
        plan = self._keep(ROOT, ROOT, None, {}, [(output0.args, output1.args)])
        self._check_recomputed(plan)
        if plan.recomputed:
            self.notes.append(
                f"{type(self.model).__name__}'s own forward() computes again, on every call, what the passes folded "
                f"to constants ({_describe(plan.recomputed[0])}); the generated module (keep_class=False) does not"
            )
        return self._assemble(plan)

    def _keep(self, key0: str, key1: str, skip: str | None, given: dict[Node, Node],
              starts: list[tuple[Any, Any]]) -> _Keep:
        level = _Level(self, key0, key1, skip, given)
        level.run(starts)
        children: dict[str, _Plan] = {}
        for child in self.calls[key0].children:
            if child in level.outs:
                children[child] = self._plan(child, level.given_to(child), level.outs[child], child in level.vanished)
        return _Keep(key0, self.module(key0), level.params, children, level.recomputed, level.reads)

    def _plan(self, key: str, given: dict[Node, Node], outs: dict[Node, Node], vanished: bool) -> _Plan:
        """Keep the call, or swap in what its optimized region became."""
        if vanished and type(self.module(key)) is nn.Identity:
            return _Keep(key, self.module(key))  # an identity that codegen dropped is still the identity
        if vanished:
            swap = self._as_identity(key)
            if isinstance(swap, _Swap):
                return swap
        kept: _Keep | None = None
        try:
            kept = self._keep(key, key, None, given, list(outs.items()))
        except _Mismatch as mismatch:
            reasons = [str(mismatch)]
        else:
            if not kept.recomputed:
                return self._as_lowered_layer(key, given, outs) or kept
            # exact, but its forward() would compute again, on every call, what the passes folded
            # (DEConv's kernel built from parameters: 1.5x the deploy net's latency): swap if we can
            reasons = []
        for attempt in (self._as_submodule, self._as_layer, self._as_generated):
            swap = attempt(key, given, outs)
            if isinstance(swap, _Swap):
                return swap
            reasons.append(swap)
        if kept is not None:
            return kept
        raise _Mismatch(f"{reasons[0]}; and no module fits in its place ({reasons[-1]})")

    def _as_lowered_layer(self, key: str, given: dict[Node, Node], outs: dict[Node, Node]) -> _Swap | None:
        """A layer module whose one op became a canonical op codegen lowers (an nn.LayerNorm now
        normalizing a zero-mean stream): the kept module computes it exactly, the swapped-in one
        with the kernel that is fastest where it runs (fxopt.runtime)."""
        region = self.after.region(key)
        if len(region) != 1 or region[0].target not in _LOWERED_AS:
            return None
        swap = self._as_layer(key, given, outs)
        return swap if isinstance(swap, _Swap) else None

    def _single_argument(self, key: str) -> bool:
        """The call passes exactly one value (its input) and returns one."""
        record = self.records.get(key)
        if record is not None:
            one_in = len(record.args) == 1 and not record.kwargs and isinstance(record.args[0], Slot)
            return one_in and isinstance(record.result, Slot)
        if len(self.before.inputs(key)) != 1 or len(self.before.outputs(key)) != 1:
            return False
        if not self.exported:  # symbolic_trace records every traced-through call: this one is a leaf module
            (node,) = self.before.region(key) or (None,)
            return node is not None and (node.op != "call_module" or (len(node.args) == 1 and not node.kwargs))
        required = [p for p in inspect.signature(self.module(key).forward).parameters.values()
                    if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return len(required) == 1

    def _as_identity(self, key: str) -> _Swap | str:
        if not self._single_argument(key):
            return "it takes or returns more than one value, so nn.Identity cannot stand in"
        return _Swap(key, self.module(key), nn.Identity(), "nn.Identity (its computation vanished)")

    def _as_submodule(self, key: str, given: dict[Node, Node], outs: dict[Node, Node]) -> _Swap | str:
        """One of its submodules, given the call's input unchanged, computes the whole optimized region
        (PEFT's merge_and_unload: the LoRA layer becomes its base layer, holding the merged weight)."""
        inputs = self.before.inputs(key)
        results = set(outs.values())
        if not self._single_argument(key) or len(results) != 1:
            return "it takes or returns more than one value"
        (result,) = results
        for child in self.calls[key].children:
            outputs = self.before.outputs(child)
            if self.before.inputs(child) != inputs or len(outputs) != 1 or self._calls_of(child) > 1:
                continue
            try:
                kept = self._keep(child, key, child, given, [(outputs[0], result)])
            except _Mismatch:
                continue
            name = _relative(self.path(child), self.path(key) + ".")
            return _Swap(key, self.module(key), kept, f"{_class_name(self.module(child))}, its submodule {name}")
        return "none of its submodules computes its optimized region"

    def _as_layer(self, key: str, given: dict[Node, Node], outs: dict[Node, Node]) -> _Swap | str:
        region = self.after.region(key)
        layers = [n for n in region if not self.is_idle_cast(n)]
        if len(layers) != 1 or not any(op(layers[0]) for op in _LAYER_OPS):
            return "its optimized region is not one conv, linear or LayerNorm layer"
        layer = layers[0]
        inputs = self.before.inputs(key)
        if not self._single_argument(key) or len(inputs) != 1 or given.get(inputs[0]) is not layer.kwargs["input"]:
            return "its optimized layer does not read the module's input"
        if any(_through_casts(n1, region) is not layer for n1 in outs.values()):
            return "it returns more than the layer's output"
        weight, bias = (self._layer_tensor(layer.kwargs[k]) for k in ("weight", "bias"))
        if any(value is None and layer.kwargs[k] is not None for k, value in (("weight", weight), ("bias", bias))):
            return "its optimized layer's weight is computed at run time"
        if ops.CONV(layer):
            new = self._conv_module(layer, weight, bias)
        elif ops.LINEAR(layer):
            new = self._linear_module(weight, bias)
        else:
            new = self._layer_norm_module(layer, weight, bias)
        if new is None:
            return "its optimized layer has no nn module form"
        return _Swap(key, self.module(key), new, _class_name(new) + repr(new)[len(type(new).__name__):])

    def _conv_module(self, layer: Node, weight: torch.Tensor | None, bias: torch.Tensor | None) -> nn.Module | None:
        k = layer.kwargs
        if weight is None:
            return None
        rank, transposed, groups = weight.dim() - 2, k["transposed"], k["groups"]
        if (rank, transposed) not in _CONV_TYPES:
            return None
        cin, cout = weight.shape[1] * groups, weight.shape[0]
        if transposed:  # (in, out / groups, *kernel)
            cin, cout = weight.shape[0], weight.shape[1] * groups
        options = dict(stride=k["stride"], padding=k["padding"], dilation=k["dilation"], groups=groups,
                       bias=bias is not None, padding_mode=k["padding_mode"])
        if transposed:
            options["output_padding"] = k["output_padding"]
        return _holding(self._layer(_CONV_TYPES[rank, transposed], cin, cout, tuple(weight.shape[2:]), **options,
                                    device=weight.device, dtype=weight.dtype), weight, bias)

    def _layer_norm_module(self, layer: Node, weight: torch.Tensor | None,
                           bias: torch.Tensor | None) -> nn.Module | None:
        """nn.LayerNorm, or for an RMSNorm of a zero-mean input fxopt.runtime's subclass of it."""
        if weight is None and bias is not None:
            return None
        tensor = weight if weight is not None else torch.empty(0)
        k = layer.kwargs
        kind = runtime.ZeroMeanRMSNorm if ops.ZERO_MEAN_RMS_NORM(layer) else nn.LayerNorm
        return _holding(self._layer(kind, tuple(k["normalized_shape"]), eps=k["eps"],
                                    elementwise_affine=weight is not None, bias=bias is not None,
                                    device=tensor.device, dtype=tensor.dtype), weight, bias)

    def _linear_module(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> nn.Module | None:
        if weight is None or weight.dim() != 2:
            return None
        return _holding(self._layer(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                    device=weight.device, dtype=weight.dtype), weight, bias)

    def _layer(self, kind: type, *args: Any, **options: Any) -> nn.Module:
        """A configured layer (without initialising weights) to copy: one per configuration, as building
        a torch layer costs more than a millisecond."""
        key = (kind, args, tuple(sorted(options.items(), key=lambda item: item[0])))
        if key not in self._layers:
            self._layers[key] = nn.utils.skip_init(kind, *args, **options).eval()
        return self._layers[key]

    def _layer_tensor(self, arg: Any) -> torch.Tensor | None:
        if not isinstance(arg, Node) or arg.op != "get_attr":
            return None
        value = self.after_tensor(arg)
        return None if value is None else self._own(value)

    def _as_generated(self, key: str, given: dict[Node, Node], outs: dict[Node, Node]) -> _Swap | str:
        """A GraphModule of the call's optimized region, with the forward() signature of the module."""
        module = self.module(key)
        record = self.records.get(key)
        if record is None and not (self._single_argument(key) and self.before.inputs(key)[0] in given):
            return ("it was traced by torch.export, which does not record the arguments of submodule calls, "
                    "so a generated module cannot be given its forward() signature" if self.exported else
                    "it is a leaf module called with more than one value")
        graph = Graph()
        env: dict[Node, Node] = {}
        signature = inspect.signature(module.forward)
        if record is not None:
            problem = self._record_placeholders(graph, env, signature, record, given)
        else:
            name = next(iter(signature.parameters))
            problem = None
            env[given[self.before.inputs(key)[0]]] = graph.placeholder(name)
        if problem:
            return problem
        missing = [n1 for n1 in self.after.inputs(key) if n1 not in env]
        if missing:
            return f"its optimized region reads {_describe(missing[0])}, which is not one of its forward()'s arguments"
        attributes: dict[str, Any] = {}
        prefix = self.path(key) + "."
        for node in self.after.region(key):
            env[node] = graph.node_copy(node, lambda a: self._generated_arg(a, env, graph, attributes, prefix))
            if node.op == "call_module":  # a module the passes left as it is (nn.ReLU, a leaf module)
                env[node].target = _relative(node.target, prefix)
                attributes[env[node].target] = attribute(self.gm, node.target)
        result = self._generated_result(key, record, env, given, outs)
        if isinstance(result, str):
            return result
        graph.output(result)
        fresh = {_relative(name, prefix) for name in self.fresh}
        generated = finalize(GraphModule(attributes, graph), f"Optimized{type(module).__name__}", fresh, self.inplace)
        what = f"a generated module ({type(generated).__name__})"
        if self.exported:
            what += ", specialised to the example input shapes (captured with torch.export)"
        return _Swap(key, module, generated, what)

    def _record_placeholders(self, graph: Graph, env: dict[Node, Node], signature: inspect.Signature,
                             record: CallRecord, given: dict[Node, Node]) -> str | None:
        if not record.complete:
            return "its caller passes or receives values inside objects a graph cannot take apart"
        try:
            bound = signature.bind(*record.args, **record.kwargs)
        except TypeError as error:
            return f"its recorded call does not fit its forward() ({error})"
        for name, parameter in signature.parameters.items():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                if name in bound.arguments:
                    return "its forward() takes *args or **kwargs"
                continue
            default = parameter.default if parameter.default is not inspect.Parameter.empty else inspect.Signature.empty
            placeholder = graph.placeholder(name, default_value=default)
            value = bound.arguments.get(name)
            if isinstance(value, Slot) and value in self.tags:
                n1 = given.get(self.tags[value])
                if n1 is not None:
                    env.setdefault(n1, placeholder)
        return None

    def _generated_arg(self, arg: Node, env: dict[Node, Node], graph: Graph, attributes: dict[str, Any],
                       prefix: str) -> Node:
        if arg in env:
            return env[arg]
        name = _relative(arg.target, prefix)
        attributes[name] = attribute(self.gm, arg.target)
        env[arg] = graph.get_attr(name)
        return env[arg]

    def _generated_result(self, key: str, record: CallRecord | None, env: dict[Node, Node],
                          given: dict[Node, Node], outs: dict[Node, Node]) -> Any:
        if record is None:
            (n0,) = self.before.outputs(key)
            return env[outs[n0]] if n0 in outs else "its output is not used by the optimized graph"
        missing: list[Any] = []

        def value(leaf: Any) -> Any:
            if not isinstance(leaf, Slot):
                return leaf
            n0 = self.tags.get(leaf)
            n1 = outs.get(n0, given.get(n0)) if n0 is not None else None
            if n1 is None or n1 not in env:
                missing.append(leaf)
                return None
            return env[n1]

        result = map_aggregate(record.result, value)
        return f"its output {missing[0].position} is not one the optimized graph computes" if missing else result

    def _calls_of(self, key: str) -> int:
        path = self.path(key)
        return sum(1 for call in self.calls.values() if call.path == path)

    def _check_recomputed(self, plan: _Plan) -> None:
        """A folded constant is computed again by the kept forward(): only right if the tensors it
        is computed from kept their values."""
        changed = {id(t0) for keep in _keeps(plan) for t0, _ in keep.params}
        for keep in _keeps(plan):
            for node in keep.recomputed:
                for source in _ancestors(node):
                    tensor = self.snapshot.tensors.get(source)
                    if tensor is not None and id(tensor) in changed:
                        raise _Mismatch(
                            f"{self.who(keep.key)}: the passes folded {_describe(node)} to a constant and also "
                            f"rewrote {source.target}, which its forward() computes it from"
                        )

    # -- assembling the copy --

    def _own(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor for the result: the user's own ones are copied unless inplace."""
        if self.inplace or id(tensor) not in self.user_tensors:
            return tensor
        return tensor.detach().clone()

    def _assemble(self, plan: _Keep) -> Kept:
        plans = _by_module(plan)
        memo: dict[int, Any] = {}
        if self.inplace:
            memo.update(self.user_tensors)
        updates = self._slot_updates(plans)
        wrapped: dict[int, torch.Tensor] = {}  # one result tensor per new tensor: shared stays shared

        def result_tensor(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            if id(new) not in wrapped:
                wrapped[id(new)] = _like(old, self._own(new))
            return wrapped[id(new)]

        for old, new in self._rewritten_everywhere(updates):
            memo[id(old)] = result_tensor(old, new)  # not copied only to be replaced
        rewritten: dict[int, list[str]] = {}
        for module, name in updates:
            rewritten.setdefault(id(module), []).append(name)
        stand_ins = {id(p.new.module) for ps in plans.values() for p in ps
                     if isinstance(p, _Swap) and isinstance(p.new, _Keep)}
        swapped: list[tuple[str, str]] = []
        # deepest first: a submodule put in its parent's place carries the swaps made inside it
        for module_plans in sorted(plans.values(), key=lambda ps: -self.path(ps[0].key).count(".")):
            first = module_plans[0]
            if isinstance(first, _Swap):
                inner = first.new
                replacement = inner if isinstance(inner, nn.Module) else self._deepcopy(inner.module, memo)
                _carry_attributes(first.module, replacement)
                memo[id(first.module)] = replacement
                names = rewritten.get(id(inner.module), []) if isinstance(inner, _Keep) else []
                what = first.what + (f", parameters rewritten ({', '.join(sorted(names))})" if names else "")
                swapped.append((self.path(first.key), f"{_class_name(first.module)} -> {what}"))
            elif id(first.module) in rewritten and id(first.module) not in stand_ins:
                names = ", ".join(sorted(rewritten[id(first.module)]))
                swapped.append((self.path(first.key) or type(self.model).__name__,
                                f"the same class, parameters rewritten ({names})"))
        result = self._deepcopy(self.model, memo)
        for (module, name), (old, new) in updates.items():
            copied = memo.get(id(module))
            if copied is None:
                raise _Mismatch(f"{type(module).__name__} holds rewritten parameter {name} but is not part of the result")
            _set_slot(copied, name, result_tensor(old, new))
        return Kept(result, sorted(swapped), self.notes)

    def _deepcopy(self, module: nn.Module, memo: dict[int, Any]) -> nn.Module:
        try:
            return copy.deepcopy(module, memo)
        except Exception as error:  # noqa: BLE001 - whatever stops the copy, the generated module remains
            raise _Mismatch(
                f"{type(module).__name__} cannot be copied with copy.deepcopy ({type(error).__name__}: {error}), "
                "and the result must not share state with the model"
            ) from None

    def _rewritten_everywhere(self, updates: _Updates) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(old, new) for each tensor every slot of the model rewrites to the same new tensor."""
        new_of: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        for old, new in updates.values():
            seen = new_of.get(id(old), (old, new))
            new_of[id(old)] = (old, new) if seen is not None and seen[1] is new else None
        for module in self.model.modules():
            for name, value in _tensor_slots(module):
                if new_of.get(id(value)) is not None and (module, name) not in updates:
                    new_of[id(value)] = None
        return [pair for pair in new_of.values() if pair is not None]

    def _slot_updates(self, plans: dict[int, list[_Plan]]) -> _Updates:
        """(module, attribute name) -> (old tensor, new tensor) for every parameter a kept module's own
        operations read as a new tensor; checks that every call of a module asks for the same."""
        updates: _Updates = {}
        for module_plans in plans.values():
            first = module_plans[0]
            if any(not _same_plan(first, other) for other in module_plans[1:]):
                raise _Mismatch(
                    f"{self.who(first.key)} is called {len(module_plans)} times and the passes optimized its calls "
                    "differently, so one module cannot stand in for all of them"
                )
            if not isinstance(first, _Keep):
                continue
            for t0, t1 in first.params:
                slots = [name for name, value in _tensor_slots(first.module) if value is t0]
                if not slots:
                    raise _Mismatch(f"{self.who(first.key)}: it reads a tensor of another module that a rewrite changed")
                for name in slots:
                    if updates.setdefault((first.module, name), (t0, t1))[1] is not t1:
                        raise _Mismatch(f"{self.who(first.key)}: its {name} was rewritten two different ways")
        self._check_unchanged_reads(plans, updates)
        self._note_untied(updates)
        return updates

    def _check_unchanged_reads(self, plans: dict[int, list[_Plan]], updates: _Updates) -> None:
        """A kept module that reads a tensor unchanged while another reads it rewritten must hold it
        itself, in a slot that keeps the old value (its forward() may reach it through another
        module's attribute, which now holds the new one)."""
        rewritten = {id(t0) for t0, _ in updates.values()}
        for module_plans in plans.values():
            keep = module_plans[0]
            if not isinstance(keep, _Keep):
                continue
            for t0, name in keep.reads:
                if id(t0) not in rewritten:
                    continue
                own = [slot for slot, value in _tensor_slots(keep.module) if value is t0]
                if not own or any((keep.module, slot) in updates for slot in own):
                    raise _Mismatch(
                        f"{self.who(keep.key)}: its forward() reads {name} unchanged, a tensor the passes rewrote "
                        "for another module that holds it (a tied weight), so the kept code would read the new one"
                    )

    def _note_untied(self, updates: _Updates) -> None:
        """A tensor the model holds in several places (a tied LM head) that only some of them now read new."""
        old = {id(t0) for t0, _ in updates.values()}
        holders: dict[int, tuple[list[str], list[str]]] = {}
        for path, module in self.model.named_modules(remove_duplicate=False):
            for name, value in _tensor_slots(module):
                if id(value) in old:
                    changed = (module, name) in updates
                    holders.setdefault(id(value), ([], []))[0 if changed else 1].append(f"{path}.{name}".lstrip("."))
        for changed, unchanged in holders.values():
            if changed and unchanged:
                self.notes.append(
                    f"kept class: {', '.join(changed)} no longer shares its tensor with {', '.join(unchanged)} (the "
                    "passes rewrote it for the first only); tie_weights() would tie them again and change the results"
                )


# ---------------------------------------------------------------------------------------------
# helpers


def _carry_attributes(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the plain attributes of the module it replaces (``self.resolution``, ``self.num_heads``)
    that it lacks: the model's own Python, which keeps running around it, may read them (timm's
    EfficientViT does)."""
    for name, value in vars(old).items():
        if not name.startswith("_") and name != "training" and not hasattr(new, name):
            setattr(new, name, value)


def _class_name(module: nn.Module) -> str:
    kind = type(module)
    if kind.__module__.startswith("torch.nn"):
        return f"nn.{kind.__qualname__}"
    return kind.__qualname__ if kind.__module__ == "__main__" else f"{kind.__module__}.{kind.__qualname__}"


def _describe(node: Node) -> str:
    if node.op == "call_function":
        what = getattr(node.target, "__name__", str(node.target))
    elif node.op == "call_method":
        what = f".{node.target}()"
    elif node.op == "call_module":
        what = f"module {node.target}"
    else:
        what = f"{node.op} {node.target}"
    return f"{node.name} ({what})"


def _same_op(n0: Node, n1: Node) -> bool:
    return n0.op == n1.op and (n0.target == n1.target or _LOWERED_AS.get(n1.target) is n0.target)


def _is_noop(node: Node) -> bool:
    if ops.IDENTITY(node):
        return True
    return ops.DROPOUT(node) and not (node.kwargs["training"] and node.kwargs["p"] > 0)


def _noop_input(node: Node) -> Any:
    return node.kwargs["input"]


def _same_constant(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - an argument type without a usable ==: treat as different
        return False


_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default}


def _cast_target(node: Node) -> torch.dtype | None:
    """The dtype a plain dtype cast (``x.to(dtype)``) converts to; None for any other node."""
    if node.op == "call_method" and node.target == "to" and not node.kwargs:
        args = node.args
    elif node.op == "call_function" and node.target in _CASTS:
        args = (node.args[0], node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None))
    else:
        return None
    return args[1] if len(args) == 2 and isinstance(args[1], torch.dtype) else None


def _through_casts(node: Node, region: list[Node]) -> Node:
    """The node a chain of casts inside ``region`` starts from."""
    while node in region and _cast_target(node) is not None:
        node = node.args[0]
    return node


def _relative(name: str, prefix: str) -> str:
    """A parameter's name inside the submodule at ``prefix`` (names outside it stay whole)."""
    return name[len(prefix):] if name.startswith(prefix) else name


def _input_dependent(graph: Graph) -> set[Node]:
    varies: set[Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in varies for a in node.all_input_nodes):
            varies.add(node)
    return varies


def _ancestors(node: Node) -> set[Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _keeps(plan: _Plan) -> list[_Keep]:
    found: list[_Keep] = []
    stack: list[_Plan] = [plan]
    while stack:
        p = stack.pop()
        keep = p if isinstance(p, _Keep) else p.new if isinstance(p.new, _Keep) else None
        if keep is not None:
            found.append(keep)
            stack.extend(keep.children.values())
    return found


def _by_module(plan: _Plan) -> dict[int, list[_Plan]]:
    """Every plan in the tree, grouped by the module object it is for (a module called twice has two)."""
    grouped: dict[int, list[_Plan]] = {}
    stack: list[_Plan] = [plan]
    while stack:
        p = stack.pop()
        grouped.setdefault(id(p.module), []).append(p)
        inner = p if isinstance(p, _Keep) else p.new if isinstance(p.new, _Keep) else None
        if inner is not None:
            if inner is not p:
                grouped.setdefault(id(inner.module), []).append(inner)
            stack.extend(inner.children.values())
    return grouped


def _same_plan(a: _Plan, b: _Plan) -> bool:
    if isinstance(a, _Keep) and isinstance(b, _Keep):
        return [(id(x), id(y)) for x, y in a.params] == [(id(x), id(y)) for x, y in b.params]
    if isinstance(a, _Swap) and isinstance(b, _Swap):
        both_identity = isinstance(a.new, nn.Identity) and isinstance(b.new, nn.Identity)
        return both_identity or a.new is b.new
    return False


def _tensor_slots(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A module's own tensors: parameters, buffers and plain tensor attributes."""
    slots = [(n, t) for n, t in (*module._parameters.items(), *module._buffers.items()) if t is not None]
    slots += [(n, t) for n, t in vars(module).items() if isinstance(t, torch.Tensor) and not n.startswith("_")]
    return slots


def _like(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` in the role ``old`` had: a parameter (with its requires_grad) or a plain tensor."""
    if isinstance(old, nn.Parameter):
        return nn.Parameter(new.detach(), requires_grad=old.requires_grad)
    return new.detach()


def _set_slot(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name] = value
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        object.__setattr__(module, name, value)


# the ops a submodule's whole optimized region may be, to become that plain torch layer
_LAYER_OPS = (ops.CONV, ops.LINEAR, ops.LAYER_NORM, ops.ZERO_MEAN_RMS_NORM)
_CONV_TYPES = {(r, t): getattr(nn, f"Conv{'Transpose' if t else ''}{r}d") for r in (1, 2, 3) for t in (False, True)}


def _holding(template: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None) -> nn.Module:
    """A copy of a configured layer holding ``weight`` and ``bias``: its own containers, no shared state."""
    module = copy.copy(template)
    module.__dict__.update({k: copy.copy(v) for k, v in vars(template).items() if isinstance(v, dict)})
    for name, value in (("weight", weight), ("bias", bias)):
        module._parameters[name] = None if value is None else nn.Parameter(value.detach(), requires_grad=False)
    return module
