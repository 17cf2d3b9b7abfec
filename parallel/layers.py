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

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from torch.nn.modules.utils import _pair

from parallel.placement import PlacementError, check_dealable, split_sizes
from parallel.roles import tag
from parallel.sharded import Sharded
from parallel.streams import SideStreams, run_on_streams

#: where a group's input comes from: its own group's maps, every group's (all-gather), the
#: g-th 1/G slice of every group's (channel shuffle), or one input every group reads whole
EXCHANGES = ("own", "all", "shuffle", "replicated")


def refuse_device(name: str, device) -> None:
    """nn's ``device=`` argument, which a sharded layer cannot take: each slot's tensors live on its slot's device."""
    if device is not None:
        raise ValueError(f"{name}: device={device!r} is not accepted: each slot's part of the layer lives on that "
                         "slot's device, set by the placement (LocalPlacement(G, devices=[...]) or the rank's GPU)")


def renamed_exchange(exchange: str, input_mode: str | None, name: str) -> str:
    """``input_mode=`` (0.1) is ``exchange=`` since 0.2: accepted with a DeprecationWarning; removed in 0.4."""
    if input_mode is None:
        return exchange
    warnings.warn(f"{name}: input_mode= is renamed exchange= (same values); input_mode= goes in 0.4",
                  DeprecationWarning, stacklevel=3)
    return input_mode


def slot_row_ranges(placement, group_out: list[int]) -> list[tuple[int, int]]:
    """Each local slot's rows [lo, hi) of the twin, when group g owns ``group_out[g]`` rows in order."""
    ranges = []
    for slot in placement.local_slots:
        mine = slot.groups_of(len(group_out), placement.num_slots)
        start = sum(group_out[:mine.start])
        ranges.append((start, start + sum(group_out[g] for g in mine)))
    return ranges


class ShardedModule(nn.Module):
    """A module whose state is a slice of a single-device twin's: it maps to and from the twin.

    ``to_full()`` assembles the twin's state (CPU tensors under the twin's keys), ``load_full()``
    takes this process's slice of one; ``full_keys`` lists the keys. ``full_state_dict`` /
    ``load_full_state_dict`` do this for a whole model and are the format that loads under
    every placement. ``state_dict()`` is this placement's own (one entry per local slot):
    loading it under another placement raises ``PlacementError`` naming the portable format.
    """

    full_keys: tuple[str, ...] = ("weight", "bias")

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """The twin's shape of each key, so loading refuses a misshaped tensor by its key; a subclass
        that leaves this empty checks shapes in its own ``slices_of``."""
        return {}

    def _layout(self) -> dict:
        return {"class": type(self).__name__, "groups": self.groups, "num_slots": self.placement.num_slots,
                "slots": [s.index for s in self.placement.local_slots]}

    def get_extra_state(self) -> dict:
        return self._layout()

    def set_extra_state(self, state) -> None:
        if state != self._layout():
            raise PlacementError(
                f"{self.key}: this state_dict was saved under another placement ({state}, here {self._layout()}); "
                "state_dict() is per placement: save parallel.full_state_dict(model) and load it with "
                "parallel.load_full_state_dict(model, state), which works under every placement")


