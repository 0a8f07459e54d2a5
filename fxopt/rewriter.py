"""The Rewriter: every graph mutation a pattern makes goes through it.

It gives patterns read access (constants, shapes, users) and builds replacements as a
transaction: new nodes are inserted in front of the match root but nothing uses them until
``commit``; ``rollback`` removes them again. The driver uses the list of created nodes to keep
its worklist right and to validate the replacement before committing.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .interpret import attribute, record_shapes
from .metadata import reads_only_metadata, same_metadata
from .ops import Op


class Rewriter:
    def __init__(self, gm: GraphModule, example_inputs: tuple | None = None, reuse_storage: bool = False):
        """``reuse_storage``: a constant that a commit leaves unread lends its memory to a new constant
        of the same shape and dtype (the new values are written into it), so folding a model costs
        no second copy of its weights. The tensors the graph was captured with are then overwritten:
        only for ``optimize(inplace=True)``."""
        self.gm = gm
        self.graph = gm.graph
        self.example_inputs = example_inputs  # to record shapes on demand
        self.reuse_storage = reuse_storage
        self._spare: dict[tuple, list[torch.Tensor]] = {}  # storage the current commit freed
        self.reused = 0  # constants written into storage the graph no longer read
        # the transaction under way
        self.created: list[Node] = []
        self.new_attributes: list[str] = []
        self._pending_notes: list[str] = []
        self._root: Node | None = None  # new nodes go in front of it
        # what committed transactions left
        self.committed_attributes: set[str] = set()  # every constant this rewriter made and kept
        self.notes: list[str] = []  # what committed rewrites tell the user (e.g. a weight they untied)
        self._version = 0  # bumped by every commit: recorded shapes may be missing for new nodes
        # caches
        self._shapes_recorded_at: int | None = None
        self._readers_by_tensor: dict[int, list[Node]] | None = None
        self._reads_inputs: dict[Node, bool] = {}
        self._get_attrs_by_target: dict[str, list[Node]] | None = None  # fx's own lookup scans every get_attr

    # -- reading -------------------------------------------------------------------------------

    def constant(self, node: Any) -> torch.Tensor | None:
        """The tensor a node always holds (a parameter, buffer or tensor attribute), else None."""
        if isinstance(node, Node) and node.op == "get_attr":
            value = attribute(self.gm, node.target)
            return value if isinstance(value, torch.Tensor) else None
        return None

    def is_constant(self, node: Any) -> bool:
        """True for a constant tensor and for ``None`` (an absent bias is a constant zero)."""
        return node is None or self.constant(node) is not None

    def shape(self, node: Any) -> torch.Size | None:
        """The shape of a node's value on the example inputs (None for non-tensors).

        Shapes are recorded by running the graph once, only when a pattern first asks (most
        rewrites never need one), and again after commits made new nodes.
        """
        if not isinstance(node, Node):
            return None
        if not _has_shape(node) and self.example_inputs is not None and self._shapes_recorded_at != self._version:
            record_shapes(self.gm, self.example_inputs)
            self._shapes_recorded_at = self._version
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            return meta.shape
        val = node.meta.get("val")
        return val.shape if isinstance(val, torch.Tensor) else None

    def reads_inputs(self, node: Node) -> bool:
        """True when ``node``'s value depends on a model input (a placeholder), directly or not.

        Remembered across rewrites: a rewrite replaces a value by an equal one, so the answer can
        only go stale towards True (x - x folded to 0), which makes a caller miss a fold, never
        fold something that varies.
        """
        stack = [node]
        while stack:
            n = stack[-1]
            if n in self._reads_inputs:
                stack.pop()
                continue
            pending = [a for a in n.all_input_nodes if a not in self._reads_inputs]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            self._reads_inputs[n] = n.op == "placeholder" or any(self._reads_inputs[a] for a in n.all_input_nodes)
        return self._reads_inputs[node]

    def get_attrs(self, target: str) -> list[Node]:
        """The get_attr nodes reading ``target``."""
        if self._get_attrs_by_target is None:
            self._get_attrs_by_target = {}
            for n in self.graph.find_nodes(op="get_attr"):
                self._get_attrs_by_target.setdefault(n.target, []).append(n)
        nodes = self._get_attrs_by_target.get(target, [])
        nodes[:] = [n for n in nodes if not _erased(n)]
        return list(nodes)

    def readers(self, node: Node) -> list[Node]:
        """Every get_attr node that reads the constant behind ``node``: under its name, or under
        another one (tied modules hold one tensor twice)."""
        value = self.constant(node)
        if value is None:
            return self.get_attrs(node.target)
        return self._live_readers(value) or [node]

    def _live_readers(self, value: torch.Tensor) -> list[Node]:
        if self._readers_by_tensor is None:  # an index by tensor, kept up to date by new_constant()
            self._readers_by_tensor = {}
            for n in self.graph.find_nodes(op="get_attr"):
                self._index_reader(n)
        return [n for n in self._readers_by_tensor.get(id(value), []) if not _erased(n)]

    def _index_reader(self, node: Node) -> None:
        self._readers_by_tensor.setdefault(id(self.constant(node)), []).append(node)

    def shared(self, node: Any) -> bool:
        """True when the constant behind ``node`` is also read elsewhere in the graph (a tied weight)."""
        if not (isinstance(node, Node) and node.op == "get_attr"):
            return False
        return sum(len(n.users) for n in self.readers(node)) > 1

    # -- building --------------------------------------------------------------------------------

    def begin(self, root: Node) -> None:
        self.created, self.new_attributes, self._root = [], [], root

    @contextlib.contextmanager
    def inserting_before(self, node: Node) -> Iterator[None]:
        """Build in front of ``node`` instead of the match root: for a rewrite that replaces
        several nodes (``rewrite`` returning a dict), each replacement goes before what it replaces."""
        saved, self._root = self._root, node
        try:
            yield
        finally:
            self._root = saved

    def call(self, op: Op, **kwargs: Any) -> Node:
        """A new canonical node of ``op``."""
        if op.fields:
            return self.call_function(op.target, **kwargs)
        return self.call_function(op.target, kwargs["a"], kwargs["b"])

    def call_function(self, target: Any, *args: Any, **kwargs: Any) -> Node:
        with self.graph.inserting_before(self._root):
            node = self.graph.call_function(target, args, kwargs)
        self.created.append(node)
        return node

    def call_method(self, name: str, *args: Any, **kwargs: Any) -> Node:
        """A Tensor method call (layout ops in symbolic_trace graphs), e.g. ``call_method("view", x, 2, -1)``."""
        with self.graph.inserting_before(self._root):
            node = self.graph.call_method(name, args, kwargs)
        self.created.append(node)
        return node

    def new_constant(self, name: str, value: torch.Tensor) -> Node:
        """A new constant tensor, stored as a parameter at ``name`` (made unique) and read by a get_attr.

        Name it after what it replaces (``conv.weight`` for a folded conv weight): where that name
        is still taken, a suffix is added, and codegen drops it once the old one is gone.
        """
        qualname = self._free_name(base_name(name))
        owner_path, _, leaf = qualname.rpartition(".")
        owner = self._owner(owner_path)
        owner.register_parameter(leaf, torch.nn.Parameter(value.detach(), requires_grad=False))
        self.new_attributes.append(qualname)
        with self.graph.inserting_before(self._root):
            node = self.graph.get_attr(qualname)  # before the current insertion point: dominates every use
        self.created.append(node)
        if self._get_attrs_by_target is not None:
            self._get_attrs_by_target.setdefault(qualname, []).append(node)
        if self._readers_by_tensor is not None:
            self._index_reader(node)
        return node

    def _free_name(self, name: str) -> str:
        candidate, i = name, 0
        while self._taken(candidate):
            i += 1
            candidate = f"{name}_{i}"
        return candidate

    def _taken(self, qualname: str) -> bool:
        try:
            return attribute(self.gm, qualname) is not None
        except AttributeError:
            return False

    def _owner(self, path: str) -> torch.nn.Module:
        owner: torch.nn.Module = self.gm
        for part in path.split(".") if path else []:
            if not isinstance(getattr(owner, part, None), torch.nn.Module):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        return owner

    def has_metadata_of(self, new: Node, old: Node) -> None:
        """Declare that the new node ``new`` computes a value of ``old``'s shape and dtype (a folded
        layer in the place of the old one), so reads of ``old``'s shape can move to it at commit."""
        self.shape(old)
        if "tensor_meta" in old.meta:
            new.meta["tensor_meta"] = old.meta["tensor_meta"]

    def note(self, text: str) -> None:
        """A message for the report, kept only if this rewrite is committed."""
        self._pending_notes.append(text)

    # -- the transaction ---------------------------------------------------------------------------

    def metadata_moves(self, replacements: dict[Node, Node], matched: list[Node]) -> dict[Node, Node] | str:
        """Where the metadata reads of matched nodes go once the match is replaced: {node: the
        replacement whose value has its shape and dtype}, for every node that only metadata reads
        outside the match keep alive (a ``x.ndim`` assert on the conv output a fold removes). A
        string says why a read cannot move (no replacement has that node's shape): the rewrite
        would keep the node computing for it, so it is not made. The match's own inputs survive
        it and count as replacements too (a BatchNorm folded into the conv after it has its
        input's shape)."""
        members, moves = set(matched), {}
        for node in matched:
            outside = [u for u in node.users if u not in members]
            if node in replacements or not outside or not all(reads_only_metadata(u, node) for u in outside):
                continue
            self.shape(node)  # records shapes if they are missing
            inputs = [a for n in matched for a in n.all_input_nodes if a not in members]
            candidates = [*replacements.items(), *((n, n) for n in (*self.created, *inputs))]
            target = next((new for like, new in candidates if same_metadata(node, like)), None)
            if target is None:
                return (f"{outside[0].name} reads the shape of {node.name}, which the rewrite removes, and no "
                        "replacement has the same shape")
            moves[node] = target
        return moves

    def commit(self, replacements: dict[Node, Node], matched: list[Node], moves: dict[Node, Node]) -> None:
        """Hand each replaced node's uses to its replacement, move the metadata reads ``moves`` names
        (what metadata_moves answered) and erase what is left dead."""
        stamp_scopes(self.created, replacements, matched)
        for old, new in replacements.items():
            if "tensor_meta" in old.meta:
                new.meta.setdefault("tensor_meta", old.meta["tensor_meta"])
            old.replace_all_uses_with(new)
        for old, new in moves.items():
            moved = old.replace_all_uses_with(new, delete_user_cb=lambda user: reads_only_metadata(user, old))
            _place_after(new, moved)
        for node in reversed(matched):
            self._erase_if_dead(node)
        if self._spare:
            self._write_into_spare_storage(self.new_attributes)
        self.committed_attributes.update(self.new_attributes)
        self.notes += self._pending_notes
        self.created, self.new_attributes, self._pending_notes, self._root = [], [], [], None  # transaction over
        self._version += 1

    def rollback(self) -> None:
        for node in reversed(self.created):
            self._forget(node)
            self.graph.erase_node(node)
        for qualname in self.new_attributes:
            self._delete_attribute(qualname)
        self.created, self.new_attributes, self._pending_notes, self._root = [], [], [], None  # transaction over

    def _erase_if_dead(self, node: Node) -> None:
        if node.users or node.graph is not self.graph or _erased(node):
            return
        inputs = node.all_input_nodes
        self._forget(node)
        self.graph.erase_node(node)
        if node.op == "get_attr" and not self.get_attrs(node.target):
            if self.reuse_storage:
                self._keep_as_spare(self.constant_at(node.target))
            self._delete_attribute(node.target)
        for arg in inputs:
            if arg.op == "get_attr":
                self._erase_if_dead(arg)

    def _forget(self, node: Node) -> None:
        """Drop ``node``, about to be erased, from the caches: an entry would keep it alive (and,
        through its links, the nodes that were next to it)."""
        self._reads_inputs.pop(node, None)
        if node.op != "get_attr":
            return
        keys = ((self._get_attrs_by_target, node.target), (self._readers_by_tensor, id(self.constant(node))))
        for index, key in keys:
            nodes = index.get(key) if index is not None else None
            if nodes is not None and node in nodes:
                nodes.remove(node)
                if not nodes:
                    del index[key]

    def constant_at(self, qualname: str) -> torch.Tensor | None:
        value = attribute(self.gm, qualname)
        return value if isinstance(value, torch.Tensor) else None

    def _keep_as_spare(self, value: torch.Tensor | None) -> None:
        """Offer ``value``'s memory to this commit's new constants, when nothing else can see it:
        no get_attr reads it under another name, and it owns its whole storage (not a view)."""
        if value is None or not value.is_contiguous() or value._base is not None:
            return
        if value.untyped_storage().nbytes() != value.numel() * value.element_size():
            return
        if self._live_readers(value):
            return
        # by size, not shape: a merge may store the weight transposed (GPT-2's Conv1D as a Linear)
        self._spare.setdefault((value.numel(), value.dtype), []).append(value)

    def _write_into_spare_storage(self, qualnames: list[str]) -> None:
        for qualname in qualnames:
            new = self.constant_at(qualname)
            spares = self._spare.get((new.numel(), new.dtype)) if new is not None and new.is_contiguous() else None
            if not spares:
                continue
            with torch.no_grad():
                storage = spares.pop().view(new.shape)
                storage.copy_(new)
            owner_path, _, leaf = qualname.rpartition(".")
            owner = attribute(self.gm, owner_path) if owner_path else self.gm
            owner.register_parameter(leaf, torch.nn.Parameter(storage.detach(), requires_grad=False))
            self.reused += 1
        self._spare.clear()

    def _delete_attribute(self, qualname: str) -> None:
        owner_path, _, leaf = qualname.rpartition(".")
        owner = attribute(self.gm, owner_path) if owner_path else self.gm
        if leaf in owner._parameters:
            owner._parameters[leaf] = None  # keep the slot: nn modules' reprs read e.g. ``bias``
        elif leaf in owner._buffers:
            owner._buffers[leaf] = None
        elif hasattr(owner, leaf):
            delattr(owner, leaf)


