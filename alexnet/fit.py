"""The training run: build everything from the config, train epoch by epoch, checkpoint, log, summarise."""
from __future__ import annotations

import functools
import math
import os
import time

import torch
from tqdm import tqdm

from alexnet import accel, memwatch, mfu
from alexnet import checkpoint as ckpt_io
from alexnet.checkpoint import Position
from alexnet import rundir, scope
from alexnet.build import data_from_config, placement_from_config, spec_from_config
from alexnet.config import ConfigError, dump
from alexnet.engine import EpochHooks, Trainer, TrainingDiverged, evaluate, to_input, train_one_epoch
from alexnet.filters import within_between, within_between_correlation
from alexnet.responses import all_slots_local, grouped_layers, response_correlations
from alexnet.graphs import GraphRecordings, describe_recordings
from alexnet.init import init_reference_state
from alexnet.logs import RunLog
from alexnet.model import GroupAlexNet
from alexnet.schedule import LRSchedule
from parallel import LocalRuntime, load_full_state_dict


def build_run(cfg: dict, where=None):
    """Spec, placement, runtime, model (initialised from the seed), optimizer: everything but data.

    ``where``: an ``alexnet.build.Where`` already made, else one from the config.
    """
    spec = spec_from_config(cfg)
    where = where or placement_from_config(cfg, spec)
    placement, runtime = where.placement, where.runtime
    model = GroupAlexNet(spec, placement, fc_placement=where.fc_placement, rows=where.rows)
    load_full_state_dict(model, init_reference_state(spec, cfg["run"]["seed"]))
    return spec, placement, runtime, model, sgd_from_config(cfg, model.parameters(), placement)


def sgd_from_config(cfg: dict, params, placement) -> torch.optim.SGD:
    """The run's optimizer: SGD with momentum and weight decay as configured."""
    o = cfg["optim"]
    # fused: one kernel for the whole update on CUDA, instead of a few per parameter
    fused = True if accel.on_cuda(placement) else None
    return torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"], fused=fused)


def prepare_trainer(cfg: dict, model, optimizer, placement, runtime, batch_shape: tuple[int, ...], say=print,
                    decided: dict | None = None) -> Trainer:
    """The speed settings applied (``accel.prepare``: memory format, conv formulations, compile; ``decided``:
    a checkpoint's choices, reused) and the step's inputs bundled: what train.py trains with, and what the
    benchmarks time."""
    t = cfg["train"]
    runner, choices = accel.prepare(model, cfg, placement, batch_shape, say=say,
                                    wrap=overlap_wrapper(cfg, runtime, placement), runtime=runtime, decided=decided)
    memory = memwatch.MemoryWatch(placement, runtime, model, optimizer, compiled=t["compile"],
                                  distributed=not isinstance(runtime, LocalRuntime),
                                  snapshot_path=snapshot_path(cfg, placement, runtime))
    return Trainer(runner, optimizer, placement, runtime, t["precision"],
                   channels_last=choices["channels_last"], seed=cfg["run"]["seed"], choices=choices,
                   memory=memory)


def overlap_wrapper(cfg: dict, runtime, placement):
    """``parallel.grad_sync: overlap`` with data replicas: the model under DDP over the replicas (its bucketed
    all-reduce runs during backward); None when there is nothing to overlap or the flat sync is asked for."""
    if cfg["parallel"]["grad_sync"] != "overlap" or runtime.num_replicas == 1 or isinstance(runtime, LocalRuntime):
        return None
    from parallel.overlap import overlap_replicas
    return lambda model: overlap_replicas(model, runtime, placement.input_device)


