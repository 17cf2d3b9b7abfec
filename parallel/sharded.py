"""The activation that flows between sharded layers, carrying its group sizes with it.

A ``Sharded`` holds one tensor per *local* slot and the share of the channel (feature)
dimension, dim 1, of *every* group of the layer that produced it:

    parts[s]        (N, C_s, ...) on slot s's device: the channels of slot s's groups, in group order
    group_sizes[g]  group g's share of dim 1, for all G groups (also those in other processes)

Concatenating all slots' parts along dim 1 (in slot order) gives the single-device
reference activation X, and X = cat_g X_g with X_g of ``group_sizes[g]`` channels. Gathers,
shuffles, the logits and the byte counter read the sizes from here, so a split that is
not even (10 features over 4 groups: 3, 3, 2, 2) is right under every placement.

It is a NamedTuple so that ``torch.compile`` traces through it without graph breaks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Sharded(NamedTuple):
    parts: tuple[torch.Tensor, ...]
    group_sizes: tuple[int, ...]

    @property
    def groups(self) -> int:
        """G of the layer that produced the activation."""
        return len(self.group_sizes)

    def map(self, fn) -> "Sharded":
        """``fn`` applied to every part; for functions that keep dim 1 (ReLU, pooling, residual sums)."""
        return Sharded(tuple(fn(p) for p in self.parts), self.group_sizes)


def add(x: Sharded, y: Sharded) -> Sharded:
    """Residual sum X + Y of two activations with the same channel split, slot by slot (no exchange)."""
    if x.group_sizes != y.group_sizes or len(x.parts) != len(y.parts):
        raise ValueError(f"parallel.add: the two activations are split differently ({x.group_sizes} vs "
                         f"{y.group_sizes} channels per group); a residual sum needs the same split")
    return Sharded(tuple(a + b for a, b in zip(x.parts, y.parts)), x.group_sizes)


def cat(x: Sharded, y: Sharded) -> Sharded:
    """Channel concatenation inside each group, slot by slot (no exchange).

    Group g of the result holds X_g then Y_g, so the reference activation is
    cat(X_0, Y_0, X_1, Y_1, ..., X_{G-1}, Y_{G-1}) along dim 1, not cat(X, Y): each group
    keeps its own maps, and a grouped layer after it reads only its own group's.
    """
    if x.groups != y.groups or len(x.parts) != len(y.parts):
        raise ValueError(f"parallel.cat: the two activations have {x.groups} and {y.groups} groups; "
                         "concatenating inside groups needs the same number")
    if len(set(x.group_sizes)) > 1 or len(set(y.group_sizes)) > 1:
        raise ValueError("parallel.cat: concatenation inside groups needs equal groups in each activation, got "
                         f"{x.group_sizes} and {y.group_sizes} channels per group")
    parts = []
    for a, b in zip(x.parts, y.parts):  # a slot's groups, interleaved: X_g then Y_g
        xa, yb = a.split(x.group_sizes[0], dim=1), b.split(y.group_sizes[0], dim=1)
        parts.append(torch.cat([t for pair in zip(xa, yb) for t in pair], dim=1))
    return Sharded(tuple(parts), tuple(a + b for a, b in zip(x.group_sizes, y.group_sizes)))


def slot_sizes(group_sizes, num_slots: int) -> list[int]:
    """Each slot's share of dim 1 when G groups are dealt to ``num_slots`` slots in contiguous blocks."""
    per = len(group_sizes) // num_slots
    return [sum(group_sizes[s * per:(s + 1) * per]) for s in range(num_slots)]


def shard(x: torch.Tensor, placement, groups: int | None = None) -> Sharded:
    """Split a reference activation X (dim 1 = channels/features) into this process's parts.

    ``groups`` (default ``placement.groups``) equal groups, dealt to the placement's slots
    in contiguous blocks; each part goes to its slot's device. The inverse of
    concatenating every slot's part.
    """
    G = groups or placement.groups
    if x.shape[1] % G:
        raise ValueError(f"shard: {x.shape[1]} channels do not divide by {G} groups")
    sizes = (x.shape[1] // G,) * G
    bounds = [0]
    for n in slot_sizes(sizes, placement.num_slots):
        bounds.append(bounds[-1] + n)
    parts = tuple(x[:, bounds[s.index]:bounds[s.index + 1]].to(s.device) for s in placement.local_slots)
    return Sharded(parts, sizes)
