"""One epoch of training, and evaluation: flat functions over a model, a loader and a placement.

The placement supplies the few things that differ between one process and torchrun:
where the batch goes, gradient averaging over data replicas, and metric reduction.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from parallel.dropout import dropout_layers, set_draws


def topk_wrong(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is not among the top-k logits, for each k (device tensors)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(labels[:, None])
    return [(~hit[:, :min(k, kmax)].any(dim=1)).sum() for k in ks]


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing after the last good checkpoint is saved."""


def to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """The batch on the model's input device, NHWC in memory when asked (cuDNN's fast layout)."""
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


@dataclass
class Trainer:
    """What one training step needs: the callable to train (compiled or not), its optimizer, where it runs.

    ``diverged`` is a device flag set when a loss is not finite; the host reads it only
    where it reads anyway (log steps, the end of an epoch), so a step never waits on it.
    """
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    placement: object
    runtime: object
    precision: str = "fp32"
    channels_last: bool = False
    seed: int = 0
    memory: object = None  # alexnet.memwatch.MemoryWatch: wraps each step (CPU: the first one is tracked)
    choices: dict | None = None  # the layout and conv formulations chosen at start-up (checkpointed)
    diverged: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.diverged = torch.zeros((), dtype=torch.bool, device=self.placement.output_device)


