"""Run a config family (G = 1..4, or any of its configs) over several seeds, then write the comparison report.

  python scripts/compare_groups.py configs/fashion_mnist --seeds 0 1 2
  python scripts/compare_groups.py configs/fashion_mnist --configs g1 g2 g4 g4_shuffle root --seeds 0 1 2
  python scripts/compare_groups.py configs/fashion_mnist --seeds 0 --set train.epochs=2 --runs-dir runs/demo
  python scripts/compare_groups.py configs/fashion_mnist --design g1=14 g2=14 g3=7 g4=7 --speed   # make study
  python scripts/compare_groups.py configs/fashion_mnist --collect-only     # report from existing runs
  tensorboard --logdir runs/fashion_mnist                                  # every run side by side

In TensorBoard, Custom Scalars opens on one curve per config: the mean over its seeds with a
band of one standard deviation (the summary runs _mean/<config>, rewritten as runs finish;
set smoothing to 0, the curves are per epoch); the per-run charts follow.

Each run goes to runs/<family>/<config>-s<seed>/ (or --runs-dir), e.g. g2-s0 or root-s1. A run whose summary.json
exists is skipped; one with a checkpoint but no summary is resumed, so the study can be
stopped (Ctrl-C) and started again at any time without losing finished work. A run
folder trained with other settings is an error, never silently mixed in. The report
(comparison.md, .csv, .png) is written next to the runs and printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import yaml

from alexnet.checkpoint import CheckpointError
from alexnet.config import ConfigError, load
from alexnet.engine import TrainingDiverged
from alexnet.fit import fit
from alexnet.spec import SpecError
from data.errors import DataError
from parallel.placement import PlacementError
from alexnet.hparams import write_study_experiment
import study_speed
from study_bands import SUMMARY_DIR, write_summary_runs
from study_report import build_report
from study_stats import EQUIVALENCE_MARGIN


def parse_design(entries: list[str]) -> dict[str, int]:
    """``["g1=14", "g2=14", "g3=7"]`` -> {config: number of seeds}: config NAME runs seeds 0 .. N-1."""
    design = {}
    for entry in entries:
        name, _, n = entry.partition("=")
        if not n.isdigit() or int(n) < 1 or not name:
            raise ConfigError(f"--design takes NAME=SEEDS entries such as g1=14 (seeds 0..13), got {entry!r}")
        design[name] = int(n)
    return design


def design_pairs(design: dict[str, int]) -> list[tuple[str, int]]:
    """(config, seed) in seed-major order: seeds 0.. of every config first, so an interrupted study already
    holds whole seeds of every config."""
    return [(name, seed) for seed in range(max(design.values())) for name, n in design.items() if seed < n]


def plan(config_dir: str, configs: list, seeds: list[int], overrides: list[str],
         runs_dir: str | None = None, pairs: list[tuple[str, int]] | None = None) -> list[dict]:
    """Every (config, seed) run with its resolved config and state: done, resume or new.

    ``configs``: file names in ``config_dir`` without .yaml (``g4_shuffle``); a number G means ``g<G>``.
    ``pairs`` (a design, ``design_pairs``) replaces configs x seeds with its own (config, seed) list.
    """
    if any(o.split("=", 1)[0].strip() in ("run.dir", "run.seed", "model.groups") for o in overrides):
        raise ConfigError("compare_groups sets run.dir, run.seed and model.groups itself; drop them from --set "
                          "(use --runs-dir for another folder)")
    runs = []
    names = [f"g{name}" if isinstance(name, int) else name for name in configs]
    for name, seed in pairs or [(name, seed) for name in names for seed in seeds]:
        path = os.path.join(config_dir, f"{name}.yaml")
        if not os.path.isfile(path):
            present = sorted(f[:-5] for f in os.listdir(config_dir) if f.endswith(".yaml") and f != "base.yaml") \
                if os.path.isdir(config_dir) else []
            raise ConfigError(f"{path} does not exist; configs in {config_dir}: {', '.join(present) or 'none'}")
        extra = [f"run.seed={seed}"] + ([f"run.dir={os.path.join(runs_dir, f'{name}-s{seed}')}"] if runs_dir else [])
        cfg = load(path, overrides + extra)
        run_dir = cfg["run"]["dir"]
        check_same_settings(cfg, run_dir)
        if os.path.isfile(os.path.join(run_dir, "summary.json")):
            state = "done"
        elif os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt")):
            state = "resume"
        else:
            state = "new"
        runs.append({"name": name, "seed": seed, "cfg": cfg, "dir": run_dir, "state": state})
    return runs


def check_same_settings(cfg: dict, run_dir: str) -> None:
    """Refuse to reuse a run folder whose saved config differs from the one requested (where the folder
    is, ``run.dir``, is not a setting: a finished run linked into another study is the same run)."""
    saved_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(saved_path):
        return
    with open(saved_path) as f:
        saved = yaml.safe_load(f)
    differ = [f"{section}.{key}" for section in cfg for key in cfg[section]
              if (section, key) != ("run", "dir") and saved.get(section, {}).get(key) != cfg[section][key]]
    if differ:
        raise ConfigError(f"{run_dir} was trained with other settings ({', '.join(differ[:4])}); delete it, "
                          "or pass --runs-dir to keep this study's runs elsewhere")


def study_hparams(runs: list[dict]) -> list[dict]:
    """Every finished run's HParams values, from its summary.json (runs made before they were saved
    there are left out of the study's experiment, and still listed by their own sessions)."""
    out = []
    for r in runs:
        path = os.path.join(r["dir"], "summary.json")
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f).get("hparams")
            if saved:
                out.append(saved)
    return out


