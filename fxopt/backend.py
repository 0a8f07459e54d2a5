"""``torch.compile(model, backend="fxopt")``: the fxopt passes, then inductor.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so the name works
once fxopt is installed. Options go through ``torch.compile``'s ``options``, e.g.
``options={"passes": ["fold_bn"], "verify": False}`` (defaults: the default pipeline, verified).

What dynamo hands a backend: a GraphModule whose parameters and buffers are placeholders (dynamo
inlines nn.Modules and lifts their tensors to graph inputs), together with the real tensors of
the call being compiled. Folding treats those tensors as constants, which is sound only when
nothing differentiates through them and nothing writes them, so the backend folds only

* under inference: grad mode off (``torch.no_grad()`` / ``torch.inference_mode()``) or no input
  requiring grad (dynamo guards on both: a later call that records gradients recompiles);
* graphs that write none of their inputs (a training-mode BatchNorm updates its statistics);
* parameters and buffers (tensors dynamo read from an nn.Module, and nn.Parameters).

Otherwise, and when fxopt cannot optimize the graph or its result fails verification, the graph
goes to inductor unchanged, with a warning saying why.

Folded values are a snapshot, as with inductor's ``freezing``, but checked on every call: each
folded argument must be the very tensor that was folded, at the same version (``Tensor._version``
counts in-place writes: ``load_state_dict``, optimizer steps); BatchNorm statistics, which a
training-mode forward updates without counting a write, are compared by value. When one changed
the graph is folded again (with a warning: that costs a compile; for weights that keep changing
use ``backend="inductor"``). Not seen: writes through ``.data`` (``p.data.copy_(...)``), which
bypass the version counter, and in-place writes to parameters created under
``torch.inference_mode()``, which have none; call ``torch._dynamo.reset()`` after those.

Dynamo guards an nn.Module by its type, not its identity, so another model of the same class
reuses a compiled graph with its own tensors: each model gets its own folding (one compile each),
dropped when the model is. With dynamic shapes every rewrite is validated on the concrete sizes of
the call being compiled. Each folding holds its own copy of the tensors it keeps (fxopt never
writes into the user's tensors).
"""

from __future__ import annotations

import logging
import operator
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import FxoptError
from .interpret import install_attributes

log = logging.getLogger(__name__)


class FxoptBackendWarning(UserWarning):
    """The fxopt backend did not fold a graph, or folded it again; the message says why."""


@dataclass(frozen=True)
class BackendOptions:
    """What ``torch.compile(..., backend="fxopt", options={...})`` accepts."""

    passes: Sequence[str] | None = None  # None: the default pipeline
    verify: bool = True  # validate every rewrite and the whole graph, as fxopt.optimize does


def fxopt_backend(gm: GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None) -> Callable:
    """The dynamo backend: fold parameters with the fxopt passes where that is sound, then inductor."""
    settings = _options(options)
    reason = _why_not_fold(gm, example_inputs)
    roles = _tensor_roles(gm, example_inputs) if reason is None else None
    if roles is not None and roles.written:
        reason = _writes_inputs(gm, roles.written)
    if reason is None:
        try:
            return _FoldedGraph(gm, example_inputs, settings, roles.statistics)
        except FxoptError as error:  # e.g. a result that fails verification: never used
            reason = f"fxopt could not optimize this graph ({error})"
    warnings.warn(f"fxopt backend: {reason}; compiling with inductor unchanged", FxoptBackendWarning, stacklevel=2)
    return _inductor(gm, example_inputs)


def _options(options: dict[str, Any] | None) -> BackendOptions:
    from .pattern import get_pass

    known = list(BackendOptions.__dataclass_fields__)
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        raise FxoptError(f"fxopt backend: unknown option(s) {unknown}; the options are {known}")
    settings = BackendOptions(**(options or {}))
    for name in settings.passes or ():
        get_pass(name)  # a misspelt pass is the user's error, not a reason to compile without fxopt
    return settings


