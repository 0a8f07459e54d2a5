"""Running a graph, or a piece of it, on real values.

Capture uses this to record shapes; translation validation uses it to record the activations
that reach a match and to evaluate the matched subgraph and its replacement, also in float64.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree


@contextlib.contextmanager
def preserved_buffers(module: Any) -> Iterator[None]:
    """Put every buffer back (object and value) afterwards: running a BatchNorm in training mode
    updates its statistics in place, and some modules reassign their buffers. Anything that is not
    an nn.Module (a plain function) passes through."""
    if not isinstance(module, torch.nn.Module):
        yield
        return
    saved = [
        (owner, name, buffer, buffer.detach().clone())
        for owner in module.modules()
        for name, buffer in owner._buffers.items()
        if buffer is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, buffer, value in saved:
                buffer.copy_(value)
                owner._buffers[name] = buffer


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule, keep_values: bool = True):
        super().__init__(gm, garbage_collect_values=not keep_values)
        # one record per distinct layout, shared by the nodes that have it (most of a deep graph's
        # activations have a few shapes): a record is ~350 bytes
        self._shared: dict[tuple, TensorMetadata] = {}

    def run_node(self, n: Node) -> Any:
        value = super().run_node(n)
        if isinstance(value, torch.Tensor):
            meta = _extract_tensor_metadata(value)
            # quantized tensors' qparams may hold tensors: no key for those
            n.meta["tensor_meta"] = meta if meta.is_quantized else self._shared.setdefault(tuple(meta[:6]), meta)
        return value


def release_erased_nodes(gm: GraphModule) -> None:
    """Let every node erased from ``gm``'s graph from now on be freed, with what its meta holds.

    fx's Graph keeps each node it ever made in its name table (erasing leaves the entry), so erased
    nodes would live as long as the graph, about 1 KB each: canonicalization and folding erase two
    nodes for every one that remains."""
    hooks = getattr(gm, "_erase_node_hooks", None)  # a private fx API (torch 2.13): without it, nothing is freed early
    if hooks is not None and _release not in hooks:
        gm._register_erase_node_hook(_release)


def _release(node: Node) -> None:
    """fx calls this as it erases ``node``: no one reads an erased node's name-table entry or meta."""
    node.graph._graph_namespace._obj_to_name.pop(node, None)
    node.meta = {}  # freed even where something still holds the node (a cache, a snapshot's map)


def record_shapes(gm: GraphModule, example_inputs: tuple) -> None:
    """Annotate ``node.meta['tensor_meta']`` by running ``gm``, freeing each value after its last
    use (a ResNet-50's activations at 224x224 weigh a third of its weights)."""
    with torch.no_grad(), preserved_buffers(gm):
        _Recorder(gm, keep_values=False).run(*pytree.tree_leaves(example_inputs))


def run_graph(gm: GraphModule, example_inputs: tuple) -> dict[Node, Any]:
    """Run ``gm`` on the inputs and return every node's value; annotates ``node.meta['tensor_meta']``."""
    recorder = _Recorder(gm)
    with torch.no_grad(), preserved_buffers(gm):
        recorder.run(*pytree.tree_leaves(example_inputs))
    return recorder.env


def attribute(gm: torch.nn.Module, qualname: str) -> Any:
    """The object at a dotted attribute path (what a get_attr node reads)."""
    obj: Any = gm
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def install_attributes(root: torch.nn.Module, attributes: dict[str, Any]) -> None:
    """Give ``root`` exactly ``attributes`` (qualified name -> tensor or module), in fresh container
    modules: later edits to the containers (a folded weight registered, a dead one dropped) never
    reach the modules the values came from."""
    root._modules.clear()
    root._parameters.clear()
    root._buffers.clear()
    for qualname in sorted(attributes, key=lambda name: name.count(".")):
        value = attributes[qualname]
        owner = root
        *path, leaf = qualname.split(".")
        for part in path:
            if part not in owner._modules:
                owner.add_module(part, torch.nn.Module())
            owner = owner._modules[part]
        owner.__dict__.pop(leaf, None)  # torch.export keeps lifted constants as plain attributes
        if isinstance(value, torch.nn.Parameter):
            owner.register_parameter(leaf, value)
        elif isinstance(value, torch.Tensor):
            owner.register_buffer(leaf, value)
        elif isinstance(value, torch.nn.Module):
            owner.add_module(leaf, value)
        else:
            setattr(owner, leaf, value)


_IN_PLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul,
}


def writes_state(node: Node) -> bool:
    """True for a node whose call writes into a tensor (``buffer.add_(1)``, ``x[i] = v``, an aten
    op with a mutable schema, ``out=``/``inplace=True``) or is otherwise impure to fx: removing it
    when nothing reads its result would change what the model does."""
    if node.is_impure():
        return True
    target = node.target
    if node.op == "call_method":
        return target.endswith("_") and not target.endswith("__")
    if node.op != "call_function":
        return False
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    return target in _IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True or "out" in node.kwargs


