"""The AlexNet geometry as a dataclass, validated, with the per-layer table the counters use.

Layer order (Krizhevsky et al. 2012): conv1 -> relu -> lrn -> pool -> conv2 -> relu -> lrn
-> pool -> conv3 -> relu -> conv4 -> relu -> conv5 -> relu -> pool -> fc6 -> relu ->
dropout -> fc7 -> relu -> dropout -> fc8. conv1 sees the whole image in every group;
``exchange`` says what every other layer reads of the other groups' maps: ``all`` (every
group's, all-gathered), ``shuffle`` (the g-th 1/G slice of every group's) or ``own`` (its
own group's only, the default for a layer it does not name). The paper's is
``PAPER_EXCHANGE``. ``groups`` is one G for every layer or one per conv layer (a "root"
topology such as [2, 4, 4, 2, 2]); the fc layers take conv5's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from parallel.comm import exchange_bytes

CONV_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_NAMES = ("fc6", "fc7", "fc8")
CROSSABLE = CONV_NAMES[1:] + FC_NAMES
POOL_AFTER = ("conv1", "conv2", "conv5")  # overlapping 3x3 stride-2 max-pool
LRN_AFTER = ("conv1", "conv2")
POOL_KERNEL, POOL_STRIDE = 3, 2
# The paper's LRN (k=2, n=5, alpha=1e-4, beta=0.75); torch divides alpha by n, hence 5e-4.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 5e-4, 0.75, 2.0
INIT_SCHEMES = ("paper", "caffe", "kaiming")
EXCHANGES = ("all", "own", "shuffle")  # what a config may name; conv1 is always "replicated" (reads the image)
# Krizhevsky et al.: the groups talk at conv3 and at every fc layer
PAPER_EXCHANGE = {"conv3": "all", "fc6": "all", "fc7": "all", "fc8": "all"}


def groups_label(groups) -> str:
    """G as a name: 2, or a root topology's per-layer counts joined: 2-4-4-2-2."""
    return "-".join(str(g) for g in groups) if isinstance(groups, (list, tuple)) else str(groups)


def hybrid_refusal(infos) -> str | None:
    """Why the hybrid placement cannot run these layers (``spec.layers()``), or None: it splits every fc layer
    by output features over the ranks, so every fc layer must read all of its inputs (exchange ``all``)."""
    local = [i.name for i in infos if i.kind == "fc" and i.exchange != "all"]
    if not local:
        return None
    return (f"the hybrid placement splits the fc layers by output features over ranks, so every fc layer must "
            f"see all inputs; {', '.join(local)} do not: set model.exchange.{local[0]} (and any other) to all")


class SpecError(ValueError):
    """An AlexNet geometry that cannot be built; the message names the layer and the fix."""


@dataclass
class LayerInfo:
    """One weight layer: what it computes and what it costs, per image."""
    name: str
    kind: str                 # "conv" or "fc"
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int               # this layer's G
    exchange: str             # what reaches it from other groups: replicated (conv1), all, own or shuffle
    input_groups: int         # G of the layer that produced its input
    in_shape: tuple[int, ...]  # (C, H, W) or (F,)
    out_shape: tuple[int, ...]
    params: int
    macs: int                 # weight multiply-accumulates: weights x output positions
    input_numel: int          # per image; what a cross-group layer gathers

    @property
    def cross(self) -> bool:
        """Sees every group's input (all-gathered before it)."""
        return self.exchange == "all"

    @property
    def grouped(self) -> bool:
        """Block-diagonal over groups (its own or a shuffled input)."""
        return self.exchange in ("own", "shuffle")


