"""What placement-invariant draws cost, side by side in one run (ratios; run it on an idle machine).

  python scripts/draws_benchmark.py [--device cuda] [--repeats 50]

1. Dropout, forward + backward on (batch, features) activations: parallel.dropout.GroupDropout
   (a hash of global row and feature) against nn.Dropout (the device generator), at the
   Fashion-MNIST AlexNet's fc6 (128 x 384) and the paper's (128 x 4096).
2. One ImageFolder training sample through the PIL transforms, with and without the
   per-sample seed (torch.random.fork_rng + manual_seed) that makes its crop, flip and PCA
   noise a function of its position in the epoch.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def dropout_rows(device: torch.device, repeats: int) -> list[str]:
    from parallel import LocalPlacement, Sharded
    from parallel.dropout import GroupDropout, set_draws
    lines = []
    for name, shape in (("fashion fc6", (128, 384)), ("paper fc6", (128, 4096))):
        x = torch.randn(*shape, device=device, requires_grad=True)
        ours = GroupDropout(LocalPlacement(1, [str(device)]), 0.5, name="fc6.dropout")
        theirs = nn.Dropout(0.5)
        step = [0]

        def run_ours():
            set_draws([ours], 0, step[0])
            step[0] += 1
            ours(Sharded((x,), (shape[1],))).parts[0].sum().backward()

        def run_theirs():
            theirs(x).sum().backward()
        t_ours, t_theirs = timed(run_ours, repeats, device), timed(run_theirs, repeats, device)
        lines.append(f"dropout {name} {shape}: GroupDropout {t_ours * 1e3:.3f} ms, nn.Dropout {t_theirs * 1e3:.3f} ms, "
                     f"ratio {t_ours / t_theirs:.2f}")
    return lines


def sample_rows(repeats: int) -> list[str]:
    from PIL import Image

    from data.imagefolder import train_transform
    gen = torch.Generator().manual_seed(0)
    picture = Image.fromarray(torch.randint(0, 256, (375, 500, 3), generator=gen, dtype=torch.uint8).numpy())
    transform = train_transform(227, 0.1)
    seeds = iter(range(10 ** 9))

    def keyed():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(next(seeds))
            transform(picture)
    cpu = torch.device("cpu")
    t_keyed, t_plain = timed(keyed, repeats, cpu), timed(lambda: transform(picture), repeats, cpu)
    return [f"PIL train transform, 500x375 picture: with a per-sample seed {t_keyed * 1e3:.3f} ms, without "
            f"{t_plain * 1e3:.3f} ms, ratio {t_keyed / t_plain:.3f}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads")
    for line in dropout_rows(device, args.repeats) + sample_rows(args.repeats):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
