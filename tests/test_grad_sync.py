"""Data replicas synced by torch's DDP during backward (parallel.grad_sync: overlap) compute what the flat
all-reduce after backward computes: the same loss curves and final weights over 8 steps, on 2 replicas,
2 x 2 ranks and the hybrid placement, with slices of unequal size (7 rows over 2 replicas)."""
import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
from conftest import assert_close

STEPS = 8


def run(tmp_path, world, groups, mode, hybrid):
    out = str(tmp_path / f"{mode}")
    mp.spawn(dist_worker.grad_sync_curve, args=(world, dist_worker.rendezvous_file(), groups, mode, hybrid, STEPS, out),
             nprocs=world, join=True)
    losses = [torch.load(f"{out}.{r}", weights_only=True)["losses"] for r in range(world)]
    return losses, torch.load(f"{out}.weights", weights_only=True)["weights"]


@pytest.mark.parametrize("world,groups,hybrid", [(2, 1, False), (4, 2, False), (2, 2, True)],
                         ids=["2 replicas", "2x2", "hybrid 2"])
def test_overlapped_sync_equals_the_flat_all_reduce_step_by_step(tmp_path, world, groups, hybrid):
    flat_losses, flat_weights = run(tmp_path, world, groups, "flat", hybrid)
    ddp_losses, ddp_weights = run(tmp_path, world, groups, "overlap", hybrid)
    for rank, (a, b) in enumerate(zip(flat_losses, ddp_losses)):
        assert_close(torch.tensor(b), torch.tensor(a), msg=lambda m: f"rank {rank}: {m}")
    assert len(set(map(tuple, flat_losses))) > 1  # replicas saw different rows
    for key, value in flat_weights.items():
        assert_close(ddp_weights[key], value, msg=lambda m: f"{key}: {m}")
    assert not torch.equal(flat_weights["fc6.weight"], initial_weight("fc6.weight", groups))


def initial_weight(key, groups):
    from alexnet.init import init_reference_state
    from conftest import tiny_spec
    return init_reference_state(tiny_spec(groups), 0)[key]
