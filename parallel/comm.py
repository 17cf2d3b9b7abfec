"""Cross-group communication primitives, each forward next to its backward.

Only this file moves activations between groups. The placements record the bytes each
exchange moves in a :class:`CommCounter`, from tensor shapes alone (no host
synchronisation, no Python state mutated inside autograd), so the number is the groups'
logical exchange volume whatever the placement: at a cross-group layer each of the G
groups receives the other G-1 groups' shards of its input in the forward pass, and the
same volume of gradients in the backward pass.
"""
from __future__ import annotations

import time
import weakref
from contextlib import contextmanager

import torch


class CommCounter:
    """Bytes exchanged between groups in one training step, per named layer and direction.

    Each exchange *records* its volume, a function of tensor shapes only, when its forward
    runs: ``record(key, fwd, bwd)`` overwrites that layer's entry (each layer claims a key
    of its own when built, see ``claim``; ``by_module`` reports them by module path), so the
    counter holds the traffic of the latest step whatever the number of steps, never reads
    back what it stored, and nothing inside an autograd Function touches it. That keeps compiled graphs
    free of breaks and of guards on changing Python numbers.

    With ``timed=True`` (benchmarks only) the distributed collectives also record their
    wall time in ``seconds``, synchronising CUDA around each one, which slows training.
    """

    def __init__(self, timed: bool = False) -> None:
        self.bytes: dict[str, int] = {}
        self.timed = timed
        self.seconds = 0.0
        self._owners: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def claim(self, name: str, owner) -> str:
        """A key no other live layer of this counter holds: ``name``, else ``name.2``, ``name.3``, ...

        Layers claim their key when they are built, so layers built in a loop without names
        never overwrite each other's bytes; a key is free again once its owner is gone.
        """
        key, n = name, 1
        while key in self._owners and self._owners[key] is not owner:
            n += 1
            key = f"{name}.{n}"
        self._owners[key] = owner
        return key

    def by_module(self, model) -> dict[str, int]:
        """``snapshot()`` with every layer's key replaced by its module path in ``model``
        (``"blocks.0.a/fwd"``); exchanges that belong to no module of it keep their names."""
        path_of = {getattr(m, "key", None): path for path, m in model.named_modules() if getattr(m, "key", None)}
        out = {}
        for entry, nbytes in self.bytes.items():
            key, direction = entry.rsplit("/", 1)
            out[f"{path_of.get(key, key)}/{direction}"] = nbytes
        return out

    def record(self, name: str, fwd_bytes: int, bwd_bytes: int) -> None:
        """Layer ``name`` moves ``fwd_bytes`` forward and ``bwd_bytes`` of gradients backward per step."""
        self.bytes[f"{name}/fwd"] = fwd_bytes
        self.bytes[f"{name}/bwd"] = bwd_bytes

    def total(self) -> int:
        """Bytes per training step (forward + backward), summed over layers."""
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.seconds = 0.0

    @contextmanager
    def timing(self, device: torch.device):
        """Accumulate the wall time of the enclosed collective when ``timed``."""
        if not self.timed:
            yield
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds += time.perf_counter() - start

    def snapshot(self) -> dict[str, int]:
        return dict(self.bytes)


