"""Batch normalisation for channels split over filter groups: each group's statistics stay with it.

BatchNorm treats every channel on its own,

    y[:, c] = (x[:, c] - mu_c) / sqrt(var_c + eps) * gamma_c + beta_c,

with mu_c, var_c the batch's mean and (biased) variance of channel c over (N, H, W) in
training, the running estimates in evaluation. So the channels of group g, held by one
slot, are normalised there with nothing from the other groups: slot s keeps
``nn.BatchNorm2d`` of its own channels (affine parameters and running statistics on its
device), and the twin is ``nn.BatchNorm2d(num_features)``: rows [lo, hi) of every tensor.

With data replicas, ``sync=True`` takes mu_c and var_c over the replicas' batches together
(SyncBatchNorm's meaning: one process that sees the global batch): two all-reduces of C
numbers over the replicas of the same groups, the mean first, then the squared deviations
from it (no E[x^2] - mu^2 cancellation).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from parallel.comm import all_reduce_over_replicas
from parallel.layers import ShardedModule, refuse_device, slot_row_ranges
from parallel.placement import check_dealable, split_sizes
from parallel.roles import tag
from parallel.sharded import Sharded


class GroupBatchNorm2d(ShardedModule):
    """``nn.BatchNorm2d(num_features)`` with its channels split over G groups (default the placement's).

    ``replica_group``: the process group of the data replicas that hold the same groups, for
    ``sync=True`` (default: the "data" dimension of a distributed placement's mesh; in one
    process, or with one replica, there is nothing to sync). ``bias=False`` (affine weight
    only) as on ``nn.BatchNorm2d`` of torch >= 2.12. ``device`` is refused: each slot's channels
    live on its slot's device.
    """

    def __init__(self, placement, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, sync: bool = False,
                 groups: int | None = None, name: str | None = None, replica_group=None,
                 dtype: torch.dtype | None = None, device=None, *, bias: bool = True):
        super().__init__()
        self.name = name or "bn"
        refuse_device(self.name, device)
        no_bias = {} if bias else {"bias": False}
        if no_bias and "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters:
            raise ValueError(f"{self.name}: bias=False needs nn.BatchNorm2d(bias=...), which this torch "
                             f"({torch.__version__}) does not have; use torch >= 2.12 or affine=False")
        G = groups or placement.groups
        check_dealable(G, placement.num_slots, self.name)
        if num_features % G:
            raise ValueError(f"{self.name}: {num_features} channels do not divide by {G} groups; "
                             f"use a multiple of {G}")
        self.placement, self.groups, self.num_features = placement, G, num_features
        self.key = placement.counter.claim(self.name, self)
        self.eps, self.momentum, self.affine, self.track_running_stats = eps, momentum, affine, track_running_stats
        self.sync = sync
        mesh = getattr(placement, "mesh", None)
        self.replica_group = replica_group if replica_group is not None or mesh is None else mesh.get_group("data")
        self.slot_rows = slot_row_ranges(placement, split_sizes(num_features, G))
        self.norms = nn.ModuleList(
            nn.BatchNorm2d(hi - lo, eps, momentum, affine, track_running_stats, device=slot.device, dtype=dtype,
                           **no_bias)
            for slot, (lo, hi) in zip(placement.local_slots, self.slot_rows))
        for p in self.norms.parameters():
            tag(p, placement)
        self.full_keys = ((("weight", "bias") if bias else ("weight",)) if affine else ()) + \
            (("running_mean", "running_var", "num_batches_tracked") if track_running_stats else ())

    def forward(self, x: Sharded) -> Sharded:
        if not isinstance(x, Sharded):
            raise TypeError(f"{self.name}: expected a parallel.Sharded activation, got {type(x).__name__}")
        out = []
        for norm, part, (lo, hi) in zip(self.norms, x.parts, self.slot_rows):
            if part.dim() != 4 or part.shape[1] != hi - lo:
                raise ValueError(f"{self.name}: expected (N, {hi - lo}, H, W) maps on this slot (channels "
                                 f"{lo}..{hi - 1} of {self.num_features}), got shape {tuple(part.shape)}")
            out.append(self._synced(norm, part) if self._syncs() else norm(part))
        return Sharded(tuple(out), x.group_sizes)

    def _syncs(self) -> bool:
        if not (self.sync and self.training and self.replica_group is not None):
            return False
        import torch.distributed as dist
        return dist.get_world_size(self.replica_group) > 1

    def _synced(self, norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        """Batch statistics over every replica's rows; running statistics updated as nn.BatchNorm2d does."""
        rows, pg = x.shape[0], self.replica_group
        local = x.new_full((1,), x.numel() // x.shape[1])  # positions per channel, summed with the means
        summed = all_reduce_over_replicas(torch.cat([x.sum((0, 2, 3)), local]), pg, rows)
        count = summed[-1:]
        mean = summed[:-1] / count
        centred = x - mean[None, :, None, None]
        var = all_reduce_over_replicas(centred.square().sum((0, 2, 3)), pg, rows) / count
        y = centred * (var + self.eps).rsqrt()[None, :, None, None]
        if self.affine:
            y = y * norm.weight[None, :, None, None]
            if norm.bias is not None:
                y = y + norm.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                norm.num_batches_tracked += 1
                f = self.momentum if self.momentum is not None else 1.0 / norm.num_batches_tracked.item()
                n = count.detach()
                norm.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                norm.running_var.mul_(1 - f).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=f)
        return y

    # --- the twin: nn.BatchNorm2d(num_features) ---

    def to_full(self, value_of=None, everywhere: bool = True) -> dict[str, torch.Tensor]:
        """The twin's state (CPU), each tensor's rows stacked in group order; a collective when distributed.

        ``value_of(param)`` substitutes a tensor of the parameter's shape (a gradient, a momentum
        buffer) for the affine parameters; the running statistics are always themselves.
        ``everywhere=False``: the stacked tensors on global rank 0 only (None elsewhere).
        """
        value_of = value_of or (lambda p: p.detach())
        out = {}
        for key in self.full_keys:
            if key == "num_batches_tracked":  # the same count on every slot
                out[key] = self.norms[0].num_batches_tracked.detach().cpu().clone()
                continue
            tensors = [getattr(n, key) for n in self.norms]
            if key in ("weight", "bias"):
                tensors = [value_of(t) for t in tensors]
            out[key] = self.placement.assemble_rows([t.detach() for t in tensors], everywhere)
        return out

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """The twin's shape of each of its keys."""
        return {key: () if key == "num_batches_tracked" else (self.num_features,) for key in self.full_keys}

    def slices_of(self, full: dict[str, torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Each local tensor's rows of the twin's state, on its device."""
        missing = [k for k in self.full_keys if k not in full]
        if missing:
            raise ValueError(f"{self.name}: the state has no {', '.join(missing)}")
        out = {}
        for norm, (lo, hi) in zip(self.norms, self.slot_rows):
            for key in self.full_keys:
                mine = getattr(norm, key)
                value = full[key] if key == "num_batches_tracked" else full[key][lo:hi]
                if key != "num_batches_tracked" and full[key].shape != (self.num_features,):
                    raise ValueError(f"{self.name}.{key}: shape {tuple(full[key].shape)} does not fit "
                                     f"({self.num_features},)")
                out[mine] = value.to(mine.device, mine.dtype)
        return out

    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Copy this process's rows of the twin's state into every slot (exact slices)."""
        with torch.no_grad():
            for t, value in self.slices_of(full).items():
                t.copy_(value)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}, momentum={self.momentum}, sync={self.sync}"
