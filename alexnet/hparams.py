"""TensorBoard's HParams dashboard for a run and for a study: what the study varies first.

The dashboard shows the first five hyperparameters and the first five metrics of the
experiment; the rest start unticked. TensorBoard orders an experiment's hyperparameters
by whether they differ between runs (``HParamInfo.differs``, true first), then by name,
whatever order they are written in (tensorboard/plugins/hparams/backend_context.py,
``_sort_and_reduce_to_hparams_limit``). So every experiment written here marks what a
group-count study varies, ``STUDY_HPARAMS``, as differing (and anything else that does
differ between the runs), and lists ``METRICS`` first. Values are text as a person
writes them ("128", "656914", "0.05"), because TensorBoard prints numbers with five
significant digits (128.00, 6.5691e+05).

A run writes its session (start and end) and an experiment of its own; a study writes
one experiment for all its runs in its first summary run, ``_mean/<config>`` (``write_study_experiment``), with the
values that occur, and marks its runs' own experiments as not to be used (TensorBoard
takes the first experiment it finds, so only the study's is written when the study runs
the training itself, and a study collected from runs made elsewhere rewrites nothing but
its own).
"""
from __future__ import annotations

import os

#: what a group-count study varies, and what it costs: the five hyperparameters shown first
STUDY_HPARAMS = ("groups", "exchanges", "seed", "params", "macs")
#: the metrics listed first (the dashboard ticks five): final errors, loss, speed, peak memory, traffic
METRICS = ("epoch/val_top1_err", "epoch/val_top5_err", "epoch/train_loss", "epoch/images_per_s",
           "epoch/peak_mib_max", "epoch/cross_group_mb_per_step")


def as_text(value) -> str:
    """128 -> "128", 2.0 -> "2", 0.05 -> "0.05", 1e-4 -> "0.0001"; text stays text."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.6g}" if abs(value) >= 1e-4 else repr(value)
    return str(value)


def _sort_key(text: str):
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _plugin_summary(tag: str, **data):
    """A Summary holding one HParamsPluginData field (experiment, session_start_info, ...) under ``tag``."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2
    meta = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**data))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def experiment_summary(runs: list[dict], varying=STUDY_HPARAMS):
    """The Experiment summary for runs given by their hyperparameters (name -> value): study
    hyperparameters first and marked differing, then the rest in the first run's order; each
    one's domain is the values that occur (as text)."""
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata
    names = [k for k in varying if any(k in r for r in runs)]
    names += [k for r in runs for k in r if k not in names]
    names = list(dict.fromkeys(names))
    infos = []
    for name in names:
        values = sorted({as_text(r[name]) for r in runs if name in r}, key=_sort_key)
        infos.append(api_pb2.HParamInfo(
            name=name, type=api_pb2.DATA_TYPE_STRING, differs=name in varying or len(values) > 1,
            domain_discrete=struct_pb2.ListValue(values=[struct_pb2.Value(string_value=v) for v in values])))
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in METRICS]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
    return _plugin_summary(metadata.EXPERIMENT_TAG, experiment=experiment)


def session_summaries(hparams: dict) -> list:
    """SessionStartInfo (the run's values, as text) and a successful SessionEndInfo."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    start = plugin_data_pb2.SessionStartInfo()
    for name, value in hparams.items():
        start.hparams[name].string_value = as_text(value)
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
    return [_plugin_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start),
            _plugin_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end)]


def write_study_experiment(study_dir: str, runs: list[dict], clean: str | None = None) -> str:
    """One experiment for the study's runs, in ``study_dir`` (replaced each time; ``clean``: another folder
    an earlier one may be in, removed there too); returns the folder."""
    from torch.utils.tensorboard import SummaryWriter
    for folder in {study_dir, clean or study_dir}:
        for name in os.listdir(folder):
            if name.startswith("events.out.tfevents.") and name.endswith(".hparams"):
                os.remove(os.path.join(folder, name))
    writer = SummaryWriter(study_dir, filename_suffix=".hparams")
    writer.file_writer.add_summary(experiment_summary(runs))
    writer.close()
    return study_dir
