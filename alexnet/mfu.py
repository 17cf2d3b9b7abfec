"""Achieved training FLOP/s and model FLOPs utilisation (MFU).

A training step costs about three passes of arithmetic per image: the forward pass, the
backward pass to the activations and the backward pass to the weights, each 2 FLOPs per
multiply-accumulate of the forward pass: FLOPs per image = 6 x MACs (the weights' MACs
of the network at that G: ``NetworkSpec.macs``). MFU = achieved FLOP/s / the summed dense
bf16 peak of every device the run computes on (its slots' distinct devices in one process,
times the processes of a torchrun world: the whole run's FLOP/s against the whole run's
peak), a fixed yardstick whatever precision the run uses (an fp32 run is measured against
the same peak, so its MFU is honestly low).
"""
from __future__ import annotations

# Dense (not 2:4 sparse) BF16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets, which
# list the sparse figure (twice these): H100 SXM 1,979 and H100 PCIe 1,513 (H100 Tensor Core
# GPU datasheet), H100 NVL 1,671, H200 SXM 1,979 and H200 NVL 1,671 (H200 datasheet), A100 312 dense (A100
# datasheet). Matched against torch.cuda.get_device_name in this order (first hit wins).
DENSE_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.5, "NVIDIA H100 datasheet (PCIe, 1,513 sparse)"),
    ("H100 NVL", 835.5, "NVIDIA H100 datasheet (NVL, 1,671 sparse)"),
    ("H100", 989.5, "NVIDIA H100 datasheet (SXM, 1,979 sparse)"),
    ("H200 NVL", 835.5, "NVIDIA H200 datasheet (NVL, 1,671 sparse)"),
    ("H200", 989.5, "NVIDIA H200 datasheet (SXM, 1,979 sparse)"),
    ("A100", 312.0, "NVIDIA A100 datasheet"),
)


def training_flops_per_image(macs: int) -> float:
    return 6.0 * macs


def peak_of(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 peak TFLOP/s, its source) of a device name; None when unknown (a CPU, another GPU)."""
    for key, tflops, source in DENSE_BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops, source
    return None


def throughput(images_per_s: float, macs: int, device_name: str, devices: int = 1) -> dict:
    """{"tflops": achieved, "mfu": share of the peak of ``devices`` such devices or None, "peak_tflops" (theirs
    summed), "peak_source", "devices"}."""
    tflops = training_flops_per_image(macs) * images_per_s / 1e12
    peak = peak_of(device_name)
    total = peak[0] * devices if peak else None
    return {"tflops": tflops, "mfu": tflops / total if peak else None, "peak_tflops": total,
            "peak_source": peak[1] if peak else None, "devices": devices}


def devices_in_run(placement) -> int:
    """The devices a run computes on: this process's slots' distinct devices, times the processes of
    the world (every torchrun rank holds as many; a hybrid or D x G world counts every rank)."""
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return len({s.device for s in placement.local_slots}) * world


def device_name(device) -> str:
    """What ``peak_of`` matches: the GPU's name, or "cpu"."""
    import torch
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def describe(images_per_s: float, macs: int, device, devices: int = 1) -> str:
    """'12.3 TFLOP/s (1.2% of 2 x H200's 989.5 dense bf16)' or '0.05 TFLOP/s' where the peak is unknown."""
    name = device_name(device)
    t = throughput(images_per_s, macs, name, devices)
    text = f"{t['tflops']:.3g} TFLOP/s"
    if t["mfu"] is None:
        return text
    return text + f" ({100 * t['mfu']:.1f}% of {devices} x {name}'s {t['peak_tflops'] / devices:g} dense bf16)"
