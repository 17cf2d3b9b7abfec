"""One process per filter group on torch.distributed, optionally times D data replicas.

The world of N = D x G ranks forms a 2-D device mesh ("data", "group"); rank r holds
exactly one group's shard of every layer. Cross-group layers all-gather over the
"group" dimension; gradients are averaged over the "data" dimension with one explicit
all-reduce per step after backward (exact and simple; DDP's overlap of that all-reduce
with backward is what it would add, at the price of wrapping a module whose forward
runs collectives of its own).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.comm import CommCounter, all_gather_for_distinct_consumers, all_gather_for_replicated_consumer, received_bytes
from parallel.placement import PlacementError, Slot


def _restart_store(world: int, timeout: timedelta) -> dict:
    """init_process_group arguments that give a torchrun restart round keys of its own.

    torchrun --max-restarts starts the new workers on the same key-value store as the dead
    round's; without a fresh prefix a restarted rank can read a dead peer's address and
    time out connecting to it (gloo's connectFullMesh). The first round keeps env://.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0:
        return {}
    rank = int(os.environ["RANK"])
    hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=hosts_store,
                          timeout=timeout)
    return {"store": dist.PrefixStore(f"restart{restart}", store), "rank": rank, "world_size": world}


def pick_backend(requested: str) -> str:
    """``auto``: nccl when CUDA is available, gloo otherwise."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    available = {"nccl": dist.is_nccl_available(), "gloo": dist.is_gloo_available()}
    if requested not in available:
        raise PlacementError(f"parallel.backend {requested!r} is not one of auto, nccl, gloo")
    if not available[requested] or (requested == "nccl" and not torch.cuda.is_available()):
        raise PlacementError(f"parallel.backend={requested} is not available in this torch build or machine; "
                             "use parallel.backend=gloo on CPU or auto")
    return requested


class DistributedPlacement:
    """This rank's group of a (data x group) mesh; process groups are passed in, never global."""

    def __init__(self, groups: int, group_pg, data_pg, control_pg, group_index: int, replica: int,
                 num_replicas: int, device: torch.device, global_rank: int, counter: CommCounter | None = None,
                 mesh=None):
        self.groups, self.group_pg, self.data_pg, self.control_pg = groups, group_pg, data_pg, control_pg
        self.group_index, self.replica, self.num_replicas = group_index, replica, num_replicas
        self.device, self.global_rank, self.mesh = torch.device(device), global_rank, mesh
        self.slots = [Slot(self.device, group_index, 1)]
        self.counter = counter if counter is not None else CommCounter()
        self._sizes: dict[tuple[str, int], list[int]] = {}

    @classmethod
    def from_env(cls, groups: int, backend: str = "auto", timeout_s: float = 600,
                 counter: CommCounter | None = None) -> "DistributedPlacement":
        """Build from torchrun's environment: init the process group and the (data, group) mesh."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world % groups:
            raise PlacementError(f"world size {world} is not a multiple of model.groups={groups}; launch "
                                 f"torchrun --nproc-per-node {groups} (or a multiple: data replicas x groups)")
        backend = pick_backend(backend)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            if local_rank >= torch.cuda.device_count():
                raise PlacementError(f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                                     "use --nproc-per-node <= GPUs per node, or parallel.backend=gloo")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                    device_id=device if backend == "nccl" else None,
                                    **_restart_store(world, timedelta(seconds=timeout_s)))
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (world // groups, groups), mesh_dim_names=("data", "group"))
        # A CPU (gloo) group for control messages (the stop flag), so agreeing to stop
        # never waits on the GPU stream.
        control = dist.new_group(backend="gloo") if backend == "nccl" else None
        return cls(groups, mesh.get_group("group"), mesh.get_group("data"), control,
                   mesh.get_local_rank("group"), mesh.get_local_rank("data"), world // groups, device,
                   dist.get_rank(), counter=counter, mesh=mesh)

    # --- what the model and the loop see ---
    @property
    def local_slots(self) -> list[Slot]:
        return self.slots

    @property
    def input_device(self) -> torch.device:
        return self.device

    @property
    def output_device(self) -> torch.device:
        return self.device

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    @property
    def process_index(self) -> int:
        return self.global_rank

    def gather(self, shards: list[torch.Tensor], dim: int, name: str,
               group_sizes: list[int] | None = None) -> list[torch.Tensor]:
        """All-gather this group's shard over the "group" dimension (backward: reduce-scatter)."""
        (shard,) = shards
        sizes = group_sizes or self.group_sizes(name, shard.shape[dim])
        nbytes = received_bytes(shard.numel() * shard.element_size() * sum(sizes) // sizes[self.group_index],
                                sizes, list(range(self.groups)))
        self.counter.record(name, nbytes, nbytes)
        return [all_gather_for_distinct_consumers(shard, self.group_pg, dim, sizes, self.group_index, self.counter)]

    def gather_output(self, shards: list[torch.Tensor], dim: int, name: str,
                      group_sizes: list[int] | None = None) -> torch.Tensor:
        """All-gather the logits; every rank computes the same loss, so backward keeps its own slice."""
        (shard,) = shards
        sizes = group_sizes or self.group_sizes(name, shard.shape[dim])
        nbytes = received_bytes(shard.numel() * shard.element_size() * sum(sizes) // sizes[self.group_index],
                                sizes, list(range(self.groups)))
        self.counter.record(name, nbytes, 0)  # backward keeps its own slice: nothing moves
        return all_gather_for_replicated_consumer(shard, self.group_pg, dim, sizes, self.group_index, self.counter)

    def group_sizes(self, name: str, local: int) -> list[int]:
        """Every group's share of the gathered dimension at exchange ``name`` (10 features over 4 ranks: 3,3,2,2).

        Asked of the other ranks once per exchange and remembered: the shares of a layer's
        output do not change between steps, so later steps pay nothing.
        """
        key = (name, local)
        if key not in self._sizes:
            mine = torch.tensor([local], device=self.device)
            everyone = [torch.zeros_like(mine) for _ in range(self.groups)]
            dist.all_gather(everyone, mine, group=self.group_pg)
            self._sizes[key] = [int(t.item()) for t in everyone]
        return self._sizes[key]

    def sync_gradients(self, params) -> None:
        """Average each group's gradients over the data replicas: one flat all-reduce."""
        if self.num_replicas == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        with self.counter.timing(flat.device):
            dist.all_reduce(flat, group=self.data_pg)
        flat /= self.num_replicas
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

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if it is true on any (all ranks must agree to stop at the same step)."""
        t = torch.tensor([1.0 if flag else 0.0], device="cpu" if self.control_pg is not None else self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_pg)
        return bool(t.item())

    def any_rank_async(self, flag: bool):
        """Start the same vote without waiting; the returned function waits and gives the answer.

        The training loop starts one vote per step and reads it a step later, so agreeing
        to stop never holds up a step (the loop stops one step after the signal).
        """
        t = torch.tensor([1.0 if flag else 0.0], device="cpu" if self.control_pg is not None else self.device)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_pg, async_op=True)

        def result() -> bool:
            work.wait()
            return bool(t.item())
        return result

    def barrier(self) -> None:
        dist.barrier()

    def assemble_rows(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Every group's rows (dim 0) stacked in group order, on CPU, on every rank of the group."""
        (part,) = parts
        rows = [0] * self.groups
        rows[self.group_index] = part.shape[0]
        counts = torch.tensor(rows, device=self.device)
        dist.all_reduce(counts, group=self.group_pg)
        counts = counts.tolist()
        padded = torch.zeros(max(counts), *part.shape[1:], dtype=part.dtype, device=self.device)
        padded[:part.shape[0]] = part.to(self.device)
        pieces = [torch.empty_like(padded) for _ in range(self.groups)]
        dist.all_gather(pieces, padded, group=self.group_pg)
        return torch.cat([p[:n] for p, n in zip(pieces, counts)]).cpu()

    def describe(self) -> str:
        return (f"{self.num_replicas} replica(s) x {self.groups} groups, one group per process "
                f"({dist.get_backend(self.group_pg)} on {self.device.type})")


