"""Layers that hold one block of filter groups per slot, each on its slot's device.

An activation between layers is a ``parallel.sharded.Sharded``: one tensor per local slot,
``x.parts[s]`` of shape (N, C_s, ...) holding the channels of slot s's groups in group
order, and ``x.group_sizes``, every group's share of dim 1. Concatenating the parts along
dim 1 (in slot order) gives the single-device reference activation. Each layer may have
its own number of groups G (``groups=``, default the placement's), any multiple of the
number of slots K: slot k computes groups [k G/K, (k+1) G/K), so it only ever reads the
maps it holds, whatever G the previous layer had.

Each layer stores, per slot, the rows of the reference weight that its groups own
(output channels ``[first_s, last_s)``), so one slot holding every group *is* the
reference layer and the weight mapping is a slice both ways: ``to_full()`` assembles the
single-device twin's ``{"weight", "bias"}`` and ``load_full()`` takes this process's rows
of one; ``full_state_dict`` / ``load_full_state_dict`` do the same for every sharded layer
of a model, keyed by module name.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from parallel.placement import check_dealable, split_sizes
from parallel.sharded import Sharded

#: where a group's input comes from: its own group's maps, every group's (all-gather), the
#: g-th 1/G slice of every group's (channel shuffle), or one input every group reads whole
INPUT_MODES = ("own", "all", "shuffle", "replicated")


class _GroupSharded(nn.Module):
    """Bookkeeping shared by the sharded layers: output rows per group and per slot."""

    def __init__(self, placement, in_features: int, out_features: int, input_mode: str, name: str,
                 uneven_ok: bool, groups: int | None):
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ValueError(f"{name}: input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
        G = groups or placement.groups
        check_dealable(G, placement.num_slots, name)
        if out_features % G and not (uneven_ok and input_mode in ("all", "replicated")):
            raise ValueError(f"{name}: {out_features} output channels do not divide by {G} groups")
        if input_mode in ("own", "shuffle") and in_features % G:
            raise ValueError(f"{name}: {in_features} input channels do not divide by {G} groups")
        if input_mode == "shuffle" and in_features % (G * G):
            raise ValueError(f"{name}: a channel shuffle over {G} groups splits each group's {in_features // G} "
                             f"maps into {G} slices; use a number of input channels divisible by {G * G}")
        self.placement = placement
        self.name = name
        self.input_mode = input_mode
        self.groups = G
        self.per_slot = G // placement.num_slots
        self.group_out = split_sizes(out_features, G)
        self.slot_rows: list[tuple[int, int]] = []
        for slot in placement.local_slots:
            mine = slot.groups_of(G, placement.num_slots)
            start = sum(self.group_out[:mine.start])
            self.slot_rows.append((start, start + sum(self.group_out[g] for g in mine)))
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()  # empty when the layer has no bias

    def _add_block(self, shape: tuple[int, ...], device: torch.device, bias: bool) -> None:
        self.weights.append(nn.Parameter(torch.empty(*shape, device=device)))
        if bias:
            self.biases.append(nn.Parameter(torch.zeros(shape[0], device=device)))

    def _bias(self, i: int) -> torch.Tensor | None:
        return self.biases[i] if len(self.biases) else None

    def reset_parameters(self) -> None:
        """torch's default for Conv2d/Linear (Kaiming-uniform, a = sqrt(5)) on every block, so a layer
        built on its own is ready to train; AlexNet overwrites it with its own init scheme."""
        for i, w in enumerate(self.weights):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if self._bias(i) is not None:
                bound = 1 / math.sqrt(w[0].numel())
                nn.init.uniform_(self._bias(i), -bound, bound)

    def to_full(self, value_of=None) -> dict[str, torch.Tensor]:
        """The single-device twin's parameters (CPU): every group's rows stacked in group order.

        ``value_of(param)`` substitutes a tensor of the parameter's shape (e.g. its gradient or
        an optimizer's momentum buffer), which then maps exactly like the weights. A collective
        under the distributed placement: every rank of the group must call it.
        """
        value_of = value_of or (lambda p: p.detach())
        out = {"weight": self.placement.assemble_rows([value_of(w) for w in self.weights])}
        if len(self.biases):
            out["bias"] = self.placement.assemble_rows([value_of(b) for b in self.biases])
        return out

    def slices_of(self, full: dict[str, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
        """Each local parameter's rows of the twin's ``{"weight", "bias"}``, on the parameter's device.

        ``full["weight"]`` may have any shape with the twin's number of elements per row
        (a grouped fc's twin is a grouped 1x1 convolution, for instance).
        """
        rows = sum(self.group_out)
        expected = (rows, *self.weights[0].shape[1:])
        weight = full["weight"]
        if weight.shape[0] != rows or weight[0].numel() != self.weights[0][0].numel():
            raise ValueError(f"{self.name}: weight of shape {tuple(weight.shape)} does not fit {expected}")
        if ("bias" in full) != bool(len(self.biases)):
            raise ValueError(f"{self.name}: the layer {'has' if len(self.biases) else 'has no'} bias, the state "
                             f"{'has' if 'bias' in full else 'has no'} bias")
        out = {}
        for i, (lo, hi) in enumerate(self.slot_rows):
            w = self.weights[i]
            out[w] = weight[lo:hi].reshape(w.shape).to(w.device)
            if len(self.biases):
                out[self.biases[i]] = full["bias"][lo:hi].to(self.biases[i].device)
        return out

    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Copy this process's rows of the twin's ``{"weight", "bias"}`` into the shards (exact slices)."""
        with torch.no_grad():
            for p, value in self.slices_of(full).items():
                p.copy_(value)

    def _inputs(self, x, dim: int = 1) -> list[torch.Tensor]:
        """The tensor each slot computes from: its own maps, all groups' maps, its shuffled slices,
        or the replicated input."""
        slots = self.placement.local_slots
        if self.input_mode == "replicated":
            return [x.to(s.device, non_blocking=True) for s in slots]
        if not isinstance(x, Sharded):
            raise TypeError(f"{self.name}: expected a parallel.Sharded activation (per-slot parts and every "
                            f"group's size; parallel.shard() makes one from a full tensor), got {type(x).__name__}")
        if len(x.parts) != len(slots):
            raise ValueError(f"{self.name}: expected {len(slots)} shards, got {len(x.parts)}")
        if self.input_mode == "all":
            return self.placement.gather(list(x.parts), dim, self.name, x.group_sizes)
        if self.input_mode == "shuffle":
            return self.placement.shuffle(list(x.parts), self.name, self.groups)
        return list(x.parts)

    def _output(self, parts: list[torch.Tensor]) -> Sharded:
        return Sharded(tuple(parts), tuple(self.group_out))


class GroupConv2d(_GroupSharded):
    """Convolution with its output channels split over G groups.

    Y_g = conv(X_in(g), W_g) + b_g, where W_g holds output channels
    [g*C_out/G, (g+1)*C_out/G) and X_in(g) is
      * ``own``: input channels [g*C_in/G, (g+1)*C_in/G), group g's own maps: the reference
        is ``nn.Conv2d(C_in, C_out, groups=G)``;
      * ``shuffle``: the g-th 1/G slice of every group's maps (ShuffleNet's channel shuffle,
        then ``own``): the reference is that permutation followed by ``nn.Conv2d(groups=G)``;
      * ``all``: every group's maps, gathered and concatenated (a cross-group layer):
        the reference is a dense ``nn.Conv2d(C_in, C_out)``;
      * ``replicated``: the same full input for every group (e.g. the image at conv1).
    A slot holding k groups computes them in one call (``groups=k`` in ``own`` mode).
    """

    def __init__(self, placement, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0, input_mode: str = "own",
                 name: str = "conv", dilation: int | tuple[int, int] = 1, bias: bool = True,
                 groups: int | None = None):
        super().__init__(placement, in_channels, out_channels, input_mode, name, uneven_ok=False, groups=groups)
        grouped = input_mode in ("own", "shuffle")
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.in_per_filter = in_channels // self.groups if grouped else in_channels
        for slot, (lo, hi) in zip(placement.local_slots, self.slot_rows):
            self._add_block((hi - lo, self.in_per_filter, *_pair(kernel_size)), slot.device, bias)
        self.slot_conv_groups = [self.per_slot if grouped else 1 for _ in placement.local_slots]
        # How a slot holding k > 1 groups computes them; both give the same Y_g (see FORMULATIONS).
        self.formulation = "grouped"
        self.reset_parameters()

    #: ``grouped``: one ``F.conv2d(groups=k)`` call; ``split``: k dense convolutions, one per
    #: group, concatenated. Which is faster depends on the device, dtype, memory format and
    #: shapes (cuDNN's grouped kernels can be slower than k dense ones), so it is measured:
    #: see ``parallel.tuning``.
    FORMULATIONS = ("grouped", "split")

    def forward(self, x) -> Sharded:
        return self._output([self._conv(xi, w, self._bias(i), k)
                             for i, (xi, w, k) in enumerate(zip(self._inputs(x), self.weights, self.slot_conv_groups))])

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int) -> torch.Tensor:
        if k == 1 or self.formulation == "grouped":
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, k)
        biases = b.chunk(k, 0) if b is not None else [None] * k
        return torch.cat([F.conv2d(xg, wg, bg, self.stride, self.padding, self.dilation)
                          for xg, wg, bg in zip(x.chunk(k, 1), w.chunk(k, 0), biases)], dim=1)