_SCOPE = "nn_module_stack"  # the module calls a node was traced in, as capture records them


def stamp_scopes(created: list[Node], replacements: dict[Node, Node], matched: list[Node]) -> None:
    """Give each node a rewrite created the module scope it stands for (``meta["nn_module_stack"]``,
    which fxopt.restore reads to swap rewritten submodules into the user's class): that of the node
    it replaces or is built in front of, when that is the same op; else the innermost scope common
    to the matched nodes of its op, narrowed to those reading the same input when there are such
    (a folded conv stays in its conv's module); else that of the nodes it replaces; else the
    innermost scope common to the whole match."""
    made, in_match = set(created), set(matched)
    computed = [m for m in matched if m.op not in ("get_attr", "placeholder")]
    same_op: dict[tuple, list[Node]] = {}
    for m in computed:
        same_op.setdefault((m.op, m.target), []).append(m)
    replaced: dict[Node, list[Node]] = {}
    for old, new in replacements.items():
        replaced.setdefault(new, []).append(old)
    common: dict[int, dict] = {}  # by source list: the nodes of one op share one scope
    for node in created:
        if node.op == "get_attr" or _SCOPE in node.meta:
            continue
        stands_for = [*replaced.get(node, []), _built_before(node, made)]
        alike = [n for n in stands_for if n in in_match and (n.op, n.target) == (node.op, node.target)]
        if alike:
            node.meta[_SCOPE] = _common_scope(alike[:1])
            continue
        sources = same_op.get((node.op, node.target)) or replaced.get(node) or computed
        near = [n for n in sources if _first_input(n) is not None and _first_input(n) is _first_input(node)]
        if near:
            node.meta[_SCOPE] = _common_scope(near)
            continue
        if id(sources) not in common:  # these lists live until the end: their ids stay theirs
            common[id(sources)] = _common_scope(sources)
        node.meta[_SCOPE] = dict(common[id(sources)])


