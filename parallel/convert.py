"""Split a network you already have over the placement's slots: ``convert(model, placement)``.

The model is traced symbolically (``torch.fx``); every node is mapped to its sharded twin by
these rules, or the conversion is refused, in one line naming the node, its op and the
source line it comes from:

  conv (nn.Conv2d)        reading the input image (an unsharded tensor)   -> GroupConv2d, "replicated"
                          reading sharded maps, groups = 1               -> GroupConv2d, "all" (all-gather,
                                                                            then each slot its output channels)
                          reading sharded maps, groups = g, K divides g  -> GroupConv2d, "own", groups=g
                                                                            (nn.Conv2d(groups=g): no exchange)
  linear (nn.Linear)      reading sharded features (or maps: flattened)  -> GroupLinear, "all"
                          reading an unsharded tensor                    -> GroupLinear, "replicated"
  nn.BatchNorm2d          on sharded maps                                -> GroupBatchNorm2d
  nn.Dropout              on sharded maps                                -> GroupDropout (masks from global
                                                                            positions: one mask, any placement)
  ReLU, max/avg/adaptive pooling, Identity, Flatten(1)  on sharded maps  -> applied per slot
  x + y, torch.flatten(x, 1), F.relu                    on sharded maps  -> per slot (parallel.add, ...)
  anything on unsharded tensors only                                     -> as it is

Every sharded layer except grouped convolutions splits its output over K groups, one per
slot (K = the placement's slots), so the maps between layers are always K equal blocks of
channels, and a grouped convolution with g groups finds its g/K groups' inputs on its slot.
The weights are the original's, sliced (nothing drawn anew that stays), so
``full_state_dict(converted)`` is ``model.state_dict()`` key for key and
``load_full_state_dict`` takes it back. The output is gathered on the output device, as
``gather_output`` does. ``exchange={"layer.path": "shuffle", ...}`` overrides a conv or linear
layer's exchange (its twin must still be what that exchange computes).
"""
from __future__ import annotations

import copy
import operator
import os
import re

import torch
import torch.nn.functional as F
from torch import fx, nn

from parallel.dropout import GroupDropout
from parallel.layers import GroupConv2d, GroupLinear, PerGroup, gather_output
from parallel.norm import GroupBatchNorm2d
from parallel.placement import PlacementError
from parallel.sharded import Sharded, add

#: modules that treat every channel on its own: applied to each slot's part as they are
CHANNEL_WISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool2d, nn.Identity, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU)
ADDS = (operator.add, operator.iadd, torch.add)


class ConversionError(PlacementError):
    """A node ``convert`` has no rule for; the message names it, its op and its source line."""


def _where(node: fx.Node) -> str:
    """The file and line a node was traced from: the innermost frame of its recorded stack outside torch."""
    torch_dir = os.path.dirname(torch.__file__)
    lines = [(f, n) for f, n in re.findall(r'File "([^"]+)", line (\d+)', node.stack_trace or "")
             if not f.startswith(torch_dir)]
    return f"{lines[-1][0]}:{lines[-1][1]}" if lines else "source line not recorded"


def _refuse(node: fx.Node, why: str) -> ConversionError:
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return ConversionError(f"parallel.convert: cannot convert node {node.name} ({node.op} {what}, {_where(node)}): "
                           f"{why}")


def _flatten_sharded(x: Sharded, start_dim: int = 1) -> Sharded:
    """Flatten each slot's (N, C_s, H, W) to (N, C_s H W): slots hold contiguous channel blocks, so the parts
    concatenated are the reference's channel-major flatten; each group's share grows by H W."""
    per_channel = x.parts[0][0, 0].numel()
    return Sharded(tuple(p.flatten(start_dim) for p in x.parts), tuple(s * per_channel for s in x.group_sizes))


class _Ref(str):
    """A value of the traced graph, by node name, inside a step's arguments."""


def _refs(value):
    """A node's arguments with every fx Node replaced by its name (plain Python: nothing of fx at run time)."""
    return fx.node.map_arg(value, lambda n: _Ref(n.name))


