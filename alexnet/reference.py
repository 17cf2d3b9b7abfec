"""The single-device reference: the same AlexNet in plain torch, grouping done by torch.

conv2/conv4/conv5 (when not cross-group) are ``nn.Conv2d(groups=G)`` with each layer's own
G; cross-group layers are dense; a shuffled layer is ``ChannelShuffle(G)`` then
``nn.Conv2d(groups=G)``; LRN is applied to each group's channels separately; an fc layer
that is not cross-group is a grouped 1x1 convolution. The model-parallel network must compute exactly
this, and its weights map onto this module's state_dict by slicing output rows.
"""
from __future__ import annotations

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
    """Block-diagonal linear layer: a grouped 1x1 convolution over (N, F, 1)."""

    def __init__(self, in_features: int, out_features: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(in_features, out_features, 1, groups=groups)

    def forward(self, x):
        return self.conv(x.unsqueeze(-1)).squeeze(-1)


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
