"""Synthetic data for smoke runs and benchmarks: class-dependent templates plus noise.

Learnable enough that the loss falls, so a smoke run also shows the loop trains.
"""
from __future__ import annotations

import torch

from data.fashion_mnist import InMemoryLoader


def build(num_classes: int, in_channels: int, size: int, batch_size: int, val_batch_size: int, seed: int,
          replica: int, num_replicas: int, train_samples: int = 512, val_samples: int = 256,
          device: torch.device | str = "cpu"):
    gen = torch.Generator().manual_seed(seed + 12345)
    templates = torch.rand(num_classes, in_channels, size, size, generator=gen)

    def make(n: int):
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        noise = torch.rand(n, in_channels, size, size, generator=gen)
        images = (0.5 * templates[labels] + 0.5 * noise).mul(255).to(torch.uint8)
        return images, labels

    (ti, tl), (vi, vl) = make(train_samples), make(val_samples)
    train = InMemoryLoader(ti, tl, batch_size, size, True, seed, replica, num_replicas, crop_padding=0,
                           flip=False, mean=0.5, std=0.25, device=device)
    val = InMemoryLoader(vi, vl, val_batch_size, size, False, seed, replica, num_replicas, mean=0.5, std=0.25,
                         device=device)
    return train, val
