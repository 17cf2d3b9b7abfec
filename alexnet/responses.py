"""Do filters of different groups respond less alike than filters of one group? (the seed's second claim)

The seed text says "the correlation between kernel filters of different filter groups is
usually quite less". Comparing weights (``alexnet.filters``) says little past conv1, since a
grouped layer's filters read different maps; what a filter *does* is its response. So, per
grouped convolution (a layer whose G_l > 1 and whose groups read only their own maps:
conv2, conv4, conv5 under the paper's exchange):

    Y_c      output channel c of the layer (before its ReLU) on a fixed set of validation
             images: one vector over every image and spatial position
    R[i, j]  |Pearson correlation| of Y_i and Y_j                      (C x C)
    within   mean of R[i, j] over pairs i != j in the same group   (``alexnet.filters.within_between``)
    between  mean of R[i, j] over pairs in different groups

The claim holds at a layer when between < within; the study pairs the two per seed and
gives the difference a 95% interval over seeds (``scripts/study_report.py``).
"""
from __future__ import annotations

import torch

from parallel import GroupConv2d


def grouped_layers(model: torch.nn.Module) -> dict[str, GroupConv2d]:
    """The convolutions whose groups read only their own (or shuffled) maps, G_l > 1, by module name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, GroupConv2d) and m.grouped and m.groups > 1}


def correlation_matrix(responses: torch.Tensor) -> torch.Tensor:
    """|Pearson correlation| (C x C) between the channels of a (N, C, ...) response, each channel one
    vector over N and every position; fp64, so that small layers' sums lose nothing."""
    c = responses.shape[1]
    f = responses.transpose(0, 1).reshape(c, -1).double()
    f = f - f.mean(1, keepdim=True)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (f @ f.T).abs()


@torch.no_grad()
def response_correlations(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{layer: R} for every grouped convolution of ``model``, from one forward pass of ``images``
    in eval mode (no dropout, no running statistic moves). Every slot must be in this process
    (one process, any devices): the matrices need every group's responses."""
    layers = grouped_layers(model)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):  # returns None: the output is not replaced
            seen[name] = torch.cat([p.detach().float().cpu() for p in output.parts], dim=1)
        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {name: correlation_matrix(seen[name]) for name in layers}


def all_slots_local(placement) -> bool:
    """Whether this process holds every group (the response matrices need them all)."""
    return len(placement.local_slots) == placement.num_slots
