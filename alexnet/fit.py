"""The training run: build everything from the config, train epoch by epoch, checkpoint, log, summarise."""
from __future__ import annotations

import math
import os
import time

import torch
from tqdm import tqdm

from alexnet import accel, mfu
from alexnet import checkpoint as ckpt_io
from alexnet import rundir
from alexnet.build import data_from_config, placement_from_config, spec_from_config
from alexnet.config import dump
from alexnet.engine import TrainingDiverged, evaluate, train_one_epoch
from alexnet.filters import within_between_correlation
from alexnet.graphs import GraphRecordings, describe_recordings
from alexnet.init import init_reference_state
from alexnet.logs import RunLog
from alexnet.model import GroupAlexNet
from alexnet.schedule import LRSchedule


def build_run(cfg: dict, where=None):
    """Spec, placement, runtime, model (initialised from the seed), optimizer: everything but data.

    ``where``: an ``alexnet.build.Where`` already made, else one from the config.
    """
    spec = spec_from_config(cfg)
    where = where or placement_from_config(cfg, spec)
    placement, runtime = where.placement, where.runtime
    model = GroupAlexNet(spec, placement, fc_placement=where.fc_placement, rows=where.rows)
    model.load_reference(init_reference_state(spec, cfg["run"]["seed"]))
    o = cfg["optim"]
    # fused: one kernel for the whole update on CUDA, instead of a few per parameter
    fused = True if accel.on_cuda(placement) else None
    optimizer = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"],
                                fused=fused)
    return spec, placement, runtime, model, optimizer


def resolve_resume(resume: str | None, run_dir: str, say=print) -> str | None:
    """``--resume`` with no path means the run directory's latest checkpoint; with none yet, a fresh start.

    (A job restarted before its first checkpoint, e.g. by torchrun --max-restarts, must still run.)
    """
    if resume == "latest":
        path = os.path.join(run_dir, "checkpoints", "last.pt")
        if not os.path.isfile(path):
            say(f"--resume: no checkpoint in {os.path.dirname(path)} yet; starting from the beginning")
            return None
        return path
    return resume


def fit(cfg: dict, resume: str | None = None, stop_after_epoch: int | None = None, should_stop=lambda: False,
        quiet: bool = False, hparams_experiment: bool = True) -> dict:
    """Train as the config says; returns the summary (also written to summary.json).

    ``hparams_experiment=False``: the run writes its HParams session but no experiment of
    its own (a study writes one for all its runs, ``alexnet.hparams``).

    The run directory is checked and locked first (``alexnet.rundir``): a folder that holds
    a run is only continued with ``resume``, and never by two processes at once.
    """
    where = placement_from_config(cfg)
    runtime = where.runtime
    say = print if runtime.is_main and not quiet else (lambda *a, **k: None)
    resume_path = resolve_resume(resume, cfg["run"]["dir"], say)
    lock = rundir.claim(cfg["run"]["dir"], resuming=bool(resume_path) or resume == "latest",
                        overwrite=cfg["run"]["overwrite"], lock=runtime.is_main)
    try:
        return _fit(cfg, resume_path, stop_after_epoch, should_stop, where, quiet, say, hparams_experiment)
    finally:
        if lock is not None:
            lock.close()


