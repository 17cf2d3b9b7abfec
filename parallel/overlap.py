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

import inspect

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


def row_weighted_all_reduce(state: RowWeights, bucket):  # (no return annotation: DDP checks it, and it is a string here)
    """DDP communication hook: sum over replicas of (w_k x this replica's bucket), in place."""
    buffer = bucket.buffer()
    buffer.mul_(state.weight)
    work = dist.all_reduce(buffer, group=state.pg, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap(model: nn.Module, data_pg, device: torch.device, replica: int, replicas: int,
         bucket_cap_mb: float = 25.0, split_pg=None) -> tuple[nn.Module, RowWeights]:
    """``model`` under DDP over ``data_pg`` with the row-weighted hook; (the DDP module, its RowWeights).

    The parameters whose rows are split over ``split_pg`` (default ``data_pg``) are left out: the
    hybrid's fc shards, split over the very ranks that are its replicas.
    Parameters are equal on every replica already (seeded init, or a loaded checkpoint), so DDP's
    start-up broadcast is skipped; buffers are not broadcast per step (they are equal or per-slot).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP
    split_pg = data_pg if split_pg is None else split_pg
    ignored = [name for name, p in model.named_parameters() if split_over(p) is split_pg]
    if ignored:
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device = torch.device(device)
    # no buffer sync per forward (dropout's draws are per slot, equal everywhere); torch 2.14 renamed the switch
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters \
        else {"broadcast_buffers": False}
    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None, process_group=data_pg,
              gradient_as_bucket_view=True, bucket_cap_mb=bucket_cap_mb, init_sync=False, **no_sync)
    state = RowWeights(data_pg, replica, replicas)
    ddp.register_comm_hook(state, row_weighted_all_reduce)
    return ddp, state


def overlap_replicas(model: nn.Module, runtime, device: torch.device, bucket_cap_mb: float = 25.0) -> nn.Module:
    """What a training loop trains instead of ``model`` when its data replicas should sync during backward:
    ``model`` under DDP (``wrap``) over ``runtime``'s replicas, attached to the runtime so that its
    ``sync_gradients`` leaves those gradients to DDP and ``plan_rows`` sets their weights.

    The hybrid placement's replicas are every rank, the very ranks its forward's collectives run over:
    DDP gets a second process group of the same ranks, so its bucket all-reduces never interleave
    with those exchanges on one group.
    """
    from parallel.hybrid import HybridRuntime
    pg = runtime.data_pg
    if isinstance(runtime, HybridRuntime):
        pg = dist.new_group(ranks=dist.get_process_group_ranks(pg), backend=dist.get_backend(pg))
    ddp, weights = wrap(model, pg, device, runtime.replica, runtime.num_replicas, bucket_cap_mb,
                        split_pg=runtime.data_pg)
    runtime.attach_overlap(weights)
    return ddp