def exchange_bytes(exchange: str, total_bytes: int, groups) -> int:
    """Forward bytes a layer's input moves between groups per step: the one byte rule.

    ``total_bytes``: the whole input (every group's share); ``groups``: G, or the groups'
    shares of the exchanged dimension (uneven splits).
    ``all`` (all-gather): every group receives every other group's share, (G - 1) x
      total_bytes for G equal shares;
    ``shuffle``: group g keeps its own 1/G slice of its maps and receives the g-th 1/G
      slice of every other group's, (G - 1) / G x total_bytes;
    ``own``, ``replicated``: nothing.
    The backward pass returns as many bytes of gradients. Every placement counts by this
    rule (and the logits' gather as ``all``), and the spec's per-layer table too, so the
    number does not depend on where the groups live.
    """
    sizes = [1] * groups if isinstance(groups, int) else list(groups)
    if exchange == "all":
        whole = sum(sizes)
        return sum(total_bytes - total_bytes * size // whole for size in sizes)
    if exchange == "shuffle":
        return total_bytes * (len(sizes) - 1) // len(sizes)
    if exchange in ("own", "replicated"):
        return 0
    raise ValueError(f"exchange must be all, shuffle, own or replicated, got {exchange!r}")


class _GatherToDevices(torch.autograd.Function):
    """Forward: out_t = cat(shards moved to targets[t], dim) for every target device t.

    Backward: grad(shard_i) = sum_t grad(out_t)[slice_i], moved back to shard i's device;
    the consumers compute different things from the same gathered input, so their
    gradients add up (the local twin of all-gather / reduce-scatter).
    """

    @staticmethod
    def forward(ctx, targets, dim, *shards):
        ctx.dim = dim
        ctx.sizes = [s.shape[dim] for s in shards]
        ctx.devices = [s.device for s in shards]
        # non_blocking: device-to-device copies queue on the stream, the host never waits.
        return tuple(torch.cat([s.to(t, non_blocking=True) for s in shards], dim=dim) for t in targets)

    @staticmethod
    def backward(ctx, *grads):
        out = []
        for i, (dev, size) in enumerate(zip(ctx.devices, ctx.sizes)):
            start = sum(ctx.sizes[:i])
            total = None
            for g in grads:
                if g is None:
                    continue
                piece = moved(g.narrow(ctx.dim, start, size), dev)
                total = piece if total is None else total + piece
            out.append(total)
        return (None, None, *out)


def moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: itself when it is there already, else a dense copy (in its memory format) sent
    there. A strided slice copied straight to another GPU is staged through temporary buffers when
    the two have no peer-to-peer access; one dense copy first is one transfer."""
    if t.device == torch.device(device):
        return t
    return t.contiguous(memory_format=_format_of(t)).to(device, non_blocking=True)


def gather_to_devices(shards: list[torch.Tensor], targets: list[torch.device], dim: int) -> list[torch.Tensor]:
    """Concatenate ``shards`` along ``dim`` on each of ``targets``; autograd-correct."""
    if len(shards) == 1 and len(targets) == 1 and shards[0].device == targets[0]:
        return [shards[0]]  # one slot: its groups already share the tensor
    return list(_GatherToDevices.apply(tuple(targets), dim, *shards))


# --- torch.distributed: one group per process -------------------------------------------

def _padded_to(t: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """``t`` zero-padded along ``dim`` to ``width`` (uneven shares travel padded to the largest)."""
    if t.shape[dim] == width:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = width - t.shape[dim]
    return torch.cat([t, t.new_zeros(pad_shape).to(memory_format=_format_of(t))], dim=dim)


def _format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D NHWC tensor (also a channel slice of one), else contiguous."""
    nhwc = t.dim() == 4 and t.stride(1) == 1 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1
    return torch.channels_last if nhwc else torch.contiguous_format


def _gather_into(output: torch.Tensor, send: torch.Tensor, pg) -> None:
    """All-gather into one (K * rows, ...) tensor under the installed torch's name for it: ``all_gather_single``
    from torch 2.14 (where ``all_gather_into_tensor`` warns that it is deprecated), the old name before (2.11)."""
    import torch.distributed as dist
    (dist.all_gather_single if hasattr(dist, "all_gather_single") else dist.all_gather_into_tensor)(
        output, send, group=pg)


def _reduce_scatter_into(output: torch.Tensor, send: torch.Tensor, pg) -> None:
    """Sum over ranks of their (K * rows, ...) tensors, keeping this rank's rows: ``reduce_scatter_single`` from
    torch 2.14, ``reduce_scatter_tensor`` (deprecated there) before."""
    import torch.distributed as dist
    (dist.reduce_scatter_single if hasattr(dist, "reduce_scatter_single") else dist.reduce_scatter_tensor)(
        output, send, group=pg)


def _stack_rows(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The pieces (equal shapes) one after the other along dim 0, in one dense buffer of their memory format:
    what the all-gather fills and the reduce-scatter reads (no per-rank list, no flat copy)."""
    return torch.cat([p.contiguous(memory_format=_format_of(p)) for p in pieces], dim=0)


def _all_gather_along(shard: torch.Tensor, pg, dim: int, sizes: list[int]) -> torch.Tensor:
    """cat over ranks of ``shard`` along ``dim``, in the shard's memory format (NHWC stays NHWC).

    One all-gather into a (K * rows, ...) buffer (``_gather_into``), then one cat along ``dim``;
    uneven shares are padded to the largest for the collective, then trimmed.
    """
    import torch.distributed as dist
    send = _padded_to(shard, dim, max(sizes)).contiguous(memory_format=_format_of(shard))
    received = torch.empty((len(sizes) * send.shape[0], *send.shape[1:]), dtype=send.dtype, device=send.device,
                           memory_format=_format_of(send))
    _gather_into(received, send, pg)
    pieces = received.chunk(len(sizes), dim=0)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(pieces, sizes)], dim=dim)


class _AllGatherDistinctConsumers(torch.autograd.Function):
    """Forward: Y = cat_g(X_g) on every rank (all-gather over the group dimension).

    Backward: each rank computed different outputs from Y, so
    dL/dX_g = sum over ranks r of (dL_r/dY)[slice g]: one reduce-scatter (``_sum_own_slice``;
    gloo has it too).
    """

    @staticmethod
    def forward(ctx, shard, pg, dim, sizes, index, counter):
        ctx.meta = (pg, dim, sizes, index, counter)
        with counter.timing(shard.device):
            return _all_gather_along(shard, pg, dim, sizes)

    @staticmethod
    def backward(ctx, grad):
        pg, dim, sizes, index, counter = ctx.meta
        with counter.timing(grad.device):
            return (_sum_own_slice(grad, pg, dim, sizes, index), *[None] * 5)


def _sum_own_slice(grad: torch.Tensor, pg, dim: int, sizes: list[int], index: int) -> torch.Tensor:
    """sum over ranks of grad[slice index]: one reduce-scatter of the K slices stacked along dim 0
    (uneven slices padded to the largest, so it moves K x the largest slice, never K x the whole),
    in the gradient's memory format."""
    import torch.distributed as dist
    width = max(sizes)
    chunks = [_padded_to(c, dim, width) for c in grad.split(sizes, dim=dim)]
    send = _stack_rows(chunks)
    out = torch.empty_like(chunks[index], memory_format=_format_of(chunks[index]))
    _reduce_scatter_into(out, send, pg)
    return out.narrow(dim, 0, sizes[index])


class _AllGatherReplicatedConsumer(torch.autograd.Function):
    """Forward: Y = cat_g(X_g) on every rank. Backward: dL/dX_g = (dL/dY)[slice g], no communication.

    Correct when every rank computes the *same* function of Y (the loss from the logits):
    each rank already holds the whole gradient, and summing would count it G times.
    """

    @staticmethod
    def forward(ctx, shard, pg, dim, sizes, index, counter):
        ctx.meta = (dim, sizes, index)
        with counter.timing(shard.device):
            return _all_gather_along(shard, pg, dim, sizes)

    @staticmethod
    def backward(ctx, grad):
        dim, sizes, index = ctx.meta
        return (grad.narrow(dim, sum(sizes[:index]), sizes[index]).contiguous(), *[None] * 5)


def all_gather_for_distinct_consumers(shard, pg, dim, sizes, index, counter):
    return _AllGatherDistinctConsumers.apply(shard, pg, dim, sizes, index, counter)


def all_gather_for_replicated_consumer(shard, pg, dim, sizes, index, counter):
    return _AllGatherReplicatedConsumer.apply(shard, pg, dim, sizes, index, counter)


class _AllReduceOverReplicas(torch.autograd.Function):
    """Forward: S = sum_r t_r over the data replicas (batch statistics of the global batch).

    Backward: replica r receives (sum_r' n_r' dL_r'/dS) / n_r, with n_r its batch rows. The
    runtime averages gradients weighted by rows (sum_r n_r g_r / sum n_r), so this makes
    every gradient that flows through S that of the global batch's mean loss, also when
    the replicas' slices differ in size; with equal slices it is SyncBatchNorm's plain sum.
    """

    @staticmethod
    def forward(ctx, t, pg, rows):
        import torch.distributed as dist
        ctx.meta = (pg, rows)
        out = t.clone()
        dist.all_reduce(out, group=pg)
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        pg, rows = ctx.meta
        grad = grad * rows
        dist.all_reduce(grad, group=pg)
        return grad / rows, None, None


def all_reduce_over_replicas(t: torch.Tensor, pg, rows: int) -> torch.Tensor:
    """sum of ``t`` over the replicas in ``pg``; autograd-correct for the global batch's loss (see above)."""
    return _AllReduceOverReplicas.apply(t, pg, rows)


# --- channel shuffle: group g receives the g-th 1/G slice of every group's maps ------------------
#
# With G groups of C/G maps dealt to K slots (P = G/K groups each), a slot's part is
# (N, P*C/G, ...) = (N, P [source group h], G [destination group g], C/G^2, ...). The
# shuffled input of group g is cat over h of piece (h, g): ShuffleNet's channel shuffle,
# written as the permutation (h, g, c) -> (g, h, c) of the reference's channel axis.

def shuffle_to_devices(parts: list[torch.Tensor], devices: list[torch.device], groups: int) -> list[torch.Tensor]:
    """The channel shuffle between local slots: each slot sends every other slot the pieces its
    groups need, one copy per pair of slots; plain differentiable ops (slices, copies, cat),
    so autograd's backward is the inverse shuffle. Channels_last maps stay channels_last: the
    permutation runs on their NHWC view, whose channels are the last, dense dimension."""
    if all(_format_of(p) is torch.channels_last for p in parts):
        nhwc = _shuffle_along([p.permute(0, 2, 3, 1) for p in parts], devices, groups, dim=3)
        return [y.permute(0, 3, 1, 2) for y in nhwc]
    return _shuffle_along(parts, devices, groups, dim=1)


def _shuffle_along(parts: list[torch.Tensor], devices: list[torch.device], groups: int, dim: int) -> list[torch.Tensor]:
    """The shuffle of the channel dimension ``dim``: (.., h_s, g, c, ..) -> (.., g_t, h, c, ..) per target slot t."""
    K = len(parts)
    P = groups // K
    pieces = [p.unflatten(dim, (P, groups, -1)) for p in parts]  # (.., h_s, g, c, ..)
    out = []
    for t, device in enumerate(devices):
        received = [moved(v.narrow(dim + 1, t * P, P), device) for v in pieces]
        y = torch.cat(received, dim=dim).transpose(dim, dim + 1)  # (.., g_t, h, c, ..)
        out.append(y.flatten(dim, dim + 2))
    return out


def _a2a(send: torch.Tensor, pg) -> torch.Tensor:
    import torch.distributed as dist
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=pg)
    return received


class _AllToAllShuffle(torch.autograd.Function):
    """Forward: the channel shuffle over K ranks as one all-to-all (rank s sends rank t the
    pieces (h, g) of its groups h for t's groups g). Backward: the inverse all-to-all."""

    @staticmethod
    def forward(ctx, part, pg, K, groups, counter):
        ctx.meta = (pg, K, groups // K, part.shape, counter)
        P = groups // K
        rest = part.shape[2:]
        view = part.unflatten(1, (P, K, P, -1))              # (N, h_s, t, g_t, c, ...)
        send = view.movedim(2, 0).contiguous()                # (t, N, h_s, g_t, c, ...)
        with counter.timing(part.device):
            received = _a2a(send, pg)                         # (s, N, h_s, g_t, c, ...)
        y = received.permute(1, 3, 0, 2, *range(4, 5 + len(rest)))  # (N, g_t, s, h_s, c, ...)
        return y.reshape(part.shape).contiguous(memory_format=_format_of(part))

    @staticmethod
    def backward(ctx, grad):
        pg, K, P, shape, counter = ctx.meta
        rest = shape[2:]
        view = grad.reshape(shape).unflatten(1, (P, K, P, -1))             # (N, g_t, s, h_s, c, ...)
        send = view.permute(2, 0, 3, 1, *range(4, 5 + len(rest))).contiguous()  # (s, N, h_s, g_t, c, ...)
        with counter.timing(grad.device):
            received = _a2a(send, pg)                                      # (t, N, h_s, g_t, c, ...)
        g = received.permute(1, 2, 0, 3, *range(4, 5 + len(rest)))         # (N, h_s, t, g_t, c, ...)
        return g.reshape(shape).contiguous(memory_format=_format_of(grad)), None, None, None, None


def all_to_all_shuffle(part: torch.Tensor, pg, num_ranks: int, groups: int, counter: CommCounter) -> torch.Tensor:
    return _AllToAllShuffle.apply(part, pg, num_ranks, groups, counter)


# --- hybrid placement (Krizhevsky 2014): batch rows <-> feature columns ----------------------

def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[1] == width else torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1])], dim=1)


