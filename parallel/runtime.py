"""How processes and data replicas coordinate: what a training loop talks to.

A placement (``parallel.placement``, ``parallel.distributed``) says where filter groups live
and moves activations between them; a runtime says which process this is and what the
processes agree on: averaging gradients over data replicas, summing metrics, voting to
stop, waiting for each other. Both fulfil ``parallel.contracts.Runtime``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.comm import CommCounter


class LocalRuntime:
    """One process, one data replica: nothing to average, reduce or wait for."""

    is_main = True
    process_index = 0
    replica = 0
    num_replicas = 1

    def sync_gradients(self, params, rows: int | None = None) -> None:
        pass

    def plan_rows(self, rows: list[int]) -> None:
        """Every replica's rows of the next step: one replica has nothing to weigh."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def any_rank(self, flag: bool) -> bool:
        return flag

    def any_rank_async(self, flag: bool):
        """A vote that is already decided: one process has no one to ask."""
        return lambda: flag

    def barrier(self) -> None:
        pass

    def all_gather_object(self, obj) -> list:
        """Every process's ``obj``, in process order: here just this one."""
        return [obj]


class DistributedRuntime:
    """This process in a (data replicas x groups) world; process groups are passed in, never global.

    data_pg     the ranks holding the same group in every replica (gradients are averaged over it)
    control_pg  a CPU (gloo) group for the stop vote under NCCL, so agreeing to stop never
                waits on the GPU stream; None uses the default group
    """

    def __init__(self, data_pg, control_pg, global_rank: int, replica: int, num_replicas: int,
                 device: torch.device, counter: CommCounter | None = None):
        self.data_pg, self.control_pg = data_pg, control_pg
        self.global_rank, self.replica, self.num_replicas = global_rank, replica, num_replicas
        self.device = torch.device(device)
        self.counter = counter if counter is not None else CommCounter()
        self.overlap = None  # parallel.overlap.RowWeights once a DDP wrapper syncs the gradients in backward

    def attach_overlap(self, weights) -> None:
        """From now on DDP (``parallel.overlap.wrap``) all-reduces the gradients during backward, weighted
        by ``weights``; ``sync_gradients`` leaves them as they are."""
        self.overlap = weights

    def plan_rows(self, rows: list[int]) -> None:
        """Every replica's rows of the next step (from the loop's sampler): the overlapped all-reduce
        weighs this replica's gradient by rows[replica] / sum(rows). (The flat one learns them itself.)"""
        if self.overlap is not None:
            self.overlap.plan(rows)

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    @property
    def process_index(self) -> int:
        return self.global_rank

    def sync_gradients(self, params, rows: int | None = None) -> None:
        """Average each group's gradients over the data replicas: one flat all-reduce.

        With ``rows`` (this replica's batch rows; its loss the mean over them) the average is
        weighted by rows, sum_k n_k g_k / sum_k n_k, the gradient of the mean over the whole
        global batch even when the replicas' slices differ in size; the row count rides in
        the same all-reduce. Without it every replica weighs the same.
        """
        if self.num_replicas == 1 or self.overlap is not None:  # overlapped: DDP did it during backward
            return
        grads = [p.grad for p in params if p.grad is not None]
        parts = [g.reshape(-1) for g in grads]
        if rows is not None:
            parts.append(grads[0].new_full((1,), float(rows)))
        flat = torch.cat(parts)
        if rows is not None:
            flat[:-1] *= rows  # in place on the buffer the all-reduce needs anyway
        with self.counter.timing(flat.device):
            dist.all_reduce(flat, group=self.data_pg)
        flat /= flat[-1:].clone() if rows is not None else self.num_replicas
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Metrics: every rank of a replica holds the same numbers, so sum over replicas only."""
        if self.num_replicas > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor, group=self.data_pg)
        return tensor

    def _flag(self, flag: bool) -> torch.Tensor:
        return torch.tensor([1.0 if flag else 0.0], device="cpu" if self.control_pg is not None else self.device)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if it is true on any (all ranks must agree to stop at the same step)."""
        t = self._flag(flag)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_pg)
        return bool(t.item())

    def any_rank_async(self, flag: bool):
        """Start the same vote without waiting; the returned function waits and gives the answer.

        The training loop starts one vote per step and reads it a step later, so agreeing
        to stop never holds up a step (the loop stops one step after the signal).
        """
        t = self._flag(flag)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_pg, async_op=True)

        def result() -> bool:
            work.wait()
            return bool(t.item())
        return result

    def barrier(self) -> None:
        dist.barrier()

    def all_gather_object(self, obj) -> list:
        """Every process's ``obj`` (a small picklable value, e.g. a memory figure), in global rank order;
        over the CPU control group under NCCL, so it never waits on a GPU stream."""
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self.control_pg)
        return out
