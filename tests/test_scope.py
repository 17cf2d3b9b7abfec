"""Keys that act only on some devices or placements are refused elsewhere (alexnet.scope), and every key is classified.

The table below is written independently of alexnet/scope.py: for each scoped key, a value
that asks for its effect, and the (device, placement, replicas) runs where it has one.
"""
import os
import subprocess
import sys
from itertools import product

import pytest

from alexnet.config import DEFAULTS, ConfigError, load
from alexnet.scope import SCOPED, RunScope, check
from conftest import ROOT

SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")

ALL_SCOPES = [RunScope(d, p, r) for d, p, r in product(("cpu", "cuda"), ("local", "distributed", "hybrid"), (1, 2))
              if not (p == "local" and r > 1)]

#: key -> (a value asking for its effect, the runs where it has one)
ACTS = {
    "train.cudnn_benchmark": ("false", lambda s: s.device == "cuda"),
    "train.conv_formulation": ("streams", lambda s: s.device == "cuda"),
    "parallel.devices": ("[cpu,cpu]", lambda s: s.placement == "local"),
    "parallel.backend": ("gloo", lambda s: s.placement in ("distributed", "hybrid")),
    "parallel.timeout_s": ("30", lambda s: s.placement in ("distributed", "hybrid")),
    "parallel.grad_sync": ("flat", lambda s: s.replicas > 1),
}

#: keys that act in every run of train.py on every device and placement (classified by hand: a new key
#: must land in this list or in alexnet.scope.SCOPED, or the next test fails)
EVERYWHERE = {
    "model.*", "optim.*", "data.*", "run.*",
    "train.epochs", "train.precision", "train.log_every", "train.filter_images_every", "train.compile",
    "train.compile_mode", "train.channels_last", "train.cpu_keep_freed", "train.memory_snapshot",
    "parallel.placement",
}


def flat_keys(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict) and f"{prefix}{k}" != "model.exchange":
            yield from flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_every_train_and_parallel_key_is_scoped_or_acts_everywhere():
    scoped = {rule.key for rule in SCOPED}
    assert scoped == set(ACTS)
    for key in flat_keys(DEFAULTS):
        section = key.split(".")[0]
        assert key in scoped or key in EVERYWHERE or f"{section}.*" in EVERYWHERE, f"{key}: where does it act?"


@pytest.mark.parametrize("key", sorted(ACTS))
def test_a_scoped_key_is_refused_in_one_line_exactly_where_it_does_nothing(key):
    value, acts = ACTS[key]
    cfg = load(SMOKE, [f"{key}={value}"])
    for scope in ALL_SCOPES:
        if acts(scope):
            check(cfg, scope)
        else:
            with pytest.raises(ConfigError) as e:
                check(cfg, scope)
            message = str(e.value)
            assert "\n" not in message and message.startswith(f"{key}=") and scope.placement in message
    for scope in ALL_SCOPES:  # at its default (smoke.yaml sets none of them) the key is accepted anywhere
        check(load(SMOKE), scope)


def test_train_py_refuses_a_key_this_run_would_ignore_with_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", SMOKE, "--set",
                           f"run.dir={tmp_path}", "--set", "parallel.backend=gloo"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: parallel.backend=gloo acts only under torchrun (placement distributed or hybrid), and "
                     "this run is local on cpu without data replicas: --set parallel.backend=auto (its default), or "
                     "launch with torchrun"], proc.stderr