@dataclass
class AlexNetSpec:
    groups: int | list[int] = 2
    num_classes: int = 1000
    in_channels: int = 3
    input_size: int = 227
    conv_channels: list[int] = field(default_factory=lambda: [96, 256, 384, 384, 256])
    kernels: list[int] = field(default_factory=lambda: [11, 5, 3, 3, 3])
    strides: list[int] = field(default_factory=lambda: [4, 1, 1, 1, 1])
    paddings: list[int] = field(default_factory=lambda: [0, 2, 1, 1, 1])
    fc_widths: list[int] = field(default_factory=lambda: [4096, 4096])
    exchange: dict[str, str] = field(default_factory=lambda: dict(PAPER_EXCHANGE))
    lrn: bool = True
    dropout: float = 0.5
    init: str = "paper"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def conv_groups(self) -> list[int]:
        return list(self.groups) if isinstance(self.groups, (list, tuple)) else [self.groups] * len(CONV_NAMES)

    @property
    def layer_groups(self) -> dict[str, int]:
        """G of every weight layer; the fc layers take conv5's."""
        conv = self.conv_groups
        return {**dict(zip(CONV_NAMES, conv)), **{name: conv[-1] for name in FC_NAMES}}

    @property
    def slot_groups(self) -> int:
        """The largest G every layer's count is a multiple of: the most slots (devices, ranks) the net fits."""
        return math.gcd(*self.conv_groups)

    @property
    def label(self) -> str:
        return groups_label(self.groups)

    @property
    def exchanges(self) -> str:
        """Where groups exchange maps: "conv3 all, fc6 all, fc7 all, fc8 all" for the paper."""
        return ", ".join(f"{i.name} {i.exchange}" for i in self.layers() if i.exchange in ("all", "shuffle")) \
            or "none"

    def exchange_of(self, name: str) -> str:
        if name == "conv1":
            return "replicated"
        return self.exchange.get(name, "own")

    def validate(self) -> None:
        if isinstance(self.groups, (list, tuple)):
            if len(self.groups) != len(CONV_NAMES) or any(not isinstance(g, int) for g in self.groups):
                raise SpecError(f"model.groups must be one number or {len(CONV_NAMES)} (one per conv layer, "
                                f"e.g. [2, 4, 4, 2, 2]), got {self.groups}")
        if min(self.conv_groups) < 1:
            raise SpecError(f"model.groups must be >= 1, got {self.groups}")
        for key, n in (("conv_channels", 5), ("kernels", 5), ("strides", 5), ("paddings", 5), ("fc_widths", 2)):
            if len(getattr(self, key)) != n:
                raise SpecError(f"model.{key} needs {n} entries (one per layer), got {getattr(self, key)}")
        for key in ("conv_channels", "kernels", "strides", "fc_widths"):
            if any(v < 1 for v in getattr(self, key)):
                raise SpecError(f"model.{key} entries must be >= 1, got {getattr(self, key)}")
        if not isinstance(self.exchange, dict):
            raise SpecError(f"model.exchange must map layer names to one of {list(EXCHANGES)}, e.g. "
                            f"{{conv3: shuffle}}; got {self.exchange!r}")
        for name, how in self.exchange.items():
            if name not in CROSSABLE:
                raise SpecError(f"model.exchange: {name!r} is not one of {list(CROSSABLE)} "
                                "(conv1 always reads the whole image)")
            if how not in EXCHANGES:
                raise SpecError(f"model.exchange.{name}: {how!r} is not one of {list(EXCHANGES)}")
            if how == "shuffle" and name in FC_NAMES:
                raise SpecError(f"model.exchange.{name}: shuffle is for conv2..conv5 (channel maps); use all or own")
        if self.init not in INIT_SCHEMES:
            raise SpecError(f"model.init: {self.init!r} is not one of {list(INIT_SCHEMES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"model.dropout must be in [0, 1), got {self.dropout}")
        widths = dict(zip(CONV_NAMES + FC_NAMES[:2], self.conv_channels + self.fc_widths))
        inputs = dict(zip(CONV_NAMES[1:] + FC_NAMES[:1], self.conv_channels))
        for name, G in self.layer_groups.items():
            width = widths.get(name)
            key = f"model.conv_channels[{CONV_NAMES.index(name)}]" if name in CONV_NAMES \
                else f"model.fc_widths[{FC_NAMES.index(name) if name in FC_NAMES[:2] else 0}]"
            if width is not None and width % G:
                lo, hi = width - width % G, width - width % G + G
                raise SpecError(f"{name} has {width} channels, which do not divide by {G} groups; "
                                f"set {key} to {lo} or {hi}")
            how = self.exchange_of(name)
            if how == "shuffle" and inputs[name] % (G * G):
                raise SpecError(f"{name}: a channel shuffle over {G} groups needs input channels divisible by "
                                f"{G * G}, got {inputs[name]}; change the previous layer's width")
            if how == "own" and name in inputs and inputs[name] % G:
                raise SpecError(f"{name} reads {inputs[name]} channels in {G} groups, which does not divide; "
                                "change the previous layer's width or this layer's groups")
        if self.exchange_of("fc8") != "all" and self.num_classes % self.layer_groups["fc8"]:
            raise SpecError(f"fc8 reading only its own group's features splits the classes by group, so num_classes "
                            f"({self.num_classes}) must divide by {self.layer_groups['fc8']}; set model.exchange.fc8 "
                            "to all")
        too_small = self._first_empty_map(self.input_size)
        if too_small:
            fits = next((n for n in range(self.input_size + 1, 4097) if not self._first_empty_map(n)), None)
            hint = f"; use model.input_size >= {fits}" if fits else ""
            raise SpecError(f"model.input_size={self.input_size} is too small for this geometry: {too_small} "
                            f"would have no pixels left{hint}")

    def _first_empty_map(self, size: int) -> str | None:
        """The first conv or pool whose output would be empty for a ``size`` x ``size`` input, else None."""
        h = size
        for i, name in enumerate(CONV_NAMES):
            h = (h + 2 * self.paddings[i] - self.kernels[i]) // self.strides[i] + 1
            if h < 1:
                return name
            if name in POOL_AFTER:
                h = (h - POOL_KERNEL) // POOL_STRIDE + 1
                if h < 1:
                    return f"the pool after {name}"
        return None

    def layers(self) -> list[LayerInfo]:
        """Every weight layer with its shapes, parameters and multiply-accumulates per image."""
        groups = self.layer_groups
        out: list[LayerInfo] = []
        c, h = self.in_channels, self.input_size
        previous = 1  # the image is one whole input
        for i, name in enumerate(CONV_NAMES):
            k, s, p, oc = self.kernels[i], self.strides[i], self.paddings[i], self.conv_channels[i]
            G, how = groups[name], self.exchange_of(name)
            grouped = how in ("own", "shuffle")
            oh = (h + 2 * p - k) // s + 1
            in_per_filter = c // G if grouped else c
            weights = oc * in_per_filter * k * k
            out.append(LayerInfo(name, "conv", c, oc, k, s, p, G, how, previous,
                                 (c, h, h), (oc, oh, oh), weights + oc, weights * oh * oh, c * h * h))
            c, h, previous = oc, oh, G
            if name in POOL_AFTER:
                h = (h - POOL_KERNEL) // POOL_STRIDE + 1
        f = c * h * h
        for name, oc in zip(FC_NAMES, self.fc_widths + [self.num_classes]):
            G, how = groups[name], self.exchange_of(name)
            weights = oc * (f if how == "all" else f // G)
            out.append(LayerInfo(name, "fc", f, oc, 1, 1, 0, G, how, previous,
                                 (f,), (oc,), weights + oc, weights, f))
            f, previous = oc, G
        return out

    def params(self) -> int:
        return sum(layer.params for layer in self.layers())

    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers())

    def cross_group_bytes(self, batch: int, bytes_per_element: int = 4) -> dict[str, int]:
        """Forward bytes received across groups per batch, per exchanging layer.

        All-gather: every one of the input's G groups receives the others' share, (G-1) x
        the input; shuffle over G groups: (G-1)/G of the input once. The backward pass
        returns the same volume of gradients. (The logits' gather is counted separately.)
        """
        out = {}
        for layer in self.layers():
            if layer.exchange in ("all", "shuffle"):
                groups = layer.input_groups if layer.exchange == "all" else layer.groups
                out[layer.name] = exchange_bytes(layer.exchange, batch * layer.input_numel * bytes_per_element, groups)
        return out
