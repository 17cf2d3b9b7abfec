"""Render a checkpoint's conv1 filters per group and their correlation heat map to PNG.

  python scripts/visualize_filters.py runs/fashion_mnist/g2-s0/checkpoints/last.pt --out filters/

Writes conv1_filters.png (all groups in one image, group by group, on one colour scale with
its bar, as in Krizhevsky et al. 2012, Figure 3) and
conv1_correlation.png (|correlation| between conv1 filters, in group order, with the mean
within groups and between groups in the title: learned, since every conv1 filter sees the
whole image) and, for G > 1, conv3_input_group_share.png (how much of each conv3 filter
group's weight falls on each input group's maps: learned, since conv3 is dense).
"""
from __future__ import annotations

import argparse
import os
import sys

from alexnet import checkpoint as ckpt_io
from alexnet.build import spec_from_config
from alexnet.filters import (conv1_all_groups_image, filter_correlation, input_group_share,
                             within_between_correlation)


def render(ckpt_path: str, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ckpt = ckpt_io.load(ckpt_path)
    spec = spec_from_config(ckpt["config"])
    groups = spec.layer_groups["conv1"]  # with per-layer counts, conv1's groups are the ones pictured
    state = ckpt["model"]
    os.makedirs(out_dir, exist_ok=True)
    image, scale = conv1_all_groups_image(state, groups, pad=2)
    fig, ax = plt.subplots(figsize=(4.6, 1.2 + 3.2 * groups ** 0.5))
    shown = ax.imshow(image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else image[0].numpy(),
                      cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"conv1 filters, G = {groups} (groups top to bottom), epoch {ckpt['epoch']}", fontsize=9)
    ax.axis("off")
    bar = fig.colorbar(shown, ax=ax, fraction=0.04, ticks=[0, 0.5, 1])
    bar.ax.set_yticklabels([f"{-scale:.2g}", "0", f"{scale:.2g}"])  # one scale for every group's filters
    fig.tight_layout()
    filters_png = os.path.join(out_dir, "conv1_filters.png")
    fig.savefig(filters_png, dpi=110)
    plt.close(fig)
    corr = filter_correlation(state, groups, "conv1")
    within, between = within_between_correlation(state, groups)
    fig, ax = plt.subplots(figsize=(5.4, 4.8))
    im = ax.imshow(corr.numpy(), cmap="viridis", vmin=0, vmax=1)
    per_group = corr.shape[0] // groups
    for g in range(1, groups):  # group boundaries
        ax.axhline(g * per_group - 0.5, color="white", lw=1)
        ax.axvline(g * per_group - 0.5, color="white", lw=1)
    ax.set_title(f"|corr| between conv1 filters (G = {groups})\n"
                 f"mean within groups {within:.3f}, between groups {between:.3f}", fontsize=10)
    ax.set_xlabel("filter")
    ax.set_ylabel("filter")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    corr_png = os.path.join(out_dir, "conv1_correlation.png")
    fig.savefig(corr_png, dpi=110)
    plt.close(fig)
    paths = [filters_png, corr_png]
    # conv3's dense weights show how much each filter group draws on each input group's maps;
    # only where it all-gathers them, and with the same groups on both sides
    info = {i.name: i for i in spec.layers()}["conv3"]
    if groups > 1 and info.exchange == "all" and info.groups == info.input_groups == groups:
        share = input_group_share(state, groups)
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        im = ax.imshow(share.numpy(), cmap="viridis", vmin=0, vmax=1)
        for g in range(groups):
            for h in range(groups):
                ax.text(h, g, f"{share[g, h]:.2f}", ha="center", va="center", color="white", fontsize=9)
        ax.set_xlabel("input group (conv2 maps)")
        ax.set_ylabel("conv3 filter group")
        ax.set_title("share of conv3 weight norm per input group", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        share_png = os.path.join(out_dir, "conv3_input_group_share.png")
        fig.savefig(share_png, dpi=110)
        plt.close(fig)
        paths.append(share_png)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--out", default="filters")
    args = p.parse_args(argv)
    try:
        paths = render(args.checkpoint, args.out)
    except ckpt_io.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
