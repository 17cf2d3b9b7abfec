"""train.py: smoke run output, one-line errors with exit code 2, resume, evaluate."""
import json
import os
import subprocess
import sys

import pytest
import torch

from alexnet.config import ConfigError, load
from alexnet.fit import fit

TINY = ["model.conv_channels=[12,24,36,36,24]", "model.fc_widths=[48,48]", "model.kernels=[3,3,3,3,3]",
        "model.strides=[1,1,1,1,1]", "model.paddings=[1,1,1,1,1]"]


def run_cli(root, *args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(root, "train.py"), *args], capture_output=True, text=True,
                          cwd=cwd or root, timeout=300)


def test_smoke_run_writes_events_metrics_summary(root, tmp_path):
    proc = run_cli(root, "--config", "configs/smoke.yaml", "--set", f"run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    files = os.listdir(tmp_path)
    assert any(f.startswith("events.out.tfevents") for f in files)
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [m["epoch"] for m in lines] == [1, 2]
    for key in ("epoch", "train_loss", "val_top1_err", "val_top5_err", "lr", "images_per_s"):
        assert key in lines[0]
    summary = json.load(open(tmp_path / "summary.json"))
    for key in ("groups", "params", "macs", "final_val_top1_err", "final_val_top5_err", "best_val_top1_err",
                "images_per_s", "wall_s"):
        assert key in summary
    assert summary["final_val_top1_err"] == lines[-1]["val_top1_err"]
    for m in lines:  # 6 FLOPs per MAC per image (forward, two backward passes); no peak to share on a CPU
        assert m["tflops"] == pytest.approx(6 * summary["macs"] * m["images_per_s"] / 1e12) and m["mfu"] is None
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("args, needle", [
    (["--set", "optim.lrr=0.1"], "optim.lr"),
    (["--set", "optim.lr=fast"], "optim.lr"),
    (["--set", "model.groups=3", "--set", "model.conv_channels=[36,256,144,144,96]"], "conv2"),
    (["--set", "parallel.devices=[cpu,cpu,cpu]"], "parallel.devices"),
    (["--set", "data.dataset=imagefolder", "--set", "data.root=/nonexistent"], "/nonexistent"),
    (["--set", "optim.lr=1e6"], "training diverged"),
    (["--set", "train.epochs=0"], "train.epochs must be >= 1"),
    (["--set", "model.cross_group=[conv3]"], "write model.exchange: {conv3: all, fc6: own, fc7: own, fc8: own}"),
])
def test_bad_input_is_one_line_and_exit_2(root, tmp_path, args, needle):
    proc = run_cli(root, "--config", "configs/smoke.yaml", "--set", f"run.dir={tmp_path}", *args)
    assert proc.returncode == 2, proc.stderr
    # what a terminal shows: a progress bar erased with carriage returns leaves nothing
    lines = [line.rsplit("\r", 1)[-1] for line in proc.stderr.strip().split("\n")]
    lines = [line for line in lines if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_mistyped_key_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load("configs/smoke.yaml", ["optim.lrr=0.1"])


def test_retired_cross_group_names_the_exchange_that_means_the_same(tmp_path):
    """model.cross_group (layers that all-gather) and model.exchange (overrides) are one map now: the old key
    is refused with the map that computes what it did, and that map gives the old network."""
    old = tmp_path / "old.yaml"
    old.write_text("inherit: %s\nmodel:\n  cross_group: [conv3, fc6]\n" % os.path.abspath("configs/smoke.yaml"))
    with pytest.raises(ConfigError) as e:
        load(str(old))
    message = str(e.value)
    assert message == (f"{old}: model.cross_group is retired: one map says what each layer reads of the other "
                       "groups; write model.exchange: {conv3: all, fc6: all, fc7: own, fc8: own} instead")
    replacement = message.split("write model.exchange: ")[1].removesuffix(" instead")
    spec = load_and_build("configs/smoke.yaml", [f"model.exchange={replacement}"])
    assert [(i.name, i.exchange) for i in spec.layers()] == [
        ("conv1", "replicated"), ("conv2", "own"), ("conv3", "all"), ("conv4", "own"), ("conv5", "own"),
        ("fc6", "all"), ("fc7", "own"), ("fc8", "own")]


def test_g3_with_256_wide_conv2_names_fix():
    with pytest.raises(Exception, match=r"conv2 has 256 channels.*255 or 258"):
        load_and_build("configs/imagenet/g3.yaml", ["model.conv_channels=[96,256,384,384,255]"])


def load_and_build(path, overrides):
    from alexnet.build import spec_from_config
    return spec_from_config(load(path, overrides))


def _cfg(tmp_path, name, device="cpu", *extra):
    """Two fresh runs compared to the last bit must not time their layouts (a busy machine can pick NCHW
    for one and NHWC for the other, whose sums round differently): both pinned."""
    return load("configs/smoke.yaml", TINY + [f"run.dir={tmp_path / name}", "model.dropout=0.5",
                                              f"parallel.devices=[{device}]", "train.channels_last=false",
                                              "train.conv_formulation=grouped", *extra])


DEVICES = [("cpu", ())] + ([("cuda:0", ("run.deterministic=true",))] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device, extra", DEVICES)
def test_resumed_run_continues_exactly(tmp_path, device, extra):
    """Stop after epoch 1, resume: epoch 2 equals the uninterrupted run's epoch 2 (bitwise on CUDA when
    run.deterministic is set)."""
    fit(_cfg(tmp_path, "straight", device, *extra), quiet=True)
    fit(_cfg(tmp_path, "stopped", device, *extra), stop_after_epoch=1, quiet=True)
    assert not (tmp_path / "stopped" / "summary.json").exists()
    fit(_cfg(tmp_path, "stopped", device, *extra), resume="latest", quiet=True)
    a = [json.loads(x) for x in open(tmp_path / "straight" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "stopped" / "metrics.jsonl")]
    assert [m["epoch"] for m in b] == [1, 2]
    for key in ("train_loss", "val_top1_err", "val_top5_err", "val_loss", "lr", "step"):
        assert a[1][key] == b[1][key], key
    sa = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    sb = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key


def as_format_1(ckpt: dict) -> dict:
    """What the code before checkpoint format 2 wrote for the same run: block-diagonal fc layers keyed
    fc6.conv.weight of shape (out, in/G, 1), and the config's model.cross_group list."""
    def old_keys(state):
        out = {}
        for key, value in state.items():
            name, leaf = key.split(".")
            grouped = name.startswith("fc") and ckpt["config"]["model"]["exchange"].get(name, "own") == "own"
            out[f"{name}.conv.{leaf}" if grouped else key] = value.unsqueeze(-1) if grouped and leaf == "weight" \
                else value
        return out
    model = dict(ckpt["config"]["model"])
    exchange = model.pop("exchange")
    model["cross_group"] = [name for name, how in exchange.items() if how == "all"]
    model["exchange"] = {name: how for name, how in exchange.items() if how == "shuffle"}
    return dict(ckpt, format=1, config=dict(ckpt["config"], model=model), model=old_keys(ckpt["model"]),
                optimizer={"momentum": old_keys(ckpt["optimizer"]["momentum"])})


def test_format_1_checkpoint_resumes_as_the_run_that_wrote_it(tmp_path):
    """A checkpoint of the old layout (fc6.conv.weight, model.cross_group) resumes exactly as today's."""
    grouped_fc = ["model.exchange.fc6=own", "model.exchange.fc7=own"]
    fit(_cfg(tmp_path, "run", "cpu", *grouped_fc), stop_after_epoch=1, quiet=True)
    last = str(tmp_path / "run" / "checkpoints" / "last.pt")
    new = torch.load(last, weights_only=True)
    old = as_format_1(new)
    assert "fc6.conv.weight" in old["model"] and "cross_group" in old["config"]["model"]
    torch.save(old, tmp_path / "old.pt")
    for name, path in (("from_new", last), ("from_old", str(tmp_path / "old.pt"))):
        fit(_cfg(tmp_path, name, "cpu", *grouped_fc), resume=path, quiet=True)
    a, b = ([json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")] for name in ("from_new", "from_old"))
    assert [m["epoch"] for m in a] == [m["epoch"] for m in b] == [1, 2]
    for key in ("train_loss", "val_top1_err", "val_top5_err", "val_loss", "lr", "step"):
        assert a[-1][key] == b[-1][key], key
    ends = [torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
            for name in ("from_new", "from_old")]
    assert ends[0]["model"].keys() == ends[1]["model"].keys() == new["model"].keys()
    for key in new["model"]:
        assert torch.equal(ends[0]["model"][key], ends[1]["model"][key]), key


def test_corrupt_checkpoint_is_one_line(root, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = run_cli(root, "--config", "configs/smoke.yaml", "--set", f"run.dir={tmp_path}", "--resume", str(bad))
    assert proc.returncode == 2 and "corrupt" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_evaluate_checkpoint_matches_last_epoch(root, tmp_path):
    cfg = _cfg(tmp_path, "run")
    fit(cfg, quiet=True)
    proc = run_cli(root, "--evaluate", str(tmp_path / "run" / "checkpoints" / "last.pt"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    last = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")][-1]
    assert result["val_top1_err"] == pytest.approx(last["val_top1_err"])


def test_checkpoint_of_other_groups_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "g2")
    fit(cfg, stop_after_epoch=1, quiet=True)
    from alexnet.checkpoint import CheckpointError
    other = load("configs/smoke.yaml", TINY + [f"run.dir={tmp_path / 'g2'}", "model.groups=4"])
    with pytest.raises(CheckpointError, match="model.groups=2"):
        fit(other, resume="latest", quiet=True)


def test_a_peer_rank_says_a_user_error_itself_when_rank_0_has_not(monkeypatch, capsys):
    """Under torchrun rank 0 says a user error; a peer waits for torchrun to end it (SIGTERM's default
    action), and says the error itself, naming its rank, if rank 0 did not fail alike."""
    import signal

    import train
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(train, "PEER_REPORT_WAIT_S", 0.01)
    before = signal.getsignal(signal.SIGTERM)
    try:
        train.report_error("world size 3 does not fit 2 groups")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)
    assert capsys.readouterr().err == "error (rank 1): world size 3 does not fit 2 groups\n"
    monkeypatch.setenv("RANK", "0")
    train.report_error("world size 3 does not fit 2 groups")
    assert capsys.readouterr().err == "error: world size 3 does not fit 2 groups\n"
