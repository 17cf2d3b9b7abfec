"""Claiming a run directory: never overwrite a run's history, never share it with a second process.

A run directory holds one run's history (metrics.jsonl, events, checkpoints). Starting a
new run where one already trained would erase it, and two processes writing into one
folder interleave their lines, so before training the main process:
  * checks the path can be a folder (no regular file in the way, checkpoints/ not a file);
  * refuses a folder that already holds a run unless the run is being resumed, or
    ``run.overwrite`` says to delete it and start over;
  * takes an exclusive lock (``.lock``, an flock: the kernel releases it when the process
    ends, even if killed, so a stale lock cannot exist; the file names the holder's pid).
"""
from __future__ import annotations

import fcntl
import os

from alexnet.config import ConfigError


def _check_is_folder_path(run_dir: str) -> None:
    path = os.path.abspath(run_dir)
    while True:
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"run.dir {run_dir!r}: {path} is a file, not a folder; choose another run.dir")
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def holds_a_run(run_dir: str) -> bool:
    """True when the folder has a checkpoint or at least one epoch in metrics.jsonl."""
    if os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt")):
        return True
    metrics = os.path.join(run_dir, "metrics.jsonl")
    return os.path.isfile(metrics) and os.path.getsize(metrics) > 0


RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml")


def clear_run(run_dir: str) -> None:
    """Delete what a run wrote (metrics, summary, events, checkpoints); other files are left alone."""
    import shutil
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name in RUN_FILES or name.startswith("events.out.tfevents"):
            os.remove(path)
        elif name == "checkpoints" and os.path.isdir(path):
            shutil.rmtree(path)


def claim(run_dir: str, resuming: bool, overwrite: bool = False, lock: bool = True):
    """Check ``run_dir`` and lock it for this process; returns the open lock file (keep it until the run ends).

    Every rank of a torchrun job checks (so all refuse alike); only the main one locks (``lock``)
    and, with ``overwrite``, deletes the previous run's files once it holds the lock.
    """
    _check_is_folder_path(run_dir)
    checkpoints = os.path.join(run_dir, "checkpoints")
    if os.path.exists(checkpoints) and not os.path.isdir(checkpoints):
        raise ConfigError(f"{checkpoints} is a file, but checkpoints are written into a folder of that name; "
                          "move the file away or choose another run.dir")
    if not resuming and not overwrite and holds_a_run(run_dir):
        raise ConfigError(f"run.dir {run_dir!r} already holds a run; continue it with --resume, start a new one "
                          "elsewhere with --set run.dir=<new folder>, or replace it with --set run.overwrite=true")
    if not lock:
        return None
    try:
        os.makedirs(run_dir, exist_ok=True)
        handle = open(os.path.join(run_dir, ".lock"), "a+")
    except OSError as e:
        raise ConfigError(f"run.dir {run_dir!r} cannot be written ({e.strerror}); choose another run.dir") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"run.dir {run_dir!r} is in use by {holder}; wait for it to finish, "
                          "or choose another run.dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()}\n")
    handle.flush()
    if overwrite and not resuming and holds_a_run(run_dir):
        clear_run(run_dir)
    return handle
