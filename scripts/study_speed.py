"""The efficiency half of the study: images/s of train.py's own step per config, measured alone, side by side.

Before a study trains (nothing else of it running), every config's model is built exactly
as train.py builds it (``benchmark.train_py_trainer``: the layout and conv formulations
train.py would choose) and its training step (forward, loss, backward, SGD) is timed on one
fixed batch of the config's size. Rounds alternate the configs, so the machine's drift
hits all alike; the median round counts. Written to ``<runs dir>/speed.json`` with the
commit and torch, and read by the report (``study_report``).

  python scripts/study_speed.py configs/fashion_mnist --configs g1 g2 g3 g4 --out runs/study/speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from alexnet.config import load
from alexnet.fit import code_commit
from alexnet.logs import write_json_atomic
from benchmark import Setting, time_steps, train_py_trainer

SPEED_FILE = "speed.json"


def measure(cfgs: dict[str, dict], rounds: int = 5, steps: int = 5) -> dict:
    """{config: {"images_per_s", "step_ms", "channels_last", "rounds_ms"}} for train.py's step of each config."""
    trainers, batches = {}, {}
    for name, cfg in cfgs.items():
        batch = cfg["data"]["batch_size"]
        spec, trainer = train_py_trainer(cfg, batch)
        trainers[name] = trainer
        batches[name] = Setting(trainer.placement.input_device).batch(spec, batch)
        time_steps(trainer, *batches[name], 3)  # warm-up: allocator, kernel selection
    per_round = {name: [] for name in cfgs}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            per_round[name].append(time_steps(trainer, *batches[name], steps))
    out = {}
    for name, times in per_round.items():
        sec = statistics.median(times)
        out[name] = {"images_per_s": cfgs[name]["data"]["batch_size"] / sec, "step_ms": 1000 * sec,
                     "channels_last": trainers[name].channels_last, "rounds_ms": [1000 * t for t in times]}
    return out


def write(path: str, configs: dict, rounds: int, steps: int) -> dict:
    record = {"what": "train.py's step (forward, loss, backward, SGD) on one fixed batch, alone, configs "
                      "alternating over rounds, median round", "commit": code_commit(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "rounds": rounds, "steps": steps,
              "configs": configs}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_json_atomic(record, path)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config_dir")
    p.add_argument("--configs", nargs="+", default=["g1", "g2", "g3", "g4"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cfgs = {name: load(os.path.join(args.config_dir, f"{name}.yaml"), args.overrides) for name in args.configs}
    result = measure(cfgs, args.rounds, args.steps)
    write(args.out, result, args.rounds, args.steps)
    for name, r in result.items():
        print(f"{name}: {r['images_per_s']:.0f} images/s ({r['step_ms']:.1f} ms a step, "
              f"{'NHWC' if r['channels_last'] else 'NCHW'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
