"""Capture: turn a model into an FX GraphModule.

``torch.fx.symbolic_trace`` is tried first (it keeps module calls and parameter names and is
fast); when it fails, ``torch.export.export(strict=False)`` is tried. Both unlift parameters into ``get_attr`` nodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Proxy, Tracer
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.node import map_aggregate
from torch.utils import _pytree as pytree

from .errors import CaptureError

LeafSpec = type | str


# node.meta key: the CallRecord slots a traced value fills
BOUNDARY = "fxopt_call_boundary"


@dataclass(frozen=True)
class Slot:
    """One traced value in a CallRecord: argument ``position`` (an index, or a name for a keyword
    argument) or result number ``position`` of call ``key``."""

    key: str
    kind: str  # "arg", "kwarg" or "out"
    position: int | str


@dataclass
class CallRecord:
    """How the model called one traced-through submodule (symbolic_trace only): its arguments and its
    result, each traced value replaced by its Slot, which is also listed in that node's
    ``meta[BOUNDARY]`` (meta survives canonicalization, nodes do not). ``complete`` is False when a
    traced value sat where a slot could not name it (inside an object)."""

    path: str
    args: tuple
    kwargs: dict[str, Any]
    result: Any
    complete: bool


@dataclass
class Captured:
    module: GraphModule
    frontend: str
    notes: list[str] = field(default_factory=list)
    calls: dict[str, CallRecord] = field(default_factory=dict)  # by the call's nn_module_stack key


class _LeafTracer(Tracer):
    # Buffers are proxied like parameters: fx's default computes ops on buffers while tracing, which
    # freezes a torch.bernoulli(buffer) into a constant and drops an in-place buffer update.
    proxy_buffer_attributes = True

    def __init__(self, leaves: tuple[LeafSpec, ...], autowrap_functions: tuple[Callable, ...]):
        super().__init__(autowrap_functions=autowrap_functions)
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.leaf_names = {x for x in leaves if isinstance(x, str)}
        self.calls: dict[str, CallRecord] = {}
        self.hooked: set[str] = set()

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        if has_forward_hooks(m):
            self.hooked.add(qualname)
            return True  # called as a module, so its hooks run; canonicalization leaves it as it is
        if isinstance(m, torch.ao.quantization.FakeQuantizeBase):
            return True  # its forward branches on its own buffers; canonicalization reads its state
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: torch.nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Trace the call as fx does, and record a traced-through call's arguments and result, so that
        fxopt.restore can give a rewritten submodule the forward() signature its caller uses."""
        path = self.path_of_module(m)
        calls_before = self.num_calls.get(path, 0)
        result = super().call_module(m, forward, args, kwargs)
        if not self.is_leaf_module(m, path):
            key = f"{path}@{calls_before}" if calls_before else path  # fx's nn_module_stack key for this call
            self.calls[key] = _record(key, path, args, kwargs, result)
        return result