def snapshot_path(cfg: dict, placement, runtime) -> str | None:
    """Where ``train.memory_snapshot`` writes this process's allocator history (CUDA only; refused on CPU)."""
    if not cfg["train"]["memory_snapshot"]:
        return None
    if not accel.on_cuda(placement):
        raise ConfigError("train.memory_snapshot records the CUDA allocator's history, and this run is on CPU; "
                          "set train.memory_snapshot=false (memory per device is still reported: MemTracker, one step)")
    name = "memory_snapshot.pickle" if runtime.is_main else f"memory_snapshot.rank{runtime.process_index}.pickle"
    return os.path.join(cfg["run"]["dir"], name)


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
    scope.check(cfg, scope.scope_of(where))
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
    """The training loop, in the manner of nanoGPT's and torchvision's: every step a named function."""
    code_commit()  # read before training, so the summary names the code this run started with
    torch.manual_seed(cfg["run"]["seed"])
    accel.set_determinism(cfg["run"]["deterministic"])
    spec, placement, runtime, model, optimizer = build_run(cfg, where)
    train_loader, val_loader = data_from_config(cfg, placement, runtime)
    schedule = schedule_from_config(cfg, len(train_loader))
    position, decided = resume(resume_path, cfg, model, optimizer, schedule)
    log = RunLog(cfg["run"]["dir"], runtime.is_main, position.epoch, position.step, position.record)
    log.layout()
    best_val = min((m["val_top1_err"] for m in log.history()), default=math.inf)  # for best.pt
    trainer = prepare_trainer(cfg, model, optimizer, placement, runtime, batch_shape(spec, train_loader, runtime), say,
                              decided)
    t = cfg["train"]
    recordings = GraphRecordings() if t["compile"] and t["compile_mode"] == "reduce-overhead" else None
    write_config(cfg, runtime)
    clock = Clock(position.wall_s)
    probe = response_probe(val_loader, trainer, runtime)
    stopped, mb_per_step = False, 0.0
    for epoch in range(position.epoch, t["epochs"]):
        epoch_start = time.perf_counter()
        result = train_epoch(cfg, trainer, train_loader, schedule, epoch, position, log, should_stop, quiet)
        mb_per_step = result["comm_bytes_per_step"] / 1e6
        epoch_step = position.epoch_step + result["step"] - position.step
        if result["stopped"] and epoch_step < len(train_loader):
            # Pre-empted mid-epoch: save the position and the epoch's partial sums.
            position = Position(epoch, result["step"], epoch_step, result["partial"], record=position.record)
            save(cfg, model, trainer, schedule, position, clock)
            stopped = True
            break
        val = evaluate(trainer, val_loader)
        record = epoch_record(spec, trainer, schedule, epoch, result, val, time.perf_counter() - epoch_start)
        # The checkpoint first, holding the epoch's record: metrics.jsonl never lists an epoch that no
        # checkpoint holds, and a crash between the two is repaired on resume (RunLog).
        weights = ckpt_io.model_state(model)  # on rank 0 only, which writes the checkpoint and the metrics
        add_filter_correlation(record, weights, spec)
        responses = add_response_correlation(record, model, probe)
        position = Position(epoch + 1, result["step"], record=record)
        save(cfg, model, trainer, schedule, position, clock, weights)
        best_val = keep_best(cfg, runtime, record, best_val)
        log.epoch(record)
        report_epoch(cfg, spec, trainer, record, recordings, epoch_step, say)
        log_filters(cfg, log, weights, spec, epoch, responses)
        if result["stopped"] or (stop_after_epoch is not None and epoch + 1 >= stop_after_epoch):
            stopped = result["stopped"]
            break
    if recordings is not None:
        recordings.close()
    return finish(cfg, spec, where.describe(), runtime, log, clock, mb_per_step, stopped, hparams_experiment,
                  train_loader.num_samples, val_loader.num_samples)


def schedule_from_config(cfg: dict, steps_per_epoch: int) -> LRSchedule:
    o = cfg["optim"]
    return LRSchedule(o["schedule"], o["lr"], cfg["train"]["epochs"], steps_per_epoch, o["patience"], o["max_drops"],
                      o["step_size"], o["gamma"], o["warmup_epochs"])


