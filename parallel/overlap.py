"""Data replicas' gradient all-reduce overlapped with backward, by torch's DistributedDataParallel.

DDP puts the gradients in buckets in reverse order of use (so fc6's, ready first in
backward, go first), starts a bucket's all-reduce over the "data" process group as soon as
its gradients are ready, and waits for the last one at the end of backward: the all-reduce
runs behind the rest of the backward pass instead of after it. Its communication hook keeps
this project's semantics exactly:

  replica k's bucket is scaled by w_k = n_k / N before the sum over replicas, so
  sum_k w_k g_k = sum_k n_k g_k / N, the gradient of the mean over the whole global batch of
  N = sum_k n_k rows, also when the replicas' slices differ in size (an epoch's last batch).

The step's row counts come from the loop (``RowWeights.plan``, from its sampler, as
train.py does); without a plan every replica weighs 1/D (the plain mean). Parameters split
over the data group's ranks (the hybrid placement's fc shards, ``parallel.roles``) are not
DDP's: the runtime treats them (``parallel.hybrid.HybridRuntime``).

The module DDP wraps runs collectives of its own in forward and backward (the "group"
dimension's all-gathers and reduce-scatters): DDP only adds its bucket all-reduces on the
"data" group, a different process group, so the two never share a collective stream order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel.roles import split_over


class RowWeights:
    """The communication hook's state: the data process group and this replica's weight for the next backward."""

    def __init__(self, pg, replica: int, replicas: int):
        self.pg, self.replica, self.replicas = pg, replica, replicas
        self.weight = 1.0 / replicas

    def plan(self, rows: list[int]) -> None:
        """Every replica's rows of the next step: this replica's gradient weighs rows[replica] / sum(rows)."""
        self.weight = rows[self.replica] / sum(rows)

    def __setstate__(self, state):  # DDP may pickle the hook's state; the process group does not travel
        self.__dict__.update(state)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "pg"}


def row_weighted_all_reduce(state: RowWeights, bucket) -> torch.futures.Future:
    """DDP communication hook: sum over replicas of (w_k x this replica's bucket), in place."""
    buffer = bucket.buffer()
    buffer.mul_(state.weight)
    work = dist.all_reduce(buffer, group=state.pg, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap(model: nn.Module, data_pg, device: torch.device, replica: int, replicas: int,
         bucket_cap_mb: float = 25.0) -> tuple[nn.Module, RowWeights]:
    """``model`` under DDP over ``data_pg`` with the row-weighted hook; (the DDP module, its RowWeights).

    The parameters whose rows are split over ``data_pg`` itself (hybrid fc shards) are left out.
    Parameters are equal on every replica already (seeded init, or a loaded checkpoint), so DDP's
    start-up broadcast is skipped; buffers are not broadcast per step (they are equal or per-slot).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP
    ignored = [name for name, p in model.named_parameters() if split_over(p) is data_pg]
    if ignored:
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device = torch.device(device)
    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None, process_group=data_pg,
              broadcast_buffers=False, gradient_as_bucket_view=True, bucket_cap_mb=bucket_cap_mb, init_sync=False)
    state = RowWeights(data_pg, replica, replicas)
    ddp.register_comm_hook(state, row_weighted_all_reduce)
    return ddp, state
