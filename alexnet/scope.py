"""Keys that act only on some devices or placements: set where they would do nothing, they are refused.

A run's config may carry a key that this run cannot use (``parallel.backend=nccl`` in one
process, ``train.cudnn_benchmark=false`` on the CPU): accepted, it would change nothing, and
the user would believe it did. So each such key names where it acts, and ``check`` refuses
one set to anything but its default elsewhere, in one line naming the key, where it acts,
this run, and the fix (the key's default, or what makes it act). A key at its default is
always accepted: configs shared between a GPU cluster and a laptop keep working.

The scope is the run's device (cpu or cuda), its placement (local, distributed, hybrid) and
its data replicas; keys whose effect depends on another key (``optim.step_size`` with
``optim.schedule``, ``train.compile_mode`` with ``train.compile``) or on the dataset are not
judged here (``train.memory_snapshot`` on the CPU is refused where it is read, ``alexnet.fit``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from alexnet.config import DEFAULTS, ConfigError
from parallel import LocalRuntime


@dataclass(frozen=True)
class RunScope:
    """Where a run trains: ``device`` cpu | cuda (cuda when any slot is a GPU), ``placement`` local |
    distributed | hybrid, ``replicas`` the data-parallel copies of the model."""
    device: str
    placement: str
    replicas: int

    def describe(self) -> str:
        return (f"this run is {self.placement} on {self.device}"
                + (f" with {self.replicas} data replicas" if self.replicas > 1 else " without data replicas"))


@dataclass(frozen=True)
class Scoped:
    """``key`` acts where ``acts(scope)``; ``set_to(value)`` says whether a value asks for that action
    (default: any value but the key's default); ``otherwise`` is the other way to make it act."""
    key: str
    where: str
    acts: Callable[[RunScope], bool]
    otherwise: str
    set_to: Callable[[object], bool] | None = None


def _default(key: str):
    section, name = key.split(".")
    return DEFAULTS[section][name]


def _as_set(value) -> str:
    """A value as --set writes it."""
    if isinstance(value, list):
        return f"[{','.join(map(str, value))}]"
    return str(value).lower() if isinstance(value, bool) else str(value)


SCOPED = (
    Scoped("train.cudnn_benchmark", "on CUDA devices (cuDNN's algorithm search)", lambda s: s.device == "cuda",
           "train on a GPU"),
    Scoped("train.conv_formulation", "on CUDA devices (streams: a group per side CUDA stream)",
           lambda s: s.device == "cuda", "train on a GPU", set_to=lambda v: v == "streams"),
    Scoped("parallel.devices", "with parallel.placement=local (under torchrun each process gets its device from "
           "LOCAL_RANK)", lambda s: s.placement == "local", "run in one process without torchrun"),
    Scoped("parallel.backend", "under torchrun (placement distributed or hybrid)", lambda s: s.placement != "local",
           "launch with torchrun"),
    Scoped("parallel.timeout_s", "under torchrun (placement distributed or hybrid)", lambda s: s.placement != "local",
           "launch with torchrun"),
    Scoped("parallel.grad_sync", "with data replicas (torchrun with more processes than slots per replica, or "
           "hybrid)", lambda s: s.replicas > 1, "launch more processes than the model's slots"),
)


def check(cfg: dict, scope: RunScope) -> None:
    """Refuse (ConfigError, one line) the first key set where it does nothing."""
    for rule in SCOPED:
        section, name = rule.key.split(".")
        value = cfg[section][name]
        asked = rule.set_to(value) if rule.set_to else value != _default(rule.key)
        if asked and not rule.acts(scope):
            raise ConfigError(f"{rule.key}={_as_set(value)} acts only {rule.where}, and {scope.describe()}: "
                              f"--set {rule.key}={_as_set(_default(rule.key))} (its default), or {rule.otherwise}")


def scope_of(where) -> RunScope:
    """The RunScope of an ``alexnet.build.Where``."""
    device = "cuda" if any(slot.device.type == "cuda" for slot in where.placement.local_slots) else "cpu"
    if where.fc_placement is not None:
        placement = "hybrid"
    else:
        placement = "local" if isinstance(where.runtime, LocalRuntime) else "distributed"
    return RunScope(device, placement, where.runtime.num_replicas)