def _inductor(gm: GraphModule, example_inputs: Sequence[Any], freezing: bool = False) -> Callable:
    """Inductor as ``backend="inductor"`` runs it; ``freezing`` for a folded graph, whose tensors
    are constants anyway: inductor then also pre-packs weights and folds what it can."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches={"freezing": True} if freezing else None)


def _why_not_fold(gm: GraphModule, example_inputs: list[Any]) -> str | None:
    """Why the parameters cannot be treated as constants here (None: they can)."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    if any(isinstance(t, torch._subclasses.FakeTensor) for t in tensors):
        return "dynamo passed fake example inputs, so the parameters' values are unknown at compile time"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return (
            "gradients are being recorded (grad mode is on and a parameter or input requires grad), so the "
            "parameters are not constants; call the compiled model under torch.no_grad() or "
            "torch.inference_mode() to fold"
        )
    dropped = _calls_retracing_drops(gm)
    if dropped:
        return f"the graph switches global state ({', '.join(sorted(dropped))}), which fxopt's capture would drop"
    return None


def _writes_inputs(gm: GraphModule, written: list[int]) -> str:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = ", ".join(_qualified_name(placeholders[i]) for i in written[:4]) + (", ..." if len(written) > 4 else "")
    return (
        f"the graph writes its inputs in place ({names}), as a BatchNorm in training mode does with its "
        "statistics; call model.eval() to fold"
    )


def _calls_retracing_drops(gm: GraphModule) -> set[str]:
    """Calls that torch.fx.symbolic_trace (fxopt's capture) would run at trace time instead of
    recording, such as the grad-mode and autocast switches dynamo records for ``with`` blocks."""

    def calls(graph: torch.fx.Graph) -> Counter:
        return Counter((n.op, n.target) for n in graph.nodes if n.op.startswith("call"))

    try:
        retraced = torch.fx.symbolic_trace(gm).graph
    except Exception as error:  # noqa: BLE001 - any tracing failure means fxopt cannot take the graph
        return {f"untraceable ({type(error).__name__})"}
    return {getattr(target, "__name__", str(target)) for _, target in calls(gm.graph) - calls(retraced)}


class _FoldedGraph:
    """What dynamo calls with every graph input: one build per set of folded tensors, checked."""

    def __init__(self, gm: GraphModule, example_inputs: list[Any], settings: BackendOptions, statistics: list[int]):
        self.gm = gm
        self.settings = settings
        self.statistics = set(statistics)  # positions of BatchNorm statistics: checked by value
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.folded_positions = [
            i for i, (node, value) in enumerate(zip(placeholders, example_inputs)) if _is_parameter_or_buffer(node, value)
        ]
        folded = set(self.folded_positions)
        self.runtime_positions = [i for i in range(len(placeholders)) if i not in folded]
        # dynamo guards modules by type, not identity: another instance of the model's class reuses
        # this graph with its own tensors, so builds are kept per first folded tensor
        self.builds: dict[int | None, _Build] = {}
        self._build(example_inputs, lambda optimized, inputs: _inductor(optimized, inputs, freezing=True))

    def __call__(self, *args: Any) -> Any:
        build = self.builds.get(self._key(args))
        if build is None:
            log.info("fxopt backend: another model of the same class reuses this graph: folding its parameters")
            build = self._build(list(args), _torch_compile)
        elif build.stale(args):
            warnings.warn(
                "fxopt backend: a folded parameter or buffer changed since it was folded (a new tensor or an "
                "in-place write such as load_state_dict): folding again, which costs a compile; for weights "
                "that keep changing use backend='inductor'",
                FxoptBackendWarning,
                stacklevel=2,
            )
            build = self._build(list(args), _torch_compile)
        return build.compiled(*[args[i] for i in self.runtime_positions])

    def _key(self, args: Sequence[Any]) -> int | None:
        return id(args[self.folded_positions[0]]) if self.folded_positions else None

    def _build(self, inputs: list[Any], compile_graph: Callable[[GraphModule, list[Any]], Callable]) -> _Build:
        import fxopt  # here: the fxopt package imports this module while it initialises

        module = _with_constants(self.gm, inputs, self.folded_positions)
        runtime_inputs = [inputs[i] for i in self.runtime_positions]
        optimized = fxopt.optimize(  # inductor takes a GraphModule: dynamo's graph has no class to keep
            module, tuple(_concrete(x) for x in runtime_inputs), passes=self.settings.passes,
            verify=self.settings.verify, keep_class=False,
        )
        log.info("fxopt backend:\n%s", optimized.report)
        verification = optimized.report.verification
        if verification is not None and not verification.passed:
            raise FxoptError(f"the optimized graph failed verification: {verification}")
        # versions taken after optimize: its runs put buffers back with copy_, which counts as a write
        folded = _Snapshot.of(inputs, self.folded_positions, self.statistics)
        build = _Build(compile_graph(optimized, runtime_inputs), folded)
        key = self._key(inputs)
        self.builds[key] = build
        if key is not None:  # a model that is gone takes its build along
            weakref.finalize(inputs[self.folded_positions[0]], self.builds.pop, key, None)
        return build


