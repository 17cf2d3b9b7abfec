"""Spawn K local processes for a benchmark and read what rank 0 wrote."""
from __future__ import annotations

import json
import os
import socket
import tempfile

import torch.multiprocessing as mp


def spawn_and_read(worker, world: int, *args) -> dict:
    """Run ``worker(rank, world, port, *args, out)`` in ``world`` processes; return rank 0's JSON at ``out``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "rank0.json")
    mp.spawn(worker, args=(world, port, *args, out), nprocs=world, join=True)
    with open(out) as f:
        return json.load(f)
