"""The channel shuffle (ShuffleNet, Zhang et al. 2018) as a module of its own.

With G groups of C/G maps, split each group's maps into G equal slices; group g receives
the g-th slice of every group, in group order. On the reference channel axis that is the
permutation (h, g, c) -> (g, h, c) of (source group h, destination group g, c in C/G^2):

    reference:  x.unflatten(1, (G, G, C // G**2)).transpose(1, 2).flatten(1, 3)

Inside a slot it is that permutation; between local slots, one copy per pair of slots;
between processes, one all-to-all (backward: the inverse). Each group receives
(G - 1) / G of its maps from the others, counted by the same rule as ``exchange="shuffle"``,
which is this module fused into the layer that consumes it.
"""
from __future__ import annotations

from torch import nn

from parallel.placement import check_dealable
from parallel.sharded import Sharded


class ChannelShuffle(nn.Module):
    """Y = shuffle(X) over ``groups`` groups (default the placement's); a multiple of the slots."""

    def __init__(self, placement, groups: int | None = None, name: str | None = None):
        super().__init__()
        self.placement, self.groups = placement, groups or placement.groups
        self.name = name or "shuffle"
        check_dealable(self.groups, placement.num_slots, self.name)
        self.key = placement.counter.claim(self.name, self)

    def forward(self, x: Sharded) -> Sharded:
        if not isinstance(x, Sharded):
            raise TypeError(f"{self.name}: expected a parallel.Sharded activation, got {type(x).__name__}")
        G, C = self.groups, sum(x.group_sizes)
        if C % (G * G):
            raise ValueError(f"{self.name}: a channel shuffle over {G} groups splits each group's maps into {G} "
                             f"slices; {C} channels do not divide by {G * G}")
        return Sharded(tuple(self.placement.shuffle(list(x.parts), self.key, G)), (C // G,) * G)