def _fit(cfg: dict, resume_path: str | None, stop_after_epoch: int | None, should_stop, where,
         quiet: bool, say, hparams_experiment: bool = True) -> dict:
    torch.manual_seed(cfg["run"]["seed"])
    accel.set_determinism(cfg["run"]["deterministic"])
    spec, placement, runtime, model, optimizer = build_run(cfg, where)
    where_text = where.describe()
    run_dir = cfg["run"]["dir"]
    train_loader, val_loader = data_from_config(cfg, placement, runtime)
    o, t = cfg["optim"], cfg["train"]
    schedule = LRSchedule(o["schedule"], o["lr"], t["epochs"], len(train_loader), o["patience"], o["max_drops"],
                          o["step_size"], o["gamma"], o["warmup_epochs"])
    start_epoch, step, wall_before, skip, carry = 0, 0, 0.0, 0, None
    if resume_path:
        ckpt = ckpt_io.load(resume_path)
        ckpt_io.check_compatible(ckpt, cfg["model"], resume_path)
        model.load_reference(ckpt["model"])
        ckpt_io.load_optimizer_state(model, optimizer, ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        start_epoch, step, wall_before = ckpt["epoch"], ckpt["step"], ckpt["wall_s"]
        skip, carry = ckpt.get("epoch_step", 0), ckpt.get("partial")
        last_record = ckpt.get("record")
    else:
        last_record = None
    log = RunLog(run_dir, runtime.is_main, start_epoch, step, last_record)
    log.layout()
    best_val = min((m["val_top1_err"] for m in log.history()), default=math.inf)  # for best.pt
    per_replica = max(1, train_loader.batch_size // runtime.num_replicas)
    batch_shape = (per_replica, spec.in_channels, spec.input_size, spec.input_size)
    runner = accel.prepare(model, cfg, placement, batch_shape, say=say)
    recordings = GraphRecordings() if t["compile"] and t["compile_mode"] == "reduce-overhead" else None
    channels_last = accel.on_cuda(placement) and t["channels_last"]
    if runtime.is_main:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(dump(cfg))
    mb_per_step = 0.0
    run_start = time.perf_counter()
    stopped = False

    def checkpoint(epochs_done: int, epoch_step: int = 0, partial: dict | None = None, weights="assemble",
                   record: dict | None = None) -> None:
        # Every rank takes part (shards are gathered); only the main process writes.
        state = {"format": ckpt_io.FORMAT, "config": cfg, "epoch": epochs_done, "step": step,
                 "epoch_step": epoch_step, "partial": partial, "record": record or last_record,
                 # (None on ranks other than 0, which assemble nothing and write nothing)
                 "model": ckpt_io.model_state(model) if isinstance(weights, str) else weights,
                 "optimizer": ckpt_io.optimizer_state(model, optimizer),
                 "schedule": schedule.state_dict(), "wall_s": wall_before + time.perf_counter() - run_start}
        if runtime.is_main:
            ckpt_io.save_atomic(state, os.path.join(run_dir, "checkpoints", "last.pt"))
        runtime.barrier()

    for epoch in range(start_epoch, t["epochs"]):
        train_loader.set_epoch(epoch, skip)
        epoch_start = time.perf_counter()
        # disable=None: no bar when stderr is not a terminal (log files, pipes), so errors stay one line
        bar = tqdm(total=len(train_loader), initial=skip, desc=f"epoch {epoch + 1}/{t['epochs']}", unit="step",
                   disable=True if quiet or not runtime.is_main else None, leave=False, dynamic_ncols=True)
        placement.counter.reset()
        step_before = step
        try:
            result = train_one_epoch(runner, train_loader, optimizer, schedule, placement, runtime, epoch, step,
                                     cfg["run"]["seed"], t["precision"], progress=bar, log_every=t["log_every"],
                                     should_stop=should_stop, carry=carry, channels_last=channels_last,
                                     on_log=lambda s, loss, lr: (log.scalar("train/loss", loss, s),
                                                                 log.scalar("train/lr", lr, s)))
        except TrainingDiverged as e:
            bar.close()
            path = os.path.join(run_dir, "checkpoints", "last.pt")
            kept = (f"the last checkpoint ({path}, epoch {epoch}) is kept" if os.path.isfile(path)
                    else "no checkpoint had been written yet")
            raise TrainingDiverged(f"{e}, epoch {epoch + 1}: nothing of this epoch is saved and {kept}; lower "
                                   f"optim.lr (it is {o['lr']:g}) or check the data") from None
        bar.close()
        mb_per_step = result["comm_bytes_per_step"] / 1e6
        step = result["step"]
        epoch_step = skip + step - step_before
        skip, carry = 0, None
        if result["stopped"] and epoch_step < len(train_loader):
            # Pre-empted mid-epoch: save the position and the epoch's partial sums.
            checkpoint(epoch, epoch_step, result["partial"])
            stopped = True
            break
        val = evaluate(runner, val_loader, placement, runtime, t["precision"], channels_last)
        lr_used = schedule.lr(step - 1, epoch)
        schedule.end_epoch(val["val_top1_err"])
        speed = mfu.throughput(result["images_per_s"], spec.macs(), mfu.device_name(placement.input_device))
        record = {"epoch": epoch + 1, "step": step, "train_loss": result["train_loss"],
                  "train_top1_err": result["train_top1_err"], "train_top5_err": result["train_top5_err"],
                  "val_loss": val["val_loss"], "val_top1_err": val["val_top1_err"], "val_top5_err": val["val_top5_err"],
                  "lr": lr_used, "images_per_s": result["images_per_s"],
                  "tflops": speed["tflops"], "mfu": speed["mfu"],
                  "cross_group_mb_per_step": mb_per_step,
                  "epoch_s": time.perf_counter() - epoch_start, "data_replicas": runtime.num_replicas,
                  "groups": spec.groups}
        # The checkpoint first, holding the epoch's record: metrics.jsonl never lists an epoch that no
        # checkpoint holds, and a crash between the two is repaired on resume (RunLog).
        weights = ckpt_io.model_state(model)  # on rank 0 only, which writes the checkpoint and the metrics
        if weights is not None:
            # the seed's claim, tested every epoch: are conv1 filters of one group more alike than across groups?
            record["conv1_corr_within"], record["conv1_corr_between"] = within_between_correlation(
                weights, spec.layer_groups["conv1"])
        checkpoint(epoch + 1, weights=weights, record=record)
        last_record = record  # what a mid-epoch checkpoint of the next epoch carries
        if runtime.is_main and record["val_top1_err"] <= best_val:
            best_val = record["val_top1_err"]
            ckpt_io.copy_atomic(os.path.join(run_dir, "checkpoints", "last.pt"),
                                os.path.join(run_dir, "checkpoints", "best.pt"))
        log.epoch(record)
        if runtime.is_main and not quiet:
            print(f"epoch {epoch + 1}/{t['epochs']}  loss {record['train_loss']:.4f}  val top-1 "
                  f"{record['val_top1_err']:.2f}%  top-5 {record['val_top5_err']:.2f}%  lr {lr_used:.3g}  "
                  f"{record['images_per_s']:.0f} img/s  "
                  f"{mfu.describe(record['images_per_s'], spec.macs(), placement.input_device)}  "
                  f"{record['epoch_s']:.1f}s", flush=True)
            if recordings is not None:
                say(describe_recordings(recordings.take(), epoch_step, accel.on_cuda(placement)))
        every = t["filter_images_every"]
        if every and ((epoch + 1) % every == 0 or epoch + 1 == t["epochs"]):
            log.filters(weights, spec.layer_groups["conv1"], epoch + 1)
        if result["stopped"]:
            stopped = True
            break
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    if recordings is not None:
        recordings.close()
    history = log.history() if runtime.is_main else []
    finished = bool(history) and history[-1]["epoch"] == t["epochs"]
    summary = make_summary(cfg, spec, where_text, runtime, history, wall_before + time.perf_counter() - run_start,
                           mb_per_step)
    summary["settings"] = run_settings(cfg, where_text, train_loader.num_samples, val_loader.num_samples)
    summary["stopped"] = stopped
    if finished:
        summary["hparams"] = run_hparams(cfg, spec, runtime)
        log.summary(summary)
        log.hparams(summary["hparams"], experiment=hparams_experiment)
    log.close()
    return summary


def git_commit() -> str | None:
    """The checkout's commit (with ``+changes`` when the tree differs from it), or None outside git."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+changes" if dirty else "")) if commit else None


# The commit of the code this process runs: read once, when it is imported, so a study that
# runs for hours in one process keeps reporting the code it loaded even if the checkout moves on.
CODE_COMMIT = git_commit()


def run_settings(cfg: dict, where: str, train_samples: int, val_samples: int) -> dict:
    """What was run, for every artefact that reports the run: data, schedule, machine, code."""
    d, t = cfg["data"], cfg["train"]
    return {"dataset": d["dataset"], "epochs": t["epochs"], "batch_size": d["batch_size"], "lr": cfg["optim"]["lr"],
            "data_limit": d["limit"], "train_samples": train_samples, "val_samples": val_samples,
            "precision": t["precision"], "placement": where, "torch": torch.__version__,
            "commit": CODE_COMMIT}


def run_hparams(cfg: dict, spec, runtime) -> dict:
    """The run's hyperparameters for TensorBoard's HParams: what a study varies first
    (``alexnet.hparams.STUDY_HPARAMS``), then the settings that are usually the same."""
    d, t, o = cfg["data"], cfg["train"], cfg["optim"]
    return {"groups": spec.label, "exchanges": spec.exchanges, "seed": cfg["run"]["seed"], "params": spec.params(),
            "macs": spec.macs(), "data_replicas": runtime.num_replicas, "epochs": t["epochs"], "lr": o["lr"],
            "batch_size": d["batch_size"], "data_limit": d["limit"]}


def make_summary(cfg: dict, spec, where: str, runtime, history: list[dict], wall_s: float, mb_per_step: float) -> dict:
    final = history[-1] if history else {}
    speeds = [h["images_per_s"] for h in history]
    return {"groups": spec.groups, "exchanges": spec.exchanges, "seed": cfg["run"]["seed"],
            "data_replicas": runtime.num_replicas,
            "params": spec.params(), "macs": spec.macs(), "epochs": final.get("epoch", 0),
            "final_val_top1_err": final.get("val_top1_err", math.nan),
            "final_val_top5_err": final.get("val_top5_err", math.nan),
            "best_val_top1_err": min((h["val_top1_err"] for h in history), default=math.nan),
            "best_val_top5_err": min((h["val_top5_err"] for h in history), default=math.nan),
            "images_per_s": sum(speeds) / len(speeds) if speeds else math.nan,
            "cross_group_mb_per_step": mb_per_step, "wall_s": wall_s,
            "placement": where}
