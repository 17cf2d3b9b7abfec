"""Krizhevsky's "one weird trick" (2014): data parallelism where the compute is, model
parallelism where the parameters are.

K ranks. Rank k holds every weight of the convolutional part and runs it on its 1/K of
the global batch (a ``LocalPlacement`` on its device: every filter group in one slot).
The fully connected part is split over the K ranks by output features (a
``DistributedPlacement`` with K slots over all ranks):

  rows(k)  = rank k's slice of the global batch of B images (n_k rows)
  F        = cat_k conv_features(rows(k))              all-gather of rows before fc6
  H6_k     = F A6_k                                    rank k's fc6 features, whole batch
  H7_k, Z_k likewise from the all-gathered H6, H7      the group placement's all-gather
  logits(rows(k)) = cat_j Z_j[rows(k)]                 one all-to-all back to the rows' owner

Each rank's loss is the mean over its own rows, L_k; with w_k = n_k K / B the global loss,
the mean over all B rows that one process computes, is L = (1/K) sum_k w_k L_k.

Gradients. The all-to-all's backward is the inverse all-to-all, weighting rank k's
gradient by w_k (``parallel.comm.features_to_rows``), and the row all-gather's is a
reduce-scatter, so every gradient that reaches a sharded layer or a rank's conv features
is the gradient of sum_k w_k L_k = K L. Hence (``HybridRuntime.sync_gradients``): the fc
shards' gradients are divided by K (no communication: each rank owns its rows of A); the
conv weights' gradients, rank k holding the part that flows through rows(k), are averaged
over the K ranks: (1/K) sum_k d(K L)/dθ|rows(k) = dL/dθ. Exact for any split of the batch
(an epoch's last, smaller batch, or B not divisible by K).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.comm import CommCounter, all_gather_for_distinct_consumers, exchange_bytes, features_to_rows
from parallel.distributed import DistributedPlacement, init_process_group_from_env, own_teardown
from parallel.placement import LocalPlacement
from parallel.roles import split_over
from parallel.runtime import DistributedRuntime
from parallel.sharded import Sharded, slot_sizes


class RowExchange:
    """The two exchanges between the data-parallel and the model-parallel half, over ``pg``.

    ``control_pg``: a CPU (gloo) group for the row counts under NCCL, so learning them never
    waits on the GPU stream; None uses ``pg`` with tensors on ``device``.
    """

    def __init__(self, pg, index: int, num_ranks: int, device: torch.device, counter: CommCounter,
                 control_pg=None):
        self.pg, self.index, self.num_ranks, self.control_pg = pg, index, num_ranks, control_pg
        self.device, self.counter = torch.device(device), counter
        self._planned: list[int] | None = None

    def plan(self, sizes: list[int]) -> None:
        """Every rank's rows of the next forward, known to the training loop from its sampler: that forward
        then learns them without a collective (and without a host read of its result)."""
        if len(sizes) != self.num_ranks:
            raise ValueError(f"plan: {len(sizes)} row counts for {self.num_ranks} ranks")
        self._planned = list(sizes)

    def batch_sizes(self, rows: int) -> list[int]:
        """Every rank's number of rows this step (an epoch's last batch may split unevenly): the planned
        ones (used once) when they hold this rank's ``rows``, else learnt by an all-gather of the counts."""
        planned, self._planned = self._planned, None
        if planned is not None and planned[self.index] == rows:
            return planned
        mine = torch.tensor([rows], device="cpu" if self.control_pg is not None else self.device)
        everyone = [torch.zeros_like(mine) for _ in range(self.num_ranks)]
        dist.all_gather(everyone, mine, group=self.control_pg if self.control_pg is not None else self.pg)
        return [int(t.item()) for t in everyone]

    def gather_rows(self, x: torch.Tensor, sizes: list[int], name: str = "rows") -> torch.Tensor:
        """All ranks' rows of ``x`` (dim 0; ``sizes``: every rank's rows), in rank order;
        backward: each rank's rows, summed over the ranks that read them (a reduce-scatter)."""
        whole = x.numel() * x.element_size() * sum(sizes) // max(1, x.shape[0])
        nbytes = exchange_bytes("all", whole, sizes)
        self.counter.record(name, nbytes, nbytes)
        return all_gather_for_distinct_consumers(x.contiguous(), self.pg, 0, sizes, self.index, self.counter)

    def rows_of(self, x: Sharded, rows: list[int], name: str = "logits") -> torch.Tensor:
        """This rank's rows of the features every rank holds a share of (all-to-all; backward: its inverse)."""
        (part,) = x.parts
        cols = slot_sizes(x.group_sizes, self.num_ranks)
        whole = part.numel() * part.element_size() * sum(cols) // max(1, cols[self.index])
        nbytes = whole * (self.num_ranks - 1) // self.num_ranks  # everyone keeps its own block
        self.counter.record(name, nbytes, nbytes)
        return features_to_rows(part, self.pg, self.index, rows, cols, self.counter)


class HybridRuntime(DistributedRuntime):
    """K ranks as K data replicas for the replicated (conv) weights; the sharded (fc) weights' gradients
    are divided by K instead of averaged (see the module docstring for why). Which is which it reads
    from each parameter's tag (``parallel.roles``): a parameter split over this runtime's ranks is a shard."""

    def sync_gradients(self, params, rows: int | None = None) -> None:
        """``rows`` is not needed: the row exchange already weighted each rank's loss by its rows."""
        params = list(params)
        shards = {id(p) for p in params if split_over(p) is self.data_pg}
        for p in params:
            if id(p) in shards and p.grad is not None:
                p.grad.div_(self.num_replicas)
        super().sync_gradients([p for p in params if id(p) not in shards])

    def plan_rows(self, rows: list[int]) -> None:
        """Nothing to weigh: the row exchange already weighs each rank's loss by its rows, so the conv
        gradients are averaged with 1/K each, overlapped (DDP) or not."""


def init_hybrid_from_env(groups: int, backend: str = "auto", timeout_s: float = 600,
                         counter: CommCounter | None = None, conv_counter: CommCounter | None = None):
    """Under torchrun with K ranks: (conv placement, fc placement, row exchange, runtime) for this rank.

    ``counter`` records every exchange; ``conv_counter``, when given, takes the conv groups' instead
    (they share this rank's device, so a count of traffic between processes leaves them out).
    The process groups are destroyed at exit (``parallel.distributed.tear_down``).
    """
    device, world, rank, control = init_process_group_from_env(backend, timeout_s)
    own_teardown()
    counter = counter if counter is not None else CommCounter()
    world_pg = dist.group.WORLD
    conv = LocalPlacement(groups, [str(device)], counter=conv_counter if conv_counter is not None else counter)
    fc = DistributedPlacement(world, world, world_pg, rank, device, counter=counter)
    rows = RowExchange(world_pg, rank, world, device, counter, control_pg=control)
    runtime = HybridRuntime(world_pg, control, rank, rank, world, device, counter=counter)
    return conv, fc, rows, runtime
