"""The data replicas' gradient sync measured side by side in one run: no sync, the flat all-reduce
after backward (``parallel.grad_sync: flat``) and DDP's bucketed all-reduce during backward
(``overlap``), on gloo ranks of this machine.

  python scripts/grad_sync_benchmark.py [--geometry fashion paper] [--groups 1 2] [--steps 4] [--reps 3]

Each world is D = 2 replicas x G groups (2 or 4 processes). In every repetition the three
variants run one after the other on the same model and batch, so drift hits them alike;
the step time is the median over repetitions of the mean over ``--steps`` steps, measured on
rank 0 after a barrier. Exposed communication = a variant's step time minus the no-sync
step's: the wall time the step spends on gradients beyond its compute. On this 2-core CPU
the ranks share two cores with gloo's threads, so an all-reduce that runs during backward
competes with it for the same cores; what overlap buys depends on a link and compute
that run side by side (see scripts/overlap_model.py for the paper's AlexNet on GPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

GEOMETRIES = {  # (model overrides, global batch)
    "fashion": ({"num_classes": 10, "in_channels": 1, "input_size": 32, "conv_channels": [36, 96, 144, 144, 96],
                 "kernels": [5, 3, 3, 3, 3], "strides": [2, 1, 1, 1, 1], "paddings": [2, 1, 1, 1, 1],
                 "fc_widths": [384, 384], "init": "kaiming"}, 128),
    "paper": ({}, 8),
}
MODES = ("none", "flat", "overlap")


def worker(rank, world, store, geometry, groups, steps, reps, out):
    import torch.distributed as dist

    from alexnet.init import init_reference_state
    from alexnet.model import GroupAlexNet
    from alexnet.spec import AlexNetSpec
    from parallel import load_full_state_dict
    from parallel.distributed import init_from_env, join_spawned_world
    from parallel.overlap import overlap_replicas
    torch.set_num_threads(1)
    join_spawned_world(rank, world, store, "gloo")
    overrides, batch = GEOMETRIES[geometry]
    spec = AlexNetSpec(groups=groups, **overrides)
    placement, runtime = init_from_env(groups, "gloo")
    model = GroupAlexNet(spec, placement)
    load_full_state_dict(model, init_reference_state(spec, 0))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    rows = batch // runtime.num_replicas
    gen = torch.Generator().manual_seed(runtime.replica)
    x = torch.randn(rows, spec.in_channels, spec.input_size, spec.input_size, generator=gen)
    y = torch.randint(0, spec.num_classes, (rows,), generator=gen)
    ddp = overlap_replicas(model, runtime, torch.device("cpu"))
    weights = runtime.overlap

    def step(mode):
        runtime.overlap = weights if mode == "overlap" else None
        trained = ddp if mode == "overlap" else model
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(trained(x), y).backward()
        if mode == "flat":
            runtime.sync_gradients(model.parameters(), rows=rows)
        opt.step()

    for mode in MODES:  # warm-up
        step(mode)
    times = {m: [] for m in MODES}
    for _ in range(reps):
        for mode in MODES:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                step(mode)
            dist.barrier()
            times[mode].append((time.perf_counter() - start) / steps)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def measure(geometry: str, groups: int, steps: int, reps: int) -> dict:
    folder = tempfile.mkdtemp(prefix="gradsync")
    out = os.path.join(folder, "times.json")
    world = 2 * groups
    mp.spawn(worker, args=(world, os.path.join(folder, "store"), geometry, groups, steps, reps, out), nprocs=world,
             join=True)
    with open(out) as f:
        times = json.load(f)
    step = {m: statistics.median(v) for m, v in times.items()}
    return {"geometry": geometry, "groups": groups, "replicas": 2, "processes": world,
            "global_batch": GEOMETRIES[geometry][1], "step_s": step,
            "exposed_s": {m: step[m] - step["none"] for m in ("flat", "overlap")},
            "overlap_over_flat_step": step["overlap"] / step["flat"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", nargs="+", choices=list(GEOMETRIES), default=list(GEOMETRIES))
    p.add_argument("--groups", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    print("| geometry (global batch) | G | processes | step, no sync | step, flat | step, overlap | exposed, flat | "
          "exposed, overlap | overlap / flat (step) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for geometry in args.geometry:
        for groups in args.groups:
            r = measure(geometry, groups, args.steps, args.reps)
            rows.append(r)
            s, e = r["step_s"], r["exposed_s"]
            print(f"| {geometry} ({r['global_batch']}) | {groups} | {r['processes']} | {1e3 * s['none']:.0f} ms | "
                  f"{1e3 * s['flat']:.0f} ms | {1e3 * s['overlap']:.0f} ms | {1e3 * e['flat']:.0f} ms | "
                  f"{1e3 * e['overlap']:.0f} ms | {r['overlap_over_flat_step']:.2f} |", flush=True)
    if args.json:
        from alexnet.fit import code_commit
        commit = code_commit()  # before the file is opened: a tracked file truncated reads as "+changes"
        with open(args.json, "w") as f:
            json.dump({"commit": commit, "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
