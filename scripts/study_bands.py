"""A study's seeds as one curve per config in TensorBoard: the mean over seeds with a band.

For every config of a study (``g1``, ``g2``, ``root``, ...) the summary run ``_mean/<config>``
holds, per epoch, the mean over the config's seeds of each compared metric under
``seeds/<metric>``, and the band ``seeds/<metric>/lower`` and ``/upper`` = mean -+ one
sample standard deviation over the seeds (the spread a reader should expect from another
seed; the report's interval for a *difference* is in comparison.md). Only epochs that every
seed of the config has reached are written, so a band never mixes 3 seeds at one epoch with
2 at the next. The folder is rewritten whole each time (no duplicate steps when a study
resumes). Its layout puts Custom Scalars' margin charts, one band per config, first: the
``_`` sorts the summary runs before the per-run folders (``g1-s0``), and TensorBoard merges
the runs' layouts in that order.
"""
from __future__ import annotations

import math
import os
import shutil

from alexnet.logs import read_metrics

SUMMARY_DIR = "_mean"
#: metric -> chart title of its margin chart
COMPARED = {"val_top1_err": "val top-1 error (%)", "val_top5_err": "val top-5 error (%)", "val_loss": "val loss",
            "train_loss": "train loss", "images_per_s": "images/s", "conv1_corr_within": "conv1 |corr| within groups",
            "conv1_corr_between": "conv1 |corr| between groups"}
CATEGORY = "seeds: mean +- 1 sd per config (smoothing 0)"


def bands(histories: list[list[dict]]) -> dict[str, list[tuple[int, float, float, float]]]:
    """Per metric, (epoch, mean, lower, upper) for every epoch all ``histories`` (one per seed) reached."""
    if not histories or not all(histories):
        return {}
    reached = min(h[-1]["epoch"] for h in histories)  # the last epoch every seed has reached
    out = {}
    for metric in COMPARED:
        series = []
        for epoch in range(1, reached + 1):
            values = [r[metric] for h in histories for r in h if r["epoch"] == epoch and r.get(metric) is not None]
            if not values or not all(map(math.isfinite, values)):  # a metric this config has not (G = 1: between)
                continue
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            series.append((epoch, mean, mean - sd, mean + sd))
        if series:
            out[metric] = series
    return out


def layout() -> dict:
    """The summary runs' Custom Scalars category (torch's add_custom_scalars form): a margin chart per metric."""
    # last first: TensorBoard (2.21) draws a margin category's charts in reverse order, and val top-1 error
    # should open the page
    return {CATEGORY: {f"{title}, mean +- 1 sd over seeds": ["Margin", [f"seeds/{m}", f"seeds/{m}/lower",
                                                                        f"seeds/{m}/upper"]]
                       for m, title in reversed(COMPARED.items())}}


def write_summary_runs(family_dir: str, runs: list[dict]) -> list[str]:
    """Rewrite ``<family_dir>/_mean/<config>`` for every config of ``runs`` ({"name", "dir"} each); returns
    the folders written (a config none of whose seeds finished an epoch gets none)."""
    from torch.utils.tensorboard import SummaryWriter
    root = os.path.join(family_dir, SUMMARY_DIR)
    by_config: dict[str, list[str]] = {}
    for r in runs:
        by_config.setdefault(r["name"], []).append(r["dir"])
    written = []
    for name, dirs in by_config.items():
        folder = os.path.join(root, name)
        shutil.rmtree(folder, ignore_errors=True)
        series = bands([read_metrics(os.path.join(d, "metrics.jsonl")) for d in dirs])
        if not series:
            continue
        writer = SummaryWriter(folder)
        for metric, points in series.items():
            for epoch, mean, lower, upper in points:
                writer.add_scalar(f"seeds/{metric}", mean, epoch)
                writer.add_scalar(f"seeds/{metric}/lower", lower, epoch)
                writer.add_scalar(f"seeds/{metric}/upper", upper, epoch)
        writer.add_custom_scalars(layout())
        writer.close()
        written.append(folder)
    return written
