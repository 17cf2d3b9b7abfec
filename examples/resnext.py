"""A small ResNeXt-style network built only from parallel/, trained on Fashion-MNIST.

Each block is 1x1 conv -> grouped 3x3 conv -> 1x1 conv, plus the block's input:
  a: 1x1, every group's maps in   (a cross-group layer: all-gather)
  b: 3x3, each group its own maps (no communication: nn.Conv2d(groups=G))
  c: 1x1, every group's maps in   (a cross-group layer)
so groups talk twice per block, and the grouped 3x3 convolution, where most of the
multiply-accumulates are, runs with each group on its own device or process. The same
network in plain torch (``Reference``) has the same module names, so
``parallel.full_state_dict`` / ``load_full_state_dict`` map weights both ways.

  python examples/resnext.py --groups 4 --epochs 1                       # one process (devices: auto)
  python examples/resnext.py --groups 2 --devices cpu cpu --epochs 1     # two slots in one process
  torchrun --nproc-per-node 2 examples/resnext.py --groups 2 --epochs 1  # one process per group (gloo on CPU)

Writes metrics.jsonl and summary.json (and TensorBoard events) into --run-dir, like train.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from parallel import GroupConv2d, GroupLinear, LocalPlacement, LocalRuntime, PerGroup, Sharded, gather_output  # noqa: E402


def add(x: Sharded, y: Sharded) -> Sharded:
    """Residual sum of two sharded activations with the same channel split (slot by slot)."""
    return Sharded(tuple(a + b for a, b in zip(x.parts, y.parts)), x.group_sizes)


class Block(nn.Module):
    """y = relu(x + c(relu(b(relu(a(x)))))): a and c are 1x1 over all groups, b is 3x3 per group."""

    def __init__(self, placement, channels: int, width: int):
        super().__init__()
        self.a = GroupConv2d(placement, channels, width, 1, input_mode="all", name="a", bias=False)
        self.b = GroupConv2d(placement, width, width, 3, padding=1, input_mode="own", name="b", bias=False)
        self.c = GroupConv2d(placement, width, channels, 1, input_mode="all", name="c")
        self.relu = PerGroup(placement, nn.ReLU(), channel_wise=True)

    def forward(self, x):
        return self.relu(add(x, self.c(self.relu(self.b(self.relu(self.a(x)))))))


class GroupResNeXt(nn.Module):
    """stem (3x3 stride 2 over the whole image) -> blocks -> global average pool -> linear (classes over groups)."""

    def __init__(self, placement, classes: int = 10, channels: int = 32, width: int = 32, blocks: int = 2):
        super().__init__()
        self.placement = placement
        self.stem = GroupConv2d(placement, 1, channels, 3, stride=2, padding=1, input_mode="replicated", name="stem")
        self.blocks = nn.ModuleList(Block(placement, channels, width) for _ in range(blocks))
        self.relu = PerGroup(placement, nn.ReLU(), channel_wise=True)
        self.pool = PerGroup(placement, nn.AdaptiveAvgPool2d(1), channel_wise=True)
        self.head = GroupLinear(placement, channels, classes, input_mode="all", name="head")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(images))
        for block in self.blocks:
            x = block(x)
        return gather_output(self.placement, self.head(self.pool(x)))


class ReferenceBlock(nn.Module):
    def __init__(self, groups: int, channels: int, width: int):
        super().__init__()
        self.a = nn.Conv2d(channels, width, 1, bias=False)
        self.b = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.c = nn.Conv2d(width, channels, 1)

    def forward(self, x):
        return torch.relu(x + self.c(torch.relu(self.b(torch.relu(self.a(x))))))


class Reference(nn.Module):
    """The same network in plain torch, with nn.Conv2d(groups=G); module names match GroupResNeXt's."""

    def __init__(self, groups: int, classes: int = 10, channels: int = 32, width: int = 32, blocks: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(ReferenceBlock(groups, channels, width) for _ in range(blocks))
        self.head = nn.Linear(channels, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(images))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def placement_for(groups: int, devices: list[str]):
    """(placement, runtime). torchrun: one process per group (gloo on CPU, NCCL on GPUs); otherwise one
    process over ``devices``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from parallel.distributed import init_from_env
        return init_from_env(groups, "auto")
    return LocalPlacement(groups, devices), LocalRuntime()


def main(argv=None) -> int:
    from alexnet.engine import evaluate, train_one_epoch
    from alexnet.logs import RunLog
    from alexnet.schedule import LRSchedule
    from data.errors import DataError
    from data.fashion_mnist import build
    from parallel import PlacementError

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--devices", nargs="+", default=["auto"])
    p.add_argument("--limit", type=int, default=0, help="only the first N images of each split (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None, help="default runs/resnext/g<G>-s<seed>")
    args = p.parse_args(argv)
    run_dir = args.run_dir or os.path.join("runs", "resnext", f"g{args.groups}-s{args.seed}")
    try:
        placement, runtime = placement_for(args.groups, args.devices)
        torch.manual_seed(args.seed)
        model = GroupResNeXt(placement)
        train, val = build(None, args.batch_size, 512, 28, args.seed, runtime.replica, runtime.num_replicas,
                           crop_padding=2, limit=args.limit, device=placement.input_device)
    except (PlacementError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    schedule = LRSchedule("cosine", args.lr, args.epochs, len(train))
    log = RunLog(run_dir, runtime.is_main)
    step, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        result = train_one_epoch(model, train, optimizer, schedule, placement, runtime, epoch, step, args.seed)
        step = result["step"]
        record = {"epoch": epoch + 1, "step": step, "train_loss": result["train_loss"],
                  "train_top1_err": result["train_top1_err"], **evaluate(model, val, placement, runtime),
                  "images_per_s": result["images_per_s"], "groups": args.groups,
                  "cross_group_mb_per_step": placement.counter.total() / 1e6}
        log.epoch(record)
        if runtime.is_main:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {record['train_loss']:.4f}  "
                  f"val top-1 {record['val_top1_err']:.2f}%  {record['images_per_s']:.0f} img/s", flush=True)
    summary = {"groups": args.groups, "seed": args.seed, "epochs": args.epochs,
               "final_val_top1_err": record["val_top1_err"], "final_val_top5_err": record["val_top5_err"],
               "params": sum(p.numel() for p in Reference(args.groups).parameters()),
               "wall_s": time.perf_counter() - start, "placement": placement.describe()}
    log.summary(summary)
    log.close()
    if runtime.is_main:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
