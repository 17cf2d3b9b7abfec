"""Training throughput (forward + backward + SGD step) measured side by side in one process.

Model only: for G = 1..4 and two geometries (the paper's 227x227 AlexNet and the
Fashion-MNIST one) it times, on the same batch:
  ours          GroupAlexNet, local placement, all groups in one slot, as train.py runs it
                (group-aware LRN; on CUDA each grouped conv's formulation timed and chosen)
  ours/tLRN     the same with torch's nn.LocalResponseNorm: isolates framework overhead
  reference     plain torch, nn.Conv2d(groups=G), torch's LRN
  torchvision   torchvision.models.alexnet (64/192/384/256/256, no groups/LRN; paper geometry only)
  ours+compile, reference+compile   with --compile: both under torch.compile
Rounds alternate the models so drift hits all of them alike; the median round counts.
--precision bf16 runs under autocast, --channels-last uses NHWC for every model (CUDA only, as train.py).

--e2e fake|fashion_mnist|jpeg runs train.py's own loop (alexnet.fit) over fake data, Fashion-MNIST,
or a generated JPEG tree (500x375, ~55 KB, written by parallel processes; decoded on the GPU
when training there) and prints end-to-end images/s beside model-only images/s for the same
settings, and their ratio.

--exchanges times all-gather vs channel shuffle (all-to-all) vs the hybrid placement, communication
time and bytes per step, for 2 and 4 processes (scripts/exchange_benchmark.py).

--distributed adds the one-process-per-group placement: for world sizes 1, 2, 4 (G = world,
one group per process; gloo on CPU, NCCL on GPUs when there are enough) it times training
steps and the wall time spent inside the collectives.

  python scripts/benchmark.py                       # CPU (or CUDA when present)
  python scripts/benchmark.py --device cpu --geometry fashion_mnist --rounds 5
  python scripts/benchmark.py --geometry paper --groups 1 2 4 --precision bf16 --channels-last --compile --batch 256
  python scripts/benchmark.py --e2e fake jpeg --groups 2 --precision bf16 --channels-last --compile --batch 256
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

from alexnet import mfu
from alexnet.build import placement_from_config, spec_from_config
from alexnet.config import load
from alexnet.engine import Trainer, to_input, train_step
from alexnet.fit import build_run, code_commit, prepare_trainer, sgd_from_config
from alexnet.model import GroupAlexNet
from alexnet.reference import ReferenceAlexNet
from benchlib import GEOMETRIES
from parallel import LocalPlacement, LocalRuntime



class Setting:
    """How every model of one comparison runs: device, precision, memory format."""

    def __init__(self, device: torch.device, precision: str = "fp32", channels_last: bool = False,
                 compile_mode: str = "default"):
        self.device, self.precision, self.channels_last = device, precision, channels_last
        self.compile_mode = compile_mode

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def batch(self, spec, n: int):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, spec.in_channels, spec.input_size, spec.input_size, generator=gen).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, spec.num_classes, (n,), generator=gen).to(self.device)


def model_config(geometry: str, G: int, setting: Setting, compile_: bool) -> dict:
    """train.py's config for timing ours on one fixed batch (dropout off: the reference has none to match).
    The layout is train.py's default (auto) unless --channels-last asks NHWC for every model."""
    return load(GEOMETRIES[geometry].format(G=G), [
        "model.dropout=0.0", f"train.precision={setting.precision}",
        f"train.channels_last={'true' if setting.channels_last else 'auto'}", f"train.compile={str(compile_).lower()}",
        f"train.compile_mode={setting.compile_mode}", "train.conv_formulation=auto", "parallel.placement=local",
        f"parallel.devices=[{setting.device}]"])


def train_py_trainer(cfg: dict, batch: int) -> tuple:
    """(spec, Trainer) built exactly as train.py builds them: build_run, then the speed settings."""
    spec, placement, runtime, model, optimizer = build_run(cfg)
    shape = (batch, spec.in_channels, spec.input_size, spec.input_size)
    return spec, prepare_trainer(cfg, model, optimizer, placement, runtime, shape, say=lambda *a, **k: None)