def _filled(value, env: dict):
    """``_refs``' output with every reference replaced by its value."""
    if isinstance(value, _Ref):
        return env[value]
    if isinstance(value, (tuple, list)):
        return type(value)(_filled(v, env) for v in value)
    if isinstance(value, dict):
        return {k: _filled(v, env) for k, v in value.items()}
    return value


class Converted(nn.Module):
    """The converted network: the original's modules (sharded where the rules say) under their own
    names, run in the traced graph's order as a list of plain steps (what torch.compile traces through
    as one graph). Forward takes the original's inputs and returns its output, gathered on the
    placement's output device."""

    def __init__(self, graph: fx.Graph, children: dict[str, nn.Module], placement, functions: dict[str, object]):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        self.placement = placement
        self._inputs = [n.name for n in graph.nodes if n.op == "placeholder"]
        # (name, callable, args, kwargs) per computing node; the callables are this module's own submodules
        self._steps = [(n.name, self.get_submodule(n.target) if n.op == "call_module" else functions[n.name],
                        _refs(n.args), _refs(n.kwargs))
                       for n in graph.nodes if n.op in ("call_module", "call_function", "call_method")]
        self._output = next(_refs(n.args[0]) for n in graph.nodes if n.op == "output")

    def forward(self, *inputs):
        env = dict(zip(self._inputs, inputs))
        for name, run, args, kwargs in self._steps:
            env[name] = run(*_filled(args, env), **_filled(kwargs, env))
        out = _filled(self._output, env)
        return gather_output(self.placement, out) if isinstance(out, Sharded) else out


