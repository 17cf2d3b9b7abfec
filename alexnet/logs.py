"""What a run writes: TensorBoard events, metrics.jsonl (one line per epoch), summary.json.

Only the main process writes; the others get a ``RunLog`` whose methods do nothing.
"""
from __future__ import annotations

import json
import os



def write_json_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# Per-epoch record fields that do not change over a run (or count epochs): kept out of the Scalars page.
CONSTANT_KEYS = ("epoch", "step", "groups", "data_replicas")
CUSTOM_SCALARS = {
    "validation error": {"val top-1 error (%)": ["Multiline", [r"epoch/val_top1_err"]],
                         "val top-5 error (%)": ["Multiline", [r"epoch/val_top5_err"]],
                         "val loss": ["Multiline", [r"epoch/val_loss"]]},
    "training": {"train loss (per log step)": ["Multiline", [r"train/loss"]],
                 "train top-1 error (%)": ["Multiline", [r"epoch/train_top1_err"]],
                 "learning rate": ["Multiline", [r"train/lr"]]},
    "groups": {"conv1 |corr| within groups": ["Multiline", [r"epoch/conv1_corr_within"]],
               "conv1 |corr| between groups": ["Multiline", [r"epoch/conv1_corr_between"]],
               "cross-group MB per step": ["Multiline", [r"epoch/cross_group_mb_per_step"]],
               "response |corr| within groups": ["Multiline", [r"epoch/conv\d_resp_within"]],
               "response |corr| between groups": ["Multiline", [r"epoch/conv\d_resp_between"]]},
    "speed": {"images/s": ["Multiline", [r"epoch/images_per_s"]], "epoch seconds": ["Multiline", [r"epoch/epoch_s"]]},
    "memory": {"peak MiB per device": ["Multiline", [r"memory/peak_mib/.*"]],
               "peak MiB, largest device": ["Multiline", [r"epoch/peak_mib_max"]]},
}


class RunLog:
    def __init__(self, run_dir: str, enabled: bool, resume_epoch: int = 0, resume_step: int = 0,
                 resume_record: dict | None = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        # Keep only the epochs the checkpoint covers (an interrupted epoch is redone).
        kept = [m for m in read_metrics(self.metrics_path) if m["epoch"] <= resume_epoch]
        # The checkpoint is written before the metrics line: a crash in between leaves the line
        # missing, and the checkpoint carries it.
        if resume_record and resume_record["epoch"] == resume_epoch and not any(
                m["epoch"] == resume_epoch for m in kept):
            kept.append(resume_record)
        with open(self.metrics_path, "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in kept)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(run_dir, purge_step=resume_step if resume_step else None)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer:
            self.writer.add_scalar(tag, value, step)

    def epoch(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        epoch = record["epoch"]
        for key, value in record.items():
            if key not in CONSTANT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        for device, mib in (record.get("peak_mib") or {}).items():  # one curve per device
            if mib is not None:
                self.writer.add_scalar(f"memory/peak_mib/{device}", mib, epoch)
        self.writer.flush()

    def filters(self, weights: dict, groups: int, epoch: int) -> None:
        """conv1 filters per group, and the conv1 filter-correlation heat map (in group order)."""
        if not self.writer:
            return
        from alexnet.filters import (conv1_all_groups_image, conv1_group_grids, filter_correlation, heatmap_image,
                                     input_group_share)
        for g, grid in enumerate(conv1_group_grids(weights, groups)):
            self.writer.add_image(f"filters/conv1_group{g}", grid, epoch)
        self.writer.add_image("filters/conv1_all_groups", conv1_all_groups_image(weights, groups)[0], epoch)
        self.writer.add_image("filters/conv1_correlation", heatmap_image(filter_correlation(weights, groups, "conv1")),
                              epoch)
        if groups > 1 and "conv3" in weights and weights["conv3.weight"].shape[1] % groups == 0:
            # (the learned G x G block structure of the first cross-group layer)
            share = input_group_share(weights, groups)
            self.writer.add_image("filters/conv3_input_group_share", heatmap_image(share / share.max()), epoch)

    def responses(self, matrices: dict, epoch: int) -> None:
        """Per grouped conv layer, the |correlation| of its filters' responses on validation images (group order)."""
        if not self.writer:
            return
        from alexnet.filters import heatmap_image
        for layer, corr in matrices.items():
            self.writer.add_image(f"responses/{layer}_correlation", heatmap_image(corr.float()), epoch)

    def layout(self) -> None:
        """TensorBoard's Custom Scalars page: one chart per metric, every run in it (runs are named g<G>-s<seed>,
        so they sort by G)."""
        if self.writer:
            self.writer.add_custom_scalars(CUSTOM_SCALARS)

    def hparams(self, hparams: dict, experiment: bool = True) -> None:
        """Register this run in TensorBoard's HParams dashboard, inside the run's own directory:
        its session, and (``experiment``) an experiment of its own that opens on what a study
        varies (``alexnet.hparams``). The metrics are the per-epoch scalar tags already written."""
        if not self.writer:
            return
        from alexnet.hparams import experiment_summary, session_summaries
        summaries = ([experiment_summary([hparams])] if experiment else []) + session_summaries(hparams)
        for summary in summaries:
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def history(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def summary(self, summary: dict) -> None:
        if self.enabled:
            write_json_atomic(summary, os.path.join(self.run_dir, "summary.json"))

    def close(self) -> None:
        if self.writer:
            self.writer.close()
