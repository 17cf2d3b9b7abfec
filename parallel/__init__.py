"""Model-agnostic filter-group parallelism: placements, communication, sharded layers.

Imports nothing from ``alexnet/`` or ``data/``. ``parallel.contracts`` writes down the two
contracts: ``GroupPlacement`` (where groups live, how activations move; what the layers
use) and ``Runtime`` (replicas and processes; what a training loop uses). Activations
between layers are ``Sharded`` (per-slot parts plus every group's size).
"""
__version__ = "0.3.0"  # CHANGELOG.md lists what changed for code written on 0.1

from parallel.comm import CommCounter
from parallel.contracts import GroupPlacement, Runtime
from parallel.layers import (GroupConv2d, GroupLinear, PerGroup, ShardedModule, StateDictError, full_state_dict,
                             full_state_slices, gather_output, load_full_state_dict)
from parallel.dropout import GroupDropout
from parallel.norm import GroupBatchNorm2d
from parallel.placement import LocalPlacement, PlacementError, split_sizes
from parallel.runtime import LocalRuntime
from parallel.sharded import Sharded, add, cat, shard
from parallel.shuffle import ChannelShuffle
from parallel.convert import ConversionError, convert  # noqa: E402  (after the layers it maps to)

__all__ = ["CommCounter", "GroupConv2d", "GroupLinear", "GroupBatchNorm2d", "GroupDropout", "PerGroup",
           "ShardedModule", "StateDictError", "gather_output", "full_state_dict", "full_state_slices",
           "load_full_state_dict", "LocalPlacement", "LocalRuntime", "PlacementError", "split_sizes",
           "GroupPlacement", "Runtime", "Sharded", "shard", "add", "cat", "ChannelShuffle", "convert",
           "ConversionError"]
