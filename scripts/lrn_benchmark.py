"""LRN forward + backward, side by side: torch's, ours, and the autograd-of-slices version ours replaced.

Shapes are AlexNet's two LRN inputs at the paper geometry (conv1: 96 x 55 x 55, conv2:
256 x 27 x 27) with G groups folded as ours does it. On CUDA each variant also runs under
torch.compile. Prints milliseconds and ratios to torch's eager LRN.

  python scripts/lrn_benchmark.py --batch 256 --groups 2 --dtype bf16 --channels-last
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from alexnet.lrn import local_response_norm
from alexnet.spec import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE


def slices_autograd(x, groups):
    """The previous FastLRN: shifted slices, differentiated by autograd."""
    c = x.shape[1]
    xg = x.unflatten(1, (groups, c // groups)).float()
    padded = F.pad(xg * xg, [0, 0, 0, 0, LRN_SIZE // 2, (LRN_SIZE - 1) // 2])
    window = padded.narrow(2, 0, c // groups)
    for i in range(1, LRN_SIZE):
        window = window + padded.narrow(2, i, c // groups)
    return (xg * (window * (LRN_ALPHA / LRN_SIZE) + LRN_K).pow(-LRN_BETA)).flatten(1, 2).to(x.dtype)


def torch_lrn(x, groups):
    lrn = nn.LocalResponseNorm(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)
    n, c = x.shape[:2]
    return lrn(x.reshape(n * groups, c // groups, *x.shape[2:])).reshape(x.shape)


def ours(x, groups):
    return local_response_norm(x, LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K, groups)


def time_ms(fn, x, groups, repeats: int) -> float:
    dy = torch.randn_like(x)
    times = []
    for i in range(repeats + 3):
        x.grad = None
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x, groups).backward(dy)
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 256 on CUDA, 16 on CPU")
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else 16)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    variants = {"torch": torch_lrn, "slices+autograd": slices_autograd, "ours": ours}
    if device.type == "cuda":
        variants.update({f"{k}+compile": torch.compile(v) for k, v in list(variants.items())})
    print(f"{'shape':<22}" + "".join(f"{k:>24}" for k in variants))
    for shape in ((batch, 96, 55, 55), (batch, 256, 27, 27)):
        x = torch.randn(shape, device=device, dtype=dtype) * 10
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        ms = {name: time_ms(fn, x, args.groups, args.repeats) for name, fn in variants.items()}
        cells = "".join(f"{v:>13.3f} ms ({ms['torch'] / v:4.2f}x)" for v in ms.values())
        print(f"{str(tuple(shape)):<22}{cells}", flush=True)
    print(f"forward + backward, median of {args.repeats}; (x) = speed relative to torch's eager LRN; "
          f"{device}, {args.dtype}, groups={args.groups}, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