def plain_trainer(model: nn.Module, cfg: dict, setting: Setting, placement=None, channels_last=None) -> Trainer:
    """A model train.py does not build (plain torch, torchvision) with train.py's optimizer and step;
    ``channels_last`` overrides the setting's layout (ours/tLRN follows ours' choice)."""
    placement = placement or LocalPlacement(1, [str(setting.device)])
    channels_last = setting.channels_last if channels_last is None else channels_last
    model = setting.prepare(model).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return Trainer(model, sgd_from_config(cfg, model.parameters(), placement), placement, LocalRuntime(),
                   setting.precision, channels_last)


def make_trainers(geometry: str, G: int, setting: Setting, batch: int, compile_too: bool) -> tuple[dict, list]:
    cfg = model_config(geometry, G, setting, False)
    spec, ours = train_py_trainer(cfg, batch)
    tlrn = GroupAlexNet(spec, LocalPlacement(spec.slot_groups, [str(setting.device)]), lrn_module=nn.LocalResponseNorm)
    for layer, chosen in zip(tlrn.modules(), ours.model.modules()):  # the same conv choices, torch's LRN
        if hasattr(layer, "formulation"):
            layer.formulation = chosen.formulation
    trainers = {"ours": ours, "ours/tLRN": plain_trainer(tlrn, cfg, setting, tlrn.placement, ours.channels_last),
                "reference": plain_trainer(ReferenceAlexNet(spec), cfg, setting)}
    if spec.input_size >= 63 and spec.in_channels == 3:
        from torchvision.models import alexnet
        trainers["torchvision"] = plain_trainer(alexnet(num_classes=spec.num_classes), cfg, setting)
    if compile_too:
        _, trainers["ours+compile"] = train_py_trainer(model_config(geometry, G, setting, True), batch)
        reference = plain_trainer(ReferenceAlexNet(spec), cfg, setting)
        reference.model = torch.compile(reference.model, mode=setting.compile_mode)
        trainers["reference+compile"] = reference
    choices = [{"layer": m.name, "choice": m.formulation} for m in ours.model.modules()
               if hasattr(m, "formulation") and max(m.slot_conv_groups) > 1]
    return spec, trainers, choices


def cpu_name() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), for the record beside its figures."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def gemm_tflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """This device's attainable fp32 TFLOP/s, measured: the best of ``repeats`` n x n x n matrix products
    (2 n^3 FLOP each). The yardstick for a CPU's MFU, where no datasheet peak applies."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: Trainer, x, y, steps: int) -> float:
    """Seconds per training step: train.py's own (``alexnet.engine.train_step``), on the batch in the trainer's layout."""
    device = trainer.placement.output_device
    x = to_input(x, trainer.placement.input_device, trainer.channels_last)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(trainer, x, y)
    sync(device)
    return (time.perf_counter() - start) / steps


def peak_memory(trainer: Trainer, x, y, setting: Setting):
    if setting.device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(setting.device)
    time_steps(trainer, x, y, 1)
    return torch.cuda.max_memory_allocated(setting.device) / 2**20


