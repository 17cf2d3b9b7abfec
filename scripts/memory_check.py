"""The paper's reason for two GPUs, measured: memory per device of one SGD step of the paper's
AlexNet (227 px, 1000 classes, fp32 by default), predicted (``alexnet.memory``) beside torch's
MemTracker on CPU (``alexnet.memwatch``), for G = 1 on one device, G = 2 on one device and
on two ranks, G = 4 on four ranks; and the largest batch that fits a budget per device.

  python scripts/memory_check.py [--batch 128] [--precision fp32] [--fit 1.5GiB] [--json out.json]

Ranks are gloo processes on this machine (each its own device, as GPUs would be). A step
at batch 128 takes tens of seconds per placement on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.multiprocessing as mp

from alexnet import memory, memwatch
from alexnet.fit import code_commit
from alexnet.init import init_reference_state
from alexnet.model import GroupAlexNet
from alexnet.spec import AlexNetSpec
from parallel import LocalPlacement, load_full_state_dict

#: (name, G, processes): one process holds every group, or each rank holds G / processes of them
PLACEMENTS = (("G = 1, one device", 1, 1), ("G = 2, one device", 2, 1), ("G = 2, two devices", 2, 2),
              ("G = 4, four devices", 4, 4))


def batch(n: int, spec: AlexNetSpec):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, spec.in_channels, spec.input_size, spec.input_size, generator=gen),
            torch.randint(0, spec.num_classes, (n,), generator=gen))


def measure(model, placement, runtime, spec, n, precision):
    load_full_state_dict(model, init_reference_state(spec, 0))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = batch(n, spec)
    return memwatch.measure_step(model, opt, x, y, runtime, precision)


def rank_worker(rank, world, store, groups, n, precision, out):
    from parallel.distributed import init_from_env, join_spawned_world
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    join_spawned_world(rank, world, store, "gloo")
    spec = AlexNetSpec(groups=groups)
    placement, runtime = init_from_env(groups, "gloo")
    result = measure(GroupAlexNet(spec, placement), placement, runtime, spec, n // runtime.num_replicas, precision)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


def measured_of(groups: int, processes: int, n: int, precision: str) -> list[dict]:
    """Per device: the tracked step's peak and its categories after the forward pass (bytes)."""
    if processes == 1:
        spec = AlexNetSpec(groups=groups)
        placement = LocalPlacement(groups, ["cpu"])
        return [measure(GroupAlexNet(spec, placement), placement, None, spec, n, precision)]
    folder = tempfile.mkdtemp(prefix="memcheck")
    out = os.path.join(folder, "rank")
    mp.spawn(rank_worker, args=(processes, os.path.join(folder, "store"), groups, n, precision, out),
             nprocs=processes, join=True)
    results = []
    for r in range(processes):
        with open(f"{out}.{r}") as f:
            results.append(json.load(f))
    return results


def row(name, groups, processes, n, precision, budget) -> dict:
    spec = AlexNetSpec(groups=groups)
    kw = dict(slots=processes, distributed=processes > 1, precision=precision, weight_decay=True)
    predicted = memory.predict(spec, n, **kw)
    fits = memory.largest_batch(lambda b: max(m.peak for m in memory.predict(spec, b, **kw)), budget)
    measured = measured_of(groups, processes, n, precision)
    worst = max(range(processes), key=lambda r: measured[r]["peak"]["cpu"]["total"])
    m, p = measured[worst], predicted[worst]
    # the image batch is made before the tracked step, so the measured peak leaves it out
    return {"placement": name, "groups": groups, "devices": processes, "predicted": p.as_dict(),
            "predicted_peak_without_input": p.peak - p.input, "measured_peak": m["peak"]["cpu"]["total"],
            "measured_after_forward": m["forward"]["cpu"], "measured_peak_by_category": m["peak"]["cpu"],
            "largest_batch": fits}


def markdown(rows: list[dict], n: int, precision: str, budget: int) -> str:
    base_pred, base_meas = rows[0]["predicted_peak_without_input"], rows[0]["measured_peak"]
    mib = lambda b: f"{b / 2 ** 20:,.0f}"  # noqa: E731
    lines = [f"| placement (batch {n}, {precision}) | params + grads + momentum | activations | exchange | "
             f"predicted peak / device | share | measured peak / device (CPU) | share | largest batch in "
             f"{budget / 2 ** 30:g} GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["predicted"]
        state = p["parameters"] + p["gradients"] + p["optimizer"]
        lines.append(f"| {r['placement']} | {mib(state)} MiB | {mib(p['activations'])} MiB | {mib(p['exchange'])} MiB | "
                     f"{mib(r['predicted_peak_without_input'])} MiB | {r['predicted_peak_without_input'] / base_pred:.2f} | "
                     f"{mib(r['measured_peak'])} MiB | {r['measured_peak'] / base_meas:.2f} | {r['largest_batch']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--fit", default="1.5GiB", help="the budget per device for the largest-batch column")
    p.add_argument("--only", nargs="+", type=int, help="placement indices to run (default all)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    budget = memory.parse_bytes(args.fit)
    chosen = [PLACEMENTS[i] for i in args.only] if args.only else PLACEMENTS
    rows = []
    for name, groups, processes in chosen:
        rows.append(row(name, groups, processes, args.batch, args.precision, budget))
        print(f"{name}: predicted {rows[-1]['predicted_peak_without_input'] / 2 ** 20:,.0f} MiB, "
              f"measured {rows[-1]['measured_peak'] / 2 ** 20:,.0f} MiB", flush=True)
    print()
    print(markdown(rows, args.batch, args.precision, budget))
    if args.json:
        commit = code_commit()  # before the file is opened: a tracked file truncated reads as "+changes"
        with open(args.json, "w") as f:
            json.dump({"commit": commit, "torch": torch.__version__, "batch": args.batch,
                       "precision": args.precision, "fit_bytes": budget, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
