"""Layers that hold one block of filter groups per slot, each on its slot's device.

An activation between layers is a *group-sharded tensor*: a list with one tensor per local
slot, ``x[s]`` of shape (N, C_s, ...) holding the channels of slot s's groups in group
order. Concatenating the list along dim 1 (in slot order) gives the single-device
reference activation.

Each layer stores, per slot, the rows of the reference weight that its groups own
(output channels ``[first_s, last_s)``), so one slot holding every group *is* the
reference layer and the weight mapping is a slice both ways.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parallel.placement import split_sizes

INPUT_MODES = ("own", "all", "replicated")


class _GroupSharded(nn.Module):
    """Bookkeeping shared by the sharded layers: output rows per group and per slot."""

    def __init__(self, placement, out_features: int, input_mode: str, name: str, uneven_ok: bool):
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ValueError(f"{name}: input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
        G = placement.groups
        if out_features % G and not uneven_ok:
            raise ValueError(f"{name}: {out_features} output channels do not divide by {G} groups")
        self.placement = placement
        self.name = name
        self.input_mode = input_mode
        self.group_out = split_sizes(out_features, G)
        self.slot_rows: list[tuple[int, int]] = []
        for slot in placement.local_slots:
            start = sum(self.group_out[:slot.first])
            self.slot_rows.append((start, start + sum(self.group_out[g] for g in slot.groups)))
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()

    def reset_parameters(self) -> None:
        """torch's default for Conv2d/Linear (Kaiming-uniform, a = sqrt(5)) on every block, so a layer
        built on its own is ready to train; AlexNet overwrites it with its own init scheme."""
        for w, b in zip(self.weights, self.biases):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            bound = 1 / math.sqrt(w[0].numel())
            nn.init.uniform_(b, -bound, bound)

    def _inputs(self, x, dim: int = 1) -> list[torch.Tensor]:
        """The tensor each slot computes from: its own maps, all groups' maps, or the replicated input."""
        slots = self.placement.local_slots
        if self.input_mode == "replicated":
            return [x.to(s.device, non_blocking=True) for s in slots]
        if len(x) != len(slots):
            raise ValueError(f"{self.name}: expected {len(slots)} shards, got {len(x)}")
        if self.input_mode == "all":
            return self.placement.gather(list(x), dim, self.name)
        return list(x)


class GroupConv2d(_GroupSharded):
    """Convolution with its output channels split over G groups.

    Y_g = conv(X_in(g), W_g) + b_g, where W_g holds output channels
    [g*C_out/G, (g+1)*C_out/G) and X_in(g) is
      * ``own``: group g's own input maps (C_in/G channels): the reference is
        ``nn.Conv2d(C_in, C_out, groups=G)``;
      * ``all``: every group's maps, gathered and concatenated (a cross-group layer):
        the reference is a dense ``nn.Conv2d(C_in, C_out)``;
      * ``replicated``: the same full input for every group (e.g. the image at conv1).
    A slot holding k groups computes them in one call (``groups=k`` in ``own`` mode).
    """

    def __init__(self, placement, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, padding: int = 0, input_mode: str = "own", name: str = "conv"):
        super().__init__(placement, out_channels, input_mode, name, uneven_ok=False)
        G = placement.groups
        if input_mode == "own" and in_channels % G:
            raise ValueError(f"{name}: {in_channels} input channels do not divide by {G} groups")
        self.stride, self.padding = stride, padding
        self.in_per_filter = in_channels // G if input_mode == "own" else in_channels
        for slot, (lo, hi) in zip(placement.local_slots, self.slot_rows):
            self.weights.append(nn.Parameter(torch.empty(hi - lo, self.in_per_filter, kernel_size, kernel_size,
                                                         device=slot.device)))
            self.biases.append(nn.Parameter(torch.zeros(hi - lo, device=slot.device)))
        self.slot_conv_groups = [s.count if input_mode == "own" else 1 for s in placement.local_slots]
        # How a slot holding k > 1 groups computes them; both give the same Y_g (see FORMULATIONS).
        self.formulation = "grouped"
        self.reset_parameters()

    #: ``grouped``: one ``F.conv2d(groups=k)`` call; ``split``: k dense convolutions, one per
    #: group, concatenated. Which is faster depends on the device, dtype, memory format and
    #: shapes (cuDNN's grouped kernels can be slower than k dense ones), so it is measured:
    #: see ``parallel.tuning``.
    FORMULATIONS = ("grouped", "split")

    def forward(self, x) -> list[torch.Tensor]:
        return [self._conv(xi, w, b, k)
                for xi, w, b, k in zip(self._inputs(x), self.weights, self.biases, self.slot_conv_groups)]

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
        if k == 1 or self.formulation == "grouped":
            return F.conv2d(x, w, b, self.stride, self.padding, 1, k)
        return torch.cat([F.conv2d(xg, wg, bg, self.stride, self.padding)
                          for xg, wg, bg in zip(x.chunk(k, 1), w.chunk(k, 0), b.chunk(k, 0))], dim=1)


