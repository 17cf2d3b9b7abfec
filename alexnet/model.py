"""AlexNet with G filter groups built from parallel/ layers, and its mapping to the reference.

The same code runs for every placement: the model only sees the placement's local slots
and asks it to exchange maps where the spec says (default: all-gather at conv3, fc6, fc7,
fc8; ``model.exchange`` may make a layer ``own`` or ``shuffle``). Each layer has its own G
(``model.groups`` may list one per conv layer).
"""
from __future__ import annotations

import torch
from torch import nn

from alexnet.lrn import FastLRN
from alexnet.spec import LRN_AFTER, LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, POOL_AFTER, POOL_KERNEL, POOL_STRIDE, AlexNetSpec
from parallel import GroupConv2d, GroupLinear, PerGroup, PlacementError, gather_output
from parallel.dropout import GroupDropout


class GroupAlexNet(nn.Module):
    """AlexNet whose filter groups live where ``placement`` puts them.

    Forward takes the image batch (any device) and returns the logits of all groups,
    concatenated in group order on the placement's output device.

    The hybrid placement (``parallel.hybrid``) passes ``fc_placement`` (the fc layers split
    by output features over the ranks) and ``rows`` (its row exchange): the conv part runs
    on this rank's batch slice, fc6 reads every rank's conv features, and forward returns
    the logits of this rank's rows only.
    """

    def __init__(self, spec: AlexNetSpec, placement, lrn_module: type = FastLRN, fc_placement=None,
                 rows=None):
        super().__init__()
        self.spec, self.placement, self.rows = spec, placement, rows
        self.layer_infos = spec.layers()
        if rows is not None:
            local = [i.name for i in self.layer_infos if i.kind == "fc" and i.exchange != "all"]
            if local:
                raise PlacementError(f"the hybrid placement splits the fc layers by output features over ranks, so "
                                     f"every fc layer must see all inputs; {', '.join(local)} do not: add them to "
                                     "model.cross_group")
        self.fc_placement = fc_placement = fc_placement or placement
        relu = PerGroup(placement, nn.ReLU(), channel_wise=True)
        lrn = PerGroup(placement, lrn_module(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K))
        pool = PerGroup(placement, nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE), channel_wise=True)
        fc_relu = PerGroup(fc_placement, nn.ReLU(), channel_wise=True)
        self.stages = nn.ModuleList()
        self.fc_stages = nn.ModuleList()
        self.weight_layers: dict[str, nn.Module] = {}
        for info in self.layer_infos:
            mode = info.exchange
            if info.kind == "conv":
                layer = GroupConv2d(placement, info.in_channels, info.out_channels, info.kernel, info.stride,
                                    info.padding, mode, info.name, groups=info.groups)
                self.stages.append(layer)
                self.stages.append(relu)
                if spec.lrn and info.name in LRN_AFTER:
                    self.stages.append(lrn)
                if info.name in POOL_AFTER:
                    self.stages.append(pool)
            else:
                hybrid_fc6 = rows is not None and info.name == "fc6"  # reads the gathered rows whole
                layer = GroupLinear(fc_placement, info.in_channels, info.out_channels,
                                    "replicated" if hybrid_fc6 else mode, info.name,
                                    groups=fc_placement.num_slots if rows is not None else info.groups)
                self.fc_stages.append(layer)
                if info.name != "fc8":
                    # masks from global rows and features: the same under every placement
                    self.fc_stages.extend([fc_relu, GroupDropout(fc_placement, spec.dropout, f"{info.name}.dropout",
                                                                 global_rows=rows is not None)])
            self.weight_layers[info.name] = layer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for stage in self.stages:
            x = stage(x)
        if self.rows is None:
            for stage in self.fc_stages:
                x = stage(x)
            return gather_output(self.fc_placement, x)
        (features,) = x.parts
        sizes = self.rows.batch_sizes(features.shape[0])
        x = self.rows.gather_rows(features.flatten(1), sizes, "fc6_rows")
        for stage in self.fc_stages:
            x = stage(x)
        return self.rows.rows_of(x, sizes)

    # --- mapping to the single-device reference (ReferenceAlexNet.state_dict() keys) ---

    def _reference_keys(self, name: str) -> tuple[str, str]:
        info = next(i for i in self.layer_infos if i.name == name)
        prefix = f"{name}.conv" if info.kind == "fc" and info.grouped else name
        return f"{prefix}.weight", f"{prefix}.bias"

    def _reference_weight_shape(self, name: str) -> tuple[int, ...]:
        info = next(i for i in self.layer_infos if i.name == name)
        G = info.groups
        if info.kind == "conv":
            cin = info.in_channels // G if info.grouped else info.in_channels
            return (info.out_channels, cin, info.kernel, info.kernel)
        return (info.out_channels, info.in_channels // G, 1) if info.grouped else (info.out_channels, info.in_channels)

    def to_reference(self, value_of=None, everywhere: bool = True) -> dict[str, torch.Tensor] | None:
        """The reference state_dict assembled from every group's shard (on CPU).

        ``value_of(param)`` substitutes a per-parameter tensor of the same shape (e.g. an
        optimizer's momentum buffer), so optimizer state maps exactly like the weights.
        ``everywhere=False`` (checkpoints): only global rank 0 assembles it; others get None.
        """
        out, received = {}, True
        for name, layer in self.weight_layers.items():  # every layer, also on ranks that receive nothing:
            wkey, bkey = self._reference_keys(name)     # each one is a collective
            full = layer.to_full(value_of, everywhere)
            if full["weight"] is None:
                received = False
                continue
            out[wkey] = full["weight"].reshape(self._reference_weight_shape(name))
            out[bkey] = full["bias"]
        return out if received else None

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
