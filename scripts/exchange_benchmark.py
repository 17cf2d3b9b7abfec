"""Communication per training step: all-gather vs channel shuffle (all-to-all) vs the hybrid placement.

For each world size K (default 2 and 4; G = K groups, the Fashion-MNIST geometry unless
--geometry paper) it runs, one process per rank (gloo on CPU, NCCL on GPUs when there are
K of them), forward + backward + gradient sync + SGD step on the same global batch for:
  all-gather  the paper's exchange: conv3, fc6, fc7, fc8 all-gather every group's maps
  shuffle     conv3 takes the channel shuffle (one all-to-all) instead of the all-gather
  hybrid      convs data-parallel (1/K of the batch per rank, weights all-reduced), fc layers
              split over the ranks (rows all-gathered before fc6, logits back by all-to-all)
and prints ms per step, the wall time inside the collectives (synchronised around each
one, so it is an upper bound on what overlapping could hide) and the bytes all processes
receive per step (the counter's rule; for hybrid plus the conv gradients' all-reduce,
2 (K-1) x their size as a ring moves it). Variants alternate in rounds; the median counts.

  python scripts/exchange_benchmark.py --steps 5 --rounds 3
  python scripts/benchmark.py --exchanges            # the same, from the main benchmark
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from benchlib import GEOMETRIES, spawn_and_read

VARIANTS = ("all-gather", "shuffle", "hybrid")


def _variant(name: str, world: int, rank: int, geometry: str, backend: str, x: torch.Tensor, y: torch.Tensor):
    """(Trainer, this rank's images, its labels, the timed counter) for one variant, built by train.py's code."""
    from alexnet.build import Where, placement_from_config
    from alexnet.config import load
    from alexnet.engine import Trainer
    from alexnet.fit import build_run
    from parallel import CommCounter
    from parallel.hybrid import init_hybrid_from_env
    from parallel.roles import split_over
    counter = CommCounter(timed=True)
    cfg = load(GEOMETRIES[geometry].format(G=world), [
        "model.dropout=0.0", f"parallel.backend={backend}",
        "parallel.placement=" + ("hybrid" if name == "hybrid" else "distributed")] +
        (["model.exchange.conv3=shuffle"] if name == "shuffle" else []))
    if name != "hybrid":  # train.py's distributed placement; every rank reads the whole batch
        _, placement, runtime, model, optimizer = build_run(cfg, placement_from_config(cfg, counter=counter))
        return Trainer(model, optimizer, placement, runtime), x, y, counter
    # train.py's hybrid; its conv groups, which share this rank's device, count into a counter of their own:
    # their exchange is no traffic between processes
    conv, fc, rows, runtime = init_hybrid_from_env(world, backend, counter=counter, conv_counter=CommCounter())
    _, placement, runtime, model, optimizer = build_run(cfg, Where(conv, runtime, fc, rows))
    # the conv weights' gradient all-reduce, as a ring moves it: every rank receives 2 (K-1)/K of them
    conv_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if split_over(p) is None)
    counter.record("conv_grad_allreduce", 0, 2 * (world - 1) * conv_bytes)
    mine = torch.tensor_split(torch.arange(x.shape[0]), world)[rank]
    return Trainer(model, optimizer, placement, runtime), x[mine], y[mine], counter


def _worker(rank: int, world: int, store: str, geometry: str, batch: int, steps: int, rounds: int, backend: str,
            out: str):
    """One rank: every variant built, then timed in alternating rounds; rank 0 writes the medians to ``out``."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torch.distributed as dist

    from alexnet.build import spec_from_config
    from alexnet.config import load
    from alexnet.engine import train_step
    from parallel.distributed import init_process_group_from_env, join_spawned_world
    join_spawned_world(rank, world, store, backend)
    device, _, _, _ = init_process_group_from_env(backend)
    spec = spec_from_config(load(GEOMETRIES[geometry].format(G=world)))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec.in_channels, spec.input_size, spec.input_size, generator=gen).to(device)
    y = torch.randint(0, spec.num_classes, (batch,), generator=gen).to(device)
    runs = {name: _variant(name, world, rank, geometry, backend, x, y) for name in VARIANTS}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    for trainer, inputs, labels, _ in runs.values():  # warm-up
        train_step(trainer, inputs, labels)
    times = {name: [] for name in VARIANTS}
    comm = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, (trainer, inputs, labels, counter) in runs.items():
            counter.seconds = 0.0
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                train_step(trainer, inputs, labels)
            sync()
            times[name].append((time.perf_counter() - start) / steps)
            comm[name].append(counter.seconds / steps)
    if rank == 0:
        result = {name: {"step_ms": 1000 * statistics.median(times[name]),
                         "comm_ms": 1000 * statistics.median(comm[name]),
                         "mb_per_step": runs[name][3].total() / 1e6,
                         "bytes_by_layer": runs[name][3].snapshot()} for name in VARIANTS}
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def run(worlds: list[int], geometry: str, batch: int, steps: int, rounds: int, device: str) -> list[dict]:
    cuda = device == "cuda"
    rows = []
    for world in worlds:
        if cuda and torch.cuda.device_count() < world:
            print(f"  exchanges world={world}: skipped, {torch.cuda.device_count()} GPU(s)")
            continue
        backend = "nccl" if cuda else "gloo"
        result = spawn_and_read(_worker, world, geometry, batch, steps, rounds, backend)
        for name in VARIANTS:
            rows.append({"world": world, "groups": world, "variant": name, "geometry": geometry, "batch": batch,
                         "backend": backend, **result[name]})
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'procs':>5}  {'variant':<11}{'step ms':>9}{'comm ms':>9}{'comm/step':>10}{'MB/step':>9}")
    for r in rows:
        print(f"{r['world']:>5}  {r['variant']:<11}{r['step_ms']:>9.1f}{r['comm_ms']:>9.1f}"
              f"{r['comm_ms'] / r['step_ms']:>10.2f}{r['mb_per_step']:>9.2f}")
    for world in sorted({r["world"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["world"] == world}
        print(f"  {world} procs: shuffle / all-gather comm time = {by['shuffle']['comm_ms'] / by['all-gather']['comm_ms']:.2f}x, "
              f"hybrid / all-gather = {by['hybrid']['comm_ms'] / by['all-gather']['comm_ms']:.2f}x; bytes "
              f"{by['shuffle']['mb_per_step'] / by['all-gather']['mb_per_step']:.2f}x and "
              f"{by['hybrid']['mb_per_step'] / by['all-gather']['mb_per_step']:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    p.add_argument("--geometry", default="fashion_mnist", choices=list(GEOMETRIES))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="runs/benchmark/exchanges.json")
    args = p.parse_args(argv)
    rows = run(args.worlds, args.geometry, args.batch, args.steps, args.rounds, args.device)
    print_rows(rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "cpus": os.cpu_count(), "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