class _GroupSharded(ShardedModule):
    """Bookkeeping shared by the sharded layers: output rows per group and per slot."""

    def __init__(self, placement, in_features: int, out_features: int, exchange: str, name: str | None,
                 default_name: str, uneven_ok: bool, groups: int | None, dtype: torch.dtype | None):
        super().__init__()
        name = name or default_name
        if exchange not in EXCHANGES:
            raise ValueError(f"{name}: exchange must be one of {EXCHANGES}, got {exchange!r}")
        G = groups or placement.groups
        check_dealable(G, placement.num_slots, name)
        if out_features % G and not (uneven_ok and exchange in ("all", "replicated")):
            raise ValueError(f"{name}: {out_features} output channels do not divide by {G} groups")
        if exchange in ("own", "shuffle") and in_features % G:
            raise ValueError(f"{name}: {in_features} input channels do not divide by {G} groups")
        if exchange == "shuffle" and in_features % (G * G):
            raise ValueError(f"{name}: a channel shuffle over {G} groups splits each group's {in_features // G} "
                             f"maps into {G} slices; use a number of input channels divisible by {G * G}")
        self.placement = placement
        self.name = name
        # the byte counter's key: the display name, made unique among the counter's live layers
        self.key = placement.counter.claim(name, self)
        self.exchange = exchange
        # block-diagonal: each group reads only its own (or its shuffled) share of the input
        self.grouped = exchange in ("own", "shuffle")
        self.groups = G
        self.dtype = dtype
        self.per_slot = G // placement.num_slots
        self.group_out = split_sizes(out_features, G)
        self.slot_rows = slot_row_ranges(placement, self.group_out)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()  # empty when the layer has no bias

    def _add_block(self, shape: tuple[int, ...], device: torch.device, bias: bool) -> None:
        self.weights.append(tag(nn.Parameter(torch.empty(*shape, device=device, dtype=self.dtype)), self.placement))
        if bias:
            self.biases.append(tag(nn.Parameter(torch.zeros(shape[0], device=device, dtype=self.dtype)),
                                   self.placement))

    def _bias(self, i: int) -> torch.Tensor | None:
        return self.biases[i] if len(self.biases) else None

    @property
    def full_weight_shape(self) -> tuple[int, ...]:
        """The twin's weight shape as this layer stores it: (all output rows, *one row's shape)."""
        return (sum(self.group_out), *self.weights[0].shape[1:])

    def reset_parameters(self) -> None:
        """torch's default for Conv2d/Linear (Kaiming-uniform, a = sqrt(5); bias U(-1/sqrt(fan_in), ..)),
        drawn exactly as the twin draws it: the whole tensor from the default CPU generator on
        every slot and rank, each keeping its rows. So a seed gives the same full weights under
        every placement, and different groups different weights."""
        self.init_full_(lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)),
                        lambda b, w: nn.init.uniform_(b, -1 / math.sqrt(w[0].numel()), 1 / math.sqrt(w[0].numel()))
                        if w[0].numel() else b.zero_())

    def init_full_(self, weight_init, bias_init=None) -> None:
        """Initialise as the twin would be by ``weight_init(W)`` then ``bias_init(b, W)``, in place,
        on the twin's full CPU tensors (in the RNG order the twin would draw them); keep this
        process's rows. ``bias_init`` None leaves the biases as they are.

        Costs one full tensor on the host per layer while it runs: fc6 of the paper
        (4096 x 9216 fp32) is 151 MB, drawn on every rank.
        """
        dtype = self.weights[0].dtype
        weight = weight_init(torch.empty(self.full_weight_shape, dtype=dtype))
        bias = None
        if len(self.biases) and bias_init is not None:
            bias = bias_init(torch.empty(weight.shape[0], dtype=dtype), weight)
        with torch.no_grad():
            for i, (lo, hi) in enumerate(self.slot_rows):
                self.weights[i].copy_(weight[lo:hi].reshape(self.weights[i].shape))
                if bias is not None:
                    self.biases[i].copy_(bias[lo:hi])

    def to_full(self, value_of=None, everywhere: bool = True) -> dict[str, torch.Tensor]:
        """The single-device twin's parameters (CPU): every group's rows stacked in group order.

        ``value_of(param)`` substitutes a tensor of the parameter's shape (e.g. its gradient or
        an optimizer's momentum buffer), which then maps exactly like the weights. A collective
        under the distributed placement: every rank of the group must call it; with
        ``everywhere=False`` only global rank 0 receives the tensors (the others get None values).
        """
        value_of = value_of or (lambda p: p.detach())
        out = {"weight": self.placement.assemble_rows([value_of(w) for w in self.weights], everywhere)}
        if len(self.biases):
            out["bias"] = self.placement.assemble_rows([value_of(b) for b in self.biases], everywhere)
        return out

    @property
    def full_keys(self) -> tuple[str, ...]:
        return ("weight", "bias") if len(self.biases) else ("weight",)

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """The twin's shape of each of its keys."""
        shape = self.full_weight_shape
        return {"weight": shape, "bias": (shape[0],)} if len(self.biases) else {"weight": shape}

    def slices_of(self, full: dict[str, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
        """Each local parameter's rows of the twin's ``{"weight", "bias"}``, on the parameter's device.

        Shapes must be the twin's exactly (nothing is reshaped: a weight of the right size in another
        layout, (out, kw, kh, in) for (out, in, kh, kw), would load scrambled).
        """
        expected = self.full_weight_shape
        weight = full["weight"]
        if tuple(weight.shape) != expected:
            raise ValueError(f"{self.name}.weight: shape {tuple(weight.shape)} does not fit this layer's {expected} "
                             "(a state of another group count or geometry?)")
        if "bias" in full and tuple(full["bias"].shape) != (expected[0],):
            raise ValueError(f"{self.name}.bias: shape {tuple(full['bias'].shape)} does not fit this layer's "
                             f"{(expected[0],)}")
        if ("bias" in full) != bool(len(self.biases)):
            raise ValueError(f"{self.name}: the layer {'has' if len(self.biases) else 'has no'} bias, the state "
                             f"{'has' if 'bias' in full else 'has no'} bias")
        out = {}
        for i, (lo, hi) in enumerate(self.slot_rows):
            w = self.weights[i]
            out[w] = weight[lo:hi].to(w.device)
            if len(self.biases):
                out[self.biases[i]] = full["bias"][lo:hi].to(self.biases[i].device)
        return out

    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Copy this process's rows of the twin's ``{"weight", "bias"}`` into the shards (exact slices)."""
        with torch.no_grad():
            for p, value in self.slices_of(full).items():
                p.copy_(value)

    def _check_devices(self) -> None:
        """Each slot's weights on its slot's device: a model moved by ``.to(device)`` or ``.cuda()`` is
        named here, in one line, instead of failing inside a convolution."""
        for slot, w in zip(self.placement.local_slots, self.weights):
            want = slot.device
            if w.device.type != want.type or (want.index is not None and w.device.index != want.index):
                raise PlacementError(
                    f"{self.name}: slot {slot.index}'s weights are on {w.device} but the placement puts that slot on "
                    f"{want}; a sharded model is placed by its placement: do not move it with .to()/.cuda() "
                    "(build it on a placement with the devices you want)")

    def _inputs(self, x, dim: int = 1) -> list[torch.Tensor]:
        """The tensor each slot computes from: its own maps, all groups' maps, its shuffled slices,
        or the replicated input."""
        self._check_devices()
        slots = self.placement.local_slots
        if self.exchange == "replicated":
            return [x.to(s.device, non_blocking=True) for s in slots]
        if not isinstance(x, Sharded):
            raise TypeError(f"{self.name}: expected a parallel.Sharded activation (per-slot parts and every "
                            f"group's size; parallel.shard() makes one from a full tensor), got {type(x).__name__}")
        if len(x.parts) != len(slots):
            raise ValueError(f"{self.name}: expected {len(slots)} shards, got {len(x.parts)}")
        if self.exchange == "all":
            return self.placement.gather(list(x.parts), dim, self.key, x.group_sizes)
        if self.exchange == "shuffle":
            return self.placement.shuffle(list(x.parts), self.key, self.groups)
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
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0, exchange: str = "own",
                 name: str | None = None, dilation: int | tuple[int, int] = 1, bias: bool = True,
                 groups: int | None = None, padding_mode: str = "zeros", dtype: torch.dtype | None = None,
                 device=None, input_mode: str | None = None):
        refuse_device(name or "conv", device)
        exchange = renamed_exchange(exchange, input_mode, name or "conv")
        super().__init__(placement, in_channels, out_channels, exchange, name, "conv", uneven_ok=False,
                         groups=groups, dtype=dtype)
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding_mode = padding_mode
        self.padding, self.explicit_pad = self._check_padding(padding, padding_mode)
        self.in_per_filter = in_channels // self.groups if self.grouped else in_channels
        for slot, (lo, hi) in zip(placement.local_slots, self.slot_rows):
            self._add_block((hi - lo, self.in_per_filter, *self.kernel_size), slot.device, bias)
        self.slot_conv_groups = [self.per_slot if self.grouped else 1 for _ in placement.local_slots]
        # How a slot holding k > 1 groups computes them; all give the same Y_g (see FORMULATIONS).
        self.formulation = "grouped"
        self._side_streams = SideStreams()
        self.reset_parameters()

    PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

    def _check_padding(self, padding, padding_mode):
        """nn.Conv2d's padding rules: an int or pair, 'valid' (none) or 'same' (stride 1 only), and
        any ``padding_mode``; a mode other than zeros pads explicitly (F.pad) before an unpadded
        conv, as nn.Conv2d does. Returns (what F.conv2d gets, the F.pad amounts or None)."""
        if padding_mode not in self.PADDING_MODES:
            raise ValueError(f"{self.name}: padding_mode must be one of {self.PADDING_MODES}, got {padding_mode!r}")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{self.name}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"{self.name}: padding='same' is not supported for strided convolutions "
                                 "(as in nn.Conv2d); give the padding as a number")
            if padding == "valid":
                padding = (0, 0)
        else:
            padding = _pair(padding)
        if padding_mode == "zeros":
            return padding, None
        if padding == "same":  # the twin's split of d (k - 1): the smaller half first
            amounts = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(self.dilation, self.kernel_size)]
        else:
            amounts = [(p, p) for p in padding]
        pad = (*amounts[1], *amounts[0])  # F.pad: last dimension first
        return (0, 0), pad

    #: ``grouped``: one ``F.conv2d(groups=k)`` call; ``split``: k dense convolutions, one per
    #: group, concatenated; ``streams``: the same k dense convolutions, group g's on CUDA side
    #: stream g (``parallel.streams``; on CPU they run in order). Which is faster depends on
    #: the device, dtype, memory format and shapes (cuDNN's grouped kernels can be slower than
    #: k dense ones), so it is measured: see ``parallel.tuning``.
    FORMULATIONS = ("grouped", "split", "streams")

    @property
    def formulation(self) -> str:
        return self._formulation

    @formulation.setter
    def formulation(self, value: str) -> None:  # checked once here, not on every forward
        if value not in self.FORMULATIONS:
            raise ValueError(f"{self.name}: formulation must be one of {self.FORMULATIONS}, got {value!r}")
        self._formulation = value

    @staticmethod
    def formulations_for(device: torch.device, eager: bool = True) -> tuple[str, ...]:
        """The formulations worth timing on ``device``: streams only on CUDA and only eagerly
        (torch.compile does not trace stream switches; on CPU streams would equal split)."""
        if torch.device(device).type == "cuda" and eager:
            return GroupConv2d.FORMULATIONS
        return ("grouped", "split")

    def forward(self, x) -> Sharded:
        return self._output([self._conv(xi, w, self._bias(i), k)
                             for i, (xi, w, k) in enumerate(zip(self._inputs(x), self.weights, self.slot_conv_groups))])

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int) -> torch.Tensor:
        if self.explicit_pad is not None:
            x = F.pad(x, self.explicit_pad, mode=self.padding_mode)
        if k == 1 or self.formulation == "grouped":
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, k)
        biases = b.chunk(k, 0) if b is not None else [None] * k
        work = [functools.partial(F.conv2d, xg, wg, bg, self.stride, self.padding, self.dilation)
                for xg, wg, bg in zip(x.chunk(k, 1), w.chunk(k, 0), biases)]
        if self.formulation == "streams":
            return torch.cat(run_on_streams(work, self._side_streams.get(x.device, k)), dim=1)
        return torch.cat([conv() for conv in work], dim=1)


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

    def __init__(self, placement, in_features: int, out_features: int, exchange: str = "all",
                 name: str | None = None, bias: bool = True, groups: int | None = None,
                 dtype: torch.dtype | None = None, device=None, input_mode: str | None = None):
        refuse_device(name or "fc", device)
        exchange = renamed_exchange(exchange, input_mode, name or "fc")
        super().__init__(placement, in_features, out_features, exchange, name, "fc", uneven_ok=True, groups=groups,
                         dtype=dtype)
        self.in_per_output = in_features // self.groups if self.grouped else in_features
        for slot, (lo, hi) in zip(placement.local_slots, self.slot_rows):
            self._add_block((hi - lo, self.in_per_output), slot.device, bias)
        self.reset_parameters()

    def forward(self, x) -> Sharded:
        out = []
        for i, (xi, w) in enumerate(zip(self._inputs(x), self.weights)):
            xi = xi.flatten(1)
            b = self._bias(i)
            k = self.per_slot if self.grouped else 1
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
                             "running statistics, which each slot needs its own of; use a sharded layer instead "
                             "(parallel.GroupBatchNorm2d for BatchNorm2d)")
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


def sharded_layers(model: nn.Module) -> dict[str, ShardedModule]:
    """Every sharded module of ``model`` (GroupConv2d, GroupLinear, GroupBatchNorm2d, ...) by its module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ShardedModule)}


