"""Speed settings for a run, applied once before training: memory format, cuDNN, conv formulations, compile.

Each one leaves the math unchanged (up to floating-point rounding) and is a config switch
recorded in the run's config.yaml:
  train.channels_last    CUDA: NHWC activations and weights, cuDNN's fastest layout
  train.cudnn_benchmark  CUDA: cuDNN times its algorithms once per shape
  train.conv_formulation grouped | split | streams | auto: auto times each per grouped layer on CUDA
                         (streams only when not compiling: torch.compile does not trace stream switches)
  train.compile          torch.compile the model (the local placement's graph has no breaks)
  train.compile_mode     default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
``run.deterministic`` overrides the first two's non-determinism: cuDNN benchmark off,
deterministic algorithms on, so a resumed CUDA run is bitwise exact.
"""
from __future__ import annotations

import os

import torch

from alexnet.config import ConfigError
from alexnet.engine import autocast
from parallel.tuning import choose_conv_formulations


def on_cuda(placement) -> bool:
    return all(s.device.type == "cuda" for s in placement.local_slots)


def set_determinism(deterministic: bool) -> None:
    """Bitwise-repeatable kernels (cuBLAS needs its workspace setting before its first call)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic)


def prepare(model: torch.nn.Module, cfg: dict, placement, batch_shape: tuple[int, ...], say=print, wrap=None):
    """Apply the speed settings to ``model`` (in place); returns the callable to train with.

    ``batch_shape`` is the training batch's (N, C, H, W), used to time conv formulations.
    ``wrap(model)``: what to train instead (DDP for data replicas), wrapped after the formulations
    are timed on the bare model and before it is compiled.
    """
    t = cfg["train"]
    cuda = on_cuda(placement)
    channels_last = cuda and t["channels_last"]
    if cuda and not cfg["run"]["deterministic"]:
        torch.backends.cudnn.benchmark = t["cudnn_benchmark"]
    if channels_last:
        model.to(memory_format=torch.channels_last)
    choice = t["conv_formulation"]
    if choice == "streams" and t["compile"]:
        raise ConfigError("train.conv_formulation=streams runs eagerly (torch.compile does not trace CUDA stream "
                          "switches); with train.compile=true use grouped, split or auto")
    if choice == "auto" and cuda:
        x = torch.randn(batch_shape, device=placement.input_device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def forward_once():
            with autocast(t["precision"], placement.output_device):
                model(x)

        for r in choose_conv_formulations(model, forward_once, eager=not t["compile"]):
            timings = ", ".join(f"{k} {v:.2f} ms" for k, v in r["ms"].items())
            say(f"{r['layer']}: {r['choice']} convolution ({timings}, forward + backward)")
    elif choice != "auto":
        for m in model.modules():
            if hasattr(m, "formulation"):
                m.formulation = choice
    runner = wrap(model) if wrap is not None else model
    if t["compile"]:
        return torch.compile(runner, mode=t["compile_mode"])
    return runner
