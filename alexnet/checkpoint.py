"""Checkpoints in the placement-independent reference layout, written atomically.

Weights and SGD momentum buffers are stored as the single-device reference state_dict
(``ReferenceAlexNet`` keys), so a checkpoint written by any placement (one device, several
devices, one process per group) resumes or evaluates under any other.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from alexnet.config import upgrade_model_config
from parallel import full_state_dict, full_state_slices

FORMAT = 2  # 2: the grouped fc layers keyed fc6.weight (was fc6.conv.weight), config without model.cross_group


@dataclass
class Position:
    """Where a run stands: everything a checkpoint holds besides weights, momentum and schedule.

    ``epoch`` epochs and ``step`` global steps are done; a mid-epoch checkpoint adds
    ``epoch_step`` steps of epoch ``epoch`` and their ``partial`` sums. ``wall_s`` is the
    training wall time so far; ``record`` the last finished epoch's metrics.
    """
    epoch: int = 0
    step: int = 0
    epoch_step: int = 0
    partial: dict | None = None
    wall_s: float = 0.0
    record: dict | None = None

    @classmethod
    def of(cls, ckpt: dict) -> "Position":
        return cls(ckpt["epoch"], ckpt["step"], ckpt.get("epoch_step", 0), ckpt.get("partial"), ckpt["wall_s"],
                   ckpt.get("record"))


def build(cfg: dict, position: Position, model: dict | None, optimizer: dict | None, schedule: dict,
          speed: dict | None = None) -> dict:
    """The checkpoint (format ``FORMAT``): the run's config, its position, the reference-layout weights
    and SGD momentum (``model_state``, ``optimizer_state``), the LR schedule's state, and the speed
    choices made at start-up (``alexnet.accel.prepare``: layout, conv formulations), which a resumed
    run reuses so that it computes exactly as before."""
    return {"format": FORMAT, "config": cfg, "epoch": position.epoch, "step": position.step,
            "epoch_step": position.epoch_step, "partial": position.partial, "record": position.record,
            "model": model, "optimizer": optimizer, "schedule": schedule, "wall_s": position.wall_s, "speed": speed}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def save_atomic(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")
    except (OSError, RuntimeError) as e:  # a full disk surfaces as either, depending on where torch.save fails
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = "the previous checkpoint is kept" if os.path.isfile(path) else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {path} ({first_line(e)}); {kept}; free disk space, "
                              "then continue with --resume") from None


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (a crash right after it keeps the new name)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_atomic(src: str, dst: str) -> None:
    """``dst`` becomes a copy of ``src`` (e.g. best.pt from last.pt), never half-written."""
    import shutil
    tmp = f"{dst}.tmp.{os.getpid()}"
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"could not write {dst} ({e.strerror}); {src} is kept; free disk space") from None


def load(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, foreign file
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not a checkpoint ({type(e).__name__}: {first_line(e)}); "
                              "pass another path, or delete it to start over") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (1, FORMAT) or "model" not in ckpt:
        raise CheckpointError(f"{path!r} is not a checkpoint of this project (formats 1 and {FORMAT})")
    return upgrade(ckpt)


def upgrade(ckpt: dict) -> dict:
    """A format-1 checkpoint in today's format (in memory; the file stays as it is): its grouped fc
    layers re-keyed, its weights and momentum otherwise untouched, its config in today's words."""
    if ckpt["format"] == FORMAT:
        return ckpt
    ckpt = dict(ckpt, format=FORMAT, config=dict(ckpt["config"], model=upgrade_model_config(ckpt["config"]["model"])))
    ckpt["model"] = upgrade_reference_keys(ckpt["model"])
    if ckpt.get("optimizer"):
        ckpt["optimizer"] = dict(ckpt["optimizer"], momentum=upgrade_reference_keys(ckpt["optimizer"]["momentum"]))
    return ckpt


def upgrade_reference_keys(state: dict) -> dict:
    """A reference state_dict of format 1, whose block-diagonal fc layers were a Conv1d
    (``fc6.conv.weight`` of shape (out, in/G, 1)), keyed as today's (``fc6.weight``, (out, in/G))."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0].startswith("fc") and parts[1] == "conv":
            key = f"{parts[0]}.{parts[2]}"
            value = value.squeeze(-1) if parts[2] == "weight" else value
        out[key] = value
    return out


def check_compatible(ckpt: dict, model_cfg: dict, path: str) -> None:
    """Refuse a checkpoint of another architecture before anything is loaded."""
    def crossing(model: dict) -> dict:  # a layer not named in model.exchange reads its own group's maps
        return {name: how for name, how in model["exchange"].items() if how != "own"}
    saved = dict(ckpt["config"]["model"], exchange=crossing(ckpt["config"]["model"]))
    model_cfg = dict(model_cfg, exchange=crossing(model_cfg))
    # everything that shapes the weights or the function they compute (dropout and init may differ)
    for key in ("groups", "num_classes", "in_channels", "input_size", "conv_channels", "kernels", "strides",
                "paddings", "fc_widths", "exchange", "lrn"):
        if saved.get(key) != model_cfg.get(key):
            raise CheckpointError(f"{path!r} was trained with model.{key}={saved.get(key)}, but this config has "
                                  f"{model_cfg.get(key)}; use the run's own config (config.yaml in its run dir)")


def model_state(model) -> dict | None:
    """The reference-layout weights on global rank 0, the one that writes checkpoints (None elsewhere:
    no rank but rank 0 holds a full copy, about 0.25 GB of host memory at ImageNet size)."""
    return full_state_dict(model, everywhere=False)


def optimizer_state(model, optimizer) -> dict:
    """SGD momentum buffers in the reference layout (missing buffers, before the first step, are zeros),
    on global rank 0 only (None elsewhere)."""
    def buf(p):
        state = optimizer.state.get(p, {})
        b = state.get("momentum_buffer")
        return b if b is not None else torch.zeros_like(p)
    momentum = full_state_dict(model, buf, everywhere=False)
    return {"momentum": momentum} if momentum is not None else None


def load_optimizer_state(model, optimizer, state: dict) -> None:
    for p, value in full_state_slices(model, state["momentum"]).items():
        optimizer.state[p]["momentum_buffer"] = value.clone()


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
