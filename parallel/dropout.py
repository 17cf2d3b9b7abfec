"""Dropout whose mask depends on what it applies to, never on who draws it.

Element e of a layer's activation, at global batch row r and global feature (or channel
and position) j, is kept when

    u(seed, step, layer, r, j) >= p,      y_e = x_e / (1 - p) if kept, else 0,

where u = h / 2^32 and h is a counter-based 32-bit hash of the element's global row r and
global feature j (channel-major position in a map) mixed with a key made from (seed,
step) and the layer's name. So any slice of the mask holds the same numbers whoever holds the
slice: one slot, G slots on G devices (each device's own generator plays no part, so
two GPUs never drop the same units together), G ranks, D x G ranks, the hybrid placement,
and a run resumed in another placement. It is a few integer tensor ops on the slot's
device: no generator object, no host work per step beyond a few ``fill_``, nothing a
compiled graph breaks on (step and row offset are tensors, so they never recompile it).

Like ``nn.Dropout``, every training forward draws a new mask by itself: the layer keeps its
position (seed, step) on every slot's device, uses it and advances the step (a tensor op,
so a compiled graph neither breaks nor recompiles); ``state_dict()`` carries the position
(extra state), so a loaded model continues the stream. The seed starts as
``torch.initial_seed()`` at construction. A loop that wants to name its steps (train.py
does, from its global step) calls ``set_draws(layers, seed, step, row_offset)`` before a
step: ``row_offset`` is the global row of this replica's first row; left out, it comes from
the placement (``placement.replica`` x this replica's rows, exact when the replicas' slices
are equal; 0 in one process).
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from parallel.sharded import Sharded

_MASK32 = 0xFFFFFFFF


# A 32-bit integer hash (Wellons' hash-prospector, "0x21f0aaad / 0x735a2d97", bias ~0.1) whose
# multipliers are below 2^31, so x * c of an x < 2^32 fits int64: one multiply and one mask.
_M1, _M2, _GOLDEN = 0x21F0AAAD, 0x735A2D97, 0x61C88647


def _mix32(x):
    """A bijection of [0, 2^32) whose output bits all depend on every input bit (tensors or ints)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 15)


def step_key(seed, step):
    """The 32-bit key of (seed, step), shared by every layer and every process (ints, or int64 tensors)."""
    return _mix32(_mix32(seed & _MASK32) ^ _mix32(step & _MASK32) ^ (step >> 32))


def hash_of(rows: torch.Tensor, cols: torch.Tensor, key, layer: int) -> torch.Tensor:
    """32-bit hash, uniform on [0, 2^32), of every (row, col) pair of the broadcast int64 index
    tensors under (key, layer): each index hashed on its own (small vectors), then combined
    and mixed once over the whole activation."""
    h_rows = _mix32(((rows * _GOLDEN) & _MASK32) ^ key)
    h_cols = _mix32(((cols * _GOLDEN) & _MASK32) ^ layer)
    return _mix32(h_rows ^ h_cols)