class _FeaturesToRows(torch.autograd.Function):
    """Forward: rank k holds Z[:, cols k] for the whole batch; each rank r receives Z[rows r, :]
    (one all-to-all; uneven rows and columns are padded for the collective).
    Backward: the inverse all-to-all, so rank k gets w_r dL_r/dZ[rows r, cols k] from every r,
    where L_r is rank r's loss, the mean over its n_r rows, and w_r = n_r K / B: the gradient of
    sum_r w_r L_r = K x (the mean over all B rows), whatever the split of the batch."""

    @staticmethod
    def forward(ctx, part, pg, index, rows, cols, counter):
        ctx.meta = (pg, index, rows, cols, counter)
        width = max(cols)
        send = _pad_cols(part, width).contiguous()
        received = send.new_empty(rows[index] * len(rows), width)
        import torch.distributed as dist
        with counter.timing(part.device):
            dist.all_to_all_single(received, send, output_split_sizes=[rows[index]] * len(rows),
                                   input_split_sizes=list(rows), group=pg)
        pieces = received.split(rows[index], dim=0)
        return torch.cat([p[:, :c] for p, c in zip(pieces, cols)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        pg, index, rows, cols, counter = ctx.meta
        width = max(cols)
        grad = grad * (rows[index] * len(rows) / sum(rows))  # w_r: slices of unequal size weigh by their rows
        send = torch.cat([_pad_cols(g, width) for g in grad.split(list(cols), dim=1)], dim=0).contiguous()
        received = send.new_empty(sum(rows), width)
        import torch.distributed as dist
        with counter.timing(grad.device):
            dist.all_to_all_single(received, send, output_split_sizes=list(rows),
                                   input_split_sizes=[rows[index]] * len(rows), group=pg)
        return received[:, :cols[index]].contiguous(), None, None, None, None, None


def features_to_rows(part, pg, index, rows, cols, counter):
    return _FeaturesToRows.apply(part, pg, index, list(rows), list(cols), counter)
