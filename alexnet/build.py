"""From a resolved config to the objects a run needs: spec, placement, model, data."""
from __future__ import annotations

import os

from alexnet.spec import AlexNetSpec
from parallel import LocalPlacement


def spec_from_config(cfg: dict) -> AlexNetSpec:
    return AlexNetSpec(**cfg["model"])


def wants_distributed(cfg: dict) -> bool:
    mode = cfg["parallel"]["placement"]
    launched = "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
    return mode == "distributed" or (mode == "auto" and launched)


def placement_from_config(cfg: dict):
    groups = cfg["model"]["groups"]
    if wants_distributed(cfg):
        from parallel.distributed import DistributedPlacement
        return DistributedPlacement.from_env(groups, cfg["parallel"]["backend"], cfg["parallel"]["timeout_s"])
    return LocalPlacement(groups, cfg["parallel"]["devices"])


def data_from_config(cfg: dict, placement):
    """(train, val) loaders for this process's data replica."""
    d, m, seed = cfg["data"], cfg["model"], cfg["run"]["seed"]
    common = dict(batch_size=d["batch_size"], val_batch_size=d["val_batch_size"], seed=seed,
                  replica=placement.replica, num_replicas=placement.num_replicas)
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