def _place_after(anchor: Node, readers: list[Node]) -> None:
    """Move ``readers`` (now reading ``anchor``), and what reads them, after ``anchor`` where they came
    before it: a shape read of a conv output sits in front of the BatchNorm that the folded conv replaces."""
    early, stack = set(), [r for r in readers if r < anchor]
    while stack:
        node = stack.pop()
        if node not in early:
            early.add(node)
            stack.extend(u for u in node.users if u < anchor)
    last = anchor
    for node in sorted(early):
        last.append(node)
        last = node


def _first_input(node: Node) -> Node | None:
    """The value an op works on: its ``input`` keyword (canonical ops) or its first node argument."""
    first = node.kwargs.get("input", node.args[0] if node.args else None)
    return first if isinstance(first, Node) else None


def _built_before(node: Node, made: set[Node]) -> Node | None:
    """The node a created node was inserted in front of (the first node after it that is not new)."""
    after = node.next
    while after in made:
        after = after.next
    return after if after.op != "root" else None


def _common_scope(nodes: list[Node]) -> dict:
    scopes = [n.meta.get(_SCOPE) or {} for n in nodes]
    common = list(scopes[0].items()) if scopes else []
    for scope in scopes[1:]:
        keys = list(scope)
        length = 0
        while length < min(len(common), len(keys)) and common[length][0] == keys[length]:
            length += 1
        common = common[:length]
    return dict(common)


_VERSION_SUFFIX = re.compile(r"(?:_\d+)+$")


def base_name(name: str) -> str:
    """``name`` without the ``_1``, ``_2`` suffixes ``new_constant`` adds to keep names unique."""
    return _VERSION_SUFFIX.sub("", name)


def bias_name(weight_target: str) -> str:
    """The name for a new bias beside a layer's weight: ``conv.weight`` -> ``conv.bias``."""
    base = base_name(weight_target)
    return base.removesuffix("weight") + "bias" if base.endswith("weight") else f"{base}_bias"


def _has_shape(node: Node) -> bool:
    return "tensor_meta" in node.meta or isinstance(node.meta.get("val"), torch.Tensor)


def _erased(node: Node) -> bool:
    return getattr(node, "_erased", False)
