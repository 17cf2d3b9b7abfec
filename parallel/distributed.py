"""One process per slot on torch.distributed, optionally times D data replicas.

The world of N = D x K ranks forms a 2-D device mesh ("data", "group"); the rank at
position k of the "group" dimension is slot k: it holds block k of every layer's groups
(one group each when a layer has K groups). Cross-group layers all-gather over the
"group" dimension, channel shuffles are one all-to-all over it; gradients are averaged
over the "data" dimension, by DDP's bucketed all-reduces during backward
(``parallel.overlap``, train.py's default) or by one all-reduce after it
(``parallel.runtime.DistributedRuntime.sync_gradients``, ``parallel.grad_sync: flat``).
"""
from __future__ import annotations

import atexit
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.comm import (CommCounter, all_gather_for_distinct_consumers, all_gather_for_replicated_consumer,
                           all_to_all_shuffle, exchange_bytes, shuffle_to_devices)
from parallel.placement import PlacementError, Slot
from parallel.runtime import DistributedRuntime
from parallel.sharded import slot_sizes


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
    """This rank's slot of a (data x group) mesh; the "group" process group is passed in, never global.

    ``groups`` is the default G of a layer, ``num_slots`` K the ranks per replica (K divides
    G); a layer may have any multiple of K groups, each rank computing its contiguous block.
    """

    def __init__(self, groups: int, num_slots: int, group_pg, group_index: int, device: torch.device,
                 counter: CommCounter | None = None, mesh=None):
        if groups % num_slots:
            raise PlacementError(f"{groups} groups cannot be dealt evenly to {num_slots} ranks")
        self.groups, self._num_slots, self.group_pg, self.group_index = groups, num_slots, group_pg, group_index
        self.device, self.mesh = torch.device(device), mesh
        # the data replica this rank's rows belong to (a layer that needs global rows, dropout, reads it)
        self.replica = mesh.get_local_rank("data") if mesh is not None else 0
        per = groups // num_slots
        self.slots = [Slot(self.device, group_index, group_index * per, per)]
        self.counter = counter if counter is not None else CommCounter()

    @property
    def local_slots(self) -> list[Slot]:
        return self.slots

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def input_device(self) -> torch.device:
        return self.device

    @property
    def output_device(self) -> torch.device:
        return self.device

    def _whole_bytes(self, shard: torch.Tensor, sizes: list[int]) -> int:
        """Bytes of the whole gathered tensor, from this rank's shard and every slot's share."""
        return shard.numel() * shard.element_size() * sum(sizes) // sizes[self.group_index]

    def gather(self, shards: list[torch.Tensor], dim: int, name: str, group_sizes) -> list[torch.Tensor]:
        """All-gather this slot's shard over the "group" dimension (backward: reduce-scatter)."""
        (shard,) = shards
        sizes = slot_sizes(group_sizes, self.num_slots)
        nbytes = exchange_bytes("all", self._whole_bytes(shard, sizes), group_sizes)
        self.counter.record(name, nbytes, nbytes)
        return [all_gather_for_distinct_consumers(shard, self.group_pg, dim, sizes, self.group_index, self.counter)]

    def gather_output(self, shards: list[torch.Tensor], dim: int, name: str, group_sizes) -> torch.Tensor:
        """All-gather the logits; every rank computes the same loss, so backward keeps its own slice."""
        (shard,) = shards
        sizes = slot_sizes(group_sizes, self.num_slots)
        self.counter.record(name, exchange_bytes("all", self._whole_bytes(shard, sizes), group_sizes), 0)
        return all_gather_for_replicated_consumer(shard, self.group_pg, dim, sizes, self.group_index, self.counter)

    def shuffle(self, shards: list[torch.Tensor], name: str, groups: int) -> list[torch.Tensor]:
        """Channel shuffle over ``groups`` groups as one all-to-all over the "group" dimension."""
        (shard,) = shards
        nbytes = exchange_bytes("shuffle", shard.numel() * shard.element_size() * self.num_slots, groups)
        self.counter.record(name, nbytes, nbytes)
        if self.num_slots == 1:  # one slot: the shuffle is a permutation inside it
            return shuffle_to_devices([shard], [self.device], groups)
        return [all_to_all_shuffle(shard, self.group_pg, self.num_slots, groups, self.counter)]

    def assemble_rows(self, parts: list[torch.Tensor], everywhere: bool = True) -> torch.Tensor | None:
        """Every slot's rows (dim 0) stacked in slot order, on CPU: on every rank of the group, or
        (``everywhere=False``, for checkpoints) on the first replica's first rank only, which is
        global rank 0; every other rank gets None and holds no full copy (the other replicas, whose
        shards are the same, do not even communicate)."""
        (part,) = parts
        if not everywhere and self.mesh is not None and self.mesh.get_local_rank("data") != 0:
            return None
        rows = [0] * self.num_slots
        rows[self.group_index] = part.shape[0]
        counts = torch.tensor(rows, device=self.device)
        dist.all_reduce(counts, group=self.group_pg)
        counts = counts.tolist()
        padded = torch.zeros(max(counts), *part.shape[1:], dtype=part.dtype, device=self.device)
        padded[:part.shape[0]] = part.to(self.device)
        if everywhere:
            pieces = [torch.empty_like(padded) for _ in range(self.num_slots)]
            dist.all_gather(pieces, padded, group=self.group_pg)
        else:
            pieces = [torch.empty_like(padded) for _ in range(self.num_slots)] if self.group_index == 0 else None
            dist.gather(padded, pieces, dst=dist.get_global_rank(self.group_pg, 0), group=self.group_pg)
            if pieces is None:
                return None
        return torch.cat([p[:n] for p, n in zip(pieces, counts)]).cpu()

    def describe(self) -> str:
        return (f"{self.num_slots} process(es) per replica, each holding 1/{self.num_slots} of every layer's groups "
                f"({dist.get_backend(self.group_pg)} on {self.device.type})")


