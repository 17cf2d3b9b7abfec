"""A model on paper of the data replicas' gradient all-reduce per step, with and without overlap.

  python scripts/overlap_model.py [--groups 2] [--batch 128] [--tflops 40 400] [--replicas 2 4 8]

For the paper's AlexNet with G groups (one group per rank) and D data replicas, each rank
all-reduces the gradients of what it holds over its D replicas. A ring all-reduce of B bytes
puts 2 (D - 1) / D x B on each rank's link. Without overlap (``parallel.grad_sync: flat``)
all of it comes after backward: exposed = the whole transfer. With overlap (DDP, ``overlap``)
a layer's gradients leave when its backward is done, in backward order (fc8, fc7, fc6,
conv5 ... conv1), one transfer after the other on the link; exposed = how far the last one
ends after backward does. A layer's backward takes 4 x its MACs x the replica's rows /
the stated throughput (the backward pass is twice the forward's 2 FLOPs per MAC). The
throughputs are stated, not measured: 40 TFLOP/s is about what this project's G = 2 step
reached on one H200 at commit 6371fec (8.8k images/s x 6 x 724M MACs, DESIGN.md), 400 a
well-tuned one. Links: NVLink-class 300 GB/s and 100 Gb/s Ethernet/InfiniBand (12.5 GB/s).
"""
from __future__ import annotations

import argparse
import sys

from alexnet.spec import AlexNetSpec

LINKS = (("NVLink-class, 300 GB/s", 300e9), ("100 Gb/s, 12.5 GB/s", 12.5e9))


def per_rank_layers(spec: AlexNetSpec) -> list[tuple[str, int, int]]:
    """(layer, gradient bytes, MACs per image) of one rank holding 1/G of every layer, in backward order."""
    out = []
    for layer in reversed(spec.layers()):
        out.append((layer.name, 4 * layer.params // layer.groups, layer.macs // layer.groups))
    return out


def exposed(layers, rows: int, tflops: float, bandwidth: float, replicas: int) -> dict:
    """Backward time, transfer time and the exposed time without and with overlap (seconds)."""
    ring = 2 * (replicas - 1) / replicas
    t, link_free, backward = 0.0, 0.0, 0.0
    for _, nbytes, macs in layers:
        backward += 4 * macs * rows / (tflops * 1e12)
        start = max(backward, link_free)  # the layer's gradients leave once computed and the link is free
        link_free = start + ring * nbytes / bandwidth
    transfer = sum(ring * nbytes / bandwidth for _, nbytes, _ in layers)
    return {"backward_s": backward, "transfer_s": transfer, "flat_exposed_s": transfer,
            "overlap_exposed_s": max(0.0, link_free - backward)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--batch", type=int, default=128, help="rows per replica")
    p.add_argument("--tflops", type=float, nargs="+", default=[40.0, 400.0])
    p.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8])
    args = p.parse_args(argv)
    spec = AlexNetSpec(groups=args.groups)
    layers = per_rank_layers(spec)
    total = sum(b for _, b, _ in layers)
    print(f"paper AlexNet, G = {args.groups} (one group per rank): {total / 1e6:.0f} MB of fp32 gradients per rank, "
          f"{args.batch} rows per replica")
    print("| D | link | throughput | backward | all-reduce | exposed, flat | exposed, overlap |")
    print("|---|---|---|---|---|---|---|")
    for d in args.replicas:
        for link, bandwidth in LINKS:
            for tflops in args.tflops:
                e = exposed(layers, args.batch, tflops, bandwidth, d)
                print(f"| {d} | {link} | {tflops:g} TFLOP/s | {1e3 * e['backward_s']:.1f} ms | "
                      f"{1e3 * e['transfer_s']:.1f} ms | {1e3 * e['flat_exposed_s']:.1f} ms | "
                      f"{1e3 * e['overlap_exposed_s']:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
