"""A torchvision network you already have, split over slots by ``parallel.convert``, trained on Fashion-MNIST.

The network is built by torchvision (10 classes; its first convolution made to read one grey
channel), converted in one call (``parallel.convert``: each conv, linear, batch norm and
dropout held as its sharded twin with the original's weights), trained for a short epoch by
alexnet.engine's loop, then one step is measured: every process's memory by category
(torch's MemTracker) and the bytes each layer exchanges per step.

  python examples/convert.py --network resnet18 --groups 2 --devices cpu cpu --limit 2048   # 2 slots, one process
  torchrun --nproc-per-node 2 examples/convert.py --network resnet18 --groups 2 --limit 2048 # one process per slot
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resnext  # noqa: E402  (the training loop of the ResNeXt example, reused)

from parallel.convert import convert  # noqa: E402


def grey(model: nn.Module, in_channels: int) -> nn.Module:
    """The model with its first convolution reading ``in_channels`` channels (Fashion-MNIST is grey)."""
    path, first = next((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d))
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name,
            nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride, first.padding,
                      bias=first.bias is not None))
    return model


def converted(name: str):
    """``network(placement, in_channels)`` for resnext.main: torchvision's ``name``, converted."""
    import torchvision

    def network(placement, in_channels: int = 1) -> nn.Module:
        return convert(grey(getattr(torchvision.models, name)(num_classes=10), in_channels), placement)
    return network


def measure(name: str, groups: int, devices: list[str], batch: int) -> None:
    """One SGD step of a fresh converted model: memory per process and device, and bytes per exchanging layer."""
    from alexnet.memwatch import measure_step
    placement, runtime = resnext.placement_for(groups, devices)
    torch.manual_seed(0)
    model = converted(name)(placement)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch // runtime.num_replicas, 1, 28, 28, device=placement.input_device)
    labels = torch.randint(0, 10, (images.shape[0],), device=placement.output_device)
    measured = measure_step(model, optimizer, images, labels, runtime)
    who = f"rank {torch.distributed.get_rank()}" if torch.distributed.is_initialized() else "this process"
    for device, categories in measured["peak"].items():
        print(f"{who}, {device}: peak {categories['total'] / 2**20:.1f} MiB of one step at batch {batch} ("
              + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in categories.items() if k != "total") + ")", flush=True)
    if runtime.is_main:
        exchanged = placement.counter.by_module(model)
        print(f"bytes exchanged per step, by layer: {sum(exchanged.values()) / 1e6:.2f} MB in all")
        for key, n in exchanged.items():
            print(f"  {key:<40}{n / 1e3:>10.1f} kB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(add_help=False)  # the rest (--epochs, --limit, ...) is resnext.py's
    p.add_argument("--network", default="resnet18", help="a torchvision classifier: resnet18, alexnet, vgg11_bn, ...")
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--devices", nargs="+", default=["auto"])
    p.add_argument("--limit", type=int, default=0, help="only the first N images of each split (0: all)")
    known, rest = p.parse_known_args(argv)
    forwarded = rest + ["--groups", str(known.groups), "--limit", str(known.limit), "--devices", *known.devices]
    code = resnext.main(forwarded, network=converted(known.network), name=f"convert-{known.network}")
    if code == 0:
        measure(known.network, known.groups, known.devices, 128)
    return code


if __name__ == "__main__":
    sys.exit(main())
