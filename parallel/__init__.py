"""Model-agnostic filter-group parallelism: placements, communication, sharded layers.

Imports nothing from ``alexnet/`` or ``data/``. ``parallel.contracts`` writes down what a
placement provides: ``GroupPlacement`` (where groups live, how activations move; what the
layers use) and ``Runtime`` (replicas and processes; what a training loop uses).
"""
from parallel.comm import CommCounter
from parallel.contracts import GroupPlacement, Runtime
from parallel.layers import (GroupConv2d, GroupLinear, PerGroup, full_state_dict, gather_output,
                             load_full_state_dict)
from parallel.placement import LocalPlacement, PlacementError, split_sizes

__all__ = ["CommCounter", "GroupConv2d", "GroupLinear", "PerGroup", "gather_output", "full_state_dict",
           "load_full_state_dict",
           "LocalPlacement", "PlacementError", "split_sizes", "GroupPlacement", "Runtime"]
