"""Memory per device predicted from the spec's shapes alone: no model built, no data read.

For each slot (a device of one process, or a rank of a torchrun world) of a training step
with SGD, the bytes of

  parameters   the slot's rows of every layer's weight and bias (fp32)
  gradients    the same again (fp32, allocated during backward)
  optimizer    SGD's momentum buffers: the same again when momentum > 0, else nothing
  activations  what autograd saves for backward from the slot's own maps: each ReLU's
               output, each LRN's input, its denominator d and d^-beta, each max-pool's
               input and its int64 argmax, each dropout's bool mask, the input of each
               layer that reads only its own group's maps, the image (conv1) and the
               loss's log-softmax; under bf16 autocast, the bf16 casts of the image and of
               every weight, the LRN's fp32 copy of its input; and the gathered logits
  exchange     the gathered (``all``) or shuffled input of every exchanging layer, held
               for its backward: every slot holds the *whole* gathered input, which is
               what model parallelism does not split
  input        the image batch (and its labels) on the slot that receives it
  peak         the step's largest live total: parameters + optimizer + the walk of the
               backward pass (saved tensors freed layer by layer as gradients appear),
               the flat gradient copy of the data replicas' all-reduce, and SGD's update:
               with weight decay, torch's single-tensor SGD (CPU) copies one gradient at a
               time (the largest, fc6's, is the peak), the fused SGD train.py uses on CUDA none

``D`` data replicas divide the batch: each slot holds ``batch / D`` rows. A layer's
``G_l`` groups are dealt to the ``K`` slots in contiguous blocks, as the placements do.
The tests hold every category to torch's MemTracker on CPU (``alexnet.memwatch``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from alexnet.spec import FC_NAMES, LRN_AFTER, POOL_AFTER, POOL_KERNEL, POOL_STRIDE, AlexNetSpec, hybrid_refusal
from parallel.placement import split_sizes
from parallel.sharded import slot_sizes

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "exchange", "input")
UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def parse_bytes(text: str) -> int:
    """'1.5GiB' -> 1610612736, '3GB' -> 3e9, '512' -> 512 bytes."""
    s = text.strip().upper().replace(" ", "")
    for unit in sorted(UNITS, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[:-len(unit)]) * UNITS[unit])
    return int(float(s))


@dataclass
class SlotMemory:
    """One slot's predicted bytes, by category, and the step's peak."""
    label: str
    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    exchange: int = 0
    input: int = 0
    peak: int = 0
    exchange_by_layer: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Everything a step holds at once at its largest: the peak."""
        return self.peak

    def as_dict(self) -> dict:
        return {**{c: getattr(self, c) for c in CATEGORIES}, "peak": self.peak, "total": self.total,
                "exchange_by_layer": dict(self.exchange_by_layer)}


class _Walk:
    """The autograd tensors of one slot's step in forward order, to walk the backward pass.

    ``node(saved, grads, out_bytes)``: one op that saves the tensors ``saved`` (name -> bytes;
    a name saved by several ops is one tensor), owns parameter gradients of ``grads`` bytes
    and produces an output of ``out_bytes`` (whose gradient exists while it runs backward).
    """

    def __init__(self):
        self.saved: dict[str, int] = {}
        self.nodes: list[tuple[list[str], int, int]] = []

    def node(self, saved: dict[str, int], grads: int, out_bytes: int, temp: int = 0) -> None:
        self.saved.update(saved)
        self.nodes.append((list(saved), grads, out_bytes, temp))

    def backward_peak(self, base: int) -> int:
        """The largest live total while backward runs: ``base`` plus saved tensors not yet freed, gradients
        allocated so far and the gradients flowing in and out of the op that runs."""
        first_user = {}
        for i, (names, _, _, _) in enumerate(self.nodes):
            for n in names:
                first_user.setdefault(n, i)
        alive, grads, peak = sum(self.saved.values()), 0, 0
        for i in range(len(self.nodes) - 1, -1, -1):
            names, g, out, temp = self.nodes[i]
            grad_in = self.nodes[i - 1][2] if i else 0
            peak = max(peak, base + alive + grads + g + out + grad_in + temp)
            grads += g
            alive -= sum(self.saved[n] for n in names if first_user[n] == i)
        return peak


