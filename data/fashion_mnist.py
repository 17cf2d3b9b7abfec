"""Fashion-MNIST, the embedded default: found on disk, held in memory, augmented on the batch.

Search order: ``data.root`` alone when set (downloading into it if the files are absent);
otherwise ``$FASHION_MNIST_DIR``, the Debian/Ubuntu package path, and torchvision's
download into a cache directory.
"""
from __future__ import annotations

import gzip
import os
import struct

import torch

from data.errors import DataError
from data.sampler import ReplicaBatchSampler, SamplerLoader, epoch_generator

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "filter-groups", "fashion-mnist")
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "val_images": "t10k-images-idx3-ubyte", "val_labels": "t10k-labels-idx1-ubyte"}
MEAN, STD = 0.2860, 0.3530
HOW_TO_GET = ("get it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set "
              "FASHION_MNIST_DIR / data.root to a folder holding the four *-ubyte(.gz) files, "
              "or allow internet access once so torchvision can download them")


def _find_file(directory: str, stem: str) -> str | None:
    for sub in ("", "FashionMNIST/raw", "raw"):
        for ext in (".gz", ""):
            path = os.path.join(directory, sub, stem + ext)
            if os.path.isfile(path):
                return path
    return None


def _complete(directory: str) -> dict[str, str] | None:
    paths = {key: _find_file(directory, stem) for key, stem in FILES.items()}
    return paths if all(paths.values()) else None


def _download(directory: str) -> dict[str, str] | None:
    try:
        from torchvision.datasets import FashionMNIST
        for train in (True, False):
            FashionMNIST(directory, train=train, download=True)
    except Exception:  # no internet, no permission: reported by the caller with the fix
        return None
    return _complete(directory)


def locate(root: str | None = None, cache_dir: str | None = None, download: bool = True) -> dict[str, str]:
    """Paths of the four IDX files, or a DataError that says how to get them."""
    if root:
        found = _complete(root) or (download and _download(root))
        if not found:
            raise DataError(f"Fashion-MNIST not found in data.root={root!r} and could not be downloaded there; "
                            + HOW_TO_GET)
        return found
    candidates = [os.environ.get("FASHION_MNIST_DIR"), DEBIAN_DIR, cache_dir or DEFAULT_CACHE]
    for directory in filter(None, candidates):
        found = _complete(directory)
        if found:
            return found
    found = download and _download(cache_dir or DEFAULT_CACHE)
    if not found:
        raise DataError("Fashion-MNIST not found (looked in $FASHION_MNIST_DIR, "
                        f"{DEBIAN_DIR}, {cache_dir or DEFAULT_CACHE}) and the download failed; " + HOW_TO_GET)
    return found


def read_idx(path: str) -> torch.Tensor:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a uint8 tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    except (OSError, EOFError, struct.error) as e:
        raise DataError(f"{path} is not a readable IDX file ({e}); delete it and fetch it again") from None
    body = raw[4 + 4 * ndim:]
    if zero != 0 or dtype != 0x08 or len(body) != _prod(dims):
        raise DataError(f"{path} is corrupt or truncated (header {dims}, {len(body)} data bytes); "
                        "delete it and fetch it again")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


