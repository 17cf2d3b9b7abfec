"""Nothing lost, nothing silent: divergence, run-directory safety, data consistency, one line per bad input."""
import json
import os

import pytest
import torch

from alexnet import rundir
from alexnet.config import ConfigError, load
from alexnet.engine import TrainingDiverged
from alexnet.fit import fit
from alexnet.spec import SpecError
from data.errors import DataError

TINY = ["model.conv_channels=[12,24,36,36,24]", "model.fc_widths=[48,48]", "model.kernels=[3,3,3,3,3]",
        "model.strides=[1,1,1,1,1]", "model.paddings=[1,1,1,1,1]", "parallel.devices=[cpu]"]


def cfg(run_dir, *extra):
    return load("configs/smoke.yaml", TINY + [f"run.dir={run_dir}", *extra])


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_divergence_stops_the_run_and_keeps_the_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="no checkpoint had been written yet") as caught:
        fit(cfg(tmp_path / "fresh", "optim.lr=1e6"), quiet=True)
    # caught at the first log step (every 4 of the epoch's 8), not only when the epoch ends
    assert "became NaN or infinite by step 4 (lr" in str(caught.value)
    assert not (tmp_path / "fresh" / "checkpoints" / "last.pt").exists()
    good = tmp_path / "good"
    fit(cfg(good), quiet=True)
    before = torch.load(good / "checkpoints" / "last.pt", weights_only=True)
    with pytest.raises(TrainingDiverged, match=r"last checkpoint .* epoch 2\) is kept.*optim.lr"):
        fit(cfg(good, "train.epochs=3", "optim.lr=1e6"), resume="latest", quiet=True)
    after = torch.load(good / "checkpoints" / "last.pt", weights_only=True)
    assert after["epoch"] == 2 and all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert [m["epoch"] for m in metrics(good)] == [1, 2]


def test_a_run_directory_is_never_silently_reused(tmp_path):
    fit(cfg(tmp_path), quiet=True)
    history = metrics(tmp_path)
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*run.overwrite=true"):
        fit(cfg(tmp_path), quiet=True)
    assert metrics(tmp_path) == history
    fit(cfg(tmp_path, "run.overwrite=true", "train.epochs=1"), quiet=True)  # explicit: start over
    assert [m["epoch"] for m in metrics(tmp_path)] == [1]
    assert len([f for f in os.listdir(tmp_path) if f.startswith("events.out")]) == 1


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, capsys):
    fit(cfg(tmp_path, "train.epochs=1"), resume="latest")
    assert "no checkpoint" in capsys.readouterr().out and [m["epoch"] for m in metrics(tmp_path)] == [1]


def test_best_checkpoint_follows_the_lowest_validation_error(tmp_path):
    fit(cfg(tmp_path), quiet=True)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    errors = [m["val_top1_err"] for m in metrics(tmp_path)]
    assert best["record"]["val_top1_err"] == min(errors)


def test_a_run_directory_is_locked_while_a_run_uses_it(tmp_path):
    held = rundir.claim(str(tmp_path), resuming=False)
    try:
        with pytest.raises(ConfigError, match="in use by process"):
            fit(cfg(tmp_path), quiet=True)
    finally:
        held.close()
    fit(cfg(tmp_path), quiet=True)  # free again once the holder closes


def test_bad_run_directories_are_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        fit(cfg(tmp_path / "file" / "run"), quiet=True)
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(ConfigError, match="checkpoints are written into a folder"):
        fit(cfg(tmp_path / "run"), quiet=True)


def test_metrics_never_list_an_epoch_without_checkpoint_and_resume_repairs_a_lost_line(tmp_path):
    fit(cfg(tmp_path), stop_after_epoch=1, quiet=True)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["record"]["epoch"] == 1
    # a crash after the checkpoint but before the metrics line
    (tmp_path / "metrics.jsonl").write_text("")
    fit(cfg(tmp_path), resume="latest", quiet=True)
    assert [m["epoch"] for m in metrics(tmp_path)] == [1, 2]


@pytest.mark.parametrize("override, expected", [("optim.lr=1e-3", 0.001), ("optim.lr=1.0e6", 1e6),
                                                ("optim.weight_decay=5E-4", 5e-4)])
def test_numbers_in_exponent_notation_are_numbers(override, expected):
    assert load("configs/smoke.yaml", [override])[override.split(".")[0]][override.split(".")[1].split("=")[0]] \
        == expected


def test_exponent_notation_in_yaml_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inherit: {}\noptim:\n  lr: 1e-3\n".format(os.path.abspath("configs/smoke.yaml")))
    assert load(str(path))["optim"]["lr"] == 0.001


@pytest.mark.parametrize("override, needle", [
    ("data.batch_size=0", "data.batch_size must be >= 1"), ("data.batch_size=-4", "data.batch_size"),
    ("optim.lr=-1", "optim.lr must be > 0"), ("train.log_every=0", "train.log_every"),
    ("train.epochs=0", "train.epochs must be >= 1"), ("model.conv_channels=[a,96,144,144,96]", "an int"),
    ("optim.momentum=1.5", "optim.momentum"),
])
def test_out_of_range_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load("configs/smoke.yaml", [override])