class GroupLinear(_GroupSharded):
    """Linear layer split by output features over G groups: Y = XA + b, A's columns split.

    Y_g = X_in(g) A_g + b_g, with A_g the output features of group g (uneven splits are
    allowed with ``all``/``replicated`` inputs: 10 classes over 4 groups is 3, 3, 2, 2).
    ``all``: X_in(g) is every group's features, gathered and concatenated (4-D maps are
    flattened after gathering, which is the reference's flatten order);
    ``own``: X_in(g) is group g's own features, a block-diagonal A (the reference is a
    grouped 1x1 convolution); a slot holding k groups does one batched matmul.
    """

    def __init__(self, placement, in_features: int, out_features: int, input_mode: str = "all",
                 name: str = "fc"):
        super().__init__(placement, out_features, input_mode, name, uneven_ok=input_mode != "own")
        G = placement.groups
        if input_mode == "own" and in_features % G:
            raise ValueError(f"{name}: {in_features} input features do not divide by {G} groups")
        self.in_per_output = in_features // G if input_mode == "own" else in_features
        for slot, (lo, hi) in zip(placement.local_slots, self.slot_rows):
            self.weights.append(nn.Parameter(torch.empty(hi - lo, self.in_per_output, device=slot.device)))
            self.biases.append(nn.Parameter(torch.zeros(hi - lo, device=slot.device)))
        self.reset_parameters()

    def forward(self, x) -> list[torch.Tensor]:
        out = []
        for xi, w, b, slot in zip(self._inputs(x), self.weights, self.biases, self.placement.local_slots):
            xi = xi.flatten(1)
            k = slot.count if self.input_mode == "own" else 1
            if k == 1:
                out.append(F.linear(xi, w, b))
            else:  # k groups, block-diagonal: (k, N, in_g) @ (k, in_g, out_g)
                n = xi.shape[0]
                y = torch.bmm(xi.view(n, k, -1).transpose(0, 1), w.view(k, -1, w.shape[1]).transpose(1, 2))
                out.append(y.transpose(0, 1).reshape(n, -1) + b)
        return out


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
        self.placement = placement
        self.module = module
        self.channel_wise = channel_wise

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for xi, slot in zip(x, self.placement.local_slots):
            k = slot.count
            if self.channel_wise or k == 1:
                out.append(self.module(xi))
            elif getattr(self.module, "groups_aware", False):
                out.append(self.module(xi, groups=k))
            else:
                n = xi.shape[0]
                y = self.module(xi.reshape(n * k, xi.shape[1] // k, *xi.shape[2:]))
                out.append(y.reshape(n, -1, *y.shape[2:]))
        return out


def gather_output(placement, x: list[torch.Tensor], group_sizes: list[int], name: str = "logits") -> torch.Tensor:
    """All groups' outputs concatenated along features where the loss is computed."""
    return placement.gather_output(list(x), 1, name, group_sizes)
