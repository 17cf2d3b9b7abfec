"""Count inductor's CUDA graph recordings, so a run can say whether graphs are re-captured every step.

``train.compile_mode: reduce-overhead`` replays one recorded CUDA graph per step; when input
shapes or static addresses change, inductor records again, and a graph recorded every step
is slower than no graph at all. Inductor announces each recording through dynamo's
compilation callbacks (trigger CUDAGRAPH_RECORDING); this counts them.
"""
from __future__ import annotations


class GraphRecordings:
    """``count``: recordings since construction; ``take()``: recordings since the last take."""

    def __init__(self):
        from torch._dynamo.callback import CallbackTrigger, callback_handler
        self._trigger, self._handler = CallbackTrigger.CUDAGRAPH_RECORDING, callback_handler
        self.count, self._taken = 0, 0
        callback_handler.register_start_callback(self._on_start)

    def _on_start(self, args) -> None:
        if getattr(args, "callback_trigger", None) == self._trigger:
            self.count += 1

    def take(self) -> int:
        new, self._taken = self.count - self._taken, self.count
        return new

    def close(self) -> None:
        self._handler.remove_start_callback(self._on_start)


def describe_recordings(recorded: int, steps: int, on_cuda: bool) -> str:
    """One log line about an epoch's recordings (``steps`` training steps)."""
    if not on_cuda:
        return "CUDA graphs: none (not on CUDA; inductor runs the compiled graph without them)"
    if recorded == 0:
        return (f"CUDA graphs: none recorded in {steps} steps: inductor records no graph whose tensors span "
                "several devices (slots on two GPUs) or that it cannot capture; the compiled graph runs without them")
    if steps > 2 and recorded >= steps // 2:
        return (f"CUDA graphs: {recorded} recorded in {steps} steps: re-captured about every step (shapes or "
                "addresses change), which is slower than none; use train.compile_mode=default")
    return f"CUDA graphs: {recorded} recorded in {steps} steps (recorded once, then replayed)"
