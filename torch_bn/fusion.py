"""Rewriting BatchNorm -> activation and BatchNorm -> add -> activation into fused layers with torch.fx.

``fuse_activations(module)`` traces ``module`` with ``torch.fx`` (BatchNorm layers and torch.nn's
layers are leaves) and rewrites, where the BatchNorm's output feeds nothing else:

- ``relu(bn(x))`` into ``bn_act(x)``, and ``leaky_relu(bn(x))`` likewise (with its slope);
- ``relu(bn(x) + r)`` and ``relu(r + bn(x))`` into ``bn_act(x, r)``, the residual block's tail.

The activation may be a ``torch.nn.ReLU``/``LeakyReLU`` module (exact classes), ``torch.relu``,
``F.relu``, ``F.leaky_relu``, their in-place forms or ``Tensor.relu``; the add ``+``, ``+=``,
``torch.add`` or ``Tensor.add`` (without ``alpha``). ``bn`` is a torch_bn ``BatchNorm1d/2d/3d``
(exact class: ``torch_bn.convert`` first) called at one place in the graph; each becomes a
``BatchNormAct1d/2d/3d`` that shares its parameters and buffers (the same tensor objects).

A module that does not trace (data-dependent control flow, say) is left as it is and its
children are fused one by one instead; such modules are reported in one warning, not an error.
Like every torch.fx rewrite, the traced code is fixed at fusion time: Python branches on
non-tensor values (``self.training`` included) keep the way they went while tracing.
"""

import copy
import operator
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .activation import DEFAULT_NEGATIVE_SLOPE, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

FUSED_CLASS = {BatchNorm1d: BatchNormAct1d, BatchNorm2d: BatchNormAct2d, BatchNorm3d: BatchNormAct3d}

