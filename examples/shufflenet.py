"""ShuffleNet v1 units (Zhang et al. 2018) built only from parallel/, trained on Fashion-MNIST.

A unit, each of its G groups on its own slot (device or process):
  gconv1  1x1, each group its own maps (nn.Conv2d(groups=G))      -> bn1 -> relu
  shuffle channel shuffle: group g takes the g-th 1/G of every group's maps (the only exchange)
  dwconv  3x3 depthwise, stride s (nn.Conv2d(groups=channels))     -> bn2
  gconv2  1x1, each group its own maps                              -> bn3
  stride 1: relu(x + branch); stride 2: relu(cat(avgpool3x3/2(x), branch))
The stride-2 concatenation is inside each group (``parallel.cat``): group g of the result
holds its shortcut maps, then its branch maps, so the twin concatenates group by group,
cat(P_0, B_0, ..., P_{G-1}, B_{G-1}), and every group keeps reading only its own maps.
``Twin`` is the same network in plain torch (same module names: full_state_dict maps 1:1).

  python examples/shufflenet.py --groups 2 --epochs 1                       # one process
  torchrun --nproc-per-node 2 examples/shufflenet.py --groups 2 --epochs 1  # one process per group
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from parallel import (ChannelShuffle, GroupBatchNorm2d, GroupConv2d, GroupLinear, PerGroup, add, cat,
                      gather_output)

#: stem width, then (output channels, units) per stage; widths fit G = 1, 2, 4 (a unit's
#: bottleneck, out / 4, must divide by G^2 for the shuffle)
STEM, STAGES = 32, ((64, 2), (128, 2))


class ShuffleUnit(nn.Module):
    def __init__(self, placement, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        mid, self.stride = out_channels // 4, stride
        branch = out_channels - in_channels if stride == 2 else out_channels
        self.gconv1 = GroupConv2d(placement, in_channels, mid, 1, exchange="own", bias=False)
        self.bn1 = GroupBatchNorm2d(placement, mid)
        self.shuffle = ChannelShuffle(placement)
        self.dwconv = GroupConv2d(placement, mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = GroupBatchNorm2d(placement, mid)
        self.gconv2 = GroupConv2d(placement, mid, branch, 1, exchange="own", bias=False)
        self.bn3 = GroupBatchNorm2d(placement, branch)
        self.relu = PerGroup(placement, nn.ReLU(), channel_wise=True)
        self.pool = PerGroup(placement, nn.AvgPool2d(3, 2, 1), channel_wise=True)

    def forward(self, x):
        out = self.shuffle(self.relu(self.bn1(self.gconv1(x))))
        out = self.bn3(self.gconv2(self.bn2(self.dwconv(out))))
        return self.relu(add(x, out) if self.stride == 1 else cat(self.pool(x), out))


class GroupShuffleNet(nn.Module):
    """stem (3x3 stride 2 over the whole image, every group its share) -> stages of units -> pool -> fc."""

    def __init__(self, placement, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.placement = placement
        self.stem = GroupConv2d(placement, in_channels, STEM, 3, stride=2, padding=1, exchange="replicated",
                                bias=False)
        self.bn = GroupBatchNorm2d(placement, STEM)
        self.relu = PerGroup(placement, nn.ReLU(), channel_wise=True)
        units, width = [], STEM
        for out, n in STAGES:
            units += [ShuffleUnit(placement, width if i == 0 else out, out, 2 if i == 0 else 1) for i in range(n)]
            width = out
        self.units = nn.Sequential(*units)
        self.pool = PerGroup(placement, nn.AdaptiveAvgPool2d(1), channel_wise=True)
        self.fc = GroupLinear(placement, width, num_classes, exchange="all")

    def forward(self, images):
        x = self.units(self.relu(self.bn(self.stem(images))))
        return gather_output(self.placement, self.fc(self.pool(x)))


# --- the twin, in plain torch --------------------------------------------------------------

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Group g takes the g-th 1/G slice of every group's maps: (h, g, c) -> (g, h, c) on dim 1."""
    return x.unflatten(1, (groups, groups, -1)).transpose(1, 2).flatten(1, 3)


def cat_by_group(a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """cat(A_0, B_0, ..., A_{G-1}, B_{G-1}) along dim 1: parallel.cat's reference order."""
    return torch.cat([t for pair in zip(a.chunk(groups, 1), b.chunk(groups, 1)) for t in pair], dim=1)


class TwinUnit(nn.Module):
    def __init__(self, groups: int, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        mid, self.stride, self.groups = out_channels // 4, stride, groups
        branch = out_channels - in_channels if stride == 2 else out_channels
        self.gconv1 = nn.Conv2d(in_channels, mid, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.dwconv = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.gconv2 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.gconv1(x))), self.groups)
        out = self.bn3(self.gconv2(self.bn2(self.dwconv(out))))
        if self.stride == 1:
            return F.relu(x + out)
        return F.relu(cat_by_group(F.avg_pool2d(x, 3, 2, 1), out, self.groups))


class Twin(nn.Module):
    """GroupShuffleNet in plain torch with nn.Conv2d(groups=G); the same module names."""

    def __init__(self, groups: int, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, STEM, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(STEM)
        units, width = [], STEM
        for out, n in STAGES:
            units += [TwinUnit(groups, width if i == 0 else out, out, 2 if i == 0 else 1) for i in range(n)]
            width = out
        self.units = nn.Sequential(*units)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, images):
        x = self.units(F.relu(self.bn(self.stem(images))))
        return self.fc(x.mean(dim=(2, 3)))


if __name__ == "__main__":
    from resnext import main  # one training loop for both examples
    sys.exit(main(network=GroupShuffleNet, name="shufflenet"))