def has_forward_hooks(m: torch.nn.Module) -> bool:
    """True when calling ``m`` runs hooks of the user's besides its forward()."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _record(key: str, path: str, args: tuple, kwargs: dict, result: Any) -> CallRecord:
    def slot(kind: str, position: Any) -> Callable[[Any], Any]:
        def mark(value: Any) -> Any:
            if not isinstance(value, Proxy):
                return value
            tag = Slot(key, kind, position)
            value.node.meta.setdefault(BOUNDARY, []).append(tag)
            return tag

        return mark

    marked_args = tuple(slot("arg", i)(a) for i, a in enumerate(args))
    marked_kwargs = {name: slot("kwarg", name)(v) for name, v in kwargs.items()}
    outputs = iter(range(1 << 30))
    marked_result = map_aggregate(result, lambda v: slot("out", next(outputs))(v))
    leaves = pytree.tree_leaves((marked_args, marked_kwargs, marked_result))
    complete = _plain(result) and not any(isinstance(v, Proxy) for v in leaves)
    return CallRecord(path, marked_args, marked_kwargs, marked_result, complete)


def _plain(value: Any) -> bool:
    """Only tuples, lists and dicts as containers: a graph can return those (not a namedtuple or ModelOutput)."""
    if type(value) in (tuple, list):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(_plain(v) for v in value.values())
    return not isinstance(value, (tuple, list, dict))


def capture(
    model: torch.nn.Module,
    example_inputs: tuple,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    autowrap_functions: Iterable[Callable] = (),
) -> Captured:
    """Capture ``model`` as a GraphModule (shapes are recorded later, only if a pass needs them)."""
    leaves, wrapped = tuple(leaf_modules), tuple(autowrap_functions)
    try:
        tracer = _LeafTracer(leaves, wrapped)
        with _buffer_assignments_refused(model):
            graph = tracer.trace(model)
        # compiled only if called: fxopt runs the working graph through an Interpreter, and compiling
        # the code of a 10k-node graph takes ~60 MB for a moment and keeps a ~3 MB code object
        module = _LazyGraphModule(tracer.root, graph, type(model).__name__)
        notes = [f"{path} has a forward hook: kept as it is (not folded or merged), so the hook still runs"
                 for path in sorted(tracer.hooked)]
        return Captured(module, "torch.fx.symbolic_trace", notes, calls=tracer.calls)
    except Exception as error:  # noqa: BLE001 - any tracing failure sends us to the next frontend
        trace_error = error
    try:
        exported = torch.export.export(model, example_inputs, strict=False)
        gm = exported.module()
        _drop_guards(gm)
    except Exception as export_error:  # noqa: BLE001
        raise CaptureError(_explain(model, trace_error, export_error)) from None
    notes = [
        f"symbolic_trace failed ({_first_line(trace_error)}); captured with torch.export, "
        "so shapes are specialised to the example inputs"
    ]
    return Captured(gm, "torch.export", notes)


@contextlib.contextmanager
def _buffer_assignments_refused(model: torch.nn.Module) -> Iterator[None]:
    """Put back every buffer that tracing reassigned, and fail the trace if there was one.

    ``self.calls += 1`` on a buffer assigns the traced value (a Proxy) to the module: the user's model
    would be left holding it, and the graph would not record the update. torch.export records it
    (as an in-place write of the buffer), so symbolic_trace gives way to it."""
    buffers = [(owner, name, value) for owner in model.modules() for name, value in owner._buffers.items()]
    try:
        yield
    finally:
        reassigned = [name for owner, name, value in buffers if owner._buffers.get(name) is not value]
        for owner, name, value in buffers:
            owner._buffers[name] = value
    if reassigned:
        raise TypeError(f"forward() assigns to the buffer {reassigned[0]!r}, which symbolic_trace cannot record")


def _drop_guards(gm: GraphModule) -> None:
    """torch.export's checks are not computation: its input-shape guard module (which cannot be
    saved as source) and its dtype/device assertions (whose reads would keep a replaced weight
    alive and make every pass treat them as extra users)."""
    for node in list(gm.graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or (
            node.target is torch.ops.aten._assert_tensor_metadata.default
        ):
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _explain(model: torch.nn.Module, trace_error: BaseException, export_error: BaseException) -> str:
    return (
        f"fxopt could not capture {type(model).__name__} as a graph.\n"
        f"  torch.fx.symbolic_trace: {_first_line(trace_error)}\n"
        f"  torch.export.export(strict=False): {_first_line(export_error)}\n"
        "What you can do: pass the submodules that hold data-dependent Python control flow as "
        "leaf_modules=[MyBlock] (fxopt then leaves them untouched), wrap functions that cannot be "
        "traced with autowrap_functions=[fn], and check that example_inputs is a tuple of the "
        "arguments forward() takes (for HF transformers models, set use_cache=False in the config)."
    )
