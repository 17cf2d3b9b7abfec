"""Pictures and numbers of what the groups learned, from a reference state_dict.

conv1 filters per group as image grids (Krizhevsky et al. 2012, Figure 3: on ImageNet one
GPU's group learns colour-agnostic kernels, the other colour-specific ones), and the
absolute correlation between conv1 filters. Every conv1 filter sees the whole image, so
nothing in the architecture makes filters of one group more alike than filters of
different groups; the seed text's claim that "the correlation between kernel filters of
different filter groups is usually quite less" is tested by comparing the mean |corr|
within groups with the mean |corr| between groups (``within_between_correlation``).
(The first grouped layer's correlation would be block-diagonal by construction: its
weights are zero outside the filter's group, so it would show the architecture.)
"""
from __future__ import annotations

import torch
from torchvision.utils import make_grid

def conv1_group_grids(state: dict, groups: int, pad: int = 1) -> list[torch.Tensor]:
    """One (C, H, W) image per group, each filter scaled to [0, 1] on its own."""
    w = state["conv1.weight"].float()
    lo = w.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = w.flatten(1).max(1).values.view(-1, 1, 1, 1)
    w = (w - lo) / (hi - lo).clamp_min(1e-12)
    if w.shape[1] not in (1, 3):
        w = w[:, :1]
    per_group = w.shape[0] // groups
    nrow = max(1, int(per_group ** 0.5 + 0.999))
    return [make_grid(chunk, nrow=nrow, padding=pad, pad_value=1.0) for chunk in w.split(per_group)]

def conv1_all_groups_image(state: dict, groups: int, pad: int = 1) -> tuple[torch.Tensor, float]:
    """All conv1 filters in one (C, H, W) image, one row block per group with a blank row between groups,
    on one shared scale: value v is shown as 0.5 + v / (2 * scale), scale = max |weight| (returned too),
    so filters of different groups compare directly (grey = 0)."""
    w = state["conv1.weight"].float()
    if w.shape[1] not in (1, 3):
        w = w[:, :1]
    scale = w.abs().max().clamp_min(1e-12).item()
    shown = (0.5 + w / (2 * scale)).clamp(0, 1)
    per_group = w.shape[0] // groups
    ncol = max(1, int(per_group ** 0.5 + 0.999))
    blocks = []
    for chunk in shown.split(per_group):
        grid = make_grid(chunk, nrow=ncol, padding=pad, pad_value=1.0)
        blocks.append(grid)
        blocks.append(torch.ones(grid.shape[0], 3 * pad + 2, grid.shape[2]))  # separator between groups
    return torch.cat(blocks[:-1], dim=1), scale


def dense_filters(weight: torch.Tensor, groups: int, grouped: bool) -> torch.Tensor:
    """(C_out, C_in * k * k): a grouped weight written out with zeros outside each filter's group."""
    c_out, c_in_g = weight.shape[:2]
    if not grouped or groups == 1:
        return weight.flatten(1)
    dense = weight.new_zeros(c_out, c_in_g * groups, *weight.shape[2:])
    per_out = c_out // groups
    for g in range(groups):
        dense[g * per_out:(g + 1) * per_out, g * c_in_g:(g + 1) * c_in_g] = weight[g * per_out:(g + 1) * per_out]
    return dense.flatten(1)

def filter_correlation(state: dict, groups: int, layer: str = "conv2") -> torch.Tensor:
    """|Pearson correlation| between the filters of ``layer`` (C_out x C_out, values in [0, 1])."""
    w = state[f"{layer}.weight"].float()
    grouped = w.shape[1] * groups == _in_channels(state, layer)
    f = dense_filters(w, groups, grouped)
    f = f - f.mean(1, keepdim=True)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (f @ f.T).abs()

def within_between(corr: torch.Tensor, groups: int) -> tuple[float, float]:
    """(mean of ``corr`` over distinct pairs in one group, mean over pairs in different groups) of a C x C
    matrix whose C rows form ``groups`` contiguous groups; the second is NaN with one group (no such pairs)."""
    n = corr.shape[0]
    group_of = torch.arange(n) // (n // groups)
    same = group_of[:, None] == group_of[None, :]
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    between = corr[~same]
    return corr[same & off_diagonal].mean().item(), (between.mean().item() if between.numel() else float("nan"))


def within_between_correlation(state: dict, groups: int) -> tuple[float, float]:
    """Mean |Pearson correlation| of conv1 filter pairs in the same group, and in different groups.

    Pairs of a filter with itself are left out; with G = 1 there are no between-group
    pairs and the second value is NaN.
    """
    return within_between(filter_correlation(state, groups, "conv1"), groups)


def input_group_share(state: dict, groups: int, layer: str = "conv3") -> torch.Tensor:
    """(G, G): row g, column h = the share of group g's filters' squared weight norm on input group h's maps.

    conv3 is the first layer that sees every group's maps, and its weights are dense, so
    this block structure is learned: a diagonal-heavy matrix means each group kept mostly
    to its own predecessors' maps. Rows sum to 1 (each filter's share, averaged over the group).
    """
    w = state[f"{layer}.weight"].float()
    c_out, c_in = w.shape[:2]
    if c_in % groups or c_out % groups:
        raise ValueError(f"{layer}: {c_out} x {c_in} channels do not split into {groups} groups")
    energy = w.square().flatten(2).sum(2)  # (C_out, C_in)
    per_input = energy.view(c_out, groups, c_in // groups).sum(2)  # (C_out, G)
    share = per_input / per_input.sum(1, keepdim=True).clamp_min(1e-30)
    return share.view(groups, c_out // groups, groups).mean(1)


def _in_channels(state: dict, layer: str) -> int:
    if layer == "conv1":
        return state["conv1.weight"].shape[1]
    previous = {"conv2": "conv1", "conv3": "conv2", "conv4": "conv3", "conv5": "conv4"}[layer]
    return state[f"{previous}.weight"].shape[0]

def heatmap_image(matrix: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) viridis rendering of a matrix with values in [0, 1], for TensorBoard."""
    from matplotlib import colormaps
    rgba = colormaps["viridis"](matrix.clamp(0, 1).numpy())
    return torch.from_numpy(rgba[..., :3]).permute(2, 0, 1).float()