def train_step(t: Trainer, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss, backward, gradient sync over replicas, NaN guard, optimizer step: (loss, logits).

    train.py's step, and the one scripts/benchmark.py and scripts/exchange_benchmark.py time.
    ``images`` and ``labels`` are already on the input and output devices.
    """
    with autocast(t.precision, t.placement.output_device):
        logits = t.model(images)
    loss = F.cross_entropy(logits.float(), labels)
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t.runtime.sync_gradients(t.model.parameters(), rows=labels.shape[0])
    t.optimizer.step()
    with torch.no_grad():
        t.diverged |= ~torch.isfinite(loss.detach())
    return loss, logits


@dataclass
class EpochHooks:
    """How an epoch reports and stops: a progress bar, ``on_log(step, loss, lr)`` every ``log_every``
    steps, and ``should_stop()`` (pre-emption), voted on by every rank."""
    progress: object = None
    on_log: Callable | None = None
    log_every: int = 50
    should_stop: Callable[[], bool] = lambda: False


def train_one_epoch(t: Trainer, loader, schedule, epoch: int, step: int, hooks: EpochHooks | None = None,
                    carry: dict | None = None) -> dict:
    """``train_step`` over the loader; returns epoch metrics and the new global step.

    The host reads the loss only every ``hooks.log_every`` steps, so GPU groups never wait on it;
    the loss it logs there is the global batch's mean (summed over replicas), and a loss
    that is not finite on any replica stops every replica there. Dropout draws from
    (seed, step, global row, global feature) (``parallel.dropout``): the same masks under
    every placement.
    ``carry`` holds the sums of an epoch interrupted earlier (resume mid-epoch). When
    ``should_stop()`` turns true on any rank, every rank stops after the same step: each
    step starts a vote that the next step reads, so no step waits for the others.
    """
    hooks = hooks or EpochHooks()
    model, optimizer, placement, runtime = t.model, t.optimizer, t.placement, t.runtime
    model.train()
    device = placement.output_device
    carry = carry or {"sums": [0.0] * 4, "seen": 0, "train_s": 0.0}
    # loss*n, top1 wrong, top5 wrong, n. A carried partial epoch is already summed over
    # replicas, so only replica 0 starts from it.
    sums = torch.tensor(carry["sums"] if runtime.replica == 0 else [0.0] * 4, device=device, dtype=torch.float64)
    seen = carry["seen"]
    stopped = False
    vote = None
    comm_bytes = None
    drops = dropout_layers(model)
    row_exchange = row_exchange_of(model)  # the hybrid's: told each step's row counts by the sampler
    first_batch = loader.sampler.skip if hasattr(loader, "sampler") else 0
    start = time.perf_counter()
    for batch_index, (images, labels) in enumerate(loader, start=first_batch):
        set_draws(drops, t.seed, step, row_offset(loader, batch_index, runtime))
        if hasattr(loader, "sampler") and runtime.num_replicas > 1:  # the step's rows, known from the sampler
            rows = loader.sampler.replica_rows(batch_index)
            runtime.plan_rows(rows)
            if row_exchange is not None:
                row_exchange.plan(rows)
        lr = schedule.lr(step, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = to_input(images, placement.input_device, t.channels_last)
        labels = labels.to(device, non_blocking=True)
        with t.memory.step() if t.memory is not None else contextlib.nullcontext():
            loss, logits = train_step(t, images, labels)
        with torch.no_grad():
            wrong1, wrong5 = topk_wrong(logits, labels)
            n = labels.shape[0]
            # Python scalars go into the kernels as arguments: no host-to-device copy per step.
            sums[0] += loss.detach().double() * n
            sums[1] += wrong1
            sums[2] += wrong5
            sums[3] += n
        seen += images.shape[0]
        step += 1
        if comm_bytes is None:
            # the exchange volume of a full batch (an epoch's last batch may be smaller)
            comm_bytes = placement.counter.total()
        if step % hooks.log_every == 0:
            report_step(t, hooks, step, lr, loss, n, sums)
        if hooks.progress:
            hooks.progress.update(1)
        if vote is not None and vote():
            stopped = True
            break
        vote = runtime.any_rank_async(hooks.should_stop())
    else:
        # the last vote is read too, so every rank takes part in the same collectives
        stopped = vote is not None and vote()
    for slot_device in {s.device for s in placement.local_slots} | {device}:  # every slot's work is in the time
        if slot_device.type == "cuda":
            torch.cuda.synchronize(slot_device)
    elapsed = carry["train_s"] + time.perf_counter() - start
    sums = runtime.all_reduce_sum(sums)
    if not torch.isfinite(sums).all():
        raise TrainingDiverged(f"the training loss became NaN or infinite in this epoch (by step {step})")
    return {"train_loss": (sums[0] / sums[3]).item(), "train_top1_err": 100.0 * (sums[1] / sums[3]).item(),
            "train_top5_err": 100.0 * (sums[2] / sums[3]).item(),
            "images_per_s": seen * runtime.num_replicas / elapsed, "train_s": elapsed, "step": step,
            "comm_bytes_per_step": comm_bytes or 0, "stopped": stopped,
            "partial": {"sums": sums.tolist(), "seen": seen, "train_s": elapsed}}


def report_step(t: Trainer, hooks: EpochHooks, step: int, lr: float, loss: torch.Tensor, n: int,
                sums: torch.Tensor) -> None:
    """A log step: one small all-reduce where the host reads anyway (the global batch's loss and any
    replica's NaN flag), then ``hooks.on_log`` and the progress bar's running loss."""
    loss_sum, rows, bad = t.runtime.all_reduce_sum(
        torch.stack([loss.detach().double() * n, sums.new_tensor(float(n)), t.diverged.double()])).tolist()
    if bad:
        raise TrainingDiverged(f"the training loss became NaN or infinite by step {step} (lr {lr:.3g})")
    if hooks.on_log:
        hooks.on_log(step, loss_sum / rows, lr)
    if hooks.progress:
        hooks.progress.set_postfix(loss=f"{(sums[0] / sums[3]).item():.4f}", lr=f"{lr:.3g}")


def row_exchange_of(model: torch.nn.Module):
    """The hybrid placement's row exchange of ``model``, or None; found through any wrapper (DDP's
    ``module``, torch.compile's ``_orig_mod``), which do not pass attribute reads on alike."""
    return next((m.rows for m in model.modules() if getattr(m, "rows", None) is not None), None)


def row_offset(loader, batch_index: int, runtime) -> int:
    """The global batch row where this replica's rows of batch ``batch_index`` start."""
    if runtime.num_replicas == 1:
        return 0
    return loader.sampler.row_offset(batch_index)


@torch.no_grad()
def evaluate(t: Trainer, loader) -> dict:
    """Top-1/top-5 error (percent) and loss over the whole loader; 10-crop batches are averaged."""
    model, placement, runtime, precision, channels_last = t.model, t.placement, t.runtime, t.precision, t.channels_last
    model.eval()
    device = placement.output_device
    sums = torch.zeros(4, device=device, dtype=torch.float64)
    for images, labels in loader:
        crops = images.shape[1] if images.ndim == 5 else 1
        if crops > 1:
            images = images.flatten(0, 1)
        images = to_input(images, placement.input_device, channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model(images).float()
        if crops > 1:
            logits = logits.softmax(-1).view(-1, crops, logits.shape[-1]).mean(1).log()
        loss = F.cross_entropy(logits, labels, reduction="sum")
        wrong1, wrong5 = topk_wrong(logits, labels)
        sums[0] += loss.double()
        sums[1] += wrong1
        sums[2] += wrong5
        sums[3] += labels.shape[0]
    sums = runtime.all_reduce_sum(sums)
    n = sums[3].item()
    return {"val_loss": (sums[0] / n).item(), "val_top1_err": 100.0 * (sums[1] / n).item(),
            "val_top5_err": 100.0 * (sums[2] / n).item(), "val_samples": int(n)}