def resume(path: str | None, cfg: dict, model, optimizer, schedule) -> tuple[Position, dict | None]:
    """Load a checkpoint's weights, momentum and schedule; (its position, its speed choices) (the start
    and None when ``path`` is None, or the checkpoint predates the choices)."""
    if not path:
        return Position(), None
    ckpt = ckpt_io.load(path)
    ckpt_io.check_compatible(ckpt, cfg["model"], path)
    load_full_state_dict(model, ckpt["model"])
    ckpt_io.load_optimizer_state(model, optimizer, ckpt["optimizer"])
    schedule.load_state_dict(ckpt["schedule"])
    return Position.of(ckpt), ckpt.get("speed")


def batch_shape(spec, train_loader, runtime) -> tuple[int, ...]:
    """One replica's training batch (N, C, H, W), for timing conv formulations."""
    return (max(1, train_loader.batch_size // runtime.num_replicas), spec.in_channels, spec.input_size,
            spec.input_size)


def write_config(cfg: dict, runtime) -> None:
    if runtime.is_main:
        with open(os.path.join(cfg["run"]["dir"], "config.yaml"), "w") as f:
            f.write(dump(cfg))


class Clock:
    """Training wall time: earlier processes' (from the checkpoint) plus this one's."""

    def __init__(self, before: float):
        self.before, self.start = before, time.perf_counter()

    def wall_s(self) -> float:
        return self.before + time.perf_counter() - self.start


def train_epoch(cfg: dict, trainer: Trainer, train_loader, schedule, epoch: int, position: Position, log,
                should_stop, quiet: bool) -> dict:
    """One epoch (from a mid-epoch position when resuming one) under a progress bar; a diverged loss
    becomes one message that says what is kept and what to change."""
    t, runtime = cfg["train"], trainer.runtime
    skip, carry = position.epoch_step, position.partial  # (0, None) unless resuming mid-epoch
    train_loader.set_epoch(epoch, skip)
    # disable=None: no bar when stderr is not a terminal (log files, pipes), so errors stay one line
    bar = tqdm(total=len(train_loader), initial=skip, desc=f"epoch {epoch + 1}/{t['epochs']}", unit="step",
               disable=True if quiet or not runtime.is_main else None, leave=False, dynamic_ncols=True)
    trainer.placement.counter.reset()
    hooks = EpochHooks(progress=bar, log_every=t["log_every"], should_stop=should_stop,
                       on_log=lambda s, loss, lr: (log.scalar("train/loss", loss, s), log.scalar("train/lr", lr, s)))
    if trainer.memory is not None:
        trainer.memory.start_epoch()
    try:
        result = train_one_epoch(trainer, train_loader, schedule, epoch, position.step, hooks, carry=carry)
        if trainer.memory is not None:  # a collective under torchrun: every rank's peak
            result["peak_mib"] = trainer.memory.peaks()
        return result
    except TrainingDiverged as e:
        path = os.path.join(cfg["run"]["dir"], "checkpoints", "last.pt")
        kept = (f"the last checkpoint ({path}, epoch {epoch}) is kept" if os.path.isfile(path)
                else "no checkpoint had been written yet")
        raise TrainingDiverged(f"{e}, epoch {epoch + 1}: nothing of this epoch is saved and {kept}; lower "
                               f"optim.lr (it is {cfg['optim']['lr']:g}) or check the data") from None
    finally:
        bar.close()


def epoch_record(spec, trainer: Trainer, schedule, epoch: int, result: dict, val: dict, epoch_s: float) -> dict:
    """What metrics.jsonl and TensorBoard get for a finished epoch (the schedule sees the validation error)."""
    lr_used = schedule.lr(result["step"] - 1, epoch)
    schedule.end_epoch(val["val_top1_err"])
    speed = mfu.throughput(result["images_per_s"], spec.macs(), mfu.device_name(trainer.placement.input_device),
                           mfu.devices_in_run(trainer.placement))
    return {"epoch": epoch + 1, "step": result["step"], "train_loss": result["train_loss"],
            "train_top1_err": result["train_top1_err"], "train_top5_err": result["train_top5_err"],
            "val_loss": val["val_loss"], "val_top1_err": val["val_top1_err"], "val_top5_err": val["val_top5_err"],
            "lr": lr_used, "images_per_s": result["images_per_s"], "tflops": speed["tflops"], "mfu": speed["mfu"],
            "cross_group_mb_per_step": result["comm_bytes_per_step"] / 1e6, "epoch_s": epoch_s,
            "data_replicas": trainer.runtime.num_replicas, "groups": spec.groups, **memory_fields(trainer, result)}


def memory_fields(trainer: Trainer, result: dict) -> dict:
    """The epoch's peak memory per device (MiB; None where not measured), its largest, and how it was measured."""
    peaks = result.get("peak_mib")
    if peaks is None:
        return {}
    measured = [v for v in peaks.values() if v is not None]
    return {"peak_mib": peaks, "peak_mib_max": max(measured) if measured else None,
            "memory_measured": trainer.memory.how}


def add_filter_correlation(record: dict, weights: dict | None, spec) -> None:
    """The seed's claim, tested every epoch: are conv1 filters of one group more alike than across groups?"""
    if weights is not None:
        record["conv1_corr_within"], record["conv1_corr_between"] = within_between_correlation(
            weights, spec.layer_groups["conv1"])


#: validation images whose responses the grouped layers are correlated on (the first of the val set, fixed)
PROBE_IMAGES = 512


def response_probe(val_loader, trainer: Trainer, runtime) -> torch.Tensor | None:
    """The first ``PROBE_IMAGES`` validation images (centre crop), on the input device in the training layout;
    None where the run cannot see every group's responses (torchrun: each process holds its groups only)."""
    if not (runtime.is_main and isinstance(runtime, LocalRuntime) and all_slots_local(trainer.placement)):
        return None
    batches, n = [], 0
    for images, _ in val_loader:
        images = images[:, 0] if images.ndim == 5 else images  # 10-crop evaluation: the first crop
        batches.append(images)
        n += images.shape[0]
        if n >= PROBE_IMAGES:
            break
    return to_input(torch.cat(batches)[:PROBE_IMAGES], trainer.placement.input_device, trainer.channels_last)


def add_response_correlation(record: dict, model, probe: torch.Tensor | None) -> dict:
    """The seed's claim at every grouped layer: ``<layer>_resp_within`` and ``_resp_between`` in the record
    (None where not measured: under torchrun, where each process holds only its groups); returns the
    matrices (for TensorBoard)."""
    if probe is None:
        record.update({f"{layer}_resp_{which}": None for layer in grouped_layers(model)
                       for which in ("within", "between")})
        return {}
    matrices = response_correlations(model, probe)
    groups = {name: m.groups for name, m in model.named_modules() if name in matrices}
    for layer, corr in matrices.items():
        record[f"{layer}_resp_within"], record[f"{layer}_resp_between"] = within_between(corr, groups[layer])
    return matrices


def save(cfg: dict, model: GroupAlexNet, trainer: Trainer, schedule, position: Position, clock: Clock,
         weights="assemble") -> None:
    """checkpoints/last.pt, atomically. Every rank takes part (shards are gathered to rank 0); only
    rank 0 writes. ``model`` is the module (``trainer.model`` may be its compiled wrapper);
    ``weights``: reference-layout weights already assembled (None on ranks but 0), else assembled here."""
    runtime = trainer.runtime
    position.wall_s = clock.wall_s()
    state = ckpt_io.build(cfg, position, ckpt_io.model_state(model) if isinstance(weights, str) else weights,
                          ckpt_io.optimizer_state(model, trainer.optimizer), schedule.state_dict(), trainer.choices)
    if runtime.is_main:
        ckpt_io.save_atomic(state, os.path.join(cfg["run"]["dir"], "checkpoints", "last.pt"))
    runtime.barrier()


def keep_best(cfg: dict, runtime, record: dict, best_val: float) -> float:
    """checkpoints/best.pt: a copy of last.pt when this epoch's validation error is the lowest so far."""
    if runtime.is_main and record["val_top1_err"] <= best_val:
        folder = os.path.join(cfg["run"]["dir"], "checkpoints")
        ckpt_io.copy_atomic(os.path.join(folder, "last.pt"), os.path.join(folder, "best.pt"))
        return record["val_top1_err"]
    return best_val


def report_epoch(cfg: dict, spec, trainer: Trainer, record: dict, recordings, steps: int, say) -> None:
    """The epoch's line on the console (and, under CUDA graphs, how often they were recorded)."""
    t, placement = cfg["train"], trainer.placement
    say(f"epoch {record['epoch']}/{t['epochs']}  loss {record['train_loss']:.4f}  val top-1 "
        f"{record['val_top1_err']:.2f}%  top-5 {record['val_top5_err']:.2f}%  lr {record['lr']:.3g}  "
        f"{record['images_per_s']:.0f} img/s  "
        f"{mfu.describe(record['images_per_s'], spec.macs(), placement.input_device, mfu.devices_in_run(placement))}  "
        f"{memwatch.describe(record.get('peak_mib', {}))}  {record['epoch_s']:.1f}s", flush=True)
    if recordings is not None:
        say(describe_recordings(recordings.take(), steps, accel.on_cuda(placement)))


def log_filters(cfg: dict, log, weights, spec, epoch: int, responses: dict) -> None:
    every = cfg["train"]["filter_images_every"]
    if every and ((epoch + 1) % every == 0 or epoch + 1 == cfg["train"]["epochs"]):
        log.filters(weights, spec.layer_groups["conv1"], epoch + 1)
        log.responses(responses, epoch + 1)


def finish(cfg: dict, spec, where_text: str, runtime, log, clock: Clock, mb_per_step: float, stopped: bool,
           hparams_experiment: bool, train_samples: int, val_samples: int) -> dict:
    """The run's summary (summary.json and the HParams session once every epoch is done)."""
    history = log.history() if runtime.is_main else []
    finished = bool(history) and history[-1]["epoch"] == cfg["train"]["epochs"]
    summary = make_summary(cfg, spec, where_text, runtime, history, clock.wall_s(), mb_per_step)
    summary["settings"] = run_settings(cfg, where_text, train_samples, val_samples)
    summary["stopped"] = stopped
    if finished:
        summary["hparams"] = run_hparams(cfg, spec, runtime)
        log.summary(summary)
        log.hparams(summary["hparams"], experiment=hparams_experiment)
    log.close()
    return summary


@functools.cache
def code_commit() -> str | None:
    """The checkout's commit (with ``+changes`` when the tree differs from it), or None outside git.

    Read once per process, at the first run's start (not at import), so a study that runs for
    hours in one process keeps reporting the code it started with even if the checkout moves on.
    """
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


def run_settings(cfg: dict, where: str, train_samples: int, val_samples: int) -> dict:
    """What was run, for every artefact that reports the run: data, schedule, machine, code."""
    d, t = cfg["data"], cfg["train"]
    return {"dataset": d["dataset"], "epochs": t["epochs"], "batch_size": d["batch_size"], "lr": cfg["optim"]["lr"],
            "data_limit": d["limit"], "train_samples": train_samples, "val_samples": val_samples,
            "precision": t["precision"], "placement": where, "torch": torch.__version__,
            "commit": code_commit()}


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
            "peak_mib": final.get("peak_mib"), "peak_mib_max": final.get("peak_mib_max"),
            "memory_measured": final.get("memory_measured"),
            "cross_group_mb_per_step": mb_per_step, "wall_s": wall_s,
            "placement": where}