class InMemoryLoader(SamplerLoader):
    """Batches of an in-memory uint8 image tensor, normalised, optionally augmented, on ``device``.

    The uint8 images live on ``device`` (the training device: Fashion-MNIST is 47 MB), and
    every batch is gathered, cropped, flipped and normalised there with a few tensor ops
    for the whole batch. The host's only per-epoch work is drawing the sample order and
    every batch's crop offsets and flips (from (seed, epoch, batch) alone: resuming
    replays them exactly, and every device gets the same numbers), copied over once per
    epoch; per batch it only queues kernels, so the next batch is prepared while the
    current step runs and the host never waits.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, size: int, train: bool,
                 seed: int = 0, replica: int = 0, num_replicas: int = 1, crop_padding: int = 2,
                 flip: bool = True, mean: float = MEAN, std: float = STD, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.images = (images if images.ndim == 4 else images.unsqueeze(1)).to(self.device)
        self.labels = labels.long().to(self.device)
        self.size, self.train, self.seed = size, train, seed
        self.crop_padding, self.flip, self.mean, self.std = crop_padding, flip, mean, std
        self.sampler = ReplicaBatchSampler(len(labels), batch_size, shuffle=train, seed=seed,
                                           replica=replica, num_replicas=num_replicas)
        self.num_samples = len(labels)

    def _epoch_draws(self, batches: range) -> torch.Tensor:
        """(3, samples) crop tops, crop lefts and flips (0/1) of this replica's rows of the given batches.

        One generator per global batch, drawing for every row of it: a run resumed mid-epoch
        draws the same crops and flips, and a sample gets the same draws whichever replica
        (and however many) takes it.
        """
        draws = []
        p = self.crop_padding
        for i in batches:
            gen = epoch_generator(self.seed, self.sampler.epoch, stream=1 + i)
            lo, hi = self.sampler.global_positions(i)
            start, end = self.sampler.batch_positions(i)
            n = hi - lo  # the whole global batch's draws; this replica keeps its rows
            top = torch.randint(0, 2 * p + 1, (n,), generator=gen)
            left = torch.randint(0, 2 * p + 1, (n,), generator=gen)
            flip = (torch.rand(n, generator=gen) < 0.5).long() if self.flip else torch.zeros(n, dtype=torch.long)
            draws.append(torch.stack([top, left, flip])[:, start - lo:end - lo])
        return torch.cat(draws, dim=1) if draws else torch.zeros(3, 0, dtype=torch.long)

    def __iter__(self):
        batches = range(self.sampler.skip, len(self))
        order = self.sampler.epoch_order().to(self.device, non_blocking=True)
        draws = self._epoch_draws(batches).to(self.device, non_blocking=True) if self.train else None
        offset = 0
        for i in batches:
            start, end = self.sampler.batch_positions(i)
            idx = order[start:end]
            x = self.images[idx].float().div_(255.0)
            if self.train:
                x = self._augment(x, draws[:, offset:offset + end - start])
            else:
                x = self._centre(x)
            offset += end - start
            yield (x - self.mean) / self.std, self.labels[idx]

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        """Pad (or crop) symmetrically to ``size`` x ``size``."""
        pad = self.size - x.shape[-1]
        lo = pad // 2
        return torch.nn.functional.pad(x, (lo, pad - lo, lo, pad - lo))

    def _augment(self, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Random ``size`` crops of the centred image padded by crop_padding, flipped where drawn."""
        n, dev = x.shape[0], x.device
        p = self.crop_padding
        padded = torch.nn.functional.pad(self._centre(x), (p, p, p, p))
        top, left, flip = draws
        ar = torch.arange(self.size, device=dev)
        rows = (top[:, None] + ar)[:, None, :, None]
        # a flipped crop reads its columns right to left
        cols = torch.where(flip[:, None].bool(), left[:, None] + self.size - 1 - ar, left[:, None] + ar)
        cols = cols[:, None, None, :]
        channels = torch.arange(x.shape[1], device=dev)[None, :, None, None]
        return padded[torch.arange(n, device=dev)[:, None, None, None], channels, rows, cols]


def build(root: str | None, batch_size: int, val_batch_size: int, size: int, seed: int, replica: int,
          num_replicas: int, augment: bool = True, crop_padding: int = 2, cache_dir: str | None = None,
          limit: int = 0, download: bool = True, device: torch.device | str = "cpu"):
    """Train and validation loaders over Fashion-MNIST (``limit`` > 0 keeps the first samples of each),
    holding the data on ``device``."""
    paths = locate(root, cache_dir, download)
    tensors = {key: read_idx(path) for key, path in paths.items()}
    for key, ndim in (("train_images", 3), ("val_images", 3), ("train_labels", 1), ("val_labels", 1)):
        if tensors[key].ndim != ndim:
            raise DataError(f"{paths[key]} holds a {tensors[key].ndim}-D array, but Fashion-MNIST "
                            f"{key.replace('_', ' ')} are {ndim}-D; is it the right file?")
    for split in ("train", "val"):
        n_images, n_labels = len(tensors[f"{split}_images"]), len(tensors[f"{split}_labels"])
        if n_images != n_labels:
            raise DataError(f"Fashion-MNIST {split}: {paths[split + '_images']} has {n_images} images but "
                            f"{paths[split + '_labels']} has {n_labels} labels; the files do not belong together, "
                            "fetch both again")
    if limit:
        tensors = {key: t[:limit] for key, t in tensors.items()}
    train = InMemoryLoader(tensors["train_images"], tensors["train_labels"], batch_size, size, True, seed,
                           replica, num_replicas, crop_padding=crop_padding if augment else 0, flip=augment,
                           device=device)
    val = InMemoryLoader(tensors["val_images"], tensors["val_labels"], val_batch_size, size, False, seed,
                         replica, num_replicas, device=device)
    return train, val