def predict(spec: AlexNetSpec, batch: int, slots: int = 1, replicas: int = 1, precision: str = "fp32",
            momentum: bool = True, distributed: bool = False, labels: list[str] | None = None,
            same_device: bool = False, weight_decay: bool = False, fused_sgd: bool = False,
            device_type: str = "cpu", hybrid: bool = False) -> list[SlotMemory]:
    """Predicted memory of every slot for one training step of ``batch`` images (the global batch).

    ``slots``: K slots per replica (devices of one process, or ranks); ``replicas``: D data replicas
    (torchrun), each slot then holds batch / D rows. ``distributed``: one process per slot, so every
    slot gathers the logits and computes the loss (one process: slot 0 does). ``same_device``: the
    slots share one device, so the image reaches them without a copy. ``weight_decay`` and
    ``fused_sgd``: the optimizer's update (see the module docstring). ``device_type``: where the step runs,
    "cpu" or "cuda", which decides the LRN's backward (``alexnet.lrn``): the CPU's band-matrix one holds
    two temporaries beside dy and dx, the CUDA one three.

    ``hybrid``: the hybrid placement (``parallel.hybrid``) of ``slots`` = K ranks: every rank holds every
    conv weight and runs the conv layers on its ceil(B/K) rows (one slot, all groups); the fc layers are
    split over the K ranks by output features and run on all B rows (their input gathered by rows, then
    as the distributed placement); the logits go back to the rows' owner; the conv gradients are
    averaged through the flat all-reduce buffer.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if spec.slot_groups % slots and not hybrid:  # hybrid: the convs keep every group, the fc layers split by K
        raise ValueError(f"{slots} slots do not divide the spec's groups ({spec.label})")
    if hybrid and (replicas != 1 or not distributed):
        raise ValueError("hybrid: K ranks are both the data replicas of the convs and the slots of the fc layers; "
                         "give slots=K, replicas=1, distributed=True")
    if hybrid and (refusal := hybrid_refusal(spec.layers())):
        raise ValueError(refusal)
    n_rows = -(-batch // replicas)  # the largest replica's rows
    n_conv = -(-batch // slots) if hybrid else n_rows  # the conv layers' rows on this rank
    act = 2 if precision == "bf16" else 4
    infos = spec.layers()
    labels = labels or [f"slot {k}" for k in range(slots)]
    out = []
    for k in range(slots):
        mem, walk = SlotMemory(labels[k]), _Walk()
        receives_image = k == 0 or distributed
        image = n_conv * spec.in_channels * spec.input_size ** 2
        mem.input = image * 4 + n_conv * 8 if receives_image else 0
        if precision == "bf16":
            saved_image = {"image": image * 2}
        else:  # conv1 saves the image itself, or the copy on this slot's device
            saved_image = {"image": image * 4} if not receives_image and not same_device else {}
        previous = "image"
        previous_out = image * act
        largest = 0  # the slot's largest weight tensor (bytes)
        conv_weights = 0  # hybrid: the replicated part, averaged over the ranks
        for info in infos:
            G = info.groups
            whole_layer = hybrid and info.kind == "conv"  # every group on this rank, for its rows
            n = n_conv if whole_layer else n_rows
            rows = info.out_channels if whole_layer else \
                slot_sizes(split_sizes(info.out_channels, slots if hybrid else G), slots)[k]  # as the layers deal
            per_out = info.out_shape[1] * info.out_shape[2] if info.kind == "conv" else 1
            in_per_row = info.params // info.out_channels - 1  # weights per output row
            weights = rows * in_per_row * 4 + rows * 4
            mem.parameters += weights
            conv_weights += weights if whole_layer else 0
            largest = max(largest, rows * in_per_row * 4)
            saved = dict(saved_image) if info.name == "conv1" else {}
            if precision == "bf16":
                saved[f"{info.name}.weight_bf16"] = rows * in_per_row * 2
            if info.exchange in ("all", "shuffle"):
                whole = n * info.input_numel * act
                mine = whole if info.exchange == "all" or whole_layer else whole // slots  # hybrid convs: 1 slot
                mem.exchange_by_layer[info.name] = mine
                saved[f"{info.name}.input"] = mine
            elif info.exchange == "own":
                saved[previous] = previous_out
            walk.node(saved, weights, n * rows * per_out * act)
            numel = n * rows * per_out
            relu = f"{info.name}.relu"
            if info.name != "fc8":
                walk.node({relu: numel * act}, 0, numel * act)
            current, current_bytes = relu, numel * act
            if spec.lrn and info.name in LRN_AFTER:
                lrn = {f"{info.name}.lrn.d": numel * 4, f"{info.name}.lrn.scale": numel * 4}
                lrn[f"{info.name}.lrn.x32" if precision == "bf16" else relu] = numel * 4
                # its written-out backward holds, beside dy and dx: on CUDA dy x d^(-beta-1), its padded copy and a
                # running window sum; on the CPU dy x d^(-beta-1) and its product with the band matrix
                walk.node(lrn, 0, numel * act, temp=(3 if device_type == "cuda" else 2) * numel * 4)
                current, current_bytes = f"{info.name}.lrn", numel * act
            if info.name in POOL_AFTER:
                h = (info.out_shape[1] - POOL_KERNEL) // POOL_STRIDE + 1
                pooled = n * rows * h * h
                walk.node({current: current_bytes, f"{info.name}.pool.idx": pooled * 8}, 0, pooled * act)
                current, current_bytes = f"{info.name}.pool", pooled * act
            if info.name in FC_NAMES[:2] and spec.dropout > 0:
                walk.node({f"{info.name}.mask": numel}, 0, numel * act)
                current = f"{info.name}.drop"
            previous, previous_out = current, current_bytes
        if k == 0 or distributed:  # the gathered logits (and their fp32 copy), the loss's log-softmax
            logits = n_conv * spec.num_classes  # hybrid: the rows' owner gets them back
            walk.node({"logits": logits * act, "logits32": logits * 4 if precision == "bf16" else 0,
                       "log_softmax": logits * 4}, 0, logits * 4)
        mem.exchange = sum(mem.exchange_by_layer.values())
        mem.activations = sum(walk.saved.values()) - mem.exchange
        mem.gradients = mem.parameters
        mem.optimizer = mem.parameters if momentum else 0
        base = mem.parameters + mem.optimizer + mem.input
        # DistributedRuntime's flat all-reduce buffer (hybrid: of the replicated conv gradients only)
        flat = conv_weights if hybrid else mem.gradients if replicas > 1 else 0
        update = largest if weight_decay and not fused_sgd else 0  # grad + wd * param, one tensor at a time
        mem.peak = max(walk.backward_peak(base), base + mem.gradients + max(flat, update),
                       base + sum(walk.saved.values()))
        out.append(mem)
    return out


def largest_batch(fits, budget: int, limit: int = 1 << 16) -> int:
    """The largest batch ``b`` with ``fits(b) <= budget`` (``fits`` grows with b); 0 when none does."""
    if fits(1) > budget:
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi) <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) <= budget else (lo, mid)
    return lo
