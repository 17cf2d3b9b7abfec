"""AlexNet with G filter groups built from parallel/ layers, named as the reference.

The same code runs for every placement: the model only sees the placement's local slots
and asks it to exchange maps where the spec says (default: all-gather at conv3, fc6, fc7,
fc8; ``model.exchange`` may make a layer ``own`` or ``shuffle``). Each layer has its own G
(``model.groups`` may list one per conv layer).
"""
from __future__ import annotations

import torch
from torch import nn

from alexnet.lrn import FastLRN
from alexnet.spec import (LRN_AFTER, LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, POOL_AFTER, POOL_KERNEL, POOL_STRIDE,
                          AlexNetSpec, hybrid_refusal)
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
        refusal = hybrid_refusal(self.layer_infos) if rows is not None else None
        if refusal:
            raise PlacementError(refusal)
        self.fc_placement = fc_placement = fc_placement or placement
        # Modules are named as ReferenceAlexNet's (conv1, relu1, lrn1, pool1, ..., fc6, relu6, drop6, ..., fc8),
        # so parallel.full_state_dict(model) is the reference's state_dict, key for key.
        for info in self.layer_infos:
            n = info.name[-1]
            if info.kind == "conv":
                stage = {info.name: GroupConv2d(placement, info.in_channels, info.out_channels, info.kernel,
                                                info.stride, info.padding, info.exchange, info.name,
                                                groups=info.groups),
                         f"relu{n}": PerGroup(placement, nn.ReLU(), channel_wise=True)}
                if spec.lrn and info.name in LRN_AFTER:
                    stage[f"lrn{n}"] = PerGroup(placement, lrn_module(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K))
                if info.name in POOL_AFTER:
                    stage[f"pool{n}"] = PerGroup(placement, nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE), channel_wise=True)
            else:
                hybrid_fc6 = rows is not None and info.name == "fc6"  # reads the gathered rows whole
                stage = {info.name: GroupLinear(fc_placement, info.in_channels, info.out_channels,
                                                "replicated" if hybrid_fc6 else info.exchange, info.name,
                                                groups=fc_placement.num_slots if rows is not None else info.groups)}
                if info.name != "fc8":
                    # masks from global rows and features: the same under every placement
                    stage[f"relu{n}"] = PerGroup(fc_placement, nn.ReLU(), channel_wise=True)
                    stage[f"drop{n}"] = GroupDropout(fc_placement, spec.dropout, f"{info.name}.dropout",
                                                     global_rows=rows is not None)
            for name, module in stage.items():
                self.add_module(name, module)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, sizes = images, None
        for name, stage in self.named_children():  # in the reference's order
            if name == "fc6" and self.rows is not None:  # hybrid: fc6 reads every rank's rows
                (features,) = x.parts
                sizes = self.rows.batch_sizes(features.shape[0])
                x = self.rows.gather_rows(features.flatten(1), sizes, "fc6_rows")
            x = stage(x)
        if self.rows is None:
            return gather_output(self.fc_placement, x)
        return self.rows.rows_of(x, sizes)
