"""AlexNet with G filter groups built from parallel/ layers, and its mapping to the reference.

The same code runs for every placement: the model only sees the placement's local slots
and asks it to gather at the cross-group layers (default conv3, fc6, fc7, fc8).
"""
from __future__ import annotations

import torch
from torch import nn

from alexnet.lrn import FastLRN
from alexnet.spec import LRN_AFTER, LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, POOL_AFTER, POOL_KERNEL, POOL_STRIDE, AlexNetSpec
from parallel import GroupConv2d, GroupLinear, PerGroup, gather_output


class GroupAlexNet(nn.Module):
    """AlexNet whose filter groups live where ``placement`` puts them.

    Forward takes the image batch (any device) and returns the logits of all groups,
    concatenated in group order on the placement's output device.
    """

    def __init__(self, spec: AlexNetSpec, placement, lrn_module: type = FastLRN):
        super().__init__()
        self.spec, self.placement = spec, placement
        self.layer_infos = spec.layers()
        relu = PerGroup(placement, nn.ReLU(), channel_wise=True)
        lrn = PerGroup(placement, lrn_module(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K))
        pool = PerGroup(placement, nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE), channel_wise=True)
        drop = PerGroup(placement, nn.Dropout(spec.dropout), channel_wise=True)
        self.stages = nn.ModuleList()
        self.weight_layers: dict[str, nn.Module] = {}
        for i, info in enumerate(self.layer_infos):
            mode = "replicated" if i == 0 else ("all" if info.cross else "own")
            if info.kind == "conv":
                layer = GroupConv2d(placement, info.in_channels, info.out_channels, info.kernel, info.stride,
                                    info.padding, mode, info.name)
                self.stages.append(layer)
                self.stages.append(relu)
                if spec.lrn and info.name in LRN_AFTER:
                    self.stages.append(lrn)
                if info.name in POOL_AFTER:
                    self.stages.append(pool)
            else:
                layer = GroupLinear(placement, info.in_channels, info.out_channels, mode, info.name)
                self.stages.append(layer)
                if info.name != "fc8":
                    self.stages.extend([relu, drop])
            self.weight_layers[info.name] = layer
        self.class_split = self.weight_layers["fc8"].group_out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for stage in self.stages:
            x = stage(x)
        return gather_output(self.placement, x, self.class_split)

    # --- mapping to the single-device reference (ReferenceAlexNet.state_dict() keys) ---

    def _reference_keys(self, name: str) -> tuple[str, str]:
        info = next(i for i in self.layer_infos if i.name == name)
        prefix = f"{name}.conv" if info.kind == "fc" and info.grouped else name
        return f"{prefix}.weight", f"{prefix}.bias"

    def _reference_weight_shape(self, name: str) -> tuple[int, ...]:
        info = next(i for i in self.layer_infos if i.name == name)
        G = self.spec.groups
        if info.kind == "conv":
            cin = info.in_channels // G if info.grouped else info.in_channels
            return (info.out_channels, cin, info.kernel, info.kernel)
        return (info.out_channels, info.in_channels // G, 1) if info.grouped else (info.out_channels, info.in_channels)

    def to_reference(self, value_of=None) -> dict[str, torch.Tensor]:
        """The reference state_dict assembled from every group's shard (on CPU).

        ``value_of(param)`` substitutes a per-parameter tensor of the same shape (e.g. an
        optimizer's momentum buffer), so optimizer state maps exactly like the weights.
        """
        out = {}
        for name, layer in self.weight_layers.items():
            wkey, bkey = self._reference_keys(name)
            full = layer.to_full(value_of)
            out[wkey] = full["weight"].reshape(self._reference_weight_shape(name))
            out[bkey] = full["bias"]
        return out

    def from_reference(self, state: dict[str, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
        """Each local parameter's slice of a reference state_dict, on the parameter's device."""
        out = {}
        for name, layer in self.weight_layers.items():
            wkey, bkey = self._reference_keys(name)
            shape = self._reference_weight_shape(name)
            for key, expected in ((wkey, shape), (bkey, shape[:1])):
                if key not in state:
                    raise KeyError(f"reference state has no {key!r}")
                if tuple(state[key].shape) != tuple(expected):
                    raise ValueError(f"{key}: shape {tuple(state[key].shape)} does not fit this model's "
                                     f"{tuple(expected)} (another G or geometry?)")
            out.update(layer.slices_of({"weight": state[wkey], "bias": state[bkey]}))
        return out

    def load_reference(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a reference state_dict into the shards (exact: slices, no arithmetic)."""
        with torch.no_grad():
            for p, value in self.from_reference(state).items():
                p.copy_(value)
