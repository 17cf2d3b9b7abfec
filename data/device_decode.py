"""ImageFolder with JPEG decoding and the paper's transforms on the training device.

Worker processes only read file bytes (and decode, on the CPU, the rare file the GPU
decoder cannot take: not a JPEG, CMYK, truncated). The main process decodes a batch of
JPEGs in one call (``torchvision.io.decode_jpeg`` on ``device``: nvJPEG on CUDA, libjpeg
on CPU) and then, for the whole batch at once:

  train: shorter side to 256, random ``size`` crop, horizontal flip, PCA colour noise,
         normalisation;
  eval:  shorter side to 256, centre crop (or 10 crops: 4 corners + centre, and flips).

Resize-then-crop is done as one crop-and-resize: the crop's box in the original image
(the resized crop divided by the scale) is sampled by ``torchvision.ops.roi_align`` at
``size`` x ``size`` with 2 x 2 samples per output pixel (area averaging, enough for the
<= 2x down-scaling from ImageNet's ~500 px to 256), for every image of the batch in one
kernel, on images padded into one tensor. Results equal the PIL path's in shapes and
value ranges, not bit for bit (different resampling filters).

Randomness comes from (seed, epoch, batch) alone, drawn on the CPU: a resumed run replays
the same crops, flips and colour noise, on any device.
"""
from __future__ import annotations

import io
import sys

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from data.prefetch import in_background
from data.sampler import ReplicaBatchSampler, SamplerLoader, epoch_generator

EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SHORT_SIDE = 256


def jpeg_components(data: bytes) -> int | None:
    """Colour components of a baseline/progressive JPEG (1 grey, 3 YCbCr, 4 CMYK), None if not a whole JPEG."""
    if len(data) < 4 or data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return None  # not a JPEG, or truncated (no end-of-image marker)
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):  # start of frame: baseline, extended, progressive
            return data[i + 9] if i + 9 < len(data) else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def decode_on_cpu(data: bytes, path: str) -> torch.Tensor | None:
    """PIL's decoder for what nvJPEG cannot take; None (and one warning line) when nothing can read it."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
            return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width,
                                                                                      3).permute(2, 0, 1)
    except Exception as e:  # noqa: BLE001  (any unreadable file: skip it, say which)
        print(f"warning: skipping unreadable image {path} ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return None


class EncodedFiles(torch.utils.data.Dataset):
    """(path, label) samples whose items are ("jpeg", file bytes), ("image", CHW uint8) or ("skip", None)."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with open(path, "rb") as f:
            data = f.read()
        if jpeg_components(data) == 3:
            return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), label, path
        image = decode_on_cpu(data, path)
        return ("skip", None, label, path) if image is None else ("image", image, label, path)


class EncodedBatch:
    """A batch as the workers hand it over: every JPEG's bytes in one uint8 tensor, plus the rest.

    One tensor per batch, not one per image: each tensor a worker sends costs a shared-memory
    segment and a file-descriptor hand-over, which for 256 small files took longer than decoding them.
    """

    def __init__(self, items):
        jpegs = [it for it in items if it[0] == "jpeg"]
        self.blob = torch.cat([it[1] for it in jpegs]) if jpegs else torch.zeros(0, dtype=torch.uint8)
        self.entries = []  # (kind, offset, length or decoded image, label, path), in batch order
        offset = 0
        for kind, data, label, path in items:
            if kind == "jpeg":
                self.entries.append((kind, offset, data.numel(), label, path))
                offset += data.numel()
            else:
                self.entries.append((kind, 0, data, label, path))

    def jpeg(self, i: int) -> torch.Tensor:
        _, offset, length, _, _ = self.entries[i]
        return self.blob[offset:offset + length]


def decode_batch(batch: EncodedBatch, device: torch.device) -> tuple[list[torch.Tensor], list[int]]:
    """Decoded CHW uint8 images on ``device`` and the positions in the batch they came from."""
    entries = batch.entries
    jpeg_at = [i for i, e in enumerate(entries) if e[0] == "jpeg"]
    decoded: dict[int, torch.Tensor] = {}
    if jpeg_at:
        data = [batch.jpeg(i) for i in jpeg_at]
        try:
            for i, img in zip(jpeg_at, decode_jpeg(data, mode=ImageReadMode.RGB, device=device)):
                decoded[i] = img
        except RuntimeError:
            # one file nvJPEG refuses fails the whole call: decode one by one, the refused on the CPU
            for i in jpeg_at:
                try:
                    decoded[i] = decode_jpeg(batch.jpeg(i), mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    img = decode_on_cpu(bytes(batch.jpeg(i).numpy()), entries[i][4])
                    if img is not None:
                        decoded[i] = img.to(device)
    for i, e in enumerate(entries):
        if e[0] == "image":
            decoded[i] = e[2].to(device, non_blocking=True)
    keep = sorted(decoded)
    return [decoded[i] for i in keep], keep


def _padded(images: list[torch.Tensor]) -> torch.Tensor:
    """One (N, 3, Hmax, Wmax) float tensor holding every image in its top-left corner, its last row
    and column repeated into the padding: a crop's bilinear samples past the last pixel centre then
    read the edge, as they do for the image alone (zeros would darken crops that touch the right or
    bottom edge of a smaller image in the batch)."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    out = torch.zeros(len(images), 3, h, w, dtype=torch.float32, device=images[0].device)
    for j, im in enumerate(images):
        ih, iw = im.shape[1], im.shape[2]
        out[j, :, :ih, :iw] = im
        out[j, :, ih:, :iw] = out[j, :, ih - 1:ih, :iw]
        out[j, :, :, iw:] = out[j, :, :, iw - 1:iw]
    return out


def _scales(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Height, width, and the factor that takes the shorter side to 256, per image (CPU float64)."""
    hw = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.float64)
    return hw[:, 0], hw[:, 1], SHORT_SIDE / hw.min(dim=1).values


