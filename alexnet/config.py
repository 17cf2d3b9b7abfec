"""Configuration: every key, its default and its meaning in one place; YAML files override, --set overrides those.

A YAML file may name one parent with ``inherit: <path relative to the file>``. Unknown
keys and wrong types are rejected with the key's path and the closest valid key.
"""
from __future__ import annotations

import copy
import difflib
import os
import re

import yaml

from alexnet.spec import CROSSABLE, PAPER_EXCHANGE, groups_label

DEFAULTS: dict = {
    "model": {
        "groups": 2,                 # G, the number of filter groups; or one per conv layer, e.g. [2, 4, 4, 2, 2]
        "num_classes": 1000,
        "in_channels": 3,
        "input_size": 227,           # square input; 227 makes the paper's conv1 give 55x55
        "conv_channels": [96, 256, 384, 384, 256],   # total over groups, each divisible by G
        "kernels": [11, 5, 3, 3, 3],
        "strides": [4, 1, 1, 1, 1],
        "paddings": [0, 2, 1, 1, 1],
        "fc_widths": [4096, 4096],   # fc6, fc7 (fc8 has num_classes)
        "exchange": dict(PAPER_EXCHANGE),  # what each layer reads of the other groups' maps: all (all-gather),
                                     # shuffle (conv2..conv5: the g-th 1/G of every group's) or own (none);
                                     # a layer not named reads its own group's (own); conv1 reads the image
        "lrn": True,                 # paper LRN after conv1 and conv2 (k=2, n=5, alpha=1e-4, beta=0.75)
        "dropout": 0.5,              # on fc6 and fc7
        "init": "paper",             # paper | caffe | kaiming
    },
    "optim": {
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "paper",         # paper (/10 on plateau, <= max_drops times) | step | cosine | constant
        "patience": 1,               # paper: epochs without val-error improvement before dividing by 10
        "max_drops": 3,
        "step_size": 30,             # step: epochs between drops
        "gamma": 0.1,                # step: factor per drop
        "warmup_epochs": 0,          # linear warm-up (cosine and step)
    },
    "train": {
        "epochs": 90,
        "precision": "fp32",         # fp32 | bf16 (autocast; CUDA)
        "log_every": 50,             # steps between TensorBoard loss points
        "filter_images_every": 1,    # epochs between conv1 filter pictures in TensorBoard (0: never)
        "compile": False,            # torch.compile the model (no graph breaks on the local placement)
        "compile_mode": "default",   # with compile: default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
        "channels_last": "auto",     # NHWC activations and weights: true | false | auto (CUDA: true, cuDNN's fast
                                     # layout; CPU, one process: both timed at start-up, the faster kept)
        "cudnn_benchmark": True,     # CUDA: let cuDNN time its algorithms per shape; ignored on CPU
        "conv_formulation": "auto",  # grouped | split | streams | auto (time each per layer at start-up; streams
                                     # only on CUDA without compile)
        "cpu_keep_freed": True,      # CPU: glibc keeps freed memory for reuse (mallopt) instead of handing it back
                                     # to the OS, which costs page faults on every large temporary
        "memory_snapshot": False,    # CUDA: record the allocator's history over the first steps into
                                     # <run.dir>/memory_snapshot.pickle (open it at https://pytorch.org/memory_viz)
    },
    "data": {
        "dataset": "fashion_mnist",  # fashion_mnist | imagefolder | fake
        "root": None,                # dataset folder; fashion_mnist: None searches $FASHION_MNIST_DIR, Debian path, cache
        "download": True,            # fashion_mnist: let torchvision download it when it is nowhere on disk
        "batch_size": 128,           # global batch (split over data-parallel replicas)
        "val_batch_size": 512,
        "workers": 4,                # imagefolder loader processes
        "decode": "auto",            # imagefolder: cpu (PIL in the workers) | gpu (workers read bytes, the training
                                     # device decodes and transforms) | auto (gpu when the input device is CUDA)
        "augment": True,             # fashion_mnist: random horizontal flips, and crops if crop_padding > 0
        "crop_padding": 2,           # fashion_mnist: random crops of the image padded by this many pixels
        "pca_std": 0.1,              # imagefolder PCA colour noise
        "eval_crops": 1,             # imagefolder: 1 (centre) or 10
        "limit": 0,                  # >0: use only the first N samples of each split (quick runs)
        "fake_train_samples": 512,
        "fake_val_samples": 256,
    },
    "parallel": {
        "placement": "auto",         # local | distributed | hybrid | auto (distributed when launched by torchrun);
                                     # hybrid: convs data-parallel, fc layers split over ranks (torchrun)
        "devices": ["auto"],         # local: one slot per entry (cpu, cuda:0, ...); [auto]: one per GPU, at most G
        "backend": "auto",           # distributed: nccl with CUDA, else gloo
        "grad_sync": "overlap",      # data replicas: overlap (DDP's bucketed all-reduce during backward) | flat
                                     # (one all-reduce of every gradient after backward; kept to compare, for 0.2)
        "timeout_s": 600,            # distributed: how long a collective (or start-up) may wait for a peer
    },
    "run": {
        "seed": 0,
        "dir": None,                 # default runs/<config family>/g<G>-s<seed>
        "deterministic": False,      # torch.use_deterministic_algorithms (slower on GPU)
        "overwrite": False,          # true: start over in a run.dir that holds a run (its metrics, events and
                                     # checkpoints are deleted); false: such a folder is only continued (--resume)
    },
}