def kernel_table(trainer: Trainer, x, y, setting: Setting, top: int) -> list[dict]:
    """The ``top`` kernels (CUDA) or operators (CPU) of 3 training steps by total time, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    cuda = setting.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        time_steps(trainer, x, y, 3)
    attr = "device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"name": e.key[:60], "ms_per_step": getattr(e, attr) / 3e3, "calls_per_step": e.count / 3}
            for e in events[:top]]


def profile_side_by_side(models: dict, x, y, setting: Setting, top: int = 12) -> dict:
    """Kernel tables of ours and the reference (compiled ones when timed), printed side by side."""
    pair = ("ours+compile", "reference+compile") if "ours+compile" in models else ("ours", "reference")
    tables = {name: kernel_table(models[name], x, y, setting, top) for name in pair}
    print(f"  {pair[0]:<52}{'ms':>8}{'n':>5}   {pair[1]:<52}{'ms':>8}{'n':>5}")
    for i in range(top):
        cells = []
        for name in pair:
            row = tables[name][i] if i < len(tables[name]) else None
            cells.append(f"{row['name'][:52]:<52}{row['ms_per_step']:>8.3f}{row['calls_per_step']:>5.0f}" if row
                         else " " * 65)
        print("  " + "   ".join(cells))
    return tables


def bench(geometry: str, G: int, setting: Setting, batch: int, steps: int, rounds: int,
          compile_too: bool = False, profile: bool = False) -> dict:
    spec, models, choices = make_trainers(geometry, G, setting, batch, compile_too)
    x, y = setting.batch(spec, batch)
    for m in models.values():  # warm-up: allocator, kernel selection, compilation
        time_steps(m, x, y, 3)
    per_round = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            per_round[name].append(time_steps(m, x, y, steps))
    out = {}
    device_name = mfu.device_name(setting.device)
    for name, m in models.items():
        sec = statistics.median(per_round[name])
        # torchvision's network has other MACs than ours at this G: no FLOP/s figure for it
        speed = mfu.throughput(batch / sec, spec.macs(), device_name) if name != "torchvision" else {}
        out[name] = {"images_per_s": batch / sec, "step_ms": 1000 * sec, "tflops": speed.get("tflops"),
                     "mfu": speed.get("mfu"), "peak_mib": peak_memory(m, x, y, setting)}
    tables = profile_side_by_side(models, x, y, setting) if profile else None
    gemm = gemm_tflops(setting.device) if setting.device.type == "cpu" else None
    ref = out["reference"]["images_per_s"]
    for r in out.values():
        r["ratio_to_reference"] = r["images_per_s"] / ref
    return {"geometry": geometry, "groups": G, "batch": batch, "device": str(setting.device), "macs": spec.macs(),
            "precision": setting.precision, "channels_last": setting.channels_last,
            "ours_channels_last": models["ours"].channels_last, "gemm_tflops": gemm,
            "compile_mode": setting.compile_mode if compile_too else None,
            "conv_formulations": {c["layer"]: c["choice"] for c in choices}, "models": out, "profile": tables}


def print_table(results: list[dict]) -> None:
    names = ["ours", "ours/tLRN", "reference", "torchvision"]
    if any("ours+compile" in r["models"] for r in results):
        names += ["ours+compile", "reference+compile"]
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
    print("images/s (ratio to the eager reference at the same G); peak GPU memory where on CUDA")
    for r in results:
        print(f"  G={r['groups']} {r['geometry']}: ours trains in {'NHWC' if r['ours_channels_last'] else 'NCHW'}")
        if r.get("gemm_tflops"):
            print(f"  G={r['groups']} {r['geometry']}: ours {r['models']['ours']['tflops']:.3g} TFLOP/s = "
                  f"{100 * r['models']['ours']['tflops'] / r['gemm_tflops']:.1f}% of this CPU's fp32 GEMM "
                  f"({r['gemm_tflops']:.3g} TFLOP/s, measured in this run)")
            continue
        if "ours+compile" in r["models"]:
            m = r["models"]
            print(f"  G={r['groups']} {r['geometry']}: ours+compile / reference+compile = "
                  f"{m['ours+compile']['images_per_s'] / m['reference+compile']['images_per_s']:.2f}x")
        for name in ("ours", "ours+compile", "reference+compile"):
            m = r["models"].get(name)
            if m and m["tflops"] is not None:
                share = f", MFU {100 * m['mfu']:.2f}% of the dense bf16 peak" if m["mfu"] is not None else ""
                print(f"  G={r['groups']} {r['geometry']}: {name} {m['tflops']:.3g} TFLOP/s "
                      f"(6 x {r['macs'] / 1e6:.0f}M MACs per image){share}")
        if r["conv_formulations"]:
            print(f"  G={r['groups']} {r['geometry']}: conv formulations chosen: {r['conv_formulations']}")


def _dist_worker(rank: int, world: int, store: str, geometry: str, batch: int, steps: int, backend: str, out: str):
    import torch.distributed as dist
    from parallel import CommCounter
    from parallel.distributed import join_spawned_world
    join_spawned_world(rank, world, store, backend)
    cfg = load(GEOMETRIES[geometry].format(G=world), ["model.dropout=0.0", "parallel.placement=distributed",
                                                       f"parallel.backend={backend}"])
    where = placement_from_config(cfg, counter=CommCounter(timed=True))
    spec, placement, runtime, model, optimizer = build_run(cfg, where)
    trainer = Trainer(model, optimizer, placement, runtime)
    x, y = Setting(placement.device).batch(spec, batch)
    time_steps(trainer, x, y, 2)
    placement.counter.reset()
    sec = time_steps(trainer, x, y, steps)
    comm = placement.counter.seconds / steps
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"images_per_s": batch / sec, "step_ms": 1000 * sec, "comm_ms": 1000 * comm,
                       "mb_per_step": placement.counter.total() / 1e6}, f)
    dist.destroy_process_group()


def bench_distributed(geometry: str, device, batch: int, steps: int) -> list[dict]:
    from benchlib import spawn_and_read
    cuda = device.type == "cuda"
    results = []
    for world in (1, 2, 4):
        if cuda and torch.cuda.device_count() < world:
            print(f"  distributed world={world}: skipped, {torch.cuda.device_count()} GPU(s)")
            continue
        r = spawn_and_read(_dist_worker, world, geometry, batch, steps, "nccl" if cuda else "gloo")
        local = bench(geometry, world, Setting(device), batch, steps, 1)["models"]["ours"]["images_per_s"]
        r.update(geometry=geometry, world=world, groups=world, batch=batch, local_images_per_s=local)
        results.append(r)
        print(f"  distributed {geometry} world={world}: {r['images_per_s']:.1f} img/s "
              f"(one process, same G: {local:.1f}), comm {r['comm_ms']:.1f} of {r['step_ms']:.1f} ms/step, "
              f"{r['mb_per_step']:.2f} MB/step", flush=True)
    return results


E2E_SOURCES = ("fake", "fashion_mnist", "jpeg")


def e2e_config(source: str, G: int, setting: Setting, batch: int, compile_: bool, run_dir: str,
               jpeg_root: str | None, workers: int, fake_samples: int, fashion_limit: int = 0) -> dict:
    """train.py's config for an end-to-end timing run of ``source`` (paper geometry except Fashion-MNIST)."""
    common = [f"data.batch_size={batch}", f"train.precision={setting.precision}",
              f"train.channels_last={str(setting.channels_last).lower()}", f"train.compile={str(compile_).lower()}",
              f"parallel.devices=[{setting.device}]", "parallel.placement=local", "train.filter_images_every=0",
              "train.log_every=1000000", "optim.schedule=constant", f"run.dir={run_dir}"]
    if source == "fashion_mnist":
        return load(GEOMETRIES["fashion_mnist"].format(G=G), common + ["train.epochs=2", f"data.limit={fashion_limit}"])
    if source == "fake":
        return load(GEOMETRIES["paper"].format(G=G), common + [
            "data.dataset=fake", f"data.fake_train_samples={fake_samples}", f"data.fake_val_samples={batch}",
            "train.epochs=3"])
    return load(GEOMETRIES["paper"].format(G=G), common + [
        "data.dataset=imagefolder", f"data.root={jpeg_root}", f"data.workers={workers}", "data.decode=auto",
        "train.epochs=3"])