class GroupLinear(_GroupSharded):
    """Linear layer split by output features over G groups: Y = XA + b, A's columns split.

    Y_g = X_in(g) A_g + b_g, with A_g the output features of group g (uneven splits are
    allowed with ``all``/``replicated`` inputs: 10 classes over 4 groups is 3, 3, 2, 2).
    ``all``: X_in(g) is every group's features, gathered and concatenated (4-D maps are
    flattened after gathering, which is the reference's flatten order);
    ``own``: X_in(g) is group g's own features, a block-diagonal A (the reference is a
    grouped 1x1 convolution); ``shuffle``: the same after a channel shuffle; a slot holding
    k groups does one batched matmul.
    """

    def __init__(self, placement, in_features: int, out_features: int, input_mode: str = "all",
                 name: str = "fc", bias: bool = True, groups: int | None = None):
        super().__init__(placement, in_features, out_features, input_mode, name, uneven_ok=True, groups=groups)
        self.block_diagonal = input_mode in ("own", "shuffle")
        self.in_per_output = in_features // self.groups if self.block_diagonal else in_features
        for slot, (lo, hi) in zip(placement.local_slots, self.slot_rows):
            self._add_block((hi - lo, self.in_per_output), slot.device, bias)
        self.reset_parameters()

    def forward(self, x) -> Sharded:
        out = []
        for i, (xi, w) in enumerate(zip(self._inputs(x), self.weights)):
            xi = xi.flatten(1)
            b = self._bias(i)
            k = self.per_slot if self.block_diagonal else 1
            if k == 1:
                out.append(F.linear(xi, w, b))
            else:  # k groups, block-diagonal: (k, N, in_g) @ (k, in_g, out_g)
                n = xi.shape[0]
                y = torch.bmm(xi.view(n, k, -1).transpose(0, 1), w.view(k, -1, w.shape[1]).transpose(1, 2))
                y = y.transpose(0, 1).reshape(n, -1)
                out.append(y + b if b is not None else y)
        return self._output(out)