def gpu_of_local_rank(local_rank: int, local_world: int, visible: int) -> torch.device:
    """The GPU of local rank ``local_rank`` of ``local_world`` on a node where it sees ``visible`` GPUs.

    As many GPUs as local ranks (or more): cuda:local_rank. One visible GPU (one GPU per task:
    CUDA_VISIBLE_DEVICES per rank, as SLURM often sets it): cuda:0. Anything between would put
    two ranks on one GPU, which NCCL refuses ("Duplicate GPU detected"): refused here, in one line.
    """
    if visible == 0:
        raise PlacementError("parallel.backend=nccl but this process sees no GPU; use parallel.backend=gloo")
    if visible == 1:
        return torch.device("cuda", 0)
    if local_world > visible:
        raise PlacementError(f"{local_world} ranks on this node but {visible} GPUs visible to each: two ranks would "
                             f"share a GPU, which NCCL refuses; launch torchrun --nproc-per-node {visible}, or give "
                             "each rank one GPU (CUDA_VISIBLE_DEVICES per task)")
    return torch.device("cuda", local_rank)


def init_process_group_from_env(backend: str = "auto", timeout_s: float = 600):
    """Under torchrun: initialise the default process group; (device, world, rank, control group).

    The control group is a CPU (gloo) group for small host-side messages (the stop vote, row
    counts) under NCCL, so they never wait on the GPU stream; None on CPU, where the default
    group already is gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = pick_backend(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
        visible = torch.cuda.device_count()
        device = gpu_of_local_rank(local_rank, local_world, visible)
        if local_rank >= visible:
            print(f"rank {os.environ.get('RANK', '?')}: LOCAL_RANK {local_rank} but {visible} GPU(s) visible; "
                  f"using {device} (one GPU per task)", flush=True)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None,
                                **_restart_store(world, timedelta(seconds=timeout_s)))
    control = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return device, world, dist.get_rank(), control


def slots_for_world(world: int, groups: int) -> int:
    """Ranks per replica: G when the world is a multiple of G (one group per rank, world/G replicas),
    the world itself when it divides G (G/world groups per rank, one replica)."""
    if world % groups == 0:
        return groups
    if groups % world == 0:
        return world
    fits = sorted({d for d in range(1, groups + 1) if groups % d == 0} | {groups * k for k in (2, 3, 4)})
    raise PlacementError(f"world size {world} does not fit {groups} groups: launch a number of processes that "
                         f"divides {groups} (each holds several groups) or is a multiple of it (data replicas); "
                         f"e.g. torchrun --nproc-per-node {'/'.join(map(str, fits))}")


def join_spawned_world(rank: int, world: int, store_path: str, backend: str = "auto", timeout_s: float = 600):
    """Join a world of ``world`` processes started without torchrun (``mp.spawn``), meeting at a file.

    The processes rendezvous through a FileStore at ``store_path`` (a path no earlier world
    used, on a filesystem they share), so no TCP port is picked, closed and handed on (another
    process could take it in between). Sets RANK/WORLD_SIZE/LOCAL_RANK as torchrun would, so
    ``init_from_env`` then builds the mesh on the group this made.
    """
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group(pick_backend(backend), init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


#: seconds ``tear_down`` holds no GIL after destroying the groups (the abort below needs a window of a few ms)
FINISH_S = 0.1


def tear_down() -> None:
    """Destroy this process's process groups (every one ``init_from_env`` made), while the interpreter is whole.

    Registered with ``atexit`` by ``init_from_env`` and ``init_hybrid_from_env``, so a script that
    never tears down still does, on a normal exit and after an uncaught exception. On a normal
    exit every rank first meets at a barrier, so no rank destroys its groups while a peer's last
    collective still needs it; after an exception it does not wait for peers that may never
    come. Harmless when already torn down.

    Then it sleeps ``FINISH_S`` without the GIL, which is what prevents the abort at exit
    ("terminate called without an active exception", SIGABRT, which torchrun reports as a
    failed job). Its cause, from gdb on an aborting rank: a gloo worker thread
    (``pt_gloo_runloop``) destroys a finished collective (``~AsyncAllgatherWork``) after the
    caller has moved on; dropping the work's tensors decrefs their Python objects, which
    needs the GIL; the main thread holds the GIL through the script's last lines and the
    exit path, and once finalisation has begun a thread that asks for the GIL is ended by
    ``pthread_exit``, whose unwinding through a noexcept C++ frame calls std::terminate. The
    sleep hands the GIL to any such thread while Python is still whole. Destroying the groups
    does not join gloo's threads: the placement and the mesh still hold the process groups."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    failed = getattr(sys, "last_value", None) is not None  # set by an uncaught exception before atexit runs
    try:
        if not failed:
            dist.barrier()
        dist.destroy_process_group()
        # Python still whole: let gloo's worker threads drop their last tensor references now (see above)
        time.sleep(FINISH_S)
    except Exception as e:  # noqa: BLE001  (a peer that died first: nothing left to tear down cleanly)
        print(f"warning: parallel.distributed could not destroy the process group at exit "
              f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)


def own_teardown() -> None:
    """Make sure ``tear_down`` runs at exit, once however often groups are made."""
    atexit.unregister(tear_down)
    atexit.register(tear_down)


def init_from_env(groups: int, backend: str = "auto", timeout_s: float = 600,
                  counter: CommCounter | None = None) -> tuple[DistributedPlacement, DistributedRuntime]:
    """Under torchrun: init the process group and the (data, group) mesh for ``groups`` groups.

    Returns this rank's placement (for the layers) and runtime (for the training loop); both
    record into the same ``counter``. The process groups are destroyed at exit (``tear_down``):
    the caller need not, and may still call ``destroy_process_group`` itself.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    slots = slots_for_world(world, groups)
    device, world, _, control = init_process_group_from_env(backend, timeout_s)
    own_teardown()
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world // slots, slots), mesh_dim_names=("data", "group"))
    counter = counter if counter is not None else CommCounter()
    placement = DistributedPlacement(groups, slots, mesh.get_group("group"), mesh.get_local_rank("group"), device,
                                     counter=counter, mesh=mesh)
    runtime = DistributedRuntime(mesh.get_group("data"), control, dist.get_rank(), mesh.get_local_rank("data"),
                                 world // slots, device, counter=counter)
    return placement, runtime
