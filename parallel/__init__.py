"""Model-agnostic filter-group parallelism: placements, communication, sharded layers.

Imports nothing from ``alexnet/`` or ``data/``.
"""
from parallel.comm import CommCounter
from parallel.layers import (GroupConv2d, GroupLinear, PerGroup, full_state_dict, gather_output,
                             load_full_state_dict)
from parallel.placement import LocalPlacement, PlacementError, split_sizes

__all__ = ["CommCounter", "GroupConv2d", "GroupLinear", "PerGroup", "gather_output", "full_state_dict",
           "load_full_state_dict",
           "LocalPlacement", "PlacementError", "split_sizes"]