_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}
_LEAKY_RELU_FUNCTIONS = {F.leaky_relu, F.leaky_relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_IN_PLACE_ADDS = {operator.iadd, "add_"}

Activation = Tuple[str, float]  # (activation, negative_slope)


class _Tracer(fx.Tracer):
    """torch.fx's tracer with every BatchNorm layer as a leaf, the traced root included (a torch_bn
    layer records itself as a call only as a submodule; see modules.traced_as_leaf)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, _BatchNorm) or super().is_leaf_module(module, qualified_name)


def fuse_activations(module: nn.Module) -> nn.Module:
    """Fuses BatchNorm -> (add ->) ReLU/LeakyReLU in ``module`` (see the module docstring).

    Returns the fused module: a ``torch.fx.GraphModule`` when ``module`` traces and anything was
    fused (``module`` itself is then left unchanged and stays usable; the two share every
    parameter and buffer), else ``module`` with its traceable children replaced in place by
    their fused GraphModules. Module trees, parameter and buffer names (the state_dict keys)
    are kept. Warns once, listing the modules that did not trace.
    """
    untraced: List[str] = []
    fused = _fuse(module, "", untraced)
    if untraced:
        warnings.warn(
            "torch_bn: these modules do not trace with torch.fx, so BatchNorm + activation was fused only within their "
            "children: " + "; ".join(untraced),
            stacklevel=2,
        )
    return fused


def _fuse(module: nn.Module, name: str, untraced: List[str]) -> nn.Module:
    if not any(type(layer) in FUSED_CLASS for layer in module.modules()) or _Tracer().is_leaf_module(module, name):
        return module
    try:
        graph = _Tracer().trace(module)
    except Exception as error:  # torch.fx raises TraceError, TypeError, NotImplementedError, ... on untraceable code
        untraced.append(f"{name or 'the root'} ({type(module).__name__}: {type(error).__name__}: {_first_line(error)})")
        for child_name, child in module.named_children():
            fused_child = _fuse(child, f"{name}.{child_name}" if name else child_name, untraced)
            if fused_child is not child:
                setattr(module, child_name, fused_child)
        return module
    replacements = _rewrite(graph, dict(module.named_modules(remove_duplicate=False)))
    if not replacements:
        return module
    return _graph_module(_with_submodules(module, replacements), graph)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _rewrite(graph: fx.Graph, modules: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
    """Rewrites every fusable pattern in ``graph``; returns the fused layers by qualified name."""
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def fusable_bn(node) -> bool:
        # Called with just its input, at one place, and feeding only the node being fused.
        return (
            isinstance(node, fx.Node)
            and node.op == "call_module"
            and type(modules[node.target]) in FUSED_CLASS
            and calls[node.target] == 1
            and len(node.args) == 1
            and not node.kwargs
            and len(node.users) == 1
        )

    replacements: Dict[str, nn.Module] = {}
    for act_node in list(graph.nodes):
        activation = _activation_of(act_node, modules)
        if activation is None:
            continue
        source = act_node.args[0]
        if fusable_bn(source):
            fused_node, removed = source, []
        else:
            bn, residual = _bn_and_residual(source, fusable_bn)
            if bn is None:
                continue
            # The fused call takes the residual, which may be computed after the BatchNorm: it
            # goes where the add was, after both.
            with graph.inserting_before(source):
                fused_node = graph.call_module(bn.target, (bn.args[0], residual))
            removed = [source, bn]
        act_node.replace_all_uses_with(fused_node)
        for node in [act_node, *removed]:
            graph.erase_node(node)
        replacements[fused_node.target] = _fused_layer(modules[fused_node.target], activation)
    graph.lint()
    return replacements


def _activation_of(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[Activation]:
    """(activation, negative_slope) when ``node`` applies a ReLU or LeakyReLU to its first argument."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        layer = modules[node.target]
        if type(layer) is nn.ReLU:
            return "relu", 0.0
        if type(layer) is nn.LeakyReLU:
            return "leaky_relu", float(layer.negative_slope)
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu", 0.0
    elif node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return "relu", 0.0
    elif node.op == "call_function" and node.target in _LEAKY_RELU_FUNCTIONS:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", DEFAULT_NEGATIVE_SLOPE)
        if isinstance(slope, (int, float)):
            return "leaky_relu", float(slope)
    return None


def _bn_and_residual(node, fusable_bn) -> Tuple[Optional[fx.Node], Optional[fx.Node]]:
    """(BatchNorm node, the other operand) when ``node`` adds a fusable BatchNorm's output to
    another tensor and feeds only the activation; (None, None) otherwise."""
    if not isinstance(node, fx.Node) or len(node.users) != 1 or len(node.args) != 2 or node.kwargs:
        return None, None
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    if not is_add or not all(isinstance(arg, fx.Node) for arg in node.args):
        return None, None
    left, right = node.args
    # An in-place add writes into its first operand: fusing is safe only when that is the
    # BatchNorm's output, which nothing else reads.
    candidates = [(left, right)] if node.target in _IN_PLACE_ADDS else [(left, right), (right, left)]
    for bn, residual in candidates:
        if fusable_bn(bn) and residual is not bn:
            return bn, residual
    return None, None


def _fused_layer(layer: nn.Module, activation: Activation) -> nn.Module:
    """A BatchNormAct layer holding ``layer``'s parameters and buffers (the same tensors) and its
    hooks and flags; ``layer`` itself is not changed."""
    fused = _shallow_copy(layer)
    fused.__class__ = FUSED_CLASS[type(layer)]
    fused.activation, fused.negative_slope = activation
    return fused


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` holding the same tensors, submodules, hooks and flags.

    copy.copy alone would share the dicts that hold them: the copy gets its own, so that
    registering or replacing something in one does not change the other.
    """
    copied = copy.copy(module)
    for attribute in ("_parameters", "_buffers", "_modules"):
        setattr(copied, attribute, dict(getattr(module, attribute)))
    return copied


def _with_submodules(module: nn.Module, replacements: Dict[str, nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` with the submodules at the given qualified names replaced;
    only the modules on the way to them are copied, ``module`` is not changed."""
    if "" in replacements:
        return replacements[""]
    copied = _shallow_copy(module)
    by_child: Dict[str, Dict[str, nn.Module]] = {}
    for name, replacement in replacements.items():
        child, _, rest = name.partition(".")
        by_child.setdefault(child, {})[rest] = replacement
    for child, rest in by_child.items():
        copied._modules[child] = _with_submodules(module._modules[child], rest)
    return copied


def _graph_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """The GraphModule running ``graph`` on ``root``'s whole module tree and tensors.

    GraphModule copies only what the graph uses, into fresh containers; putting back the root's
    children, parameters and buffers keeps the tree, the unused submodules and the state_dict
    keys of ``root``.
    """
    fused = fx.GraphModule(root, graph)
    for name, child in root.named_children():
        setattr(fused, name, child)
    for name, parameter in root.named_parameters(recurse=False):
        if name not in fused._parameters:
            fused.register_parameter(name, parameter)
    for name, buffer in root.named_buffers(recurse=False):
        if name not in fused._buffers:
            fused.register_buffer(name, buffer, persistent=name not in root._non_persistent_buffers_set)
    fused.training = root.training  # only the root's flag: its children keep theirs
    return fused
