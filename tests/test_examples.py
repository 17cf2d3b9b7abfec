"""The example networks built only from parallel/ equal their plain-torch twins: ResNeXt equals torchvision's
own ResNet(Bottleneck, groups=G), ShuffleNet v1 units equal a plain-torch twin. Seeded, each starts as its
twin does; train and eval mode, forward and backward (float64), on 1 and 2 slots and on 2 gloo ranks."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import dist_worker
from conftest import OWN_DEPRECATION, ROOT
from parallel import LocalPlacement

sys.path.insert(0, os.path.join(ROOT, "examples"))
import resnext  # noqa: E402
import shufflenet  # noqa: E402


def twin_step(name: str, groups: int) -> dict:
    """dist_worker.example_step's results for the plain-torch twin."""
    torch.manual_seed(0)
    twin = (resnext.torchvision_twin(groups) if name == "resnext" else shufflenet.Twin(groups)).double()
    initial = {k: v.clone() for k, v in twin.state_dict().items()}
    x, y = dist_worker.example_batch(name)
    logits = twin(x)
    F.cross_entropy(logits, y).backward()
    out = {"initial": initial, "train_logits": logits.detach(),
           "grads": {k: p.grad for k, p in twin.named_parameters()}, "after": twin.state_dict()}
    twin.eval()
    with torch.no_grad():
        out["eval_logits"] = twin(x)
    return out


def assert_equals_twin(got: dict, expected: dict):
    for key, value in expected["initial"].items():  # the seed names one network, the twin's
        assert torch.equal(got["initial"][key], value), key
    assert set(got["initial"]) == set(expected["initial"])
    for what in ("train_logits", "eval_logits"):
        torch.testing.assert_close(got[what], expected[what], rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}")
    for key, value in expected["grads"].items():
        torch.testing.assert_close(got["grads"][key], value, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad {key}: {m}")
    for key, value in expected["after"].items():  # running statistics included
        torch.testing.assert_close(got["after"][key].double(), value.double(), rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", ["resnext", "shufflenet"])
@pytest.mark.parametrize("groups, devices", [(2, ["cpu"]), (2, ["cpu", "cpu"]), (4, ["cpu", "cpu"])])
def test_example_on_local_slots_equals_its_twin(name, groups, devices):
    net = dist_worker.example_network(name, LocalPlacement(groups, devices))
    assert_equals_twin(dist_worker.example_step(net, name), twin_step(name, groups))


@pytest.mark.parametrize("name", ["resnext", "shufflenet"])
def test_example_on_two_gloo_ranks_equals_its_twin(tmp_path, name):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(dist_worker.example_equivalence, args=(2, dist_worker.rendezvous_file(), name, 2, out), nprocs=2, join=True)
    assert_equals_twin(torch.load(out, weights_only=True), twin_step(name, 2))


def test_torchvision_state_dict_loads_both_ways():
    from parallel import full_state_dict, load_full_state_dict
    torch.manual_seed(1)
    tv = resnext.torchvision_twin(2)
    tv(torch.randn(2, 3, 32, 32))  # running statistics that are not the initial ones
    ours = resnext.GroupResNeXt(LocalPlacement(2, ["cpu", "cpu"]))
    load_full_state_dict(ours, tv.state_dict())
    back = full_state_dict(ours)
    assert set(back) == set(tv.state_dict()) and all(torch.equal(back[k], v) for k, v in tv.state_dict().items())


@pytest.mark.parametrize("script", ["resnext.py", "shufflenet.py", "convert.py"])
def test_example_trains_and_writes_the_run_files(tmp_path, script):
    from test_data import tiny_fashion
    data = tmp_path / "fm"
    tiny_fashion(data, n_train=64, n_val=32)
    env = dict(os.environ, FASHION_MNIST_DIR=str(data))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), "--groups", "2",
                           "--devices", "cpu", "cpu", "--epochs", "2", "--batch-size", "16", "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["epoch"] for m in lines] == [1, 2] and "val_top1_err" in lines[0]
    assert json.load(open(tmp_path / "run" / "summary.json"))["groups"] == 2


def test_convert_example_under_torchrun_trains_and_reports_each_rank(tmp_path):
    """examples/convert.py's second form: one process per slot, memory printed by every rank, bytes by rank 0."""
    from test_data import tiny_fashion
    from test_distributed import standalone_torchrun
    data = tmp_path / "fm"
    tiny_fashion(data, n_train=64, n_val=32)
    env = dict(os.environ, FASHION_MNIST_DIR=str(data), OMP_NUM_THREADS="1")
    proc = subprocess.run([*standalone_torchrun(2), os.path.join(ROOT, "examples", "convert.py"), "--groups", "2",
                           "--epochs", "1", "--batch-size", "16", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert [json.loads(x)["epoch"] for x in open(tmp_path / "run" / "metrics.jsonl")] == [1]
    for rank in (0, 1):
        assert re.search(rf"rank {rank}, cpu: peak [\d.]+ MiB of one step", out), out[-3000:]
    assert "bytes exchanged per step, by layer" in out
    assert not OWN_DEPRECATION.search(out), [line for line in out.splitlines() if OWN_DEPRECATION.search(line)]