def family_of(runs: list[dict]) -> str:
    return os.path.dirname(os.path.normpath(runs[0]["dir"]))


def time_configs(runs: list[dict]) -> None:
    """The study's efficiency measurement, alone before any training: each config's train.py step, side by side."""
    configs = {}
    for r in runs:  # one config per name (the seed plays no part in a step's time)
        configs.setdefault(r["name"], r["cfg"])
    print(f"timing train.py's step of {', '.join(configs)} side by side (5 rounds)", flush=True)
    result = study_speed.measure(configs)
    study_speed.write(os.path.join(family_of(runs), study_speed.SPEED_FILE), result, 5, 5)
    for name, r in result.items():
        print(f"  {name}: {r['images_per_s']:.0f} images/s", flush=True)


def _train_one(run: dict, threads: int) -> dict:
    """One run in a worker process of its own (``--jobs``): ``threads`` torch threads, quiet console."""
    import torch
    torch.set_num_threads(threads)
    return fit(run["cfg"], resume="latest" if run["state"] == "resume" else None, hparams_experiment=False, quiet=True)


def run_parallel(runs: list[dict], jobs: int) -> None:
    """The runs ``jobs`` at a time, each in a fresh process with cores / jobs threads.

    Small steps do not keep two threads busy (element-wise work on 0.5-5 MB tensors spends
    much of its time starting and joining them): on this 2-core CPU two one-thread runs side
    by side trained 1.18x the images/s of one two-thread run. Each run still computes from its
    own seed alone; only its images/s (shared cores) says less, so the study's speed figures
    come from ``--speed``'s pass, measured alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    todo = [r for r in runs if r["state"] != "done"]
    threads = max(1, (os.cpu_count() or jobs) // jobs)
    print(f"study: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to train, {jobs} at a "
          f"time ({threads} thread(s) each)", flush=True)
    start, finished = time.perf_counter(), 0
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = {pool.submit(_train_one, r, threads): r for r in todo}
        for future in as_completed(futures):
            r, summary = futures[future], future.result()
            finished += 1
            left = (time.perf_counter() - start) / finished * (len(todo) - finished) / 60
            print(f"[{finished}/{len(todo)}] {r['name']} seed={r['seed']}: final val top-1 "
                  f"{summary['final_val_top1_err']:.2f}%; {(time.perf_counter() - start) / 60:.1f} min so far, "
                  f"about {left:.1f} min left", flush=True)
            write_summary_runs(family_of(runs), runs)  # the seed bands, with this run in them


def run_study(runs: list[dict], jobs: int = 1) -> None:
    if jobs > 1:
        return run_parallel(runs, jobs)
    todo = [r for r in runs if r["state"] != "done"]
    print(f"study: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to train", flush=True)
    epochs_left = sum(r["cfg"]["train"]["epochs"] for r in todo)
    spent, epochs_done = 0.0, 0
    for i, r in enumerate(todo, 1):
        eta = f"{(spent / epochs_done) * epochs_left / 60:.1f} min" if epochs_done else "after the first run"
        print(f"[{i}/{len(todo)}] {r['name']} seed={r['seed']} -> {r['dir']} "
              f"({'resuming' if r['state'] == 'resume' else 'new'}); study ETA {eta}", flush=True)
        start = time.perf_counter()
        summary = fit(r["cfg"], resume="latest" if r["state"] == "resume" else None, hparams_experiment=False)
        spent += time.perf_counter() - start
        epochs_done += summary["epochs"]
        epochs_left -= r["cfg"]["train"]["epochs"]
        print(f"[{i}/{len(todo)}] {r['name']} seed={r['seed']}: final val top-1 "
              f"{summary['final_val_top1_err']:.2f}%, {time.perf_counter() - start:.0f} s", flush=True)
        write_summary_runs(family_of(runs), runs)  # the seed bands, with this run in them


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config_dir", help="a config family folder holding g1.yaml .. g4.yaml, e.g. configs/fashion_mnist")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--groups", nargs="+", type=int, default=[1, 2, 3, 4], help="G values: configs g<G>.yaml")
    p.add_argument("--configs", nargs="+", metavar="NAME",
                   help="config names in the folder instead of --groups, e.g. g1 g2 g4 g4_shuffle root")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--design", nargs="+", metavar="NAME=SEEDS",
                   help="seeds per config instead of --groups/--configs x --seeds: g1=14 g2=14 g3=7 g4=7 runs "
                        "seeds 0..13 of g1 and g2 and 0..6 of g3 and g4 (trained seed by seed)")
    p.add_argument("--speed", action="store_true",
                   help="before training, time every config's train.py step alone, side by side "
                        "(scripts/study_speed.py -> <runs dir>/speed.json, read by the report)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at a time, each in its own process with cores / jobs threads (default 1)")
    p.add_argument("--runs-dir", help="folder for this study's runs (default runs/<family>)")
    p.add_argument("--collect-only", action="store_true", help="only build the report from existing runs")
    p.add_argument("--allow-missing", action="store_true",
                   help="--collect-only: report even when some requested runs have not finished (named as a warning)")
    p.add_argument("--margin", type=float, default=EQUIVALENCE_MARGIN,
                   help="equivalence margin in points: a difference whose 95%% interval lies inside +-margin reads "
                        "'equal within margin' (default %(default)s)")
    args = p.parse_args(argv)
    try:
        design = parse_design(args.design) if args.design else None
        runs = plan(args.config_dir, args.configs or args.groups, args.seeds, args.overrides, args.runs_dir,
                    design_pairs(design) if design else None)
        if args.speed and not args.collect_only:
            time_configs(runs)
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
        if not args.collect_only:
            run_study(runs, args.jobs)
    except (ConfigError, SpecError, PlacementError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstudy interrupted: finished runs are kept; run the same command to continue", file=sys.stderr)
        return 130
    family_dir = family_of(runs)
    written = write_summary_runs(family_dir, runs)
    missing = [f"{r['name']} seed {r['seed']} ({r['dir']})" for r in runs
               if not os.path.isfile(os.path.join(r["dir"], "summary.json"))]
    if missing and not args.allow_missing:
        print(f"error: requested runs have not finished: {', '.join(missing)}; train them (run without "
              "--collect-only) or pass --allow-missing to report without them", file=sys.stderr)
        return 2
    text = build_report(family_dir, missing, args.margin)
    if text is None:
        print(f"no finished runs in {family_dir} yet", file=sys.stderr)
        return 1
    print(text)
    hparams = study_hparams(runs)
    if hparams:  # in the first summary run: no run named "." in TensorBoard, and it is found first
        write_study_experiment(written[0] if written else family_dir, hparams, clean=family_dir)
    print(f"wrote {family_dir}/comparison.md, comparison.csv, comparison.png and the HParams experiment")
    print(f"compare the runs in TensorBoard: tensorboard --logdir {family_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
