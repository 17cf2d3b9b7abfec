"""The AlexNet geometry as a dataclass, validated, with the per-layer table the counters use.

Layer order (Krizhevsky et al. 2012): conv1 -> relu -> lrn -> pool -> conv2 -> relu -> lrn
-> pool -> conv3 -> relu -> conv4 -> relu -> conv5 -> relu -> pool -> fc6 -> relu ->
dropout -> fc7 -> relu -> dropout -> fc8. conv1 sees the whole image in every group; a
layer in ``cross_group`` sees every group's input maps, any other layer only its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CONV_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_NAMES = ("fc6", "fc7", "fc8")
CROSSABLE = CONV_NAMES[1:] + FC_NAMES
POOL_AFTER = ("conv1", "conv2", "conv5")  # overlapping 3x3 stride-2 max-pool
LRN_AFTER = ("conv1", "conv2")
POOL_KERNEL, POOL_STRIDE = 3, 2
# The paper's LRN (k=2, n=5, alpha=1e-4, beta=0.75); torch divides alpha by n, hence 5e-4.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 5e-4, 0.75, 2.0
INIT_SCHEMES = ("paper", "caffe", "kaiming")


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
    cross: bool               # sees every group's input (all-gather before it)
    grouped: bool             # block-diagonal over groups (own group's input only)
    in_shape: tuple[int, ...]  # (C, H, W) or (F,)
    out_shape: tuple[int, ...]
    params: int
    macs: int                 # weight multiply-accumulates: weights x output positions
    input_numel: int          # per image; what a cross-group layer gathers


@dataclass
class AlexNetSpec:
    groups: int = 2
    num_classes: int = 1000
    in_channels: int = 3
    input_size: int = 227
    conv_channels: list[int] = field(default_factory=lambda: [96, 256, 384, 384, 256])
    kernels: list[int] = field(default_factory=lambda: [11, 5, 3, 3, 3])
    strides: list[int] = field(default_factory=lambda: [4, 1, 1, 1, 1])
    paddings: list[int] = field(default_factory=lambda: [0, 2, 1, 1, 1])
    fc_widths: list[int] = field(default_factory=lambda: [4096, 4096])
    cross_group: list[str] = field(default_factory=lambda: ["conv3", "fc6", "fc7", "fc8"])
    lrn: bool = True
    dropout: float = 0.5
    init: str = "paper"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        G = self.groups
        if not 1 <= G:
            raise SpecError(f"model.groups must be >= 1, got {G}")
        for key, n in (("conv_channels", 5), ("kernels", 5), ("strides", 5), ("paddings", 5), ("fc_widths", 2)):
            if len(getattr(self, key)) != n:
                raise SpecError(f"model.{key} needs {n} entries (one per layer), got {getattr(self, key)}")
        for key in ("conv_channels", "kernels", "strides", "fc_widths"):
            if any(v < 1 for v in getattr(self, key)):
                raise SpecError(f"model.{key} entries must be >= 1, got {getattr(self, key)}")
        bad = [c for c in self.cross_group if c not in CROSSABLE]
        if bad:
            raise SpecError(f"model.cross_group: {bad} not allowed; choose from {list(CROSSABLE)} "
                            "(conv1 always sees the whole image)")
        if self.init not in INIT_SCHEMES:
            raise SpecError(f"model.init: {self.init!r} is not one of {list(INIT_SCHEMES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"model.dropout must be in [0, 1), got {self.dropout}")
        widths = dict(zip(CONV_NAMES + FC_NAMES[:2], self.conv_channels + self.fc_widths))
        for name, width in widths.items():
            if width % G:
                lo, hi = width - width % G, width - width % G + G
                key = f"model.conv_channels[{CONV_NAMES.index(name)}]" if name in CONV_NAMES \
                    else f"model.fc_widths[{FC_NAMES.index(name)}]"
                raise SpecError(f"{name} has {width} channels, which do not divide by {G} groups; "
                                f"set {key} to {lo} or {hi}")
        if "fc8" not in self.cross_group and self.num_classes % G:
            raise SpecError(f"fc8 without cross_group splits its input by group, so num_classes "
                            f"({self.num_classes}) must divide by {G}; add fc8 to model.cross_group")
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
        G = self.groups
        out: list[LayerInfo] = []
        c, h = self.in_channels, self.input_size
        for i, name in enumerate(CONV_NAMES):
            k, s, p, oc = self.kernels[i], self.strides[i], self.paddings[i], self.conv_channels[i]
            cross = name in self.cross_group
            grouped = i > 0 and not cross
            oh = (h + 2 * p - k) // s + 1
            in_per_filter = c // G if grouped else c
            weights = oc * in_per_filter * k * k
            out.append(LayerInfo(name, "conv", c, oc, k, s, p, cross, grouped, (c, h, h), (oc, oh, oh),
                                 weights + oc, weights * oh * oh, c * h * h))
            c, h = oc, oh
            if name in POOL_AFTER:
                h = (h - POOL_KERNEL) // POOL_STRIDE + 1
        f = c * h * h
        for name, oc in zip(FC_NAMES, self.fc_widths + [self.num_classes]):
            cross = name in self.cross_group
            weights = oc * (f if cross else f // G)
            out.append(LayerInfo(name, "fc", f, oc, 1, 1, 0, cross, not cross, (f,), (oc,),
                                 weights + oc, weights, f))
            f = oc
        return out

    def params(self) -> int:
        return sum(layer.params for layer in self.layers())

    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers())

    def cross_group_bytes_per_image(self, bytes_per_element: int = 4) -> dict[str, int]:
        """Forward bytes received across groups per image: (G-1) x the gathered input, per cross layer.

        The backward pass returns the same volume of gradients.
        """
        return {layer.name: (self.groups - 1) * layer.input_numel * bytes_per_element
                for layer in self.layers() if layer.cross}
