"""What each parameter is to the processes, tagged where the parameter is created.

A sharded layer's parameter holds some rows of its single-device twin's tensor. Its
``parallel_role`` names the process group whose ranks hold the *other* rows (None when
every row lives in this process, whatever the slots), so a runtime can tell from the
parameter alone which gradients are copies to average over data replicas and which are
shards, each rank's own, that must not be averaged (Megatron-core tags its tensor-parallel
parameters the same way). Parameters of plain torch modules carry no role: they are
copies in every process.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelRole:
    """``split_over``: the process group whose ranks hold the twin's other rows (None: all here)."""
    split_over: object | None = None


def tag(param: torch.nn.Parameter, placement) -> torch.nn.Parameter:
    """Mark ``param`` as a shard of ``placement``'s groups (split over its process group, if any)."""
    param.parallel_role = ParallelRole(getattr(placement, "group_pg", None))
    return param


def split_over(param: torch.Tensor):
    """The process group ``param``'s rows are split over, or None (a copy, or all rows in this process)."""
    role = getattr(param, "parallel_role", None)
    return role.split_over if role is not None else None