def model_only_like(cfg: dict, steps: int, rounds: int) -> float:
    """Images/s of train.py's own model and settings (incl. compile) on one fixed batch: no loader."""
    spec, trainer = train_py_trainer(cfg, cfg["data"]["batch_size"])
    x, y = Setting(trainer.placement.input_device, channels_last=trainer.channels_last).batch(
        spec, cfg["data"]["batch_size"])
    time_steps(trainer, x, y, 3)
    sec = statistics.median(time_steps(trainer, x, y, steps) for _ in range(rounds))
    return cfg["data"]["batch_size"] / sec


def bench_e2e(source: str, G: int, setting: Setting, batch: int, compile_: bool, steps: int, rounds: int,
              jpeg_root: str | None, workers: int, fake_samples: int, fashion_limit: int = 0) -> dict:
    import tempfile

    from alexnet.fit import fit
    run_dir = tempfile.mkdtemp(prefix=f"e2e-{source}-")
    cfg = e2e_config(source, G, setting, batch, compile_, run_dir, jpeg_root, workers, fake_samples, fashion_limit)
    start = time.perf_counter()
    fit(cfg, quiet=True)
    wall = time.perf_counter() - start
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f]
    later = epochs[1:] or epochs  # the first epoch pays for compilation and warm-up
    e2e = statistics.mean(e["images_per_s"] for e in later)
    model = model_only_like(cfg, steps, rounds)
    r = {"source": source, "groups": G, "batch": batch, "device": str(setting.device), "precision": setting.precision,
         "channels_last": setting.channels_last, "compile": compile_, "epochs_timed": len(later),
         "e2e_images_per_s": e2e, "model_only_images_per_s": model, "ratio": e2e / model, "wall_s": wall,
         "dataset": cfg["data"]["dataset"], "decode": cfg["data"]["decode"], "workers": cfg["data"]["workers"]}
    speed = mfu.throughput(e2e, spec_from_config(cfg).macs(), mfu.device_name(setting.device))
    r.update(tflops=speed["tflops"], mfu=speed["mfu"])
    share = f", MFU {100 * speed['mfu']:.2f}%" if speed["mfu"] is not None else ""
    print(f"  e2e {source} G={G}: {e2e:.0f} img/s end to end ({speed['tflops']:.3g} TFLOP/s{share}), {model:.0f} "
          f"model only ({e2e / model:.2f}x)", flush=True)
    return r


