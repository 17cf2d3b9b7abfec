"""Training throughput (forward + backward + SGD step) measured side by side in one process.

For G = 1..4 and two geometries (the paper's 227x227 AlexNet and the Fashion-MNIST one)
it times, on the same batch:
  ours        GroupAlexNet, local placement, all groups in one slot (as shipped: FastLRN)
  ours/tLRN   the same with torch's nn.LocalResponseNorm: isolates framework overhead
  reference   plain torch, nn.Conv2d(groups=G), torch's LRN
  torchvision torchvision.models.alexnet (64/192/384/256/256, no groups/LRN; paper geometry only:
              its 11x11/4 conv1 and three pools do not fit a 32x32 image)
Rounds alternate the models so drift hits all of them alike; the median round counts.
Prints a table of images/s with ratios to the reference and writes JSON.

--distributed adds the one-process-per-group placement: for world sizes 1, 2, 4 (G = world,
one group per process; gloo on CPU, NCCL on GPUs when there are enough) it times training
steps and the wall time spent inside the collectives, beside the one-process placement
with the same G on one device.

  python scripts/benchmark.py                       # CPU (or CUDA when present)
  python scripts/benchmark.py --device cpu --geometry fashion_mnist --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from alexnet.build import spec_from_config  # noqa: E402
from alexnet.config import load  # noqa: E402
from alexnet.model import GroupAlexNet  # noqa: E402
from alexnet.reference import ReferenceAlexNet  # noqa: E402
from parallel import LocalPlacement  # noqa: E402

GEOMETRIES = {"paper": "configs/imagenet/g{G}.yaml", "fashion_mnist": "configs/fashion_mnist/g{G}.yaml"}


def make_models(spec, device):
    models = {"ours": GroupAlexNet(spec, LocalPlacement(spec.groups, [str(device)])),
              "ours/tLRN": GroupAlexNet(spec, LocalPlacement(spec.groups, [str(device)]),
                                        lrn_module=nn.LocalResponseNorm),
              "reference": ReferenceAlexNet(spec).to(device)}
    if spec.input_size >= 63 and spec.in_channels == 3:
        from torchvision.models import alexnet
        models["torchvision"] = alexnet(num_classes=spec.num_classes).to(device)
    return models


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, x, y, steps, device) -> float:
    """Seconds per step of forward + backward + SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return (time.perf_counter() - start) / steps


def peak_memory(model, x, y, device):
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    time_steps(model, x, y, 1, device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def bench(geometry: str, G: int, device, batch: int, steps: int, rounds: int) -> dict:
    spec = spec_from_config(load(GEOMETRIES[geometry].format(G=G), ["model.dropout=0.0"]))
    models = make_models(spec, device)
    x = torch.randn(batch, spec.in_channels, spec.input_size, spec.input_size, device=device)
    y = torch.randint(0, spec.num_classes, (batch,), device=device)
    for m in models.values():  # warm-up: allocator, kernel selection
        time_steps(m, x, y, 2, device)
    per_round = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            per_round[name].append(time_steps(m, x, y, steps, device))
    out = {}
    for name, m in models.items():
        sec = statistics.median(per_round[name])
        out[name] = {"images_per_s": batch / sec, "step_ms": 1000 * sec, "peak_mib": peak_memory(m, x, y, device)}
    ref = out["reference"]["images_per_s"]
    for r in out.values():
        r["ratio_to_reference"] = r["images_per_s"] / ref
    return {"geometry": geometry, "groups": G, "batch": batch, "device": str(device), "macs": spec.macs(),
            "models": out}


def print_table(results: list[dict]) -> None:
    names = ["ours", "ours/tLRN", "reference", "torchvision"]
    head = f"{'geometry':<14}{'G':>2}{'batch':>6}" + "".join(f"{n:>22}" for n in names)
    print(head)
    print("-" * len(head))
    for r in results:
        cells = []
        for n in names:
            m = r["models"].get(n)
            if m is None:
                cells.append(f"{'n/a':>22}")
                continue
            mem = f" {m['peak_mib']:.0f}MiB" if m["peak_mib"] is not None else ""
            cells.append(f"{m['images_per_s']:>10.1f} ({m['ratio_to_reference']:.2f}x){mem}".rjust(22))
        print(f"{r['geometry']:<14}{r['groups']:>2}{r['batch']:>6}" + "".join(cells))
    print("images/s (ratio to the reference at the same G); peak GPU memory where on CUDA")


def _dist_worker(rank: int, world: int, port: int, geometry: str, batch: int, steps: int, backend: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist
    from parallel import CommCounter
    from parallel.distributed import DistributedPlacement
    spec = spec_from_config(load(GEOMETRIES[geometry].format(G=world), ["model.dropout=0.0"]))
    placement = DistributedPlacement.from_env(world, backend, counter=CommCounter(timed=True))
    model = GroupAlexNet(spec, placement)
    device = placement.device
    x = torch.randn(batch, spec.in_channels, spec.input_size, spec.input_size, device=device)
    y = torch.randint(0, spec.num_classes, (batch,), device=device)
    time_steps(model, x, y, 2, device)
    placement.counter.reset()
    sec = time_steps(model, x, y, steps, device)
    comm = placement.counter.seconds / steps
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"images_per_s": batch / sec, "step_ms": 1000 * sec, "comm_ms": 1000 * comm,
                       "mb_per_step": placement.counter.total() / steps / 1e6}, f)
    dist.destroy_process_group()


