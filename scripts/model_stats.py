"""Per-layer table of an AlexNet config: output shape, parameters, multiply-accumulates and
cross-group bytes per image, with totals; with --memory, the memory of a training step per device.

  python scripts/model_stats.py --config configs/imagenet/g2.yaml [--set model.groups=4]
  python scripts/model_stats.py --config configs/imagenet/g1.yaml configs/imagenet/g2.yaml configs/imagenet/g4.yaml
  python scripts/model_stats.py --config configs/imagenet/g2.yaml --memory --batch 128 --set parallel.devices=[cuda:0,cuda:1]
  python scripts/model_stats.py --config configs/imagenet/g2.yaml --memory --world 2 --fit 1.5GiB [--json]

--memory predicts, from the spec's shapes alone (no model built, no data read), each
device's parameters, gradients, SGD momentum, activations saved for backward, exchange
buffers (the gathered inputs every device holds whole), input batch and the step's peak
(``alexnet.memory``); slots are the config's ``parallel.devices`` (one process), or the
ranks of a ``--world N`` torchrun launch. --fit SIZE prints the largest batch whose peak
fits SIZE on every device.

Multiply-accumulates count weights x output positions (no bias adds, no LRN/pool), the
convention that gives 1,135,256,096 for the paper's AlexNet at G = 1 (Ioannou's table
shows 10,568 more: a different counting convention).
"""
from __future__ import annotations

import argparse
import json
import sys

from alexnet import memory
from alexnet.build import spec_from_config
from alexnet.config import ConfigError, load
from alexnet.spec import SpecError, hybrid_refusal
from parallel import PlacementError