def _plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers outside every sharded module, by state_dict key:
    copies in every process."""
    prefixes = tuple(f"{name}." for name in sharded_layers(model))
    keys = {k for k in model.state_dict() if not k.startswith(prefixes) and not k.endswith("_extra_state")}
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    return {k: tensors[k] for k in model.state_dict() if k in keys}


def _plain_state(model: nn.Module, value_of=None) -> dict[str, torch.Tensor]:
    """``_plain_tensors`` detached; ``value_of(param)`` substitutes the parameters' entries (buffers stay
    themselves)."""
    params = dict(model.named_parameters())
    return {k: (value_of(t) if value_of is not None and k in params else t).detach()
            for k, t in _plain_tensors(model).items()}


def full_state_dict(model: nn.Module, value_of=None, everywhere: bool = True) -> dict[str, torch.Tensor] | None:
    """The single-device twin's state dict (CPU): every sharded module's full tensors under
    ``"<module>.<twin key>"`` and every other parameter and buffer as it is.

    The portable format: it loads (``load_full_state_dict``) under every placement, and
    into the twin itself. ``value_of(param)`` maps something of each parameter's shape
    instead (``lambda p: p.grad``: the twin's gradients; an optimizer's momentum buffers).
    A collective when distributed: every rank calls it. ``everywhere=False`` (checkpoints):
    only global rank 0 assembles the tensors, every other rank gets None.
    """
    out, received = {}, True
    for name, layer in sharded_layers(model).items():  # every layer on every rank: each is a collective
        for key, value in layer.to_full(value_of, everywhere).items():
            received = received and value is not None
            out[f"{name}.{key}"] = value
    out.update({k: v.detach().cpu() for k, v in _plain_state(model, value_of).items()})
    return out if received else None


def _matched(model: nn.Module, state: dict[str, torch.Tensor]):
    """(each local tensor -> its value, missing keys, unexpected keys, shape problems) of a full state dict."""
    pairs, missing, problems, expected = {}, [], [], set()
    for name, layer in sharded_layers(model).items():
        keys = {key: f"{name}.{key}" for key in layer.full_keys}
        expected.update(keys.values())
        absent = [k for k in keys.values() if k not in state]
        missing += absent
        wrong = [f"{k}: shape {tuple(state[k].shape)} does not fit {shape}" for key, shape in layer.full_shapes().items()
                 if (k := keys[key]) in state and tuple(state[k].shape) != tuple(shape)]
        problems += wrong
        if not absent and not wrong:
            try:
                pairs.update(layer.slices_of({key: state[k] for key, k in keys.items()}))
            except ValueError as e:
                problems.append(str(e))
    for k, v in _plain_tensors(model).items():
        expected.add(k)
        if k not in state:
            missing.append(k)
        elif tuple(state[k].shape) != tuple(v.shape):
            problems.append(f"{k}: shape {tuple(state[k].shape)} does not fit {tuple(v.shape)}")
        else:
            pairs[v] = state[k].to(v.device)
    return pairs, missing, [k for k in state if k not in expected], problems


class StateDictError(ValueError, RuntimeError):
    """A full state dict that does not fit a model (RuntimeError, as ``nn.Module.load_state_dict``
    raises; ValueError, as this package raised before 0.2)."""


def _refusal(missing: list[str], unexpected: list[str], problems: list[str]) -> str:
    said = ([f"missing keys: {', '.join(missing)}"] if missing else []) + \
        ([f"unexpected keys: {', '.join(unexpected)}"] if unexpected else []) + problems
    return "the full state dict does not fit this model: " + "; ".join(said)


def full_state_slices(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
    """What each of this process's parameters and buffers holds of a full state dict: its rows of
    the twin's tensors (sharded modules) or the whole tensor (the rest), on its own device.
    ``load_full_state_dict`` copies them; an optimizer's state maps the same way (momentum).
    Every tensor the model needs must be there, in the twin's exact shape (keys it does not
    need are left alone here)."""
    pairs, missing, _, problems = _matched(model, state)
    if missing or problems:
        raise StateDictError(_refusal(missing, [], problems))
    return pairs


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
    """Shard a full (single-device) state dict into every sharded module, for whatever placement
    it has; other parameters and buffers are copied as they are.

    As ``nn.Module.load_state_dict``: ``strict`` (the default) refuses, in one error, every
    missing and every unexpected key; ``strict=False`` loads what is there and returns the
    missing and unexpected keys (``.missing_keys``, ``.unexpected_keys``). A shape that differs
    from the twin's is refused either way (nothing is reshaped).
    """
    pairs, missing, unexpected, problems = _matched(model, state)
    if problems or (strict and (missing or unexpected)):
        raise StateDictError(_refusal(missing if strict else [], unexpected if strict else [], problems))
    with torch.no_grad():
        for target, value in pairs.items():
            target.copy_(value)
    return _IncompatibleKeys(missing, unexpected)
