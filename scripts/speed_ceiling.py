"""How much faster can G groups train than 1 on this machine? The step split into its convolutions and the rest.

    python scripts/speed_ceiling.py [--device cpu] [--geometry fashion_mnist] [--groups 1 2 4] [--rounds 5]

Per G: train.py's step (``alexnet.engine.train_step``, the layout and formulations train.py
chooses) and, on the same trainer, each convolution module alone, forward + backward on the
input it sees in that step. The step's time is convolutions + the rest (LRN, pools, ReLUs,
linear layers, dropout, SGD, Python). With T_G = conv_G + rest_G, the speed-up of G over 1
is T_1 / T_G; the script prints it measured, and two ceilings that hold whatever the rest
is made to cost:

    if the rest cost nothing:        conv_1 / conv_G
    the rest that a target r needs:  rest <= (conv_1 - r * conv_G) / (r - 1)   (equal rests)

All G are measured in each round, interleaved (this machine's speed drifts); medians printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import GEOMETRIES, Setting, make_trainers, sync, time_steps  # noqa: E402
from parallel.layers import GroupConv2d  # noqa: E402
from parallel.sharded import Sharded  # noqa: E402


def conv_inputs(trainer, x, y) -> dict:
    """Each GroupConv2d's input in one training step, by module name."""
    seen = {}

    def remember(name):
        def hook(module, args, output) -> None:  # a hook that returned a value would replace the output
            seen.setdefault(name, args[0])
        return hook

    hooks = [m.register_forward_hook(remember(n)) for n, m in trainer.model.named_modules()
             if isinstance(m, GroupConv2d)]
    try:
        time_steps(trainer, x, y, 1)
    finally:
        for h in hooks:
            h.remove()
    return seen


def conv_ms(trainer, inputs: dict, device, repeats: int = 5) -> dict:
    """Median ms of each convolution module's forward + backward on its step input (the image gets no gradient)."""
    modules = dict(trainer.model.named_modules())
    out = {}
    for name, x in inputs.items():
        if isinstance(x, Sharded):
            x = Sharded(tuple(t.detach().requires_grad_(True) for t in x.parts), x.group_sizes)
        else:  # the image: no gradient
            x = x.detach()
        times = []
        for i in range(repeats + 2):
            sync(device)
            start = time.perf_counter()
            y = modules[name](x)
            parts = y.parts if isinstance(y, Sharded) else (y,)
            torch.autograd.backward(parts, [torch.ones_like(t) for t in parts])
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
        trainer.model.zero_grad(set_to_none=True)
        out[name] = statistics.median(times) * 1e3
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--geometry", default="fashion_mnist", choices=sorted(GEOMETRIES))
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--targets", type=float, nargs="+", default=[1.25, 1.5], help="speed-ups to price in 'rest' ms")
    args = p.parse_args(argv)
    setting = Setting(torch.device(args.device))
    trainers, batches, inputs = {}, {}, {}
    for g in args.groups:
        spec, models, _ = make_trainers(args.geometry, g, setting, args.batch, False)
        trainers[g] = models["ours"]
        x, y = setting.batch(spec, args.batch)
        batches[g] = (x, y)
        inputs[g] = conv_inputs(trainers[g], x, y)
    step, convs = {g: [] for g in args.groups}, {g: [] for g in args.groups}
    for r in range(args.rounds):
        for g in args.groups:
            step[g].append(time_steps(trainers[g], *batches[g], args.steps) * 1e3)
            convs[g].append(conv_ms(trainers[g], inputs[g], setting.device))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"G={g} {step[g][-1]:.1f} ms" for g in args.groups),
              flush=True)
    names = list(convs[args.groups[0]][0])
    med = {g: {n: statistics.median(c[n] for c in convs[g]) for n in names} for g in args.groups}
    t = {g: statistics.median(step[g]) for g in args.groups}
    conv = {g: sum(med[g].values()) for g in args.groups}
    base = args.groups[0]
    print(f"\n{args.geometry}, batch {args.batch}, {setting.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; ms per step (median of {args.rounds} rounds)")
    print(f"{'G':>3} {'step':>7} {'convs':>7} {'rest':>7}  " + " ".join(f"{n:>7}" for n in names)
          + f"  {'speed-up':>8} {'if rest=0':>9}")
    for g in args.groups:
        print(f"{g:>3} {t[g]:7.1f} {conv[g]:7.1f} {t[g] - conv[g]:7.1f}  " + " ".join(f"{med[g][n]:7.1f}" for n in names)
              + f"  {t[base] / t[g]:8.2f} {conv[base] / conv[g]:9.2f}")
    for g in args.groups:
        if g == base:
            continue
        for r in args.targets:
            need = (conv[base] - r * conv[g]) / (r - 1)
            verdict = "unreachable: the convolutions alone miss it" if need < 0 else f"rest <= {need:.1f} ms"
            print(f"G={g} at {r:.2f}x G={base}: {verdict} (now {t[g] - conv[g]:.1f} ms at G={g}, "
                  f"{t[base] - conv[base]:.1f} at G={base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