class GroupDropout(nn.Module):
    """nn.Dropout(p) over a Sharded activation, with the mask above (identity in eval mode).

    ``global_rows``: the layer sees the whole global batch whatever the replica (the hybrid
    placement's fc part), so its rows start at 0 instead of the replica's row offset.
    ``inplace`` is accepted for nn.Dropout's signature; the output is a new tensor either way
    (a Sharded activation's parts are never overwritten), and it is the same output.
    """

    def __init__(self, placement, p: float = 0.5, name: str | None = None, global_rows: bool = False,
                 inplace: bool = False):
        super().__init__()
        self.placement, self.p, self.global_rows, self.inplace = placement, p, global_rows, inplace
        self.name = name or "dropout"
        self.key = placement.counter.claim(self.name, self)
        # the layer's part of the hash: its key (the name, made unique among the counter's live layers, so
        # two unnamed dropouts never share a mask), the same under every placement
        self.layer_id = zlib.crc32(self.key.encode())
        self._rows_named = False  # set_draws named this replica's row offset (else: from the placement)
        seed = torch.initial_seed() & _MASK32
        for i, slot in enumerate(placement.local_slots):  # (seed, step, row offset) on every slot's device
            self.register_buffer(f"draw_{i}", torch.tensor([seed, 0, 0], dtype=torch.int64, device=slot.device),
                                 persistent=False)

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:  # as on nn.Dropout, p may change after construction
        if not 0.0 <= value < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {value}")
        self._p = float(value)

    def _draws(self):
        return [getattr(self, f"draw_{i}") for i in range(len(self.placement.local_slots))]

    def set_position(self, seed: int, step: int, row_offset: int | None = None) -> None:
        """The next training forward draws step ``step`` of ``seed``'s stream (later ones step + 1, ...);
        ``row_offset``: this replica's first global row (None: from the placement)."""
        self._rows_named = row_offset is not None
        for draw in self._draws():
            draw[0].fill_(seed & _MASK32)
            draw[1].fill_(step)
            draw[2].fill_(0 if self.global_rows or row_offset is None else row_offset)

    def position(self) -> tuple[int, int]:
        """(seed, step) the next training forward draws (a host read)."""
        seed, step, _ = self._draws()[0].tolist()
        return seed, step

    def get_extra_state(self) -> dict:
        seed, step = self.position()
        return {"seed": seed, "step": step}

    def set_extra_state(self, state) -> None:
        self.set_position(state["seed"], state["step"])

    def forward(self, x: Sharded) -> Sharded:
        if not self.training or self.p == 0.0:
            return x
        threshold, scale = round(self.p * 2 ** 32), 1.0 / (1.0 - self.p)  # kept: hash >= p 2^32
        per = x.groups // self.placement.num_slots
        out = []
        for i, (slot, part) in enumerate(zip(self.placement.local_slots, x.parts)):
            draw = getattr(self, f"draw_{i}")
            first_channel = sum(x.group_sizes[:slot.index * per])
            keep = self._keep(part, draw, self._row_offset(draw, part.shape[0]), first_channel) >= threshold
            out.append(torch.where(keep, part * scale, 0.0))
            with torch.no_grad():
                draw[1] += 1  # the next forward draws the next step, as nn.Dropout draws anew
        return Sharded(tuple(out), x.group_sizes)

    def _row_offset(self, draw: torch.Tensor, rows: int):
        if self._rows_named or self.global_rows:
            return draw[2]
        return getattr(self.placement, "replica", 0) * rows  # equal slices: replica r starts at r x rows

    def _keep(self, part: torch.Tensor, draw: torch.Tensor, row_offset, first_channel: int) -> torch.Tensor:
        """The 32-bit hash of each element of ``part`` from its global (row, channel, position)."""
        n, c = part.shape[:2]
        positions = math.prod(part.shape[2:])
        rows = (torch.arange(n, device=part.device) + row_offset).view((n,) + (1,) * (part.dim() - 1))
        cols = (torch.arange(c, device=part.device) + first_channel).view((1, c) + (1,) * (part.dim() - 2))
        if positions > 1:  # a map's elements: channel-major, as the reference's flatten
            cols = cols * positions + torch.arange(positions, device=part.device).view((1, 1) + tuple(part.shape[2:]))
        return hash_of(rows, cols, step_key(draw[0], draw[1]), self.layer_id)

    def extra_repr(self) -> str:
        return f"p={self.p}, name={self.name!r}"


def set_draws(layers, seed: int, step: int, row_offset: int | None = None) -> None:
    """Point every GroupDropout in ``layers`` at (seed, step) for the next forward; this replica's rows start
    at ``row_offset`` (None: from the placement)."""
    for layer in layers:
        layer.set_position(seed, step, row_offset)


def dropout_layers(model: nn.Module) -> list[GroupDropout]:
    return [m for m in model.modules() if isinstance(m, GroupDropout)]