class PerGroup(nn.Module):
    """Apply a parameter-free module to each group separately: Y_g = f(X_g).

    ``channel_wise=True`` promises that f treats every channel (feature) on its own
    (ReLU, max-pool, dropout), so it runs on a slot's tensor as it is: no reshape, no copy,
    and a channels_last activation stays channels_last. Otherwise the module must not mix
    groups: if it defines ``forward(x, groups=k)`` (``groups_aware = True``, e.g. a
    group-aware LRN) it is told the slot's group count; any other module gets the slot's k
    groups folded into the batch dimension, (N, k*C, ...) -> (N*k, C, ...), so channel-
    mixing modules such as LocalResponseNorm never cross a group boundary, exactly as the
    reference applies them per group.
    """

    def __init__(self, placement, module: nn.Module, channel_wise: bool = False):
        super().__init__()
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            raise ValueError(f"PerGroup applies one {type(module).__name__} to every slot, but it has parameters or "
                             "running statistics, which each slot needs its own of; build one module per slot "
                             "(or a sharded layer) instead")
        if isinstance(module, nn.modules.batchnorm._NormBase) and not channel_wise:
            raise ValueError(f"PerGroup({type(module).__name__}): folding groups into the batch would share "
                             "statistics across groups; pass channel_wise=True (statistics per channel, equal "
                             "under every placement)")
        self.placement = placement
        self.module = module
        self.channel_wise = channel_wise

    def forward(self, x: Sharded) -> Sharded:
        k = x.groups // self.placement.num_slots  # the producing layer's groups per slot
        out = []
        for xi in x.parts:
            if self.channel_wise or k == 1:
                out.append(self.module(xi))
            elif getattr(self.module, "groups_aware", False):
                out.append(self.module(xi, groups=k))
            else:
                n = xi.shape[0]
                y = self.module(xi.reshape(n * k, xi.shape[1] // k, *xi.shape[2:]))
                out.append(y.reshape(n, -1, *y.shape[2:]))
        return Sharded(tuple(out), x.group_sizes)


def gather_output(placement, x: Sharded, name: str = "logits") -> torch.Tensor:
    """All groups' outputs concatenated along features where the loss is computed."""
    return placement.gather_output(list(x.parts), 1, name, x.group_sizes)


def sharded_layers(model: nn.Module) -> dict[str, _GroupSharded]:
    """Every GroupConv2d / GroupLinear of ``model`` by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _GroupSharded)}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.weight", "<module>.bias"}`` of the single-device twin of every sharded layer (CPU)."""
    out = {}
    for name, layer in sharded_layers(model).items():
        for key, value in layer.to_full().items():
            out[f"{name}.{key}"] = value
    return out


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Shard a full (single-device) state dict into every sharded layer, for whatever placement it has."""
    for name, layer in sharded_layers(model).items():
        part = {key: state[f"{name}.{key}"] for key in ("weight", "bias") if f"{name}.{key}" in state}
        if "weight" not in part:
            raise KeyError(f"the state has no {name}.weight")
        layer.load_full(part)