def table(spec) -> str:
    cross = spec.cross_group_bytes(1)
    rows = [("layer", "input", "output", "params", "MACs", "x-group B/img (fwd)")]
    for layer in spec.layers():
        kind = {"own": f"per group, G={layer.groups}", "shuffle": f"shuffled, G={layer.groups}",
                "all": "cross-group", "replicated": "whole input"}[layer.exchange]
        rows.append((f"{layer.name} ({kind})", "x".join(map(str, layer.in_shape)), "x".join(map(str, layer.out_shape)),
                     f"{layer.params:,}", f"{layer.macs:,}", f"{cross.get(layer.name, 0):,}"))
    rows.append(("total", "", "", f"{spec.params():,}", f"{spec.macs():,}", f"{sum(cross.values()):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


#: what ``alexnet.memory.predict`` models: one process with its slots, one process per slot (x replicas), and
#: the hybrid (convs data-parallel over the ranks, fc layers split over them)
MODELLED_PLACEMENTS = ("local", "distributed", "hybrid", "auto")
#: the placements that run one process per rank (so need the launch's --world)
TORCHRUN_PLACEMENTS = ("distributed", "hybrid")


def slots_of(cfg: dict, spec, world: int | None) -> dict:
    """The predict() arguments for the config's placement: its devices in one process, or a torchrun world
    (distributed: K ranks per replica x D replicas; hybrid: K ranks, every one a conv replica and an fc
    slot). A placement it does not model is refused, as is a one-process placement with --world or a
    torchrun one without it: never another placement's figures."""
    placement = cfg["parallel"]["placement"]
    if placement not in MODELLED_PLACEMENTS:
        raise ConfigError(f"--memory predicts parallel.placement {', '.join(MODELLED_PLACEMENTS)}, not {placement}")
    if world and placement == "local":
        raise ConfigError("--world predicts a torchrun launch, and parallel.placement=local is one process; "
                          "drop --world, or set parallel.placement=distributed or hybrid")
    if placement in TORCHRUN_PLACEMENTS and not world:
        raise ConfigError(f"parallel.placement={placement} is one process per rank: give the launch's --world N")
    if placement == "hybrid":
        if refusal := hybrid_refusal(spec.layers()):
            raise ConfigError(refusal)
        return {"slots": world, "distributed": True, "hybrid": True, "labels": [f"rank{r}" for r in range(world)]}
    if world:
        from parallel.distributed import slots_for_world
        k = slots_for_world(world, spec.slot_groups)
        return {"slots": k, "replicas": world // k, "distributed": True, "labels": [f"rank{r}" for r in range(k)]}
    devices = cfg["parallel"]["devices"]
    devices = [devices] if isinstance(devices, str) else list(devices)
    if devices == ["auto"]:
        from parallel.placement import resolve_devices
        devices = resolve_devices(devices, spec.slot_groups)
    return {"slots": len(devices), "labels": [f"slot {k} ({d})" for k, d in enumerate(devices)],
            "same_device": len(set(devices)) == 1 and len(devices) > 1}


def memory_report(cfg: dict, spec, batch: int, precision: str, world: int | None, budget: int | None,
                  on: str | None = None) -> dict:
    """Per device: every category and the total (bytes); with a budget, the largest batch that fits."""
    where = slots_of(cfg, spec, world)
    o = cfg["optim"]
    # train.py's SGD is fused on CUDA (no copy per update); on CPU it copies one gradient at a time
    fused = on == "cuda" if on else any(label.split("(")[-1].startswith("cuda") for label in where["labels"])

    def slots_at(b):
        return memory.predict(spec, b, precision=precision, momentum=o["momentum"] > 0,
                              weight_decay=o["weight_decay"] > 0, fused_sgd=fused,
                              device_type="cuda" if fused else "cpu", **where)
    report = {"batch": batch, "precision": precision, "devices": {m.label: m.as_dict() for m in slots_at(batch)}}
    if budget is not None:
        report["fit_bytes"] = budget
        report["largest_batch"] = memory.largest_batch(lambda b: max(m.peak for m in slots_at(b)), budget)
        if world and where.get("replicas", 1) > 1:
            report["largest_batch_note"] = f"the global batch, split over {where['replicas']} data replicas"
        elif where.get("hybrid"):
            report["largest_batch_note"] = f"the global batch: the convs run on 1/{world} of it per rank"
    return report


def memory_table(report: dict) -> str:
    devices = report["devices"]
    rows = [["MiB"] + list(devices)]
    for cat in memory.CATEGORIES + ("peak",):
        rows.append([cat] + [f"{d[cat] / 2 ** 20:,.1f}" for d in devices.values()])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    first = next(iter(devices.values()))
    if first["exchange_by_layer"]:
        lines.append("exchange buffers of the first device: " + ", ".join(
            f"{k} {v / 2 ** 20:,.1f}" for k, v in first["exchange_by_layer"].items()) + " MiB")
    if "largest_batch" in report:
        lines.append(f"largest batch whose peak fits {report['fit_bytes'] / 2 ** 30:g} GiB on every device: "
                     f"{report['largest_batch']}" + (f" ({report['largest_batch_note']})"
                                                     if "largest_batch_note" in report else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, nargs="+", help="one or more configs, a table each")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--memory", action="store_true", help="predict the memory of a training step per device")
    p.add_argument("--batch", type=int, help="--memory: the global batch (default: the config's data.batch_size)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="--memory: default the config's train.precision")
    p.add_argument("--world", type=int, help="--memory: the ranks of a torchrun launch (default: one process)")
    p.add_argument("--on", choices=("cuda", "cpu"), help="--memory: the device type (default: the config's devices; "
                   "cpu for --world)")
    p.add_argument("--fit", help="--memory: print the largest batch whose peak fits this per device, e.g. 1.5GiB")
    p.add_argument("--json", action="store_true", help="--memory: one JSON object (bytes) instead of tables")
    args = p.parse_args(argv)
    try:
        cfgs = [load(path, args.overrides) for path in args.config]
        specs = [spec_from_config(cfg) for cfg in cfgs]
        if args.memory:
            budget = memory.parse_bytes(args.fit) if args.fit else None
            reports = {path: memory_report(cfg, spec, args.batch or cfg["data"]["batch_size"],
                                           args.precision or cfg["train"]["precision"], args.world, budget, args.on)
                       for path, cfg, spec in zip(args.config, cfgs, specs)}
    except (ConfigError, SpecError, PlacementError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.memory:
        if args.json:
            print(json.dumps(reports if len(reports) > 1 else next(iter(reports.values())), indent=2))
            return 0
        for path, report in reports.items():
            print(f"{path}: predicted memory of one SGD step, batch {report['batch']}, {report['precision']}")
            print(memory_table(report))
            print()
        return 0
    for path, spec in zip(args.config, specs):
        print(f"{path}: AlexNet, G = {spec.label}, input {spec.in_channels}x{spec.input_size}x{spec.input_size}, "
              f"{spec.num_classes} classes, exchanges: {spec.exchanges}")
        print(table(spec))
        print()
    print("x-group B/img: bytes all groups receive from the other groups per image in the forward pass "
          "(fp32); the backward pass sends the same volume back.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
