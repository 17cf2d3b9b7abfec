"""Which samples each data-parallel replica sees in each step.

The global batch of step i is ``perm[i*B:(i+1)*B]`` of an epoch permutation drawn from
(seed, epoch) alone, so a resumed run replays exactly the order an uninterrupted run
would, and replica d of D takes the d-th contiguous slice of every global batch: all
ranks of one replica see the same batch, and D replicas together see the batch one
replica would have seen.
"""
from __future__ import annotations

import warnings

import torch


def stream_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A seed that depends only on (seed, epoch, stream)."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + stream) % 2 ** 63


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, epoch, stream)."""
    return torch.Generator().manual_seed(stream_seed(seed, epoch, stream))


#: sample draws (PIL transforms) use streams from here on, one per position in the epoch's order,
#: apart from the per-batch streams 1 + i
SAMPLE_STREAMS = 1 << 40


class ReplicaBatchSampler:
    """Yields index lists: this replica's slice of each global batch."""

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int = 0,
                 replica: int = 0, num_replicas: int = 1, drop_last: bool = False, keyed: bool = False):
        if batch_size < num_replicas:
            raise ValueError(f"data.batch_size ({batch_size}) is smaller than the number of replicas ({num_replicas})")
        self.num_samples, self.batch_size, self.shuffle, self.seed = num_samples, batch_size, shuffle, seed
        self.replica, self.num_replicas, self.drop_last = replica, num_replicas, drop_last
        # keyed: yield (sample index, draw seed) pairs, the seed a function of (seed, epoch, position in
        # the epoch's order) alone, so a sample's random transform is the same whichever replica,
        # worker or process loads it
        self.keyed = keyed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; ``skip`` batches already trained (resuming mid-epoch) are left out."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        # A training batch left with fewer rows than replicas would give some replica no rows (a NaN
        # loss there); it is dropped. Evaluation keeps every sample: an empty slice only adds zeros.
        too_small = self.shuffle and rest < self.num_replicas
        return full if self.drop_last or rest == 0 or too_small else full + 1

    def epoch_order(self) -> torch.Tensor:
        """This epoch's sample order (a permutation when shuffling)."""
        if self.shuffle:
            return torch.randperm(self.num_samples, generator=epoch_generator(self.seed, self.epoch))
        return torch.arange(self.num_samples)

    def global_positions(self, i: int) -> tuple[int, int]:
        """[lo, hi) in ``epoch_order()`` of global batch i (every replica's rows)."""
        return i * self.batch_size, min((i + 1) * self.batch_size, self.num_samples)

    def row_offset(self, i: int) -> int:
        """The row of the global batch i where this replica's slice starts."""
        return self.batch_positions(i)[0] - self.global_positions(i)[0]

    def replica_rows(self, i: int) -> list[int]:
        """Every replica's number of rows of global batch i (torch.tensor_split's rule)."""
        lo, hi = self.global_positions(i)
        size, extra = divmod(hi - lo, self.num_replicas)
        return [size + (1 if r < extra else 0) for r in range(self.num_replicas)]

    def batch_positions(self, i: int) -> tuple[int, int]:
        """[start, end) in ``epoch_order()`` of this replica's slice of global batch i."""
        lo, hi = self.global_positions(i)
        size, extra = divmod(hi - lo, self.num_replicas)  # torch.tensor_split's rule: the first `extra` get one more
        start = lo + self.replica * size + min(self.replica, extra)
        return start, start + size + (1 if self.replica < extra else 0)

    def __iter__(self):
        order = self.epoch_order()
        for i in range(self.skip, len(self)):
            start, end = self.batch_positions(i)
            if self.keyed:
                yield [(int(order[p]), stream_seed(self.seed, self.epoch, SAMPLE_STREAMS + p))
                       for p in range(start, end)]
            else:
                yield order[start:end].tolist()


class KeyedBatchSampler:
    """Deprecated since 0.2 (goes in 0.4): ``ReplicaBatchSampler(..., keyed=True)`` yields the same
    (sample index, draw seed) pairs itself. This wraps a sampler as 0.1's class did."""

    def __init__(self, sampler: ReplicaBatchSampler):
        warnings.warn("KeyedBatchSampler(sampler) is deprecated: build ReplicaBatchSampler(..., keyed=True); "
                      "KeyedBatchSampler goes in 0.4", DeprecationWarning, stacklevel=2)
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        keyed, self.sampler.keyed = self.sampler.keyed, True
        try:
            yield from self.sampler
        finally:
            self.sampler.keyed = keyed


class SamplerLoader:
    """What every loader delegates to its ``self.sampler`` (a ReplicaBatchSampler): batch size, epoch, length."""

    sampler: ReplicaBatchSampler

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order and augmentation; ``skip`` batches already trained (resuming) are left out."""
        self.sampler.set_epoch(epoch, skip)

    def __len__(self) -> int:
        return len(self.sampler)