def bench_loader(source: str, setting: Setting, batch: int, jpeg_root: str | None, workers: int,
                 fake_samples: int, fashion_limit: int = 0, epochs: int = 3) -> float:
    """Images/s of train.py's training loader alone (batches on the device, no model), epochs after the first."""
    from alexnet.build import data_from_config
    from parallel import LocalPlacement, LocalRuntime
    cfg = e2e_config(source, 2, setting, batch, False, "unused", jpeg_root, workers, fake_samples, fashion_limit)
    loader, _ = data_from_config(cfg, LocalPlacement(2, [str(setting.device)]), LocalRuntime())
    rates = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        sync(setting.device)
        start, seen = time.perf_counter(), 0
        for x, _ in loader:
            seen += x.shape[0]
        sync(setting.device)
        rates.append(seen / (time.perf_counter() - start))
    rate = statistics.mean(rates[1:] or rates)
    print(f"  loader {source}: {rate:.0f} img/s alone (batch {batch}, {workers} workers where used)", flush=True)
    return rate


def print_e2e(rows: list[dict]) -> None:
    head = f"{'source':<15}{'G':>2}{'batch':>6}{'end-to-end':>12}{'model only':>12}{'ratio':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['source']:<15}{r['groups']:>2}{r['batch']:>6}{r['e2e_images_per_s']:>12.0f}"
              f"{r['model_only_images_per_s']:>12.0f}{r['ratio']:>7.2f}")
    print("images/s of train.py's loop (epochs after the first) and of the same model and settings on one fixed batch")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--geometry", nargs="+", default=None, choices=list(GEOMETRIES),
                   help="model-only geometries (default: both, or none with --e2e)")
    p.add_argument("--groups", nargs="+", type=int, default=[1, 2, 3, 4])
    p.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA; 16 (paper) / 128 (fashion) on CPU")
    p.add_argument("--steps", type=int, default=None, help="steps per round (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC activations and weights for every model (default: ours as train.py chooses, "
                        "train.channels_last=auto; the others NCHW on CPU)")
    p.add_argument("--compile", action="store_true", help="also time ours and the reference under torch.compile")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"], help="torch.compile mode")
    p.add_argument("--profile", action="store_true",
                   help="print the top kernels (CPU: operators) of ours and the reference side by side, per G")
    p.add_argument("--e2e", nargs="+", default=[], choices=E2E_SOURCES,
                   help="also time train.py's loop end to end on these sources (and skip the model-only table "
                        "unless --geometry is given)")
    p.add_argument("--loader-only", action="store_true",
                   help="--e2e: time each source's training loader alone (no model) instead of train.py's loop")
    p.add_argument("--jpeg-root", default=None, help="--e2e jpeg: an existing tree (default: generate one)")
    p.add_argument("--jpeg-files", type=int, default=8192, help="--e2e jpeg: training files to generate")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                   help="--e2e jpeg: loader processes")
    p.add_argument("--fashion-limit", type=int, default=0, help="--e2e fashion_mnist: data.limit (0: all 60k)")
    p.add_argument("--fake-samples", type=int, default=None, help="--e2e fake: training samples (default 16 batches)")
    p.add_argument("--distributed", action="store_true", help="also time one process per group (torch.distributed)")
    p.add_argument("--exchanges", action="store_true",
                   help="also time all-gather vs shuffle vs hybrid communication (Fashion-MNIST geometry, 2 and 4 "
                        "processes)")
    p.add_argument("--out", default="runs/benchmark/benchmark.json")
    return p.parse_args(argv)


