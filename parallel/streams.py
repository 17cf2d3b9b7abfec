"""k independent computations on k CUDA streams of one device, handed over by events.

A slot holding k groups can run its k dense convolutions concurrently: group g's on side
stream g. The caller's (current) stream records an event that every side stream waits on
before reading its inputs, and then waits on an event of every side stream before it reads
the outputs: all waits are on the device, none on the host. Autograd runs each backward
op on the stream of its forward op and inserts the same kind of waits, so the backward
convolutions overlap too. This is what BVLC Caffe did with one cuDNN stream per group
(pytorch/pytorch#73764 measures a grouped convolution slower than n dense ones on n
streams). Whether it pays is measured per layer (``parallel.tuning``), never assumed.

On a CPU tensor there are no streams: the k computations run one after another, in order,
through the same function (so the formulation is the same math everywhere).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class SideStreams:
    """k side streams per CUDA device, created on first use and reused (creating one is costly)."""

    def __init__(self):
        self._by_device: dict[torch.device, list[torch.cuda.Stream]] = {}

    def get(self, device: torch.device, k: int) -> list | None:
        """k streams of ``device``; None on a device without streams (CPU)."""
        if device.type != "cuda":
            return None
        have = self._by_device.setdefault(device, [])
        while len(have) < k:
            have.append(torch.cuda.Stream(device))
        return have[:k]


def run_on_streams(work: Sequence[Callable[[], torch.Tensor]], streams: list | None,
                   main=None, enter: Callable = None) -> list[torch.Tensor]:
    """[work[g]() for g], work g on ``streams[g]``; returns once the caller's stream may use every result.

    ``main`` is the caller's stream (default: the current stream of the first stream's
    device) and ``enter(stream)`` the context that makes a stream current (default
    ``torch.cuda.stream``); both are parameters so the hand-over order can be tested on CPU.
    """
    if streams is None:
        return [w() for w in work]
    if len(streams) < len(work):
        raise ValueError(f"{len(work)} computations need as many streams, got {len(streams)}")
    main = main if main is not None else torch.cuda.current_stream(streams[0].device)
    enter = enter if enter is not None else torch.cuda.stream
    outs = []
    for w, side in zip(work, streams):
        side.wait_stream(main)  # the inputs main wrote are ready before side reads them
        with enter(side):
            outs.append(w())
    for out, side in zip(outs, streams):
        main.wait_stream(side)
        # side allocated out; main reads it: the allocator must not hand its memory back to side
        # until main's pending reads are done
        out.record_stream(main)
    return outs