def eliminate_dead_code(graph: torch.fx.Graph) -> None:
    """fx's dead-code elimination, keeping every node that writes state (see writes_state)."""
    graph.eliminate_dead_code(is_impure_node=writes_state)


def topological(nodes: Iterable[Node]) -> list[Node]:
    """The given nodes in an order where every node comes after those of them it reads."""
    members = set(nodes)
    ordered: list[Node] = []
    seen: set[Node] = set()

    def visit(n: Node) -> None:
        if n in seen:
            return
        seen.add(n)
        for arg in n.all_input_nodes:
            if arg in members:
                visit(arg)
        ordered.append(n)

    for n in members:
        visit(n)
    return ordered


def run_nodes(
    gm: GraphModule,
    nodes: Iterable[Node],
    env: dict[Node, Any],
    dtype: torch.dtype | None = None,
    constants: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[Node, Any]:
    """Evaluate ``nodes`` (in topological order) reading outside values from ``env``.

    With ``dtype``, every floating input and constant is cast to it first (the float64 oracle);
    ``constants`` then maps each constant tensor read by a get_attr (e.g. to perturb it).
    """

    def cast(value: Any) -> Any:
        if dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype)
        return value

    values: dict[Node, Any] = {}

    def load(arg: Node) -> Any:
        if arg in values:
            return values[arg]
        if arg.op == "get_attr":
            return constant(arg)
        return pytree.tree_map(cast, env[arg])

    def constant(n: Node) -> Any:
        value = attribute(gm, n.target)
        if constants is not None and isinstance(value, torch.Tensor):
            return cast(constants(value))
        return cast(value)

    # in float64, the model's own float32 casts and factories are widened too (see _Float64Kernels)
    kernels = float64_kernels() if dtype is torch.float64 else contextlib.nullcontext()
    with torch.no_grad(), kernels:
        for n in topological(nodes):
            args = torch.fx.node.map_arg(n.args, load)
            kwargs = torch.fx.node.map_arg(n.kwargs, load)
            if n.op == "get_attr":
                values[n] = constant(n)
            elif n.op == "call_function":
                values[n] = n.target(*args, **kwargs)
            elif n.op == "call_method":
                values[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            elif n.op == "call_module":
                module = attribute(gm, n.target)
                if dtype is not None:
                    module = _module_in(module, dtype)
                values[n] = module(*args, **kwargs)
            else:
                raise ValueError(f"cannot evaluate {n.op} node {n.name} outside its graph")
    return values


class _Float64Kernels(TorchFunctionMode):
    """Lets a float64 copy of a model run code written for float32.

    * Models pin dtypes in their own code: scratch tensors made as float32 (``torch.zeros(...,
      dtype=torch.float32)``), casts such as ``x.float()`` around a softmax. In the oracle those
      become float64, or the copy would mix dtypes (and raise) or compute part of itself in float32.
    * torch's fake-quantizers compute with a float32 scale whatever the input's dtype, so the oracle
      hands them that float32 scale (the value the float32 model uses) and a float64 input.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FLOAT32_SCALE and len(args) > 1 and isinstance(args[1], torch.Tensor):
            args = (args[0], args[1].float(), *args[2:])
        elif func in _FLOAT32_SCALE and isinstance(kwargs.get("scale"), torch.Tensor):
            kwargs["scale"] = kwargs["scale"].float()
        elif func in _NARROWING_CASTS:
            return args[0].double()
        elif func in _CONVERSIONS:
            args = tuple(torch.float64 if _narrow_float(a) else a for a in args)
            if _narrow_float(kwargs.get("dtype")):
                kwargs["dtype"] = torch.float64
        elif _narrow_float(kwargs.get("dtype")):  # a factory: torch.zeros(..., dtype=torch.float32)
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


_FLOAT32_SCALE = {torch.fake_quantize_per_channel_affine, torch.fake_quantize_per_tensor_affine}
_NARROWING_CASTS = {torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16}
_CONVERSIONS = {torch.Tensor.to, torch.Tensor.type, torch.ops.aten.to.dtype, torch.ops.aten.to.device,
                torch.ops.aten.to.dtype_layout, torch.ops.aten._to_copy.default}  # the last: export's graphs


def _narrow_float(dtype: object) -> bool:
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype != torch.float64


def float64_kernels() -> TorchFunctionMode:
    """A context in which a model converted with ``.double()`` runs in float64 (see _Float64Kernels)."""
    return _Float64Kernels()


def _module_in(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(module).to(dtype)
