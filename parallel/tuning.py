"""Measure, per grouped convolution, which formulation is fastest, and use it.

A slot holding k > 1 groups can compute ``Y = conv(X, W, groups=k)`` as one grouped call,
as k dense convolutions on the k channel blocks, concatenated, or as those k on k CUDA
streams (``GroupConv2d.FORMULATIONS``); the math is the same. Which is faster depends on
the device, dtype, memory format and shapes: fewer multiply-accumulates only buy time when the kernel that
does them is fast. So, before training, one forward pass records each grouped layer's
input, and every formulation of that layer is timed (forward + backward) on it; the
fastest wins. Results are cached per (device, dtype, memory format, shapes) in the
``cache`` dict the caller passes, so a second model with the same shapes costs nothing.
"""
from __future__ import annotations

import time

import torch

from parallel.layers import GroupConv2d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_fwd_bwd(layer: GroupConv2d, x: torch.Tensor, w, b, k: int, repeats: int) -> float:
    """Median seconds of forward + backward of one slot's convolution."""
    times = []
    for i in range(repeats + 2):  # the first two calls pick cuDNN algorithms and warm the allocator
        _sync(x.device)
        start = time.perf_counter()
        y = layer._conv(x, w, b, k)
        y.backward(torch.ones_like(y))
        _sync(x.device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _key(layer: GroupConv2d, x: torch.Tensor, k: int) -> tuple:
    fmt = "channels_last" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else "contiguous"
    return (str(x.device), str(x.dtype), fmt, tuple(x.shape), k, tuple(layer.weights[0].shape), layer.stride,
            layer.padding, layer.dilation, layer._bias(0) is not None)


def choose_conv_formulations(model: torch.nn.Module, run_forward, cache: dict | None = None,
                             repeats: int = 5, eager: bool = True) -> list[dict]:
    """Set ``formulation`` on every GroupConv2d whose slots hold several groups.

    ``run_forward()`` runs the model once on a representative batch, under the autocast
    and memory format training will use; ``eager=False`` (the model will be compiled) leaves
    the streams formulation out. Returns one record per decided layer:
    ``{"layer", "choice", "ms": {formulation: milliseconds}, "cached"}``.
    """
    cache = {} if cache is None else cache
    layers = [m for m in model.modules() if isinstance(m, GroupConv2d) and max(m.slot_conv_groups) > 1]
    if not layers:
        return []
    seen: dict[GroupConv2d, list[torch.Tensor]] = {}

    def remember_input(module, args, output) -> None:  # a hook that returned a value would replace the output
        seen.setdefault(module, args[0])

    hooks = [m.register_forward_hook(remember_input) for m in layers]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in hooks:
            h.remove()
    records = []
    for layer in layers:
        inputs = layer._inputs(seen[layer])
        # slot 0 stands for all: slots hold equal group counts and equal shapes
        x = inputs[0].detach().requires_grad_(True)
        # weights in the activation's dtype: what autocast hands the convolution
        w = layer.weights[0].detach().clone().to(x.dtype).requires_grad_(True)
        b = layer._bias(0)
        b = b.detach().clone().to(x.dtype).requires_grad_(True) if b is not None else None
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            w = w.detach().to(memory_format=torch.channels_last).requires_grad_(True)
        k = layer.slot_conv_groups[0]
        candidates = GroupConv2d.formulations_for(x.device, eager)
        key = (*_key(layer, x, k), candidates)
        cached = key in cache
        if not cached:
            ms = {}
            for f in candidates:
                layer.formulation = f
                ms[f] = 1000 * _time_fwd_bwd(layer, x, w, b, k, repeats)
            cache[key] = ms
        ms = cache[key]
        layer.formulation = min(ms, key=ms.get)
        records.append({"layer": layer.name, "choice": layer.formulation, "ms": dict(ms), "cached": cached})
    return records


def apply_formulations(model: torch.nn.Module, choice) -> None:
    """Set every GroupConv2d's formulation: one name for all, or ``{layer name: formulation}``."""
    for m in model.modules():
        if isinstance(m, GroupConv2d):
            if isinstance(choice, str):
                m.formulation = choice
            elif m.name in choice:
                m.formulation = choice[m.name]


def formulations_of(model: torch.nn.Module) -> dict[str, str]:
    """``{layer name: formulation}`` of every GroupConv2d whose slots hold several groups (where it matters)."""
    return {m.name: m.formulation for m in model.modules()
            if isinstance(m, GroupConv2d) and max(m.slot_conv_groups) > 1}


def _memory_format(model: torch.nn.Module, channels_last: bool) -> None:
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def choose_memory_format(model: torch.nn.Module, forward_backward, tune=None, rounds: int = 3) -> dict:
    """Keep ``model`` in whichever memory format, NCHW or NHWC (channels_last), trains it faster.

    ``forward_backward(channels_last)`` runs one forward and backward on a representative
    batch in that format; ``tune(channels_last)`` (optional) picks the format's conv
    formulations and returns them (``{layer: formulation}``). Rounds alternate the formats,
    so the machine's drift hits both alike, and the median round decides. The model is timed
    in eval mode (no dropout draw or running statistic moves), its gradients are cleared
    afterwards and no parameter changes value: only where its weights lie in memory.
    Returns ``{"choice": channels_last, "ms": {False: ms, True: ms}, "formulations": ...}``.
    """
    was_training = model.training
    model.eval()
    formats = (False, True)
    formulations, times = {}, {f: [] for f in formats}
    try:
        for f in formats:
            _memory_format(model, f)
            formulations[f] = tune(f) if tune is not None else {}
        for i in range(rounds + 1):  # the first round warms both up and is not counted
            for f in formats:
                _memory_format(model, f)
                apply_formulations(model, formulations[f])
                start = time.perf_counter()
                forward_backward(f)
                if i:
                    times[f].append(time.perf_counter() - start)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    ms = {f: 1000 * sorted(v)[len(v) // 2] for f, v in times.items()}
    best = min(ms, key=ms.get)
    _memory_format(model, best)
    apply_formulations(model, formulations[best])
    return {"choice": best, "ms": ms, "formulations": formulations[best]}
