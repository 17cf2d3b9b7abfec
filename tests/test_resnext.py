"""A second network built only from parallel/ (examples/resnext.py) equals its nn.Conv2d(groups=G) twin."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import dist_worker
from conftest import ROOT, assert_close
from parallel import LocalPlacement, full_state_dict, load_full_state_dict
from parallel.layers import sharded_layers

sys.path.insert(0, os.path.join(ROOT, "examples"))
import resnext  # noqa: E402


def reference_run(groups):
    torch.manual_seed(0)
    reference = resnext.Reference(groups)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    logits = reference(x)
    F.cross_entropy(logits, y).backward()
    return reference, x, y, logits


@pytest.mark.parametrize("groups, devices", [(1, ["cpu"]), (4, ["cpu"]), (2, ["cpu", "cpu"]), (4, ["cpu", "cpu"])])
def test_local_placement_equals_grouped_torch(groups, devices):
    reference, x, y, expected = reference_run(groups)
    placement = LocalPlacement(groups, devices)
    model = resnext.GroupResNeXt(placement)
    load_full_state_dict(model, reference.state_dict())
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in full_state_dict(model).items())
    logits = model(x)
    assert_close(logits, expected)
    F.cross_entropy(logits, y).backward()
    ref_grads = dict(reference.named_parameters())
    for name, layer in sharded_layers(model).items():
        got = placement.assemble_rows([w.grad for w in layer.weights])
        assert_close(got, ref_grads[f"{name}.weight"].grad, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_one_process_per_group_equals_grouped_torch(tmp_path, world):
    from test_distributed import free_port
    out = str(tmp_path / "rank0.pt")
    mp.spawn(dist_worker.resnext_equivalence, args=(world, free_port(), out), nprocs=world, join=True)
    got = torch.load(out, weights_only=True)
    reference, _, _, expected = reference_run(world)
    assert_close(got["logits"], expected)
    for name, p in reference.named_parameters():
        if name.endswith("weight"):
            assert_close(got["grads"][name], p.grad, msg=lambda m: f"{name}: {m}")


def test_example_trains_and_writes_the_run_files(tmp_path):
    from test_data import tiny_fashion
    data = tmp_path / "fm"
    tiny_fashion(data, n_train=64, n_val=32)
    env = dict(os.environ, FASHION_MNIST_DIR=str(data))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "resnext.py"), "--groups", "4",
                           "--devices", "cpu", "cpu", "--epochs", "2", "--batch-size", "16", "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["epoch"] for m in lines] == [1, 2] and "val_top1_err" in lines[0]
    assert json.load(open(tmp_path / "run" / "summary.json"))["groups"] == 4
