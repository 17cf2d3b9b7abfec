"""Train AlexNet with G filter groups, each group on its own device or process.

Usage:
  python train.py --config configs/fashion_mnist/g2.yaml              # one process, devices from the config
  python train.py --config configs/smoke.yaml --set model.groups=4    # override any key
  python train.py --config configs/imagenet/g2.yaml --set parallel.devices=[cuda:0,cuda:1]
  torchrun --nproc-per-node 2 train.py --config configs/fashion_mnist/g2.yaml   # one process per group
  python train.py --config C --resume            # continue from the run directory's last checkpoint
  python train.py --config C --resume PATH       # ... or from a given checkpoint
  python train.py --evaluate runs/fashion_mnist/g2-s0/checkpoints/last.pt

Writes runs/<family>/g<G>-s<seed>/ (or run.dir): config.yaml, TensorBoard events,
metrics.jsonl, checkpoints/last.pt, summary.json. Bad input ends with one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from alexnet.checkpoint import CheckpointError
from alexnet.config import ConfigError
from alexnet.engine import TrainingDiverged
from alexnet.spec import SpecError
from data.errors import DataError
from parallel.placement import PlacementError

USER_ERRORS = (ConfigError, SpecError, PlacementError, DataError, CheckpointError)
PREEMPTED = 143  # 128 + SIGTERM


#: seconds a rank other than 0 waits before saying a user error itself (see ``report_error``)
PEER_REPORT_WAIT_S = 30.0


def report_error(message: str) -> None:
    """One line on stderr; under torchrun rank 0 says it (every rank fails alike).

    The other ranks wait before they exit: torchrun ends every rank as soon as one has failed,
    so a peer that failed first would end a rank 0 still importing torch before it could speak
    (seen on a busy 2-core machine). They wait with SIGTERM's default action, so torchrun ends them
    at once when rank 0 has failed too; a rank that is still there after ``PEER_REPORT_WAIT_S``
    (rank 0 did not fail alike) says the error itself, naming its rank."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(PEER_REPORT_WAIT_S)
    print(f"error (rank {rank}): {message}", file=sys.stderr, flush=True)


