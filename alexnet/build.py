"""From a resolved config to the objects a run needs: spec, placement, model, data."""
from __future__ import annotations

import os
from dataclasses import dataclass

from alexnet.spec import AlexNetSpec
from parallel import LocalPlacement, LocalRuntime, PlacementError


def spec_from_config(cfg: dict) -> AlexNetSpec:
    return AlexNetSpec(**cfg["model"])


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def wants_distributed(cfg: dict) -> bool:
    mode = cfg["parallel"]["placement"]
    return mode == "distributed" or (mode == "auto" and launched_by_torchrun())


@dataclass
class Where:
    """Where a run's layers live and how its processes coordinate.

    placement     the groups of the conv layers (and of every layer, unless fc_placement)
    runtime       replicas and processes: what the training loop talks to
    fc_placement  hybrid only: the fc layers, split over the ranks by output features
    rows          hybrid only: the row exchange between the two halves
    """
    placement: object
    runtime: object
    fc_placement: object = None
    rows: object = None

    def describe(self) -> str:
        if self.fc_placement is None:
            return self.placement.describe()
        return (f"hybrid: convs data-parallel over {self.runtime.num_replicas} processes ({self.placement.describe()} "
                f"in each), fc layers over {self.fc_placement.describe()}")


def placement_from_config(cfg: dict, spec: AlexNetSpec | None = None, counter=None) -> Where:
    """Where the groups live, and how this process coordinates with others.

    Slots (devices, or ranks per replica) must divide every layer's group count, so the
    placement is built for the spec's ``slot_groups`` (G itself when every layer has G).
    ``counter``: the CommCounter to record into (a timed one for benchmarks); default a new one.
    """
    slot_groups = (spec or spec_from_config(cfg)).slot_groups
    p = cfg["parallel"]
    if p["placement"] in ("hybrid", "distributed") and not launched_by_torchrun():
        raise PlacementError(f"parallel.placement={p['placement']} runs one process per rank: launch it with "
                             "torchrun --nproc-per-node K train.py ..., or use parallel.placement=local")
    if p["placement"] == "hybrid":
        from parallel.hybrid import init_hybrid_from_env
        conv, fc, rows, runtime = init_hybrid_from_env(slot_groups, p["backend"], p["timeout_s"], counter)
        return Where(conv, runtime, fc, rows)
    if wants_distributed(cfg):
        from parallel.distributed import init_from_env
        return Where(*init_from_env(slot_groups, p["backend"], p["timeout_s"], counter))
    return Where(LocalPlacement(slot_groups, p["devices"], counter=counter), LocalRuntime())


def data_from_config(cfg: dict, placement, runtime):
    """(train, val) loaders for this process's data replica."""
    d, m, seed = cfg["data"], cfg["model"], cfg["run"]["seed"]
    common = dict(batch_size=d["batch_size"], val_batch_size=d["val_batch_size"], seed=seed,
                  replica=runtime.replica, num_replicas=runtime.num_replicas)
    device = placement.input_device  # in-memory data lives where the first layer reads it
    if d["dataset"] == "fake":
        from data import fake
        return fake.build(m["num_classes"], m["in_channels"], m["input_size"], train_samples=d["fake_train_samples"],
                          val_samples=d["fake_val_samples"], device=device, **common)
    if d["dataset"] == "fashion_mnist":
        from data import fashion_mnist
        return fashion_mnist.build(d["root"], size=m["input_size"], augment=d["augment"],
                                   crop_padding=d["crop_padding"], limit=d["limit"], download=d["download"],
                                   device=device, **common)
    from data import imagefolder
    return imagefolder.build(d["root"], size=m["input_size"], workers=d["workers"], pca_std=d["pca_std"],
                             eval_crops=d["eval_crops"], decode=d["decode"], device=device, **common)
