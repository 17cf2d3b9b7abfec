"""Data: tiny IDX files and JPEG trees made on the fly; nothing is downloaded."""
import gzip
import os
import struct

import pytest
import torch

from data import fake
from data.errors import DataError
from data.fashion_mnist import FILES, build, locate, read_idx
from data.sampler import ReplicaBatchSampler


def write_idx(path, tensor: torch.Tensor, gz: bool = True):
    header = struct.pack(">HBB", 0, 0x08, tensor.ndim) + struct.pack(f">{tensor.ndim}I", *tensor.shape)
    raw = header + tensor.to(torch.uint8).numpy().tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def tiny_fashion(root, n_train=50, n_val=20):
    gen = torch.Generator().manual_seed(0)
    os.makedirs(root, exist_ok=True)
    write_idx(os.path.join(root, FILES["train_images"] + ".gz"), torch.randint(0, 256, (n_train, 28, 28), generator=gen))
    write_idx(os.path.join(root, FILES["train_labels"] + ".gz"), torch.randint(0, 10, (n_train,), generator=gen))
    write_idx(os.path.join(root, FILES["val_images"]), torch.randint(0, 256, (n_val, 28, 28), generator=gen), gz=False)
    write_idx(os.path.join(root, FILES["val_labels"]), torch.randint(0, 10, (n_val,), generator=gen), gz=False)


def test_fashion_mnist_from_root_batches_and_replays(tmp_path):
    tiny_fashion(tmp_path)
    train, val = build(str(tmp_path), batch_size=16, val_batch_size=8, size=32, seed=3, replica=0, num_replicas=1,
                       crop_padding=2, download=False)
    batches = list(train)
    assert len(batches) == len(train) == 4 and batches[0][0].shape == (16, 1, 32, 32)
    assert sum(len(y) for _, y in val) == 20
    again = list(train)  # same epoch -> the same order and augmentation
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    train.set_epoch(1)
    assert not torch.equal(next(iter(train))[0], batches[0][0])
    train.set_epoch(0, skip=2)  # resuming mid-epoch skips the batches already trained
    assert torch.equal(next(iter(train))[0], batches[2][0])


def test_fashion_mnist_env_var_is_searched(tmp_path, monkeypatch):
    tiny_fashion(tmp_path / "fm")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "fm"))
    monkeypatch.setattr("data.fashion_mnist.DEBIAN_DIR", str(tmp_path / "none"))
    paths = locate(None, cache_dir=str(tmp_path / "cache"), download=False)
    assert paths["train_images"].startswith(str(tmp_path / "fm"))


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr("data.fashion_mnist.DEBIAN_DIR", str(tmp_path / "none"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        locate(None, cache_dir=str(tmp_path / "cache"), download=False)
    with pytest.raises(DataError, match="data.root"):
        locate(str(tmp_path / "empty"), download=False)


def test_corrupt_idx_is_a_clear_error(tmp_path):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 100) + b"\x00" * 10)
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_idx(str(path))


def test_replicas_split_every_global_batch_disjointly():
    whole = list(ReplicaBatchSampler(50, 8, shuffle=True, seed=1))
    parts = [list(ReplicaBatchSampler(50, 8, shuffle=True, seed=1, replica=r, num_replicas=2)) for r in range(2)]
    for i, batch in enumerate(whole):
        assert parts[0][i] + parts[1][i] == batch


def test_fake_data_shapes():
    train, val = fake.build(10, 3, 40, 16, 16, seed=0, replica=0, num_replicas=1, train_samples=64, val_samples=32)
    x, y = next(iter(train))
    assert x.shape == (16, 3, 40, 40) and y.max() < 10


def test_imagefolder_paper_transforms_on_a_tiny_jpeg_tree(tmp_path):
    from PIL import Image
    from data import imagefolder
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / split / cls)
            for i in range(3):
                Image.new("RGB", (300, 260), (40 * i, 100, 200)).save(tmp_path / split / cls / f"{i}.JPEG")
    train, val = imagefolder.build(str(tmp_path), batch_size=4, val_batch_size=3, size=227, seed=0, replica=0,
                                   num_replicas=1, workers=0)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 227, 227) and len(train) == 1  # 6 images, drop_last
    _, val10 = imagefolder.build(str(tmp_path), 4, 3, 227, 0, 0, 1, workers=0, eval_crops=10)
    x, y = next(iter(val10))
    assert x.shape == (3, 10, 3, 227, 227)
    light = imagefolder.PCALighting(0.1)
    img = torch.zeros(3, 4, 4)
    shifted = light(img)
    assert shifted.std(dim=(1, 2)).max() == 0 and shifted.abs().max() > 0  # one colour shift per image


def _per_sample_augment(loader, x_uint8, draws):
    """The training transform written one image at a time: centre-pad to size, pad by p, crop, flip."""
    p, size = loader.crop_padding, loader.size
    out = []
    for img, (top, left, flip) in zip(x_uint8.float() / 255.0, draws.t().tolist()):
        lo = (size - img.shape[-1]) // 2
        hi = size - img.shape[-1] - lo
        padded = torch.nn.functional.pad(img, (lo + p, hi + p, lo + p, hi + p))
        crop = padded[:, top:top + size, left:left + size]
        out.append(crop.flip(-1) if flip else crop)
    return (torch.stack(out) - loader.mean) / loader.std


def test_batched_augmentation_equals_the_per_sample_transform(tmp_path):
    tiny_fashion(tmp_path)
    train, _ = build(str(tmp_path), batch_size=16, val_batch_size=8, size=32, seed=3, replica=1, num_replicas=2,
                     crop_padding=2, download=False)
    train.set_epoch(2, skip=1)
    order = train.sampler.epoch_order()
    draws = train._epoch_draws(range(1, len(train)))
    offset = 0
    for i, (x, y) in enumerate(train, start=1):
        start, end = train.sampler.batch_positions(i)
        idx = order[start:end]
        expected = _per_sample_augment(train, train.images[idx].cpu(), draws[:, offset:offset + len(idx)])
        offset += len(idx)
        assert torch.equal(y, train.labels[idx]) and x.shape == (len(idx), 1, 32, 32)
        torch.testing.assert_close(x, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_resident_loader_equals_cpu_loader(tmp_path):
    tiny_fashion(tmp_path)
    kw = dict(batch_size=16, val_batch_size=8, size=32, seed=3, replica=0, num_replicas=1, download=False)
    cpu_train, cpu_val = build(str(tmp_path), **kw)
    gpu_train, gpu_val = build(str(tmp_path), device="cuda", **kw)
    for a, b in (cpu_train, gpu_train), (cpu_val, gpu_val):
        a.set_epoch(1, skip=1)
        b.set_epoch(1, skip=1)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xb.is_cuda and torch.equal(ya, yb.cpu())
            torch.testing.assert_close(xa, xb.cpu(), rtol=0, atol=1e-6)


def test_training_batch_with_fewer_rows_than_replicas_is_dropped():
    """1025 samples, batch 128, 4 replicas: the last training batch (1 row) would leave 3 replicas empty."""
    parts = [list(ReplicaBatchSampler(1025, 128, shuffle=True, replica=r, num_replicas=4)) for r in range(4)]
    assert all(len(p) == 8 and all(len(batch) == 32 for batch in p) for p in parts)
    val = [list(ReplicaBatchSampler(1025, 128, shuffle=False, replica=r, num_replicas=4)) for r in range(4)]
    assert sorted(i for p in val for batch in p for i in batch) == list(range(1025))  # evaluation keeps all
