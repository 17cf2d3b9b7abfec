"""Where each filter group lives.

A placement deals G filter groups to *slots* in contiguous blocks. A slot is one device
(local placement) or one process (distributed placement, see ``distributed.py``). Groups
that share a slot are computed together there (one grouped convolution / one matmul), so a
single slot costs exactly what torch's own grouped convolution costs.

The model code only ever sees the *local* slots (all of them in one process, or just this
rank's one in a distributed run) and asks the placement to move activations between
groups. That keeps one model code path for both placements.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.comm import CommCounter, exchange_bytes, gather_to_devices, shuffle_to_devices


class PlacementError(ValueError):
    """A placement that cannot hold the requested groups (the message names the fix)."""


def split_sizes(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` contiguous sizes that differ by at most one, larger first.

    10 classes over 4 groups -> [3, 3, 2, 2].
    """
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def resolve_devices(devices, groups: int) -> list[str]:
    """Turn the config's ``parallel.devices`` into concrete device strings.

    ``"auto"`` (alone or as the only list entry) means one slot per visible GPU, at most
    ``groups`` of them and a number that divides ``groups`` (G = 4 on 3 GPUs uses 2), and
    ``["cpu"]`` when there is no GPU.
    """
    if isinstance(devices, str):
        devices = [devices]
    if list(devices) == ["auto"]:
        n = torch.cuda.device_count()
        if n == 0:
            return ["cpu"]
        slots = max(k for k in range(1, min(n, groups) + 1) if groups % k == 0)
        return [f"cuda:{i}" for i in range(slots)]
    if "auto" in devices:
        raise PlacementError("parallel.devices: 'auto' must be the only entry, e.g. devices: [auto]")
    for d in devices:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise PlacementError(f"parallel.devices: {d!r} is not a device; use e.g. cpu, cuda:0") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise PlacementError(
                    f"parallel.devices names {d} but CUDA is not available; "
                    "use --set parallel.devices=[cpu] or devices: [auto]")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise PlacementError(
                    f"parallel.devices names {d} but only {torch.cuda.device_count()} GPU(s) are visible")
    return list(devices)


@dataclass
class Slot:
    """One place (a device, or a process) that computes a contiguous block of every layer's groups.

    Slot ``index`` of K computes groups ``[index * G/K, (index + 1) * G/K)`` of a layer with G
    groups; ``first`` / ``count`` are that block for the placement's own ``groups``.
    """
    device: torch.device
    index: int
    first: int
    count: int

    @property
    def groups(self) -> range:
        return range(self.first, self.first + self.count)

    def groups_of(self, groups: int, num_slots: int) -> range:
        """This slot's block of a layer with ``groups`` groups (a multiple of ``num_slots``)."""
        per = groups // num_slots
        return range(self.index * per, (self.index + 1) * per)


def check_dealable(groups: int, num_slots: int, name: str) -> None:
    """A layer's groups must be dealt evenly to the slots, so each slot reads only the maps it holds."""
    if groups < 1 or groups % num_slots:
        allowed = ", ".join(str(num_slots * k) for k in range(1, 5))
        raise PlacementError(f"{name}: {groups} groups cannot be dealt evenly to {num_slots} slots; "
                             f"use a multiple of {num_slots} ({allowed}, ...)")


class LocalPlacement:
    """All groups in one process, dealt to ``devices`` (one slot each) in contiguous blocks.

    G = 4 over 2 slots: groups 0, 1 in slot 0 and groups 2, 3 in slot 1. Two slots may name
    the same physical device (``["cpu", "cpu"]``), which exercises the multi-device path
    on a machine without GPUs.
    """

    def __init__(self, groups: int, devices: list[str] | str = ("cpu",), counter: CommCounter | None = None):
        if groups < 1:
            raise PlacementError(f"groups must be >= 1, got {groups}")
        devices = resolve_devices(devices, groups)
        if len(devices) > groups:
            raise PlacementError(
                f"parallel.devices has {len(devices)} slots but there are only {groups} groups; "
                f"list at most {groups} devices")
        self.groups = groups
        counts = split_sizes(groups, len(devices))
        if counts[-1] != counts[0]:
            raise PlacementError(
                f"{groups} groups cannot be dealt evenly to {len(devices)} devices; "
                f"use a number of devices that divides {groups}")
        self.slots: list[Slot] = []
        first = 0
        for index, (dev, count) in enumerate(zip(devices, counts)):
            self.slots.append(Slot(torch.device(dev), index, first, count))
            first += count
        self.counter = counter if counter is not None else CommCounter()
        self.replica = 0  # one process is one data replica

    # The model iterates over local slots; here every slot is local.
    @property
    def local_slots(self) -> list[Slot]:
        return self.slots

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def input_device(self) -> torch.device:
        """Where the image batch is sent: slot 0's device (conv1 copies it on to the others)."""
        return self.slots[0].device

    @property
    def output_device(self) -> torch.device:
        """Where the gathered logits (and the loss) live: slot 0's device."""
        return self.slots[0].device

    def gather(self, shards: list[torch.Tensor], dim: int, name: str, group_sizes) -> list[torch.Tensor]:
        """Give every local slot the concatenation of all groups' shards along ``dim``.

        Used at cross-group layers; the consumers compute different output channels, so
        the backward pass sums the gradients from every consumer back onto each shard.
        ``group_sizes``: each group's share of ``dim`` (from the ``Sharded`` activation).
        """
        nbytes = exchange_bytes("all", _nbytes(shards), group_sizes)
        # Recorded even with one slot: the groups inside it still "exchange" their maps,
        # so the counter does not depend on the placement.
        self.counter.record(name, nbytes, nbytes)
        return gather_to_devices(shards, [s.device for s in self.slots], dim)

    def gather_output(self, shards: list[torch.Tensor], dim: int, name: str, group_sizes) -> torch.Tensor:
        """Concatenate all groups' outputs onto ``output_device``, where the loss is computed once.

        Counted by the rule both placements share for a replicated consumer: every group
        receives the other groups' shares (one process per group does exactly that, so each
        computes the loss), and the backward pass moves nothing (each keeps its own slice).
        """
        self.counter.record(name, exchange_bytes("all", _nbytes(shards), group_sizes), 0)
        return gather_to_devices(shards, [self.output_device], dim)[0]

    def shuffle(self, shards: list[torch.Tensor], name: str, groups: int) -> list[torch.Tensor]:
        """Channel shuffle (dim 1) over ``groups`` equal groups: group g receives the g-th 1/G
        slice of every group's maps. Between slots, a copy of each piece; inside a slot, a
        permutation. Counted as (G - 1) / G of the maps each way, whatever the slots."""
        nbytes = exchange_bytes("shuffle", _nbytes(shards), groups)
        self.counter.record(name, nbytes, nbytes)
        return shuffle_to_devices(shards, [s.device for s in self.slots], groups)

    def assemble_rows(self, parts: list[torch.Tensor], everywhere: bool = True) -> torch.Tensor:
        """Stack every slot's rows (dim 0) in group order into the full tensor, on CPU (one process:
        ``everywhere`` changes nothing)."""
        return torch.cat([p.cpu() for p in parts], dim=0)

    def describe(self) -> str:
        return ", ".join(f"groups {s.first}..{s.first + s.count - 1} on {s.device}" for s in self.slots)


def _nbytes(shards: list[torch.Tensor]) -> int:
    return sum(s.numel() * s.element_size() for s in shards)