class _Converter:
    """One pass over the traced graph: for each node, whether its value is sharded, and its twin."""

    def __init__(self, model: nn.Module, placement, exchange: dict[str, str]):
        self.model, self.placement, self.exchange = model, placement, dict(exchange)
        self.K = placement.num_slots
        self.sharded: dict[str, bool] = {}
        self.replaced: dict[str, nn.Module] = {}
        self.functions: dict[str, object] = {}

    def inputs_sharded(self, node: fx.Node) -> list[bool]:
        found = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(self.sharded[n.name]))
        return found

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.sharded[node.name] = False
        elif node.op == "get_attr":
            raise _refuse(node, "a parameter or buffer used directly in forward has no sharded twin; "
                                "wrap it in a module")
        elif node.op == "call_module":
            self.sharded[node.name] = self.module(node)
        elif node.op in ("call_function", "call_method"):
            self.sharded[node.name] = self.function(node)
        elif node.op == "output":
            pass

    def module(self, node: fx.Node) -> bool:
        m = self.model.get_submodule(node.target)
        sharded = self.inputs_sharded(node)
        if isinstance(m, nn.Conv2d):
            self.replaced[node.target] = self.conv(node, m, sharded[0])
            return True
        if isinstance(m, nn.Linear):
            how = self.exchange.pop(node.target, "all" if sharded[0] else "replicated")
            layer = GroupLinear(self.placement, m.in_features, m.out_features, how, node.target, bias=m.bias is not None,
                                groups=self.K, dtype=m.weight.dtype)
            layer.load_full({k: v.detach() for k, v in m.state_dict().items()})
            self.replaced[node.target] = layer
            return True
        if not any(sharded):
            return False  # on unsharded tensors the module runs as it is
        if isinstance(m, nn.BatchNorm2d):
            bn = GroupBatchNorm2d(self.placement, m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                  groups=self.K, name=node.target, dtype=m.weight.dtype if m.affine else None)
            bn.load_full({k: v.detach() for k, v in m.state_dict().items()})
            self.replaced[node.target] = bn
            return True
        if isinstance(m, nn.Dropout):
            self.replaced[node.target] = GroupDropout(self.placement, m.p, node.target)
            return True
        if isinstance(m, CHANNEL_WISE) or (isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1):
            if isinstance(m, nn.Flatten):
                self.functions[node.name] = _flatten_sharded  # run instead of the module, which has no state
                node.op, node.target = "call_function", _flatten_sharded
            else:
                self.replaced[node.target] = PerGroup(self.placement, m, channel_wise=True)
            return True
        raise _refuse(node, f"{type(m).__name__} on maps split over slots has no rule (it may mix channels of "
                            "different slots); parallel.convert maps Conv2d, Linear, BatchNorm2d, Dropout and "
                            "channel-wise modules")

    def conv(self, node: fx.Node, m: nn.Conv2d, sharded_input: bool) -> GroupConv2d:
        if not sharded_input:
            how, groups = "replicated", self.K
            if m.groups != 1:
                raise _refuse(node, f"a grouped convolution (groups={m.groups}) reading an unsharded tensor has no "
                                    "rule; shard its input first")
        elif m.groups == 1:
            how, groups = "all", self.K
        elif m.groups % self.K == 0:
            how, groups = "own", m.groups
        else:
            raise _refuse(node, f"groups={m.groups} is not a multiple of the placement's {self.K} slots, so a group "
                                "would straddle two slots")
        how = self.exchange.pop(node.target, how)
        if m.out_channels % groups:
            raise _refuse(node, f"{m.out_channels} output channels do not divide over {groups} groups")
        layer = GroupConv2d(self.placement, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, how,
                            node.target, dilation=m.dilation, bias=m.bias is not None, groups=groups,
                            padding_mode=m.padding_mode, dtype=m.weight.dtype)
        layer.load_full({k: v.detach() for k, v in m.state_dict().items()})
        return layer

    def function(self, node: fx.Node) -> bool:
        sharded = self.inputs_sharded(node)
        target = node.target
        if not any(sharded):  # unsharded values only: as it is
            self.functions[node.name] = target if node.op == "call_function" else \
                (lambda obj, *a, _m=target, **k: getattr(obj, _m)(*a, **k))
            return False
        if target in ADDS and not node.kwargs and len(node.args) == 2 and all(sharded):
            self.functions[node.name] = add
            return True
        flat = (target is torch.flatten and node.op == "call_function") or (node.op == "call_method" and
                                                                             target == "flatten")
        if flat and sharded[0] and _start_dim(node) == 1 and _end_dim(node) == -1:
            self.functions[node.name] = lambda x, *a, **k: _flatten_sharded(x)
            return True
        if target in (F.relu, torch.relu) or (node.op == "call_method" and target == "relu"):
            self.functions[node.name] = lambda x, *a, **k: x.map(torch.relu)
            return True
        raise _refuse(node, "no rule for this operation on maps split over slots (it may mix or reorder channels "
                            "across slots: a concatenation, a reshape, an op with a channel argument)")


def _start_dim(node: fx.Node) -> int:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)


def _end_dim(node: fx.Node) -> int:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def convert(model: nn.Module, placement, *, exchange: dict[str, str] | None = None) -> Converted:
    """``model`` split over ``placement``'s slots: the same function of the same inputs, its conv, linear,
    batch-norm and dropout layers held as their sharded twins with the original's weights (see the module
    docstring for the rules). Refused, in one line, where a node has no rule or the forward cannot be traced.
    ``model`` itself is left unchanged."""
    tracer = fx.Tracer()
    tracer.record_stack_traces = True
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001  (any tracing failure: say so in one line)
        raise ConversionError(f"parallel.convert: {type(model).__name__}.forward cannot be traced by torch.fx "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); data-dependent "
                              "control flow has no static graph to split") from None
    converter = _Converter(model, placement, exchange or {})
    for node in graph.nodes:
        converter.visit(node)
    if converter.exchange:
        raise ConversionError(f"parallel.convert: exchange= names layers that are not conv or linear layers of the "
                              f"model: {', '.join(sorted(converter.exchange))}")
    body = copy.deepcopy(model)
    for path, module in converter.replaced.items():
        _set_module(body, path, module)
    return Converted(graph, dict(body.named_children()), placement, converter.functions)