def bench_distributed(geometry: str, device, batch: int, steps: int) -> list[dict]:
    import socket
    import tempfile

    import torch.multiprocessing as mp
    cuda = device.type == "cuda"
    results = []
    for world in (1, 2, 4):
        if cuda and torch.cuda.device_count() < world:
            print(f"  distributed world={world}: skipped, {torch.cuda.device_count()} GPU(s)")
            continue
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = os.path.join(tempfile.mkdtemp(), "rank0.json")
        mp.spawn(_dist_worker, args=(world, port, geometry, batch, steps, "nccl" if cuda else "gloo", out),
                 nprocs=world, join=True)
        with open(out) as f:
            r = json.load(f)
        local = bench(geometry, world, device, batch, steps, 1)["models"]["ours"]["images_per_s"]
        r.update(geometry=geometry, world=world, groups=world, batch=batch, local_images_per_s=local)
        results.append(r)
        print(f"  distributed {geometry} world={world}: {r['images_per_s']:.1f} img/s "
              f"(one process, same G: {local:.1f}), comm {r['comm_ms']:.1f} of {r['step_ms']:.1f} ms/step, "
              f"{r['mb_per_step']:.2f} MB/step", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--geometry", nargs="+", default=list(GEOMETRIES), choices=list(GEOMETRIES))
    p.add_argument("--groups", nargs="+", type=int, default=[1, 2, 3, 4])
    p.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA; 16 (paper) / 128 (fashion) on CPU")
    p.add_argument("--steps", type=int, default=None, help="steps per round (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--distributed", action="store_true", help="also time one process per group (torch.distributed)")
    p.add_argument("--out", default="runs/benchmark/benchmark.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    results = []
    for geometry in args.geometry:
        batch = args.batch or (128 if cuda or geometry == "fashion_mnist" else 16)
        for G in args.groups:
            r = bench(geometry, G, device, batch, args.steps or (20 if cuda else 3), args.rounds)
            results.append(r)
            print(f"  {geometry} G={G}: " + ", ".join(f"{k} {v['images_per_s']:.1f} img/s"
                                                      for k, v in r["models"].items()), flush=True)
    print_table(results)
    distributed = []
    if args.distributed:
        for geometry in args.geometry:
            batch = args.batch or (128 if cuda or geometry == "fashion_mnist" else 16)
            distributed += bench_distributed(geometry, device, batch, args.steps or (20 if cuda else 3))
        print(f"{'geometry':<14}{'procs':>6}{'img/s':>10}{'1-proc img/s':>14}{'comm ms/step':>14}{'step ms':>10}"
              f"{'MB/step':>9}")
        for r in distributed:
            print(f"{r['geometry']:<14}{r['world']:>6}{r['images_per_s']:>10.1f}{r['local_images_per_s']:>14.1f}"
                  f"{r['comm_ms']:>14.1f}{r['step_ms']:>10.1f}{r['mb_per_step']:>9.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results,
                   "distributed": distributed}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