def crop_resize(images: list[torch.Tensor], tops: torch.Tensor, lefts: torch.Tensor, size: int) -> torch.Tensor:
    """For each image: resize so its shorter side is 256, take the size x size crop at (top, left) of that.

    ``tops``/``lefts`` are in resized pixels, one row per image and one column per crop
    (several crops per image for 10-crop evaluation). Returns (N * crops, 3, size, size) in
    [0, 1], crops of image 0 first.
    """
    _, _, scale = _scales(images)
    crops = tops.shape[1]
    boxes = []
    for j in range(len(images)):
        s = scale[j].item()
        for c in range(crops):
            t, left = tops[j, c].item(), lefts[j, c].item()
            boxes.append([j, left / s, t / s, (left + size) / s, (t + size) / s])
    device = images[0].device
    boxes = torch.tensor(boxes, dtype=torch.float32).to(device, non_blocking=True)
    out = roi_align(_padded(images), boxes, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return out.div_(255.0)


def resized_sizes(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's height and width after resizing its shorter side to 256 (torchvision's rounding)."""
    h, w, scale = _scales(images)
    return (h * scale).floor().clamp(min=SHORT_SIDE), (w * scale).floor().clamp(min=SHORT_SIDE)


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def batch_draws(gen: torch.Generator, rows: int, pca_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, alpha) for ``rows`` images: u (rows, 3) uniform (crop top, crop left, flip), alpha (rows, 3) PCA noise."""
    u = torch.rand(rows, 3, generator=gen, dtype=torch.float64)
    return u, torch.randn(rows, 3, generator=gen) * pca_std


def train_batch(images: list[torch.Tensor], size: int, u: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Random crop of the 256-resized image, flip, PCA lighting, normalisation; (N, 3, size, size).

    ``u``, ``alpha``: each image's draws (``batch_draws``), row for row."""
    rh, rw = resized_sizes(images)
    tops = (u[:, 0] * (rh - size + 1)).floor().clamp(min=0)[:, None]
    lefts = (u[:, 1] * (rw - size + 1)).floor().clamp(min=0)[:, None]
    x = crop_resize(images, tops, lefts, size)
    device = x.device
    flip = (u[:, 2] < 0.5).to(device, non_blocking=True)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    shift = (alpha * EIGVAL) @ EIGVEC.T  # (N, 3): V (alpha * lambda) per image
    x = x + shift.to(device, non_blocking=True)[:, :, None, None]
    return normalise(x)


def eval_batch(images: list[torch.Tensor], size: int, crops: int) -> torch.Tensor:
    """Centre crop (N, 3, size, size), or 10 crops (N, 10, 3, size, size): corners + centre, then their flips."""
    rh, rw = resized_sizes(images)
    ct, cl = ((rh - size) / 2).round(), ((rw - size) / 2).round()
    if crops == 1:
        return normalise(crop_resize(images, ct[:, None], cl[:, None], size))
    zero = torch.zeros_like(rh)
    tops = torch.stack([zero, zero, rh - size, rh - size, ct], 1)
    lefts = torch.stack([zero, rw - size, zero, rw - size, cl], 1)
    five = crop_resize(images, tops, lefts, size).view(len(images), 5, 3, size, size)
    return normalise(torch.cat([five, five.flip(-1)], 1).flatten(0, 1)).view(len(images), 10, 3, size, size)


class DeviceDecodeLoader(SamplerLoader):
    """Batches of this replica's samples, decoded and transformed on ``device`` (see the module docstring)."""

    def __init__(self, samples: list[tuple[str, int]], batch_size: int, train: bool, size: int, seed: int,
                 replica: int, num_replicas: int, workers: int, device: torch.device | str, pca_std: float = 0.1,
                 eval_crops: int = 1):
        self.device = torch.device(device)
        self.train, self.size, self.seed, self.pca_std, self.eval_crops = train, size, seed, pca_std, eval_crops
        self.sampler = ReplicaBatchSampler(len(samples), batch_size, shuffle=train, seed=seed, replica=replica,
                                           num_replicas=num_replicas, drop_last=train)
        self.loader = torch.utils.data.DataLoader(EncodedFiles(samples), batch_sampler=self.sampler,
                                                  num_workers=workers, collate_fn=EncodedBatch,
                                                  persistent_workers=workers > 0,
                                                  prefetch_factor=4 if workers > 0 else None)
        self.num_samples = len(samples)

    def __iter__(self):
        return in_background(self._batches, self.device)

    def _batches(self):
        for i, batch in enumerate(self.loader, start=self.sampler.skip):
            images, keep = decode_batch(batch, self.device)
            if not images:
                continue
            labels = torch.tensor([batch.entries[j][3] for j in keep])
            if self.train:
                # the global batch's draws, of which this replica's decoded images take theirs
                lo, hi = self.sampler.global_positions(i)
                u, alpha = batch_draws(epoch_generator(self.seed, self.sampler.epoch, stream=1 + i), hi - lo,
                                       self.pca_std)
                mine = torch.tensor(keep, dtype=torch.long) + self.sampler.row_offset(i)
                yield train_batch(images, self.size, u[mine], alpha[mine]), labels
            else:
                yield eval_batch(images, self.size, self.eval_crops), labels


def wanted(decode: str, device: torch.device) -> bool:
    """data.decode: gpu, or auto on a CUDA input device."""
    return decode == "gpu" or (decode == "auto" and torch.device(device).type == "cuda")

