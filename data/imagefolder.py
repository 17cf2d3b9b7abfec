"""ImageNet (or any ``train/<class>/*``, ``val/<class>/*`` tree) with the paper's transforms.

Train: shorter side to 256, random ``size`` crop (224 or 227), horizontal flip, PCA colour
noise (Krizhevsky 2012: add eigvec @ (alpha * eigval), alpha ~ N(0, 0.1), pixels in [0, 1]).
Validation: shorter side 256, then the centre crop, or 10 crops (4 corners + centre, and
their flips) whose predictions the evaluation averages.
"""
from __future__ import annotations

import os
import sys

import torch
from torchvision import datasets, transforms

from data import device_decode
from data.errors import DataError
from data.sampler import ReplicaBatchSampler, SamplerLoader

EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class PCALighting:
    """x + V (alpha * lambda), alpha ~ N(0, std^2) per image: AlexNet's colour augmentation."""

    def __init__(self, std: float = 0.1):
        self.std = std

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.std == 0:
            return img
        alpha = torch.randn(3) * self.std
        return img + (EIGVEC @ (alpha * EIGVAL)).view(3, 1, 1)


def train_transform(size: int, pca_std: float):
    return transforms.Compose([transforms.Resize(256), transforms.RandomCrop(size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), PCALighting(pca_std), transforms.Normalize(MEAN, STD)])


def eval_transform(size: int, crops: int):
    norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    if crops == 10:
        return transforms.Compose([transforms.Resize(256), transforms.TenCrop(size),
                                   transforms.Lambda(lambda cs: torch.stack([norm(c) for c in cs]))])
    if crops != 1:
        raise DataError(f"data.eval_crops must be 1 or 10, got {crops}")
    return transforms.Compose([transforms.Resize(256), transforms.CenterCrop(size), norm])


def _samples(root: str, split: str) -> list[tuple[str, int]]:
    """(path, class index) of every image under root/split, as torchvision's ImageFolder lists them."""
    return _image_folder(root, split).samples


class TolerantImageFolder(datasets.ImageFolder):
    """ImageFolder whose unreadable files (truncated, not an image) are skipped with one warning line each."""

    def __getitem__(self, item):
        """``item``: an index, or (index, draw seed) from a keyed ReplicaBatchSampler: the random transform
        then draws from that seed alone, whichever worker or replica loads the sample."""
        index, draw_seed = item if isinstance(item, tuple) else (item, None)
        try:
            if draw_seed is None:
                return super().__getitem__(index)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(draw_seed)
                return super().__getitem__(index)
        except (OSError, ValueError, SyntaxError) as e:
            print(f"warning: skipping unreadable image {self.samples[index][0]} ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)
            return None


def collate_skipping(batch):
    """default_collate over the samples that loaded; None when none did."""
    batch = [b for b in batch if b is not None]
    return torch.utils.data.default_collate(batch) if batch else None


def _image_folder(root: str, split: str, transform=None) -> datasets.ImageFolder:
    try:
        return TolerantImageFolder(os.path.join(root, split), transform)
    except FileNotFoundError as e:  # a class folder without images, or no class folders at all
        raise DataError(f"{os.path.join(root, split)}: {e}; every class folder needs at least one image "
                        "(.jpg, .jpeg, .png, ...)") from None


def check_same_classes(root: str) -> None:
    """train/ and val/ must name the same classes, or class indices would silently disagree."""
    classes = {split: sorted(e.name for e in os.scandir(os.path.join(root, split)) if e.is_dir())
               for split in ("train", "val")}
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))[:3]
        only_val = sorted(set(classes["val"]) - set(classes["train"]))[:3]
        raise DataError(f"{root}: train/ and val/ hold different class folders (only in train: {only_train}, "
                        f"only in val: {only_val}); both need the same classes")


class FolderLoader(SamplerLoader):
    """A DataLoader over this replica's slice of each global batch (see data.sampler)."""

    def __init__(self, dataset, batch_size: int, train: bool, seed: int, replica: int, num_replicas: int, workers: int):
        self.sampler = ReplicaBatchSampler(len(dataset), batch_size, shuffle=train, seed=seed, replica=replica,
                                           num_replicas=num_replicas, drop_last=train, keyed=train)
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers,
                                                  collate_fn=collate_skipping, pin_memory=torch.cuda.is_available(),
                                                  persistent_workers=workers > 0)
        self.num_samples = len(dataset)

    def __iter__(self):
        return (batch for batch in self.loader if batch is not None)


def build(root: str | None, batch_size: int, val_batch_size: int, size: int, seed: int, replica: int,
          num_replicas: int, workers: int = 4, pca_std: float = 0.1, eval_crops: int = 1, decode: str = "cpu",
          device: torch.device | str = "cpu"):
    """Train and validation loaders; ``decode`` (cpu | gpu | auto) picks PIL in the workers or
    decoding and transforms on ``device`` (data.device_decode)."""
    if not root:
        raise DataError("data.dataset=imagefolder needs data.root: a folder with train/<class>/ and val/<class>/")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"{os.path.join(root, split)} does not exist; data.root must hold train/ and val/ "
                            "folders of class sub-folders (the ImageNet layout)")
    if eval_crops not in (1, 10):
        raise DataError(f"data.eval_crops must be 1 or 10, got {eval_crops}")
    check_same_classes(root)
    if device_decode.wanted(decode, device):
        kw = dict(size=size, seed=seed, replica=replica, num_replicas=num_replicas, workers=workers, device=device,
                  pca_std=pca_std, eval_crops=eval_crops)
        return (device_decode.DeviceDecodeLoader(_samples(root, "train"), batch_size, True, **kw),
                device_decode.DeviceDecodeLoader(_samples(root, "val"), val_batch_size, False, **kw))
    train_set = _image_folder(root, "train", train_transform(size, pca_std))
    val_set = _image_folder(root, "val", eval_transform(size, eval_crops))
    train = FolderLoader(train_set, batch_size, True, seed, replica, num_replicas, workers)
    val = FolderLoader(val_set, val_batch_size, False, seed, replica, num_replicas, workers)
    return train, val
