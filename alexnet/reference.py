"""The single-device reference: the same AlexNet in plain torch, grouping done by torch.

conv2/conv4/conv5 (when not cross-group) are ``nn.Conv2d(groups=G)`` with each layer's own
G; cross-group layers are dense; a shuffled layer is ``ChannelShuffle(G)`` then
``nn.Conv2d(groups=G)``; LRN is applied to each group's channels separately; an fc layer
that is not cross-group is block-diagonal (``GroupedLinear``). The model-parallel network
must compute exactly this, and its weights map onto this module's state_dict by slicing
output rows (``parallel.full_state_dict`` of GroupAlexNet has this module's keys).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from alexnet.spec import LRN_AFTER, LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, POOL_AFTER, POOL_KERNEL, POOL_STRIDE, AlexNetSpec


class GroupLRN(nn.Module):
    """LocalResponseNorm over each group's channels only: (N, G*C, H, W) -> (N*G, C, H, W) -> back."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups
        self.lrn = nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)

    def forward(self, x):
        n, c, h, w = x.shape
        return self.lrn(x.reshape(n * self.groups, c // self.groups, h, w)).reshape(n, c, h, w)


class ChannelShuffle(nn.Module):
    """Group g receives the g-th 1/G slice of every group's maps: channel (h, g, c) -> (g, h, c),
    with h the source group, g the destination group and c < C/G^2 the map inside the slice."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        G = self.groups
        return x.unflatten(1, (G, G, -1)).transpose(1, 2).flatten(1, 3)


class GroupedLinear(nn.Module):
    """Block-diagonal linear layer: Y_g = X_g A_g^T + b_g, X split into G equal groups of features.

    ``weight`` is (out_features, in_features / G), group g's rows ``[g out/G, (g+1) out/G)``:
    the rows GroupLinear(exchange="own") stores, so the two state dicts share keys and shapes.
    Computed as a grouped 1x1 convolution; initialised as nn.Conv1d(groups=G) would be.
    """

    def __init__(self, in_features: int, out_features: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups))
        self.bias = nn.Parameter(torch.empty(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return F.conv1d(x.unsqueeze(-1), self.weight.unsqueeze(-1), self.bias, groups=self.groups).squeeze(-1)


class ReferenceAlexNet(nn.Module):
    """Plain-torch AlexNet with G filter groups; state_dict keys ``<layer>.weight`` / ``.bias``."""

    def __init__(self, spec: AlexNetSpec):
        super().__init__()
        self.spec = spec
        self.layer_names = []
        # Every stage is registered in order (children() keeps insertion order), so
        # forward is a straight walk and train()/eval() reaches the dropout stages.
        for info in spec.layers():
            name = info.name
            self.layer_names.append(name)
            suffix = name[-1]
            G = info.groups
            if info.exchange == "shuffle":
                self.add_module(f"shuffle{suffix}", ChannelShuffle(G))
            if info.kind == "conv":
                self.add_module(name, nn.Conv2d(info.in_channels, info.out_channels, info.kernel, info.stride,
                                                info.padding, groups=G if info.grouped else 1))
                self.add_module(f"relu{suffix}", nn.ReLU())
                if spec.lrn and name in LRN_AFTER:
                    self.add_module(f"lrn{suffix}", GroupLRN(G))
                if name in POOL_AFTER:
                    self.add_module(f"pool{suffix}", nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE))
                if name == "conv5":
                    self.add_module("flatten", nn.Flatten(1))
            else:
                self.add_module(name, GroupedLinear(info.in_channels, info.out_channels, G) if info.grouped
                                else nn.Linear(info.in_channels, info.out_channels))
                if name != "fc8":
                    self.add_module(f"relu{suffix}", nn.ReLU())
                    self.add_module(f"drop{suffix}", nn.Dropout(spec.dropout))

    def forward(self, x):
        for stage in self.children():
            x = stage(x)
        return x
