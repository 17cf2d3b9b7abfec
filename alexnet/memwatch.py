"""Memory per device measured in a run, and over one step for the tests and scripts.

On CUDA the headline figure is the caching allocator's peak per device
(``torch.cuda.max_memory_allocated``), reset at each epoch's start and read at its end: no
cost per step. On CPU (no allocator statistics) torch's own tracker does it:
``torch.distributed._tools.mem_tracker.MemTracker``, a TorchDispatchMode that attributes
every tensor to parameter, gradient, optimizer state, activation or temporary, per device,
runs over the first training step this process takes; the figure is that one step's, and
the run says so. Slots of one process that share a device are reported together (the
tracker, like the allocator, counts per device); each torchrun rank reports its own.
"""
from __future__ import annotations

import contextlib
import os

import torch

MIB = 2 ** 20
#: steps ``train.memory_snapshot`` records (the first one allocates the optimizer state)
SNAPSHOT_STEPS = 3
#: MemTracker's reference types -> this project's category names
CATEGORY = {"Parameter": "parameters", "Gradient": "gradients", "Optstate": "optimizer", "Activation": "activations",
            "Temp": "temporary", "Buffer": "buffers", "Other": "other", "Total": "total"}


def mem_tracker_class():
    """torch's MemTracker, or None where this torch has none (the run then says it is not measured)."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None
    return MemTracker


def _named(snapshot: dict) -> dict[str, dict[str, int]]:
    """MemTracker's {device: {_MemRefType | 'Total': bytes}} as {'cpu': {'parameters': bytes, ..., 'total': bytes}}."""
    out = {}
    for device, cats in snapshot.items():
        out[str(device)] = {CATEGORY.get(getattr(k, "value", k), str(k)): v for k, v in cats.items()}
    return out


class StepTracker:
    """MemTracker over one step of ``model`` with ``optimizer``: ``with tracker: ...``, then ``peak``
    (per device, by category, at the step's largest total); ``mark(name)`` inside the step keeps the
    categories as they are at that point (``mark("forward")`` after the forward pass)."""

    def __init__(self, model: torch.nn.Module, optimizer=None):
        cls = mem_tracker_class()
        if cls is None:
            raise RuntimeError("this torch has no torch.distributed._tools.mem_tracker.MemTracker")
        self.tracker = cls()
        self.tracker.track_external(model, *([optimizer] if optimizer is not None else []))
        self.marks: dict[str, dict[str, dict[str, int]]] = {}
        self.peak: dict[str, dict[str, int]] = {}

    def __enter__(self):
        self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        self.peak = _named(self.tracker.get_tracker_snapshot("peak"))
        return self.tracker.__exit__(*exc)

    def mark(self, name: str) -> None:
        self.marks[name] = _named(self.tracker.get_tracker_snapshot("current"))


class MemoryWatch:
    """A run's memory per device: ``step()`` wraps each training step, ``start_epoch()`` and ``peaks()``
    bracket an epoch. ``peaks()`` is a collective under torchrun (every rank's figures reach every rank).

    ``peaks()`` -> {label: MiB or None}; ``how`` says what was measured. Labels are the devices of
    this process's slots (``cuda:0``, ``cpu``), or ``rank<r>`` under torchrun.
    """

    def __init__(self, placement, runtime, model, optimizer, compiled: bool = False, distributed: bool = False,
                 snapshot_path: str | None = None):
        self.runtime, self.model, self.optimizer, self.distributed = runtime, model, optimizer, distributed
        self.snapshot_path, self.snapshot_steps = snapshot_path, 0
        self.devices = list(dict.fromkeys([s.device for s in placement.local_slots] + [placement.output_device]))
        self.cuda = all(d.type == "cuda" for d in self.devices)
        self.tracked: dict[str, int] | None = None  # CPU: the tracked step's peak per device
        self.how = "allocator peak per device, this epoch (torch.cuda.max_memory_allocated)"
        self.unmeasured = None
        if not self.cuda:
            if compiled:
                self.unmeasured = "not measured: MemTracker does not trace a compiled model (train.compile on CPU)"
            elif mem_tracker_class() is None:
                self.unmeasured = "not measured: this torch has no MemTracker"
            self.how = self.unmeasured or "MemTracker over one step, this process's first (CPU)"

    def step(self):
        """The context of one training step: on CPU the first one is tracked, every other one runs as it is
        (on CUDA with ``snapshot_path``, the first ``SNAPSHOT_STEPS`` record the allocator's history)."""
        if self.cuda and self.snapshot_path and self.snapshot_steps < SNAPSHOT_STEPS:
            return self._recorded_step()
        if self.cuda or self.unmeasured or self.tracked is not None:
            return contextlib.nullcontext()
        return self._tracked_step()

    @contextlib.contextmanager
    def _recorded_step(self):
        """torch.cuda.memory's history of the first steps, dumped (atomically) for the memory viewer."""
        if self.snapshot_steps == 0:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        yield
        self.snapshot_steps += 1
        if self.snapshot_steps == SNAPSHOT_STEPS:
            tmp = f"{self.snapshot_path}.tmp.{os.getpid()}"
            torch.cuda.memory._dump_snapshot(tmp)
            os.replace(tmp, self.snapshot_path)
            torch.cuda.memory._record_memory_history(enabled=None)

    @contextlib.contextmanager
    def _tracked_step(self):
        tracker = StepTracker(self.model, self.optimizer)
        with tracker:
            yield
        self.tracked = {device: cats["total"] for device, cats in tracker.peak.items()}

    def start_epoch(self) -> None:
        if self.cuda:
            for d in self.devices:
                torch.cuda.reset_peak_memory_stats(d)

    def _mine(self) -> dict[str, float | None]:
        if self.cuda:
            return {str(d): torch.cuda.max_memory_allocated(d) / MIB for d in self.devices}
        if self.tracked is None:
            return {str(d): None for d in self.devices}
        return {str(d): self.tracked.get(str(d), 0) / MIB for d in self.devices}

    def peaks(self) -> dict[str, float | None]:
        mine = self._mine()
        if not self.distributed:
            return mine
        everyone = self.runtime.all_gather_object(list(mine.values())[0])
        return {f"rank{r}": value for r, value in enumerate(everyone)}


def describe(peaks: dict[str, float | None]) -> str:
    """'peak cuda:0 812 MiB, cuda:1 790 MiB' (or 'not measured')."""
    shown = [f"{label} {value:.0f} MiB" for label, value in peaks.items() if value is not None]
    return "peak " + ", ".join(shown) if shown else "peak memory not measured"


def measure_step(model, optimizer, images: torch.Tensor, labels: torch.Tensor, runtime=None,
                 precision: str = "fp32") -> dict[str, dict[str, dict[str, int]]]:
    """One SGD step (forward, loss, backward, gradient sync, update) under MemTracker, after one untracked
    step so the momentum buffers exist, as in every step but a run's first.

    Returns {"forward": per device by category right after the forward pass (what is held for
    backward), "peak": per device by category at the step's largest total}; bytes.
    """
    import torch.nn.functional as F

    from alexnet.engine import autocast

    device = labels.device

    def step(tracker=None):
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        if tracker is not None:
            tracker.mark("forward")
        loss.backward()
        if runtime is not None:
            runtime.sync_gradients(model.parameters(), rows=labels.shape[0])
        optimizer.step()

    step()
    with StepTracker(model, optimizer) as tracker:
        step(tracker)
    return {"forward": tracker.marks["forward"], "peak": tracker.peak}