def default_batch(args, cuda: bool, geometry: str) -> int:
    return args.batch or (128 if cuda or geometry == "fashion_mnist" else 16)


def default_steps(args, cuda: bool) -> int:
    return args.steps or (20 if cuda else 3)


def run_model_only(args, setting: Setting, geometries: list[str]) -> list[dict]:
    cuda = setting.device.type == "cuda"
    results = []
    for geometry in geometries:
        for G in args.groups:
            r = bench(geometry, G, setting, default_batch(args, cuda, geometry), default_steps(args, cuda),
                      args.rounds, args.compile, args.profile)
            results.append(r)
            print(f"  {geometry} G={G}: " + ", ".join(f"{k} {v['images_per_s']:.1f} img/s"
                                                      for k, v in r["models"].items()), flush=True)
    if results and setting.device.type == "cpu":
        # a peak: the best GEMM of the run (each G measured one, between its rounds), the same yardstick for all
        peak = max(r["gemm_tflops"] for r in results)
        for r in results:
            r["gemm_tflops"] = peak
    if results:
        print_table(results)
    return results


def run_e2e(args, setting: Setting) -> tuple[list[dict], dict, dict | None]:
    """train.py's loop end to end (or its loaders alone): (rows, loader rates, the generated JPEG tree)."""
    cuda = setting.device.type == "cuda"
    jpeg_info = None
    if "jpeg" in args.e2e and not args.jpeg_root:
        import tempfile

        from make_jpeg_tree import make_tree
        args.jpeg_root = tempfile.mkdtemp(prefix="jpeg-tree-")
        start = time.perf_counter()
        jpeg_info = make_tree(args.jpeg_root, args.jpeg_files, 512, 10)
        print(f"  generated {args.jpeg_files} JPEGs ({jpeg_info['mean_bytes'] / 1e3:.1f} KB on average) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    rows, loader_rates = [], {}
    for source in args.e2e:
        batch = default_batch(args, cuda, source)
        if args.loader_only:
            loader_rates[source] = bench_loader(source, setting, batch, args.jpeg_root, args.workers,
                                                args.fake_samples or 16 * batch, args.fashion_limit)
            continue
        for G in args.groups:
            rows.append(bench_e2e(source, G, setting, batch, args.compile, default_steps(args, cuda), args.rounds,
                                  args.jpeg_root, args.workers, args.fake_samples or 16 * batch, args.fashion_limit))
    if rows:
        print_e2e(rows)
    return rows, loader_rates, jpeg_info


def run_distributed(args, device: torch.device, geometries: list[str]) -> list[dict]:
    cuda = device.type == "cuda"
    rows = []
    for geometry in geometries:
        rows += bench_distributed(geometry, device, default_batch(args, cuda, geometry), default_steps(args, cuda))
    print(f"{'geometry':<14}{'procs':>6}{'img/s':>10}{'1-proc img/s':>14}{'comm ms/step':>14}{'step ms':>10}"
          f"{'MB/step':>9}")
    for r in rows:
        print(f"{r['geometry']:<14}{r['world']:>6}{r['images_per_s']:>10.1f}{r['local_images_per_s']:>14.1f}"
              f"{r['comm_ms']:>14.1f}{r['step_ms']:>10.1f}{r['mb_per_step']:>9.2f}")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    setting = Setting(device, args.precision, args.channels_last, args.compile_mode)
    geometries = args.geometry if args.geometry is not None else ([] if args.e2e else list(GEOMETRIES))
    results = run_model_only(args, setting, geometries)
    e2e_rows, loader_rates, jpeg_info = run_e2e(args, setting)
    distributed = run_distributed(args, device, geometries) if args.distributed else []
    exchanges = []
    if args.exchanges:
        import exchange_benchmark
        exchanges = exchange_benchmark.run([2, 4], "fashion_mnist", args.batch or 128, args.steps or 5, args.rounds,
                                           "cuda" if cuda else "cpu")
        exchange_benchmark.print_rows(exchanges)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    commit = code_commit()  # before --out is truncated: a tracked file being rewritten would read as +changes
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "commit": commit,
                   "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
                   "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "results": results, "e2e": e2e_rows,
                   "loader_only": loader_rates, "jpeg_tree": jpeg_info, "distributed": distributed,
                   "exchanges": exchanges}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
