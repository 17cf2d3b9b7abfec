"""One process per group (gloo on CPU) computes what the one-process placement and the reference compute."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import dist_worker
from alexnet.init import init_reference_state
from alexnet.model import GroupAlexNet
from alexnet.reference import ReferenceAlexNet
from conftest import tiny_spec
from parallel import LocalPlacement

TOL = dict(rtol=1e-5, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_run(groups: int, steps: int):
    spec = tiny_spec(groups)
    state = init_reference_state(spec, 0)
    ref = ReferenceAlexNet(spec)
    ref.load_state_dict(state)
    model = GroupAlexNet(spec, LocalPlacement(groups, ["cpu"] * groups))
    model.load_reference(state)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 32, 32, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    ref_logits = ref(x)
    F.cross_entropy(ref_logits, y).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return spec, ref, ref_logits, curve, model.to_reference()


@pytest.mark.parametrize("world, groups", [(2, 2), (4, 4), (4, 2)])
def test_distributed_matches_local_and_reference(tmp_path, world, groups):
    out = str(tmp_path / "rank0.pt")
    steps = 5
    mp.spawn(dist_worker.equivalence, args=(world, free_port(), groups, out, steps), nprocs=world, join=True)
    got = torch.load(out, weights_only=True)
    spec, ref, ref_logits, curve, final = local_run(groups, steps)
    torch.testing.assert_close(got["logits"], ref_logits, **TOL)
    for key, p in ref.named_parameters():
        torch.testing.assert_close(got["grads"][key], p.grad, **TOL, msg=lambda m: f"{key}: {m}")
    # the loss curve (dropout off) and the weights after 5 steps match the one-process placement
    torch.testing.assert_close(torch.tensor(got["curve"]), torch.tensor(curve), rtol=1e-5, atol=1e-6)
    for key in final:
        torch.testing.assert_close(got["final"][key], final[key], rtol=1e-4, atol=1e-5)
    # byte counters: DESIGN.md's formula, per replica batch
    for name, per_image in spec.cross_group_bytes_per_image().items():
        assert got["counted"][f"{name}/fwd"] == got["replica_batch"] * per_image
        assert got["counted"][f"{name}/bwd"] == got["replica_batch"] * per_image
