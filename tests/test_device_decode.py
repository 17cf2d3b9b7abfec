"""The decode-on-device ImageFolder path (data.decode=gpu), run here on the CPU: it must agree with the PIL path
in shapes and value ranges, replay exactly for a seed, and survive odd files."""
import os

import pytest
import torch
from PIL import Image

from data import device_decode, imagefolder

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def picture(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (3, 6, 8), generator=g, dtype=torch.uint8)
    big = torch.nn.functional.interpolate(small[None].float(), size=(h, w), mode="bilinear")[0]
    return Image.fromarray(big.clamp(0, 255).byte().permute(1, 2, 0).numpy())


def tree(root, per_class=4, sizes=((300, 260), (260, 310))):
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            os.makedirs(root / split / cls, exist_ok=True)
            for i in range(per_class):
                picture(*sizes[i % len(sizes)], seed=10 * c + i).save(root / split / cls / f"{i}.JPEG", quality=90)
    return root


def build(root, decode, device="cpu", **kw):
    args = dict(batch_size=4, val_batch_size=3, size=227, seed=0, replica=0, num_replicas=1, workers=0)
    args.update(kw)
    return imagefolder.build(str(root), decode=decode, device=device, **args)


@pytest.mark.parametrize("device", DEVICES)
def test_device_path_matches_pil_path_in_shape_and_range(tmp_path, device):
    root = tree(tmp_path)
    pil_train, pil_val = build(root, "cpu")
    dev_train, dev_val = build(root, "gpu", device)
    assert isinstance(dev_train, device_decode.DeviceDecodeLoader) and len(dev_train) == len(pil_train)
    (xp, yp), (xd, yd) = next(iter(pil_train)), next(iter(dev_train))
    assert xd.shape == xp.shape == (4, 3, 227, 227) and xd.device.type == device
    assert xd.dtype == torch.float32 and yd.dtype == torch.long
    # same normalisation and colour noise scale: value ranges agree to within the noise
    assert abs(xd.mean().item() - xp.mean().item()) < 0.35 and abs(xd.std().item() - xp.std().item()) < 0.35
    # validation centre crops see the same pixels: close to the PIL path apart from resampling filters
    (vp, _), (vd, _) = next(iter(pil_val)), next(iter(dev_val))
    assert vd.shape == vp.shape
    assert (vd.cpu() - vp).abs().mean() < 0.08