@dataclass
class _Build:
    """One folding of the graph: the compiled result and what it folded."""

    compiled: Callable
    folded: _Snapshot

    def stale(self, args: Sequence[Any]) -> bool:
        return self.folded.changed(args)


@dataclass(frozen=True)
class _Snapshot:
    """The tensors a build folded as they were then, checked against the arguments of every call.

    The check runs before every call of the compiled graph, so it works on parallel lists in a few
    bulk steps: a Python call and a ``torch.equal`` per tensor cost 2.5 times as much (~90 us for
    the 267 tensors of a ResNet-50 of width 16, a few percent of its compiled forward)."""

    positions: list[int]  # argument positions of the folded tensors
    tensors: list[weakref.ref]  # weakly held, so a model that is gone can go
    versioned: list[int]  # positions checked by version: all but statistics and inference tensors
    versions: list[int]
    statistics: list[tuple[list[int], torch.Tensor]]  # BatchNorm statistics: positions, their values joined

    @classmethod
    def of(cls, inputs: Sequence[Any], positions: list[int], statistics: set[int]) -> _Snapshot:
        versioned = [i for i in positions if i not in statistics and _version(inputs[i]) is not None]
        return cls(
            positions=positions,
            tensors=[weakref.ref(inputs[i]) for i in positions],
            versioned=versioned,
            versions=[inputs[i]._version for i in versioned],
            statistics=_joined_values(inputs, [i for i in positions if i in statistics]),
        )

    def changed(self, args: Sequence[Any]) -> bool:
        return not (self._same_tensors(args) and self._same_versions(args) and self._same_statistics(args))

    def _same_tensors(self, args: Sequence[Any]) -> bool:
        # identity through the weak references, not id(): a new tensor may reuse a dead one's id
        return all(map(operator.is_, [tensor() for tensor in self.tensors], [args[i] for i in self.positions]))

    def _same_versions(self, args: Sequence[Any]) -> bool:
        return [args[i]._version for i in self.versioned] == self.versions

    def _same_statistics(self, args: Sequence[Any]) -> bool:
        # by value: a training-mode BatchNorm forward updates them without counting a write
        return all(torch.equal(_joined([args[i] for i in group]), values) for group, values in self.statistics)


