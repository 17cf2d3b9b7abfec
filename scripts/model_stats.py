"""Per-layer table of an AlexNet config: output shape, parameters, multiply-accumulates and
cross-group bytes per image, with totals.

  python scripts/model_stats.py --config configs/imagenet/g2.yaml [--set model.groups=4]
  python scripts/model_stats.py --config configs/imagenet/g1.yaml configs/imagenet/g2.yaml configs/imagenet/g4.yaml

Multiply-accumulates count weights x output positions (no bias adds, no LRN/pool), the
convention that gives 1,135,256,096 for the paper's AlexNet at G = 1 (Ioannou's table
shows 10,568 more: a different counting convention).
"""
from __future__ import annotations

import argparse
import sys

from alexnet.build import spec_from_config
from alexnet.config import ConfigError, load
from alexnet.spec import SpecError


def table(spec) -> str:
    cross = spec.cross_group_bytes(1)
    rows = [("layer", "input", "output", "params", "MACs", "x-group B/img (fwd)")]
    for layer in spec.layers():
        kind = {"own": f"per group, G={layer.groups}", "shuffle": f"shuffled, G={layer.groups}",
                "all": "cross-group", "replicated": "whole input"}[layer.exchange]
        rows.append((f"{layer.name} ({kind})", "x".join(map(str, layer.in_shape)), "x".join(map(str, layer.out_shape)),
                     f"{layer.params:,}", f"{layer.macs:,}", f"{cross.get(layer.name, 0):,}"))
    rows.append(("total", "", "", f"{spec.params():,}", f"{spec.macs():,}", f"{sum(cross.values()):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, nargs="+", help="one or more configs, a table each")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    try:
        specs = [spec_from_config(load(path, args.overrides)) for path in args.config]
    except (ConfigError, SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, spec in zip(args.config, specs):
        print(f"{path}: AlexNet, G = {spec.label}, input {spec.in_channels}x{spec.input_size}x{spec.input_size}, "
              f"{spec.num_classes} classes, exchanges: {spec.exchanges}")
        print(table(spec))
        print()
    print("x-group B/img: bytes all groups receive from the other groups per image in the forward pass "
          "(fp32); the backward pass sends the same volume back.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