def test_device_path_replays_for_a_seed_and_differs_across_epochs(tmp_path):
    root = tree(tmp_path, per_class=6)
    a, _ = build(root, "gpu")
    b, _ = build(root, "gpu")
    a.set_epoch(1)
    b.set_epoch(1, skip=1)  # resumed after the first batch of epoch 1
    batches_a, batches_b = list(a), list(b)
    for (xa, ya), (xb, yb) in zip(batches_a[1:], batches_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.set_epoch(2)
    assert not torch.equal(next(iter(a))[0], batches_a[0][0])


def test_ten_crop_evaluation_on_the_device_path(tmp_path):
    root = tree(tmp_path)
    _, val = build(root, "gpu", eval_crops=10)
    x, y = next(iter(val))
    assert x.shape == (3, 10, 3, 227, 227) and y.shape == (3,)
    torch.testing.assert_close(x[:, 5:], x[:, :5].flip(-1))  # the last five are the mirrored first five


def test_decode_jpeg_on_cpu_equals_pil_decoder(tmp_path):
    from torchvision.io import ImageReadMode, decode_jpeg
    path = tmp_path / "a.jpg"
    picture(64, 48, 3).save(path, quality=95)
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    ours = decode_jpeg(data, mode=ImageReadMode.RGB)
    pil = torch.from_numpy(__import__("numpy").array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert ours.shape == (3, 48, 64) and (ours.int() - pil.int()).abs().max() <= 2  # libjpeg IDCT variants


def test_odd_files_load_or_are_skipped_with_one_warning(tmp_path, capfd):
    root = tree(tmp_path, per_class=2)
    odd = root / "train" / "cat"
    picture(280, 260, 1).convert("L").save(odd / "grey.JPEG")
    picture(280, 260, 2).convert("CMYK").save(odd / "cmyk.JPEG")
    picture(280, 260, 3).save(odd / "png.JPEG", format="PNG")
    whole = (root / "train" / "dog" / "0.JPEG").read_bytes()
    (odd / "truncated.JPEG").write_bytes(whole[: len(whole) // 3])
    (odd / "garbage.JPEG").write_bytes(b"this is not an image")
    files = device_decode.EncodedFiles([(str(p), 0) for p in sorted(odd.iterdir())])
    items = [files[i] for i in range(len(files))]
    kinds = {os.path.basename(path): kind for kind, _, _, path in items}
    assert kinds["grey.JPEG"] == kinds["cmyk.JPEG"] == kinds["png.JPEG"] == "image"
    assert kinds["0.JPEG"] == "jpeg" and kinds["garbage.JPEG"] == "skip"
    err = capfd.readouterr().err
    assert len([line for line in err.splitlines() if "garbage.JPEG" in line]) == 1
    train, _ = build(root, "gpu", batch_size=9)
    x, y = next(iter(train))
    # 9 files: grey, CMYK and PNG load on the CPU; the garbage and the truncated JPEG (PIL refuses it) are skipped
    assert x.shape == (7, 3, 227, 227) and len(y) == 7
    assert torch.isfinite(x).all()


def noisy_images(sizes=((300, 260), (256, 331), (270, 270))):
    """High-frequency pictures (uint8 noise, CHW): a crop one pixel off, a missing flip or missing colour
    noise changes every value."""
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes]


def test_train_batch_applies_each_images_own_crop_flip_and_pca_noise_exactly():
    """Per sample, against the pieces written out: crop box from u, flip where u < 0.5, V (alpha * lambda)."""
    from data.imagefolder import EIGVAL, EIGVEC
    images, size = noisy_images(), 64
    u = torch.tensor([[0.1, 0.9, 0.2], [0.7, 0.3, 0.8], [0.5, 0.5, 0.4]], dtype=torch.float64)
    alpha = torch.tensor([[0.3, -0.2, 0.1], [-0.1, 0.05, 0.2], [0.0, 0.4, -0.3]])
    got = device_decode.train_batch(images, size, u, alpha)
    rh, rw = device_decode.resized_sizes(images)
    for j, image in enumerate(images):
        top, left = int(u[j, 0] * (rh[j] - size + 1)), int(u[j, 1] * (rw[j] - size + 1))
        crop = device_decode.crop_resize([image], torch.tensor([[top]]), torch.tensor([[left]]), size)[0]
        if u[j, 2] < 0.5:
            crop = crop.flip(-1)
        crop = crop + (EIGVEC @ (alpha[j] * EIGVAL)).view(3, 1, 1)
        torch.testing.assert_close(got[j], device_decode.normalise(crop[None])[0], rtol=1e-5, atol=1e-5)
    # and the crop really moves with u: another top gives other pixels
    moved = device_decode.train_batch(images[:1], size, u[:1] + torch.tensor([[0.05, 0, 0]], dtype=torch.float64),
                                      alpha[:1])
    assert not torch.allclose(moved[0], got[0])


def test_ten_crops_are_the_four_corners_and_the_centre_then_their_mirrors():
    images, size = noisy_images(), 64
    got = device_decode.eval_batch(images, size, 10)
    rh, rw = device_decode.resized_sizes(images)
    for j, image in enumerate(images):
        h, w = int(rh[j]), int(rw[j])
        corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size),
                   (round((h - size) / 2), round((w - size) / 2))]
        for c, (top, left) in enumerate(corners):
            crop = device_decode.crop_resize([image], torch.tensor([[top]]), torch.tensor([[left]]), size)[0]
            expected = device_decode.normalise(crop[None])[0]
            torch.testing.assert_close(got[j, c], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[j, 5 + c], expected.flip(-1), rtol=1e-5, atol=1e-5)