def restarted_by_torchrun() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def latest_checkpoint(cfg: dict) -> str:
    return os.path.join(cfg["run"]["dir"], "checkpoints", "last.pt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="YAML config (may `inherit:` a parent)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=0.02 (repeatable)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from the run directory's last checkpoint, or from PATH")
    p.add_argument("--evaluate", metavar="CKPT", help="evaluate a checkpoint on the validation set and exit")
    return p.parse_args(argv)


class StopFlag:
    """Set by SIGTERM (cluster pre-emption) or a first Ctrl-C: finish the step, checkpoint, exit cleanly.

    A second Ctrl-C stops at once (KeyboardInterrupt), keeping the last checkpoint.
    """

    def __init__(self):
        self.requested = False
        self.signal = None

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> None:
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested, self.signal = True, signum
            if signum == signal.SIGINT:
                print("\nstopping after this step with a checkpoint (Ctrl-C again to stop at once)",
                      file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


class FaultTrigger:
    """Test-only: ``FILTER_GROUPS_FAULT=SIGNAL@STEPS[@RANK]`` makes this process send itself SIGNAL
    (SIGTERM, SIGINT, SIGKILL) after it has trained STEPS steps, on every rank or on RANK only, in
    torchrun's first round only: the fault tests' deterministic stand-in for a cluster's pre-emption,
    a Ctrl-C or a crash (no sleeps, no race with the work after an epoch)."""

    def __init__(self, spec: str | None):
        self.signal, self.steps, self.rank = None, 0, None
        if spec:
            name, steps, *rank = spec.split("@")
            self.signal, self.steps = signal.Signals[name], int(steps)
            self.rank = int(rank[0]) if rank else None
        self.seen = 0

    def armed(self) -> bool:
        mine = self.rank is None or self.rank == int(os.environ.get("RANK", "0"))
        return self.signal is not None and mine and not restarted_by_torchrun()

    def tick(self) -> None:
        """Called once per training step."""
        self.seen += 1
        if self.seen == self.steps and self.armed():
            os.kill(os.getpid(), self.signal)


def run_evaluate(args) -> dict:
    from alexnet import checkpoint as ckpt_io
    from alexnet.build import data_from_config
    from alexnet.config import apply_overrides, load
    from alexnet.engine import Trainer, evaluate
    from alexnet.fit import build_run
    from parallel import load_full_state_dict
    ckpt = ckpt_io.load(args.evaluate)
    cfg = load(args.config, args.overrides) if args.config else apply_overrides(ckpt["config"], args.overrides)
    ckpt_io.check_compatible(ckpt, cfg["model"], args.evaluate)
    _, placement, runtime, model, optimizer = build_run(cfg)
    load_full_state_dict(model, ckpt["model"])
    _, val_loader = data_from_config(cfg, placement, runtime)
    result = evaluate(Trainer(model, optimizer, placement, runtime, cfg["train"]["precision"]), val_loader)
    result["epoch"] = ckpt["epoch"]
    if runtime.is_main:
        print(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = None
    try:
        if args.evaluate:
            run_evaluate(args)
            return 0
        if not args.config:
            raise ConfigError("--config is required (e.g. --config configs/fashion_mnist/g2.yaml)")
        from alexnet.config import load
        from alexnet.fit import fit
        cfg = load(args.config, args.overrides)
        stop = StopFlag()
        stop.install()
        fault = FaultTrigger(os.environ.get("FILTER_GROUPS_FAULT"))
        resume = args.resume
        if resume is None and restarted_by_torchrun() and os.path.isfile(latest_checkpoint(cfg)):
            resume = latest_checkpoint(cfg)  # torchrun --max-restarts: continue where the last attempt stopped
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: resuming {resume}", flush=True)
        summary = fit(cfg, resume=resume, should_stop=lambda: (fault.tick(), stop())[1])
        if summary.get("stopped"):
            by = "Ctrl-C" if stop.signal == signal.SIGINT else "SIGTERM"
            print(f"stopped by {by} after a checkpoint; resume with --resume ({latest_checkpoint(cfg)})",
                  file=sys.stderr)
            # non-zero, so torchrun --max-restarts starts a pre-empted job again
            return 130 if stop.signal == signal.SIGINT else PREEMPTED
        if summary.get("epochs"):
            print(json.dumps(summary, indent=2))
    except USER_ERRORS as e:
        report_error(str(e))
        return 2
    except TrainingDiverged as e:
        report_error(f"training diverged: {e}")
        return 2
    except KeyboardInterrupt:
        path = latest_checkpoint(cfg) if cfg else None
        kept = (f"the last checkpoint is kept (resume with --resume: {path})" if path and os.path.isfile(path)
                else "no checkpoint had been written yet")
        print(f"interrupted; {kept}", file=sys.stderr)
        return 130
    finally:
        close_process_group()
    return 0


def close_process_group() -> None:
    """Under torchrun: leave the process group on every way out (NCCL warns, and may hang at exit, otherwise)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001  (a peer that died first: nothing left to tear down cleanly)
            print(f"warning: could not close the process group ({type(e).__name__}: {e})", file=sys.stderr)


def leave(code: int) -> None:
    """Exit with ``code``. A finished run under torchrun (everything written, closed and the process group
    destroyed) leaves through os._exit: gloo's threads can abort the interpreter's own shutdown
    ("terminate called without an active exception", SIGABRT), which would turn a finished run into a
    failed one for torchrun (and a --max-restarts restart). Any other exit keeps Python's shutdown, which
    flushes whatever an error left open."""
    from alexnet.build import launched_by_torchrun
    if code == 0 and launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)


if __name__ == "__main__":
    leave(main())
