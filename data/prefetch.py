"""Prepare the next batches in a background thread, on a CUDA stream of their own.

Decoding a batch (nvJPEG) and transforming it costs host time (Python, kernel launches,
the decoder's own synchronisation); done in the training loop's thread it would stall
the queue of training kernels. Here a thread runs the batch iterator under a side
stream and hands over each finished batch with an event; the training stream waits on
the event (on the GPU, not on the host), and ``record_stream`` tells the caching
allocator the batch is used there. Order and content are those of the iterator.
"""
from __future__ import annotations

import contextlib
import queue
import threading

import torch

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def in_background(make_iterator, device: torch.device, depth: int = 3):
    """Yield what ``make_iterator()`` yields (tuples of tensors), prepared up to ``depth`` batches ahead."""
    device = torch.device(device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            if stream is not None:
                # a new thread starts on device 0: without this, leaving the stream context below makes
                # device 0 current and puts a CUDA context on GPU 0 in every rank above 0
                torch.cuda.set_device(device)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for batch in make_iterator():
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not put((batch, event)):
                        return
            put(_END)
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer's thread)
            put(_Failure(e))

    thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            batch, event = item
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in batch:
                    if isinstance(t, torch.Tensor) and t.is_cuda:
                        t.record_stream(current)
            yield batch
    finally:
        stop.set()  # a loop that stops early (pre-emption) lets the thread finish
        thread.join(timeout=10)
