"""What the benchmark scripts share: the geometries they time, and spawning K local ranks."""
from __future__ import annotations

import json
import os
import tempfile

import torch.multiprocessing as mp

# train.py's configs for the paper's 227x227 AlexNet and the Fashion-MNIST one, by G
GEOMETRIES = {"paper": "configs/imagenet/g{G}.yaml", "fashion_mnist": "configs/fashion_mnist/g{G}.yaml"}


def spawn_and_read(worker, world: int, *args) -> dict:
    """Run ``worker(rank, world, store, *args, out)`` in ``world`` processes; return rank 0's JSON at ``out``.

    ``store`` is a fresh FileStore path for ``parallel.distributed.join_spawned_world``.
    """
    folder = tempfile.mkdtemp()
    out, store = os.path.join(folder, "rank0.json"), os.path.join(folder, "store")
    mp.spawn(worker, args=(world, store, *args, out), nprocs=world, join=True)
    with open(out) as f:
        return json.load(f)
