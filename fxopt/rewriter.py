"""The Rewriter: every graph mutation a pattern makes goes through it.

It gives patterns read access (constants, shapes, users) and builds replacements as a
transaction: new nodes are inserted in front of the match root but nothing uses them until
``commit``; ``rollback`` removes them again. The driver uses the list of created nodes to keep
its worklist right and to validate the replacement before committing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .interpret import attribute
from .ops import Op


class Rewriter:
    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.created: list[Node] = []
        self.new_attributes: list[str] = []
        self.committed_attributes: set[str] = set()  # every constant this rewriter made and kept
        self._root: Node | None = None

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

    @staticmethod
    def shape(node: Any) -> torch.Size | None:
        """The recorded shape of a node's value, when capture could record it."""
        if not isinstance(node, Node):
            return None
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            return meta.shape
        val = node.meta.get("val")
        return val.shape if isinstance(val, torch.Tensor) else None

    def shared(self, node: Any) -> bool:
        """True when the constant behind ``node`` is also read elsewhere in the graph (a tied weight)."""
        if not (isinstance(node, Node) and node.op == "get_attr"):
            return False
        readers = [n for n in self.graph.find_nodes(op="get_attr", target=node.target)]
        return sum(len(n.users) for n in readers) > 1

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

    def new_constant(self, name: str, value: torch.Tensor) -> Node:
        """A new constant tensor, stored as a parameter at ``name`` (made unique) and read by a get_attr.

        Name it after what it replaces (``conv.weight`` for a folded conv weight): where that name
        is still taken, a suffix is added, and codegen drops it once the old one is gone.
        """
        qualname = self._free_name(name)
        owner_path, _, leaf = qualname.rpartition(".")
        owner = self._owner(owner_path)
        owner.register_parameter(leaf, torch.nn.Parameter(value.detach(), requires_grad=False))
        self.new_attributes.append(qualname)
        with self.graph.inserting_before(self._root):
            node = self.graph.get_attr(qualname)  # before the current insertion point: dominates every use
        self.created.append(node)
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

    # -- the transaction ---------------------------------------------------------------------------

    def commit(self, replacements: dict[Node, Node], matched: list[Node]) -> None:
        """Hand each replaced node's uses to its replacement and erase what is left dead."""
        for old, new in replacements.items():
            if "tensor_meta" in old.meta:
                new.meta.setdefault("tensor_meta", old.meta["tensor_meta"])
            old.replace_all_uses_with(new)
        for node in reversed(matched):
            self._erase_if_dead(node)
        self.committed_attributes.update(self.new_attributes)
        self.created, self.new_attributes = [], []

    def rollback(self) -> None:
        for node in reversed(self.created):
            self.graph.erase_node(node)
        for qualname in self.new_attributes:
            self._delete_attribute(qualname)
        self.created, self.new_attributes = [], []

    def _erase_if_dead(self, node: Node) -> None:
        if node.users or node.graph is not self.graph or _erased(node):
            return
        inputs = node.all_input_nodes
        self.graph.erase_node(node)
        if node.op == "get_attr" and not self.graph.find_nodes(op="get_attr", target=node.target):
            self._delete_attribute(node.target)
        for arg in inputs:
            if arg.op == "get_attr":
                self._erase_if_dead(arg)

    def _delete_attribute(self, qualname: str) -> None:
        owner_path, _, leaf = qualname.rpartition(".")
        owner = attribute(self.gm, owner_path) if owner_path else self.gm
        if leaf in owner._parameters:
            owner._parameters[leaf] = None  # keep the slot: nn modules' reprs read e.g. ``bias``
        elif leaf in owner._buffers:
            owner._buffers[leaf] = None
        elif hasattr(owner, leaf):
            delattr(owner, leaf)


def _erased(node: Node) -> bool:
    return getattr(node, "_erased", False)