def _joined_values(inputs: Sequence[Any], positions: list[int]) -> list[tuple[list[int], torch.Tensor]]:
    """The tensors at ``positions`` in groups that one ``torch.cat`` joins (one device and dtype,
    equal trailing sizes), each with a copy of its tensors' values, joined."""
    groups: dict[tuple, list[int]] = {}
    for i in positions:
        tensor = inputs[i]
        groups.setdefault((tensor.device, tensor.dtype, tensor.shape[1:] if tensor.dim() else None), []).append(i)
    return [(group, _joined([inputs[i] for i in group]).detach()) for group in groups.values()]


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One new tensor holding all of ``tensors`` (BatchNorm statistics are 1-D; a buffer they are
    views of may not be, and ``torch.cat`` cannot join 0-d tensors)."""
    return torch.cat(tensors) if tensors[0].dim() else torch.stack(tensors)


def _torch_compile(gm: GraphModule, _: list[Any]) -> Callable:
    """Inductor for a build made outside dynamo's compile (at call time): torch.compile traces it
    afresh, so sizes that were dynamic stay dynamic."""
    return torch.compile(gm, backend="inductor", options={"freezing": True})


def _concrete(value: Any) -> Any:
    """A dynamic size as the int it has in this call, without adding a guard (fxopt runs the
    graph eagerly on the example inputs; a guard would specialise dynamo's graph)."""
    if isinstance(value, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw

        return guarding_hint_or_throw(value)
    return value


def _version(tensor: torch.Tensor) -> int | None:
    """The in-place write counter; None for inference tensors, which have none."""
    return None if tensor.is_inference() else tensor._version


def _is_parameter_or_buffer(node: Node, value: Any) -> bool:
    """A tensor dynamo read from an nn.Module (parameter or buffer), or an nn.Parameter anywhere."""
    if isinstance(value, torch.nn.Parameter):
        return True
    if not isinstance(value, torch.Tensor):
        return False
    from torch._dynamo.source import is_from_unspecialized_param_buffer_source

    grapharg = node.meta.get("grapharg")
    return grapharg is not None and is_from_unspecialized_param_buffer_source(grapharg.source)


@dataclass(frozen=True)
class _TensorRoles:
    written: list[int]  # positions of the inputs the graph writes in place
    statistics: list[int]  # positions of the inputs a BatchNorm reads as its running statistics


def _tensor_roles(gm: GraphModule, example_inputs: list[Any]) -> _TensorRoles:
    """Which inputs the graph writes and which are BatchNorm statistics, found by running it on
    fake copies (no compute, no memory) and reading each aten op's schema (version counters would
    not do: a training-mode BatchNorm updates its statistics without counting a write)."""
    from torch._subclasses import FakeTensorMode
    from torch.multiprocessing.reductions import StorageWeakRef

    recorder = _RoleRecorder()
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else _concrete(x) for x in example_inputs]
        with recorder, torch.no_grad():
            gm(*fakes)
    storages = {i: StorageWeakRef(x.untyped_storage()) for i, x in enumerate(fakes) if isinstance(x, torch.Tensor)}
    return _TensorRoles(
        written=[i for i, storage in storages.items() if storage in recorder.written],
        statistics=[i for i, storage in storages.items() if storage in recorder.statistics],
    )


class _RoleRecorder(TorchDispatchMode):
    """Records the storage of every tensor an aten op writes (a ``Tensor(a!)`` argument) and of
    the running statistics batch-norm ops read."""

    def __init__(self) -> None:
        super().__init__()
        self.written: set[Any] = set()
        self.statistics: set[Any] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        schema = func._schema
        kwargs = kwargs or {}
        values = {a.name: args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(schema.arguments)}
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        if "batch_norm" in schema.name:
            statistics = [values.get("running_mean"), values.get("running_var")]
            self.statistics |= _storages(statistics)
            if values.get("training"):
                # native_batch_norm (and the cudnn/miopen kernels) update the statistics without
                # their schema saying so
                self.written |= _storages(statistics)
        self.written |= _storages([values.get(name) for name in written])
        return func(*args, **kwargs)


def _storages(values: list[Any]) -> set[Any]:
    from torch.multiprocessing.reductions import StorageWeakRef

    return {StorageWeakRef(t.untyped_storage()) for t in pytree.tree_leaves(values) if isinstance(t, torch.Tensor)}


def _with_constants(gm: GraphModule, inputs: list[Any], positions: list[int]) -> GraphModule:
    """A copy of ``gm`` whose placeholders at ``positions`` read ``inputs`` there as attributes,
    named by their qualified names in the user's model where dynamo's sources give them."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    constants = {placeholders[i]: inputs[i] for i in positions}
    graph = torch.fx.Graph()
    copied: dict[Node, Node] = {}
    attributes: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node in constants:
            name = _unique(_qualified_name(node), attributes)
            attributes[name] = constants[node]
            copied[node] = graph.get_attr(name)
        else:
            copied[node] = graph.node_copy(node, lambda n: copied[n])
    root = torch.nn.Module()
    install_attributes(root, attributes)
    return GraphModule(root, graph, "TorchCompileGraph")


def _qualified_name(node: Node) -> str:
    """``layer1.0.conv.weight`` from dynamo's source (``L['self']._modules['layer1']...``), else the
    placeholder's own name."""
    from torch._dynamo.source import AttrSource, ChainedSource, DictGetItemSource

    source = getattr(node.meta.get("grapharg"), "source", None)
    parts: list[str] = []
    while isinstance(source, ChainedSource):
        if isinstance(source, DictGetItemSource):
            parts.append(str(source.index))
            if isinstance(source.base, AttrSource) and source.base.member in ("_modules", "_parameters", "_buffers"):
                source = source.base  # the container is not part of the name
        elif isinstance(source, AttrSource):
            parts.append(source.member)
        source = source.base
    if parts and all(part.isidentifier() or part.isdigit() for part in parts):
        return ".".join(reversed(parts))
    return node.name


def _unique(name: str, taken: dict[str, Any]) -> str:
    candidate, n = name, 1
    while candidate in taken or any(other.startswith(candidate + ".") for other in taken):
        candidate, n = f"{name}_{n}", n + 1
    return candidate