def test_too_small_image_names_the_layer_and_the_smallest_size():
    from alexnet.build import spec_from_config
    with pytest.raises(SpecError, match=r"input_size=8 is too small.*use model.input_size >= \d+"):
        spec_from_config(load("configs/imagenet/g2.yaml", ["model.input_size=8"]))


def test_config_file_errors_name_the_file(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("inherit: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"child.yaml: inherit: 'missing.yaml' does not exist"):
        load(str(child))
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  lr: [0.1\n")
    with pytest.raises(ConfigError) as e:
        load(str(broken))
    assert "broken.yaml is not valid YAML at line" in str(e.value) and "\n" not in str(e.value)


def test_fashion_mnist_files_that_do_not_belong_together(tmp_path):
    from data.fashion_mnist import FILES, build
    from test_data import tiny_fashion, write_idx
    tiny_fashion(tmp_path)
    write_idx(os.path.join(tmp_path, FILES["train_labels"] + ".gz"), torch.zeros(20))  # 50 images, 20 labels
    with pytest.raises(DataError, match="50 images but .* 20 labels"):
        build(str(tmp_path), 16, 8, 32, 0, 0, 1, download=False)


def _jpeg_tree(root, train_classes=("a", "b"), val_classes=("a", "b")):
    from PIL import Image
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for cls in classes:
            os.makedirs(root / split / cls, exist_ok=True)
            for i in range(2):
                Image.new("RGB", (64, 48), (60 * i, 90, 30)).save(root / split / cls / f"{i}.JPEG")


def test_imagefolder_class_sets_must_match_and_class_folders_need_images(tmp_path):
    from data import imagefolder
    _jpeg_tree(tmp_path / "mismatch", val_classes=("a", "c"))
    with pytest.raises(DataError, match="different class folders"):
        imagefolder.build(str(tmp_path / "mismatch"), 2, 2, 32, 0, 0, 1, workers=0)
    _jpeg_tree(tmp_path / "empty")
    os.makedirs(tmp_path / "empty" / "train" / "c")
    os.makedirs(tmp_path / "empty" / "val" / "c")
    with pytest.raises(DataError, match="every class folder needs at least one image"):
        imagefolder.build(str(tmp_path / "empty"), 2, 2, 32, 0, 0, 1, workers=0)


def test_pil_path_skips_a_truncated_jpeg_with_one_warning(tmp_path, capfd):
    from data import imagefolder
    _jpeg_tree(tmp_path)
    whole = (tmp_path / "train" / "a" / "0.JPEG").read_bytes()
    (tmp_path / "train" / "a" / "0.JPEG").write_bytes(whole[: len(whole) // 2])
    train, _ = imagefolder.build(str(tmp_path), 4, 2, 32, 0, 0, 1, workers=0, decode="cpu")
    x, y = next(iter(train))
    assert x.shape == (3, 3, 32, 32) and len(y) == 3
    assert len([line for line in capfd.readouterr().err.splitlines() if "0.JPEG" in line]) == 1


def test_failed_checkpoint_write_leaves_no_temporary_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    from alexnet import checkpoint as ckpt_io
    path = tmp_path / "last.pt"
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "model": {}}, str(path))

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt_io.CheckpointError, match="No space left on device.*previous checkpoint is kept"):
        ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "model": {"w": torch.zeros(1)}}, str(path))
    assert os.listdir(tmp_path) == ["last.pt"]
    monkeypatch.undo()
    assert ckpt_io.load(str(path))["model"] == {}


def test_fashion_mnist_idx_dimensions_are_checked(tmp_path):
    from data.fashion_mnist import FILES, build
    from test_data import tiny_fashion, write_idx
    tiny_fashion(tmp_path)
    write_idx(os.path.join(tmp_path, FILES["train_labels"] + ".gz"), torch.zeros(50, 2))
    with pytest.raises(DataError, match="2-D array.*1-D"):
        build(str(tmp_path), 16, 8, 32, 0, 0, 1, download=False)


def test_first_ctrl_c_stops_after_the_step_with_a_mid_epoch_checkpoint(root, tmp_path):
    """Ctrl-C at step 140 (train.py's test-only FILTER_GROUPS_FAULT trigger: no sleeps): exit code 130, a
    checkpoint 45 steps into epoch 2 (96 steps an epoch; the stop follows the step that reads the vote), and
    the resumed run ends with an uninterrupted run's metrics."""
    import subprocess
    import sys
    settings = ["data.fake_train_samples=3072", "train.epochs=3"]
    cmd = [sys.executable, os.path.join(root, "train.py"), "--config", "configs/smoke.yaml", "--set",
           f"run.dir={tmp_path / 'run'}"] + [a for item in TINY + settings for a in ("--set", item)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, FILTER_GROUPS_FAULT="SIGINT@140"))
    assert proc.returncode == 130, proc.stderr
    assert "stopped by Ctrl-C after a checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["epoch_step"]) == (1, 45)
    fit(cfg(tmp_path / "run", *settings), resume="latest", quiet=True)
    fit(cfg(tmp_path / "straight", *settings), quiet=True)
    keys = ("epoch", "step", "train_loss", "val_top1_err", "val_loss", "lr")
    assert [{k: m[k] for k in keys} for m in metrics(tmp_path / "run")] == \
        [{k: m[k] for k in keys} for m in metrics(tmp_path / "straight")]
