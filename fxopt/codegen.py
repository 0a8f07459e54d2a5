"""Codegen: a canonical graph back to a plain torch nn.Module, and saving it as source plus weights.

``finalize`` lowers the canonical ops that are not torch functions (``fxopt.ops.conv`` becomes
``F.pad`` + ``F.conv2d`` and friends, ``identity`` disappears, fxopt.quant's log quantizers
and the per-channel pad become the torch ops they run), rebuilds the module hierarchy
from the attributes the graph still reads (so state_dict keys are the original qualified names
where parameters survive) and recompiles.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from . import ops, quant, runtime
from .interpret import attribute, eliminate_dead_code, install_attributes
from .rewriter import base_name

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def finalize(gm: GraphModule, class_name: str, new_attributes: set[str], share: bool) -> GraphModule:
    """Lower canonical ops to torch calls and return a fresh GraphModule holding only what it reads.

    ``new_attributes`` are the names rewrites gave new constants (see ``Rewriter.new_constant``).
    Unless ``share``, every other tensor and module the result keeps is copied, so the result does
    not change when the user's model does (and the other way round). ``gm`` is used up: its graph
    becomes the result's, and its attribute containers are emptied.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if ops.CONV(node):
            _lower_conv(graph, node)
        elif ops.ZERO_MEAN_RMS_NORM(node):
            _lower_zero_mean_rms_norm(graph, node)
        elif ops.FAKE_QUANT_PER_CHANNEL(node):
            _lower_fake_quant_per_channel(graph, node)
        elif node.op == "call_function" and node.target in _INLINED:
            _inline_function(graph, node)
        elif ops.IDENTITY(node):
            node.replace_all_uses_with(node.kwargs["input"])
            graph.erase_node(node)
    eliminate_dead_code(graph)
    attributes, fresh = _attributes_by_final_name(gm, new_attributes)
    if not share:
        attributes = {name: value if name in fresh else _copy(value) for name, value in attributes.items()}
    install_attributes(gm, {})  # its containers (2 KB a module) would double the result's at its peak
    result = GraphModule(attributes, graph, class_name)
    result.graph.lint()
    bind_container_paths(result)
    return result


def bind_container_paths(root: torch.nn.Module) -> None:
    """Make the generated code's attribute chains (``self.blocks[0].conv.weight`` spelled as
    getattr calls) cheap: nn.Module finds submodules through a Python-level ``__getattr__``, about a
    microsecond a level, which on small models costs more than the convs saved. Plain container
    modules we created also get each child as an ordinary instance attribute; ``_modules`` keeps
    it too, so state_dict, named_modules and ``.to()`` are unchanged, and nn.Module's own
    ``__setattr__`` replaces both when a child is reassigned."""
    for module in root.modules():
        if module is root or type(module) is torch.nn.Module:
            for name, child in module._modules.items():
                object.__setattr__(module, name, child)


def _copy(value: Any) -> Any:
    if isinstance(value, torch.nn.Parameter):
        return torch.nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
    if isinstance(value, (torch.Tensor, torch.nn.Module)):
        return copy.deepcopy(value)
    return value


def _lower_fake_quant_per_channel(graph: torch.fx.Graph, node: Node) -> None:
    """torch's kernel with the explicit float32 scale of fxopt.ops.fake_quantize_per_channel."""
    k = node.kwargs
    with graph.inserting_before(node):
        scale = graph.call_method("float", (k["scale"],))
        args = (k["input"], scale, k["zero_point"], k["axis"], k["quant_min"], k["quant_max"])
        new = graph.call_function(torch.fake_quantize_per_channel_affine, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


# Canonical ops and fxopt.quant functions written as Python functions of torch ops: a saved
# module.py may call torch alone, so they are inlined (log quantizers, the pieces reparam_quant
# builds attention from, DBB's per-channel border padding)
_INLINED = frozenset({
    quant.log_sqrt2_quantize, quant.log2_quantize, quant.log_code, quant.log2_shift, quant.log2_dequantize,
    quant.log_sqrt2_dequantize, ops.pad_per_channel,
})


def _inline_function(graph: torch.fx.Graph, node: Node) -> None:
    """Replace the call by the torch ops the function runs, traced with its tensor arguments
    symbolic and the others (bits, delta, pad widths) fixed: the function's own arithmetic, op for
    op, so the lowered graph gives the same bits as the function."""
    function = node.target
    arguments = inspect.signature(function).bind(*node.args, **node.kwargs).arguments
    tensors = [name for name, value in arguments.items() if isinstance(value, Node)]
    fixed = {name: value for name, value in arguments.items() if name not in tensors}

    traced = torch.fx.Graph()
    tracer = torch.fx.proxy.GraphAppendingTracer(traced)
    proxies = {name: torch.fx.Proxy(traced.placeholder(name), tracer) for name in tensors}
    traced.output(function(**proxies, **fixed).node)
    with graph.inserting_before(node):
        new = graph.graph_copy(traced, {proxies[name].node: arguments[name] for name in tensors})
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _lower_conv(graph: torch.fx.Graph, node: Node) -> None:
    k = dict(node.kwargs)
    rank = len(k["stride"])
    x = k["input"]
    padding = k["padding"]
    with graph.inserting_before(node):
        if k["padding_mode"] != "zeros":
            x = graph.call_function(F.pad, (x, ops.pad_widths(padding)), {"mode": k["padding_mode"]})
            padding = (0,) * rank
        if k["transposed"]:
            args = (x, k["weight"], k["bias"], k["stride"], padding, k["output_padding"], k["groups"], k["dilation"])
            new = graph.call_function(_CONV_TRANSPOSE[rank], args)
        else:
            args = (x, k["weight"], k["bias"], k["stride"], padding, k["dilation"], k["groups"])
            new = graph.call_function(_CONV[rank], args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _lower_zero_mean_rms_norm(graph: torch.fx.Graph, node: Node) -> None:
    """fxopt.runtime's version picks the faster kernel, eager or compiled (see its docstring)."""
    k = node.kwargs
    with graph.inserting_before(node):
        args = (k["input"], k["normalized_shape"], k["weight"], k["bias"], k["eps"])
        new = graph.call_function(runtime.zero_mean_rms_norm, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _attributes_by_final_name(gm: GraphModule, new_attributes: set[str]) -> tuple[dict[str, Any], set[str]]:
    """Every attribute the graph reads, keyed by its final name, and the final names of new ones.

    A rewrite that replaced ``conv.weight`` had to call the new one ``conv.weight_1`` while the old
    one was alive; the old one is gone now, so the new one takes the original name back.
    """
    targets = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    renames: dict[str, str] = {}
    for target in sorted(targets & new_attributes):
        base = base_name(target)
        if base != target and base not in targets and base not in renames.values():
            renames[target] = base
    attributes: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            final = renames.get(node.target, node.target)
            attributes[final] = attribute(gm, node.target)
            node.target = final
    fresh = {renames.get(target, target) for target in targets & new_attributes}
    return attributes, fresh
