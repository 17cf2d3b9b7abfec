"""The two contracts of this package, written down.

``GroupPlacement`` says where filter groups live and how activations move between them:
this is all the sharded layers (``parallel.layers``) use. ``LocalPlacement`` (one process,
slots on devices) and ``DistributedPlacement`` (one process per slot, times D replicas)
implement it. ``Runtime`` says how data replicas and processes coordinate: this is what a
training loop uses (gradient averaging over replicas, metric sums, agreeing to stop,
barriers); ``LocalRuntime`` and ``DistributedRuntime`` (``parallel.runtime``) implement it.
``parallel.distributed.init_from_env`` makes the distributed pair under torchrun.
"""
from __future__ import annotations

from typing import Callable, Iterable, Protocol, runtime_checkable

import torch


@runtime_checkable
class GroupPlacement(Protocol):
    """Where groups live; how activations move between them.

    groups        G, the number of filter groups
    replica       the data replica whose rows this process computes (0 in one process)
    local_slots   this process's slots (``Slot(device, first, count)``), groups dealt in contiguous blocks
    counter       the CommCounter the exchanges record their bytes in
    input_device  where the image batch goes; output_device: where the logits (and loss) are
    gather(shards, dim, name, group_sizes=None) -> one tensor per local slot: all groups' shards
                  concatenated along ``dim`` (for consumers that compute different outputs; backward sums)
    gather_output(shards, dim, name, group_sizes=None) -> the concatenation on ``output_device`` (for a
                  consumer every group computes the same function of, the loss; backward keeps each slice)
    assemble_rows(parts) -> every group's rows (dim 0) stacked in group order, on the CPU
    """

    groups: int

    @property
    def num_slots(self) -> int: ...

    @property
    def local_slots(self) -> list: ...

    @property
    def input_device(self) -> torch.device: ...

    @property
    def output_device(self) -> torch.device: ...

    def gather(self, shards: list[torch.Tensor], dim: int, name: str, group_sizes) -> list[torch.Tensor]: ...

    def gather_output(self, shards: list[torch.Tensor], dim: int, name: str, group_sizes) -> torch.Tensor: ...

    def shuffle(self, shards: list[torch.Tensor], name: str, groups: int) -> list[torch.Tensor]: ...

    def assemble_rows(self, parts: list[torch.Tensor]) -> torch.Tensor: ...

    def describe(self) -> str: ...


@runtime_checkable
class Runtime(Protocol):
    """How data replicas and processes coordinate around the groups.

    is_main / process_index   the process that writes files / this process's index (seeds per process)
    replica / num_replicas    this data replica, and how many (each sees 1/D of every global batch)
    sync_gradients(params, rows=None)  average gradients over the replicas (weighted by each
                              replica's batch rows when given: exact for slices of unequal size)
    all_reduce_sum(t)         a metric tensor summed over replicas
    any_rank(flag)            True everywhere if true anywhere (blocking)
    any_rank_async(flag)      the same vote started now, answered by calling the result (a step later)
    barrier()                 every process reaches this point
    all_gather_object(obj)    every process's small picklable ``obj``, in process order (per-epoch reports)
    plan_rows(rows)           every replica's rows of the next step, when the loop knows them (its sampler)
    """

    is_main: bool
    process_index: int
    replica: int
    num_replicas: int

    def sync_gradients(self, params: Iterable[torch.nn.Parameter], rows: int | None = None) -> None: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def any_rank(self, flag: bool) -> bool: ...

    def any_rank_async(self, flag: bool) -> Callable[[], bool]: ...

    def barrier(self) -> None: ...

    def all_gather_object(self, obj) -> list: ...

    def plan_rows(self, rows: list[int]) -> None: ...
