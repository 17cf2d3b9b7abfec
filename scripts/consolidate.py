"""Move weights between a training checkpoint and the single-device reference state_dict.

Checkpoints are written by global rank 0 after gathering every group's shard, in the
reference layout (``ReferenceAlexNet`` keys), so any placement resumes any other's run:
torchrun -> one process and back needs no conversion. This script covers the two
remaining hand-offs:

  # checkpoint -> plain state_dict, loadable with ReferenceAlexNet(spec).load_state_dict(...)
  python scripts/consolidate.py to-reference runs/fashion_mnist/g2-s0/checkpoints/last.pt ref.pt
  # reference state_dict (e.g. from another codebase) -> a checkpoint to --resume or --evaluate
  python scripts/consolidate.py from-reference ref.pt --config configs/fashion_mnist/g2.yaml ckpt.pt
"""
from __future__ import annotations

import argparse
import sys

import torch

from alexnet import checkpoint as ckpt_io
from alexnet.build import spec_from_config
from alexnet.config import ConfigError, load
from alexnet.reference import ReferenceAlexNet
from alexnet.schedule import LRSchedule
from alexnet.spec import SpecError


def to_reference(ckpt_path: str, out: str) -> None:
    ckpt = ckpt_io.load(ckpt_path)
    ReferenceAlexNet(spec_from_config(ckpt["config"])).load_state_dict(ckpt["model"])  # proves it loads
    ckpt_io.save_atomic(ckpt["model"], out)
    print(f"wrote {out}: reference state_dict of G={ckpt['config']['model']['groups']}, epoch {ckpt['epoch']}")


def from_reference(state_path: str, config: str, overrides: list[str], out: str) -> None:
    cfg = load(config, overrides)
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ckpt_io.CheckpointError(f"{state_path!r} is not a readable state_dict ({ckpt_io.first_line(e)})") from None
    state = ckpt_io.upgrade_reference_keys(state)  # also one exported before the fc layers were re-keyed
    ref = ReferenceAlexNet(spec_from_config(cfg))
    try:
        ref.load_state_dict(state)
    except RuntimeError as e:
        raise ckpt_io.CheckpointError(f"{state_path!r} does not fit {config}: {ckpt_io.first_line(e)}") from None
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt = ckpt_io.build(cfg, ckpt_io.Position(), ref.state_dict(), {"momentum": zeros},
                         LRSchedule("paper", 0.0, 1, 1).state_dict())
    ckpt_io.save_atomic(ckpt, out)
    print(f"wrote {out}: checkpoint at epoch 0 for {config}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-reference")
    a.add_argument("checkpoint")
    a.add_argument("out")
    b = sub.add_parser("from-reference")
    b.add_argument("state_dict")
    b.add_argument("--config", required=True)
    b.add_argument("--set", dest="overrides", action="append", default=[])
    b.add_argument("out")
    args = p.parse_args(argv)
    try:
        if args.cmd == "to-reference":
            to_reference(args.checkpoint, args.out)
        else:
            from_reference(args.state_dict, args.config, args.overrides, args.out)
    except (ckpt_io.CheckpointError, ConfigError, SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
