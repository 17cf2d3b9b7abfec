"""Write a synthetic ImageNet-like tree (train/<class>/*.JPEG, val/<class>/*.JPEG) for loader benchmarks.

Images are 500x375 (and 375x500: ImageNet's common shapes), smooth random colour fields
plus fine noise, saved at a JPEG quality that gives ~55 KB files like ImageNet's.
Written by parallel processes (one per core by default).

  python scripts/make_jpeg_tree.py /tmp/jpegs --train 8192 --val 512 --classes 10
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np


def write_one(job) -> int:
    from PIL import Image
    path, index, quality = job
    rng = np.random.default_rng(index)
    w, h = (500, 375) if index % 3 else (375, 500)
    coarse = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(smooth + rng.integers(-24, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=quality)
    return os.path.getsize(path)


def make_tree(root: str, train: int, val: int, classes: int, quality: int = 83, processes: int | None = None) -> dict:
    """Write the tree; returns counts and the mean file size (bytes)."""
    jobs = []
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c:03d}"), exist_ok=True)
        for i in range(count):
            c = i % classes
            jobs.append((os.path.join(root, split, f"class{c:03d}", f"{split}_{i:07d}.JPEG"),
                         i + (0 if split == "train" else 10**7), quality))
    with ProcessPoolExecutor(processes or os.cpu_count()) as pool:
        sizes = list(pool.map(write_one, jobs, chunksize=64))
    return {"root": root, "train": train, "val": val, "classes": classes, "mean_bytes": sum(sizes) / len(sizes)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root")
    p.add_argument("--train", type=int, default=8192)
    p.add_argument("--val", type=int, default=512)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--quality", type=int, default=83)
    args = p.parse_args(argv)
    info = make_tree(args.root, args.train, args.val, args.classes, args.quality)
    print(f"wrote {info['train']} train and {info['val']} val JPEGs under {args.root}, "
          f"{info['mean_bytes'] / 1e3:.1f} KB each on average")
    return 0


if __name__ == "__main__":
    sys.exit(main())
