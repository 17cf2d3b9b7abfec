"""torchvision's ResNeXt layout built only from parallel/, trained on Fashion-MNIST.

torchvision.models.resnet.ResNet(Bottleneck, layers, groups=G, width_per_group=w), written
with GroupConv2d, GroupBatchNorm2d and GroupLinear, module for module and name for name, so
``parallel.full_state_dict`` of this network *is* torchvision's state dict (running
statistics included) and ``load_full_state_dict`` takes one. In each Bottleneck:
  conv1 1x1, every group's maps in  (all-gather)    -> bn1 -> relu
  conv2 3x3, each group its own     (nn.Conv2d(groups=G): no communication) -> bn2 -> relu
  conv3 1x1, every group's maps in  (all-gather)    -> bn3, + identity (or downsample:
                                    1x1 stride-s conv over all groups' maps, bn) -> relu
The stem convolves the whole image in every group; fc reads every group's pooled maps.
Every BatchNorm keeps its group's statistics on the group's slot. The network draws its
initial weights exactly as torchvision's does (default init, then Kaiming-normal fan-out
for convolutions, BatchNorm 1 and 0), in the same order, so a seed gives torchvision's
initial network under every placement.

  python examples/resnext.py --groups 4 --epochs 1                       # one process (devices: auto)
  python examples/resnext.py --groups 2 --devices cpu cpu --epochs 1     # two slots in one process
  torchrun --nproc-per-node 2 examples/resnext.py --groups 2 --epochs 1  # one process per group (gloo on CPU)

Writes metrics.jsonl and summary.json (and TensorBoard events) into --run-dir, like train.py.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch
from torch import nn

from parallel import (GroupBatchNorm2d, GroupConv2d, GroupLinear, LocalPlacement, LocalRuntime, PerGroup, add,
                      gather_output)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck(groups=G): y = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))) + shortcut(x)).

    width = int(planes * base_width / 64) * G; conv2 carries the stride (ResNet v1.5).
    """

    expansion = 4

    def __init__(self, placement, inplanes: int, planes: int, stride: int = 1, downsample=None,
                 base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * placement.groups
        self.conv1 = GroupConv2d(placement, inplanes, width, 1, exchange="all", bias=False)
        self.bn1 = GroupBatchNorm2d(placement, width)
        self.conv2 = GroupConv2d(placement, width, width, 3, stride=stride, padding=1, exchange="own", bias=False)
        self.bn2 = GroupBatchNorm2d(placement, width)
        self.conv3 = GroupConv2d(placement, width, planes * self.expansion, 1, exchange="all", bias=False)
        self.bn3 = GroupBatchNorm2d(placement, planes * self.expansion)
        self.relu = PerGroup(placement, nn.ReLU(), channel_wise=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(add(out, self.downsample(x) if self.downsample is not None else x))


class GroupResNeXt(nn.Module):
    """torchvision's ResNet(Bottleneck, layers, groups=G, width_per_group=base_width) with G = placement.groups.

    ``base`` scales the planes (torchvision: 64, giving 64/128/256/512; smaller trains faster);
    ``in_channels`` 3 as torchvision, 1 for Fashion-MNIST.
    """

    def __init__(self, placement, layers=(1, 1, 1, 1), base_width: int = 4, num_classes: int = 10,
                 in_channels: int = 3, base: int = 64):
        super().__init__()
        self.placement, self.base_width, self.inplanes = placement, base_width, base
        self.conv1 = GroupConv2d(placement, in_channels, base, 7, stride=2, padding=3, exchange="replicated",
                                 bias=False)
        self.bn1 = GroupBatchNorm2d(placement, base)
        self.relu = PerGroup(placement, nn.ReLU(), channel_wise=True)
        self.maxpool = PerGroup(placement, nn.MaxPool2d(3, 2, 1), channel_wise=True)
        self.layer1 = self._make_layer(base, layers[0])
        self.layer2 = self._make_layer(2 * base, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * base, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * base, layers[3], stride=2)
        self.avgpool = PerGroup(placement, nn.AdaptiveAvgPool2d(1), channel_wise=True)
        self.fc = GroupLinear(placement, 8 * base * Bottleneck.expansion, num_classes, exchange="all")
        # torchvision's re-initialisation, drawn on the full tensors in its module order
        for m in self.modules():
            if isinstance(m, GroupConv2d):
                m.init_full_(lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"))

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        """As torchvision's: the downsample is built (and draws its weights) before the first block."""
        p, out = self.placement, planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(GroupConv2d(p, self.inplanes, out, 1, stride=stride, exchange="all",
                                                   bias=False), GroupBatchNorm2d(p, out))
        layers = [Bottleneck(p, self.inplanes, planes, stride, downsample, self.base_width)]
        self.inplanes = out
        layers += [Bottleneck(p, out, planes, base_width=self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return gather_output(self.placement, self.fc(self.avgpool(x)))


def torchvision_twin(groups: int, layers=(1, 1, 1, 1), base_width: int = 4, num_classes: int = 10) -> nn.Module:
    """torchvision's own network with the same layout (built locally; no weights downloaded)."""
    from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck
    from torchvision.models.resnet import ResNet
    return ResNet(TorchvisionBottleneck, list(layers), num_classes=num_classes, groups=groups,
                  width_per_group=base_width)


def placement_for(groups: int, devices: list[str]):
    """(placement, runtime). torchrun: one process per group (gloo on CPU, NCCL on GPUs); otherwise one
    process over ``devices``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from parallel.distributed import init_from_env
        return init_from_env(groups, "auto")
    return LocalPlacement(groups, devices), LocalRuntime()


def fastest_layout(model: nn.Module, placement, runtime, batch: int) -> bool:
    """On the CPU in one process, what train.py does (alexnet.accel): glibc keeps freed memory, and NCHW is
    timed against NHWC (forward + backward, eval mode, no value changes), the faster kept. Elsewhere NCHW."""
    if placement.input_device.type != "cpu" or not isinstance(runtime, LocalRuntime):
        return False
    from alexnet.accel import keep_freed_memory
    from parallel.tuning import choose_memory_format
    keep_freed_memory()
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # not the run's RNG stream

    def forward_backward(channels_last: bool) -> None:
        images = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        model(images).sum().backward()

    record = choose_memory_format(model, forward_backward)
    print(f"layout: {'NHWC' if record['choice'] else 'NCHW'} "
          f"({', '.join(f'{k} {v:.1f} ms' for k, v in zip(('NCHW', 'NHWC'), record['ms'].values()))})", flush=True)
    return record["choice"]


def main(argv=None, network=None, name: str = "resnext") -> int:
    """Train ``network(placement, in_channels=1)`` (default GroupResNeXt) on Fashion-MNIST; the
    training loop is alexnet.engine's, the runtime's gradient sync and all."""
    from alexnet.engine import Trainer, evaluate, train_one_epoch
    from alexnet.logs import RunLog
    from alexnet.schedule import LRSchedule
    from data.errors import DataError
    from data.fashion_mnist import build
    from parallel import PlacementError, full_state_dict

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--devices", nargs="+", default=["auto"])
    p.add_argument("--limit", type=int, default=0, help="only the first N images of each split (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", type=int, default=16, help="ResNeXt: planes of the first stage (torchvision: 64)")
    p.add_argument("--run-dir", default=None, help="default runs/resnext/g<G>-s<seed>")
    args = p.parse_args(argv)
    run_dir = args.run_dir or os.path.join("runs", name, f"g{args.groups}-s{args.seed}")
    try:
        placement, runtime = placement_for(args.groups, args.devices)
        torch.manual_seed(args.seed)
        model = (network or functools.partial(GroupResNeXt, base=args.base))(placement, in_channels=1)
        train, val = build(None, args.batch_size, 512, 28, args.seed, runtime.replica, runtime.num_replicas,
                           crop_padding=2, limit=args.limit, device=placement.input_device)
    except (PlacementError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    schedule = LRSchedule("cosine", args.lr, args.epochs, len(train))
    channels_last = fastest_layout(model, placement, runtime, args.batch_size)
    trainer = Trainer(model, optimizer, placement, runtime, seed=args.seed, channels_last=channels_last)
    log = RunLog(run_dir, runtime.is_main)
    step, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        result = train_one_epoch(trainer, train, schedule, epoch, step)
        step = result["step"]
        record = {"epoch": epoch + 1, "step": step, "train_loss": result["train_loss"],
                  "train_top1_err": result["train_top1_err"], **evaluate(trainer, val),
                  "images_per_s": result["images_per_s"], "groups": args.groups,
                  "cross_group_mb_per_step": placement.counter.total() / 1e6}
        log.epoch(record)
        if runtime.is_main:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {record['train_loss']:.4f}  "
                  f"val top-1 {record['val_top1_err']:.2f}%  {record['images_per_s']:.0f} img/s", flush=True)
    summary = {"network": name, "groups": args.groups, "seed": args.seed, "epochs": args.epochs,
               "final_val_top1_err": record["val_top1_err"], "final_val_top5_err": record["val_top5_err"],
               "params": sum(v.numel() for k, v in full_state_dict(model).items() if "running" not in k
                             and "num_batches" not in k),
               "wall_s": time.perf_counter() - start, "placement": placement.describe()}
    log.summary(summary)
    log.close()
    if runtime.is_main:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