# Keys whose default is None, and what they accept.
NULLABLE = {"data.root": str, "run.dir": str}
# Keys that take true, false or "auto".
BOOL_OR_AUTO = {"train.channels_last"}
# Keys that take one int or a list of ints (one per conv layer).
INT_OR_LIST = {"model.groups"}
# Mappings whose keys are checked where they are used (model.exchange: layer -> exchange, by the spec).
OPEN_MAPS = {"model.exchange"}
CHOICES = {"model.init": ("paper", "caffe", "kaiming"), "optim.schedule": ("paper", "step", "cosine", "constant"),
           "data.dataset": ("fashion_mnist", "imagefolder", "fake"), "train.precision": ("fp32", "bf16"),
           "train.conv_formulation": ("auto", "grouped", "split", "streams"),
           "train.compile_mode": ("default", "reduce-overhead", "max-autotune-no-cudagraphs"), "data.decode": ("auto", "cpu", "gpu"),
           "parallel.placement": ("local", "distributed", "hybrid", "auto"), "parallel.backend": ("auto", "nccl", "gloo"),
           "parallel.grad_sync": ("overlap", "flat")}


# Allowed ranges: (low, low inclusive, high, high inclusive); None = unbounded.
RANGES = {"model.groups": (1, True, None, False), "model.num_classes": (1, True, None, False),
          "model.in_channels": (1, True, None, False), "model.input_size": (1, True, None, False),
          "optim.lr": (0, False, None, False), "optim.momentum": (0, True, 1, False),
          "optim.weight_decay": (0, True, None, False), "optim.patience": (0, True, None, False),
          "optim.max_drops": (0, True, None, False), "optim.step_size": (1, True, None, False),
          "optim.gamma": (0, False, None, False), "optim.warmup_epochs": (0, True, None, False),
          "train.epochs": (1, True, None, False), "train.log_every": (1, True, None, False),
          "train.filter_images_every": (0, True, None, False), "data.batch_size": (1, True, None, False),
          "data.val_batch_size": (1, True, None, False), "data.workers": (0, True, None, False),
          "data.crop_padding": (0, True, None, False), "data.pca_std": (0, True, None, False),
          "data.limit": (0, True, None, False), "data.fake_train_samples": (1, True, None, False),
          "data.fake_val_samples": (1, True, None, False), "parallel.timeout_s": (0, False, None, False)}
# List keys and the type of their entries.
LIST_OF = {"model.conv_channels": int, "model.kernels": int, "model.strides": int, "model.paddings": int,
           "model.fc_widths": int, "parallel.devices": str}
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A config problem; the message names the key and the fix."""


def exchange_of_cross_group(cross_group: list[str], exchange: dict[str, str] | None = None) -> dict[str, str]:
    """The retired pair (``model.cross_group``: layers that all-gather, ``model.exchange``: overrides)
    as one ``model.exchange``. Layers the paper's default has as ``all`` are named ``own`` when the
    list leaves them out, since a layer not named keeps the default."""
    named = [n for n in CROSSABLE if n in PAPER_EXCHANGE or n in cross_group]
    out = {n: "all" if n in cross_group else "own" for n in named + [n for n in cross_group if n not in named]}
    out.update(exchange or {})
    return out


def upgrade_model_config(model: dict) -> dict:
    """A model section written before ``model.cross_group`` was retired (checkpoints, old run dirs),
    in today's vocabulary; today's sections come back unchanged."""
    if "cross_group" not in model:
        return model
    upgraded = {k: v for k, v in model.items() if k != "cross_group"}
    upgraded["exchange"] = exchange_of_cross_group(model["cross_group"], model.get("exchange"))
    return upgraded


def _retired(path: str, value) -> str | None:
    """The one-line message for a retired key, naming its replacement; None for a key in use."""
    if path == "model.cross_group":
        names = value if isinstance(value, list) else [value]
        replacement = ", ".join(f"{k}: {v}" for k, v in exchange_of_cross_group([str(n) for n in names]).items())
        return (f"model.cross_group is retired: one map says what each layer reads of the other groups; "
                f"write model.exchange: {{{replacement}}} instead")
    return None


def _closest(key: str, options) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(options))}"


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out.extend(_flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"])
    return out


def _as_float(value):
    """YAML 1.1 reads 1e-3 and 1e6 as strings; users write learning rates that way."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def _check_range(path: str, value) -> None:
    if path not in RANGES:
        return
    low, low_in, high, high_in = RANGES[path]
    too_low = low is not None and (value < low if low_in else value <= low)
    too_high = high is not None and (value > high if high_in else value >= high)
    if too_low or too_high:
        lo = "" if low is None else f"{'>=' if low_in else '>'} {low}"
        hi = "" if high is None else f"{'<=' if high_in else '<'} {high}"
        raise ConfigError(f"{path} must be {' and '.join(x for x in (lo, hi) if x)}, got {value!r}")


