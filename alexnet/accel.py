"""Speed settings for a run, applied once before training: memory format, cuDNN, conv formulations, compile.

Each one leaves the math unchanged (up to floating-point rounding) and is a config switch
recorded in the run's config.yaml:
  train.channels_last    NHWC activations and weights: true | false | auto (CUDA: true, cuDNN's fastest
                         layout; CPU in one process: forward + backward timed in both layouts, the faster kept)
  train.cudnn_benchmark  CUDA: cuDNN times its algorithms once per shape
  train.conv_formulation grouped | split | streams | auto: auto times each per grouped layer, in each layout
                         (streams only on CUDA when not compiling: torch.compile does not trace stream switches)
  train.cpu_keep_freed   CPU: glibc keeps freed memory for the next step instead of returning it to the OS
  train.compile          torch.compile the model (the local placement's graph has no breaks)
  train.compile_mode     default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
``run.deterministic`` overrides the first two's non-determinism: cuDNN benchmark off,
deterministic algorithms on, so a resumed CUDA run is bitwise exact.
"""
from __future__ import annotations

import ctypes
import os

import torch

from alexnet.config import ConfigError
from alexnet.engine import autocast
from parallel.runtime import LocalRuntime
from parallel.tuning import apply_formulations, choose_conv_formulations, choose_memory_format, formulations_of


def on_cuda(placement) -> bool:
    return all(s.device.type == "cuda" for s in placement.local_slots)


def set_determinism(deterministic: bool) -> None:
    """Bitwise-repeatable kernels (cuBLAS needs its workspace setting before its first call)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (process-wide; what ``train.cpu_keep_freed`` asks).

    By default glibc hands every block above 128 KiB back to the OS when it is freed (mmap
    threshold) and trims the heap top, so each large temporary of a CPU step (most activations
    are 0.5-5 MB) is fresh memory, paid for in page faults and zero-fills: one LRN forward +
    backward took 20.6 ms so, 12.0 ms with the blocks kept. Raising both thresholds keeps the
    step's working set mapped. Returns False where the C library is not glibc (nothing done)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    keep = 1 << 30
    return bool(mallopt(M_TRIM_THRESHOLD, keep)) and bool(mallopt(M_MMAP_THRESHOLD, keep))


def _total(output) -> torch.Tensor:
    """A scalar to differentiate from whatever the model returns (a tensor, or a parallel.Sharded's parts)."""
    parts = getattr(output, "parts", None)
    return sum(p.float().sum() for p in parts) if parts is not None else output.float().sum()


def prepare(model: torch.nn.Module, cfg: dict, placement, batch_shape: tuple[int, ...], say=print, wrap=None,
            runtime=None, decided: dict | None = None) -> tuple:
    """Apply the speed settings to ``model`` (in place); returns (the callable to train with, the choices).

    The choices, ``{"channels_last": bool, "formulations": {layer: formulation}}``, go into every
    checkpoint: a resumed run passes them back as ``decided`` and computes with exactly what it
    computed before (a new timing could choose otherwise, and round otherwise).
    ``batch_shape`` is the training batch's (N, C, H, W), used to time layouts and conv formulations.
    ``wrap(model)``: what to train instead (DDP for data replicas), wrapped after the formulations
    are timed on the bare model and before it is compiled. ``runtime``: the run's. On the CPU
    only one process times (LocalRuntime); under torchrun each rank would time, and choose, for
    itself while one checkpoint holds rank 0's choices, so CPU ranks keep NCHW and grouped
    convolutions. CUDA keeps its rules: NHWC, and formulations timed per rank.
    """
    t = cfg["train"]
    cuda = on_cuda(placement)
    if cuda and not cfg["run"]["deterministic"]:
        torch.backends.cudnn.benchmark = t["cudnn_benchmark"]
    if not cuda and t["cpu_keep_freed"] and not keep_freed_memory():
        say("train.cpu_keep_freed: this C library is not glibc; memory is handled as it is by default")
    choice = t["conv_formulation"]
    if choice == "streams" and t["compile"]:
        raise ConfigError("train.conv_formulation=streams runs eagerly (torch.compile does not trace CUDA stream "
                          "switches); with train.compile=true use grouped, split or auto")
    one_process = isinstance(runtime or LocalRuntime(), LocalRuntime)
    if choice == "auto" and not cuda and not one_process:
        choice = "grouped"
    if choice != "auto":
        apply_formulations(model, choice)
    layout = t["channels_last"]
    timed_layout = layout == "auto" and not cuda and one_process
    if layout == "auto" and not timed_layout:
        layout = cuda  # CUDA: cuDNN's NHWC; CPU under torchrun: every rank the same, untimed
    x = torch.randn(batch_shape, device=placement.input_device)

    def as_layout(channels_last: bool) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x

    def tune(channels_last: bool) -> dict:
        """This layout's conv formulations: timed per grouped layer when auto, else as configured."""
        if choice != "auto":
            return {}

        def forward_once():
            with autocast(t["precision"], placement.output_device):
                model(as_layout(channels_last))

        records = choose_conv_formulations(model, forward_once, eager=not t["compile"])
        for r in records:
            timings = ", ".join(f"{k} {v:.2f} ms" for k, v in r["ms"].items())
            where = f" ({'NHWC' if channels_last else 'NCHW'})" if timed_layout else ""  # both layouts are timed
            say(f"{r['layer']}{where}: {r['choice']} convolution ({timings}, forward + backward)")
        return {r["layer"]: r["choice"] for r in records}

    if decided is not None:
        layout = decided["channels_last"]
        model.to(memory_format=torch.channels_last if layout else torch.contiguous_format)
        apply_formulations(model, decided["formulations"])
        say(f"layout and convolutions as the checkpoint's run chose them: {'NHWC' if layout else 'NCHW'}"
            + "".join(f", {k} {v}" for k, v in decided["formulations"].items()))
    elif timed_layout:
        def forward_backward(channels_last: bool) -> None:
            with autocast(t["precision"], placement.output_device):
                out = model(as_layout(channels_last))
            _total(out).backward()

        record = choose_memory_format(model, forward_backward, tune)
        layout = record["choice"]
        timings = ", ".join(f"{'NHWC' if k else 'NCHW'} {v:.1f} ms" for k, v in record["ms"].items())
        say(f"layout: {'NHWC (channels_last)' if layout else 'NCHW'} ({timings}, forward + backward)")
    else:
        if layout:
            model.to(memory_format=torch.channels_last)
        was_training = model.training
        model.eval()  # a timing forward draws no dropout mask and moves no running statistic
        try:
            tune(layout)
        finally:
            model.train(was_training)
    choices = {"channels_last": bool(layout), "formulations": formulations_of(model)}
    runner = wrap(model) if wrap is not None else model
    if t["compile"]:
        return torch.compile(runner, mode=t["compile_mode"]), choices
    return runner, choices
