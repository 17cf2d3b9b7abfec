"""Pictures of what the groups learned, from a reference state_dict.

conv1 filters per group as image grids (Krizhevsky et al. 2012, Figure 3: on ImageNet one
GPU's group learns colour-agnostic kernels, the other colour-specific ones), and the
absolute correlation between the filters of the first grouped layer, whose weights are
zero outside their group's input channels: with G groups the matrix is block-diagonal.
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

def _in_channels(state: dict, layer: str) -> int:
    previous = {"conv2": "conv1", "conv3": "conv2", "conv4": "conv3", "conv5": "conv4"}[layer]
    return state[f"{previous}.weight"].shape[0]

def heatmap_image(matrix: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) viridis rendering of a matrix with values in [0, 1], for TensorBoard."""
    from matplotlib import colormaps
    rgba = colormaps["viridis"](matrix.clamp(0, 1).numpy())
    return torch.from_numpy(rgba[..., :3]).permute(2, 0, 1).float()