def _check_type(path: str, value, default):
    if value is None and path in NULLABLE:
        return None
    if path in BOOL_OR_AUTO:
        if not isinstance(value, bool) and value != "auto":
            raise ConfigError(f"{path}: expected true, false or auto, got {value!r}")
        return value
    if path in INT_OR_LIST and isinstance(value, list):
        if not value or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value):
            raise ConfigError(f"{path}: expected an int >= 1 or a list of them, got {value!r}")
        return value
    expected = NULLABLE.get(path, type(default))
    if expected is float:
        value = _as_float(value)
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {expected.__name__}, got {value!r} ({type(value).__name__})")
    if path in CHOICES and value not in CHOICES[path]:
        raise ConfigError(f"{path}: {value!r} is not one of {list(CHOICES[path])}")
    if path in LIST_OF:
        kind = LIST_OF[path]
        bad = [v for v in value if not isinstance(v, kind) or (kind is int and isinstance(v, bool))]
        if bad:
            raise ConfigError(f"{path}: every entry must be {'an int' if kind is int else 'a string'}, "
                              f"got {bad[0]!r} in {value!r}")
        if kind is int and any(v < 0 for v in value):
            raise ConfigError(f"{path}: entries must be >= 0, got {value!r}")
    _check_range(path, value)
    return value


def merge(base: dict, override: dict, defaults: dict = DEFAULTS, prefix: str = "") -> dict:
    """``base`` updated with ``override``; every key of ``override`` must exist in ``defaults``."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{prefix}{key}"
        retired = _retired(path, value)
        if retired:
            raise ConfigError(retired)
        if key not in defaults:
            raise ConfigError(f"unknown config key {path!r}{_closest(path, _flat_keys(DEFAULTS))}")
        if path in OPEN_MAPS:
            if not isinstance(value, dict) or any(not isinstance(v, str) for v in value.values()):
                raise ConfigError(f"{path}: expected a mapping of names to strings, e.g. {{conv3: shuffle}}, "
                                  f"got {value!r}")
            out[key] = {**out[key], **value}
        elif isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a section of keys, got {value!r}")
            out[key] = merge(out[key], value, defaults[key], path + ".")
        else:
            out[key] = _check_type(path, value, defaults[key])
    return out


def read_yaml(path: str, seen: tuple = ()) -> dict:
    """A YAML file with its ``inherit:`` parent merged underneath (one parent per file, chains allowed)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"{path}: inherit loop through {list(seen)}")
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    parent = doc.pop("inherit", None)
    if parent is None:
        return merge(DEFAULTS, doc)
    parent_path = os.path.join(os.path.dirname(path), parent)
    if not os.path.isfile(parent_path):
        raise ConfigError(f"{path}: inherit: {parent!r} does not exist (looked for {parent_path})")
    base = read_yaml(parent_path, seen + (os.path.abspath(path),))
    try:
        return merge(base, doc)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=0.02")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        parts, value = parse_override(item)
        tree = value
        for part in reversed(parts):
            tree = {part: tree}
        cfg = merge(cfg, tree)
    return cfg


def family_of(path: str) -> str:
    """runs/<family>: the config's folder under configs/ (configs/fashion_mnist/g2.yaml -> fashion_mnist)."""
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return os.path.splitext(os.path.basename(path))[0] if parent == "configs" else parent


def run_name(path: str | None, cfg: dict) -> str:
    """g<G> for a plain G file or a config on its own (g2.yaml --set model.groups=4: g4; smoke.yaml: g2),
    else the family member's file name (g4_shuffle, root)."""
    stem = os.path.splitext(os.path.basename(path))[0] if path else ""
    if path and family_of(path) != stem and not re.fullmatch(r"g\d+", stem):
        return stem
    return f"g{groups_label(cfg['model']['groups'])}"


def load(path: str | None, overrides: list[str] | None = None) -> dict:
    """The resolved config: defaults <- YAML (with its parents) <- --set overrides."""
    cfg = read_yaml(path) if path else copy.deepcopy(DEFAULTS)
    cfg = apply_overrides(cfg, overrides or [])
    if cfg["run"]["dir"] is None:
        family = family_of(path) if path else "default"
        cfg["run"]["dir"] = os.path.join("runs", family, f"{run_name(path, cfg)}-s{cfg['run']['seed']}")
    return cfg


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
