"""parallel/ as a library for other grouped networks: seeded initialisation that does not depend on the
placement, GroupBatchNorm2d against nn.BatchNorm2d, byte counts that never collide, the channel shuffle
module, residual sums and concatenation, parameter roles, portable state, and nn.Conv2d's padding."""
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import dist_worker
from conftest import assert_close
from parallel import (ChannelShuffle, GroupBatchNorm2d, GroupConv2d, GroupLinear, LocalPlacement, PerGroup,
                      PlacementError, Sharded, add, cat, full_state_dict, gather_output, load_full_state_dict, shard)
from parallel.roles import split_over


def readme_network(placement) -> nn.Module:
    """A small grouped network written from the README's "Reusing the layers" API."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = GroupConv2d(placement, 1, 8, 3, padding=1, exchange="replicated")
            self.bn = GroupBatchNorm2d(placement, 8)
            self.relu = PerGroup(placement, nn.ReLU(), channel_wise=True)
            self.grouped = GroupConv2d(placement, 8, 8, 3, padding=1, exchange="own")
            self.mix = GroupConv2d(placement, 8, 8, 1, exchange="all")
            self.pool = PerGroup(placement, nn.AdaptiveAvgPool2d(1), channel_wise=True)
            self.head = GroupLinear(placement, 8, 10)

        def forward(self, x):
            x = self.relu(self.bn(self.stem(x)))
            x = add(x, self.mix(self.relu(self.grouped(x))))
            return gather_output(placement, self.head(self.pool(x)))

    return Net()


def seeded_full_state(placement) -> dict:
    torch.manual_seed(0)
    return full_state_dict(readme_network(placement))


def assert_same_state(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_seeded_network_is_the_same_on_one_and_two_slots_and_its_groups_differ():
    one = seeded_full_state(LocalPlacement(2, ["cpu"]))
    assert_same_state(one, seeded_full_state(LocalPlacement(2, ["cpu", "cpu"])))
    for key in ("stem.weight", "grouped.weight", "mix.weight"):
        group0, group1 = one[key].chunk(2)
        assert not torch.equal(group0, group1), key


@pytest.mark.parametrize("world, groups", [(2, 2), (4, 2)])
def test_seeded_network_is_the_same_under_torchrun_ranks_and_replicas(tmp_path, world, groups):
    out = str(tmp_path / "state")
    mp.spawn(dist_worker.seeded_init, args=(world, dist_worker.rendezvous_file(), groups, out), nprocs=world, join=True)
    expected = seeded_full_state(LocalPlacement(groups, ["cpu"]))
    for rank in range(world):  # every rank assembles the full weights; the replicas' are identical
        assert_same_state(torch.load(f"{out}.{rank}", weights_only=True), expected)


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]])
def test_layers_initialise_as_their_twins_from_the_same_rng_state(devices):
    pl = LocalPlacement(2, devices)
    cases = [(lambda: GroupConv2d(pl, 4, 6, 3, exchange="own"), lambda: nn.Conv2d(4, 6, 3, groups=2)),
             (lambda: GroupConv2d(pl, 4, 6, 3, exchange="all"), lambda: nn.Conv2d(4, 6, 3)),
             (lambda: GroupLinear(pl, 12, 10), lambda: nn.Linear(12, 10)),
             (lambda: GroupBatchNorm2d(pl, 6), lambda: nn.BatchNorm2d(6))]
    for ours, twin in cases:
        torch.manual_seed(3)
        got = ours().to_full()
        torch.manual_seed(3)
        expected = twin().state_dict()
        for key, value in got.items():
            assert torch.equal(value.reshape(expected[key].shape), expected[key]), key


# --- GroupBatchNorm2d --------------------------------------------------------------------------

BN_LAYOUTS = [(1, ["cpu"]), (2, ["cpu"]), (2, ["cpu", "cpu"]), (4, ["cpu", "cpu"])]


@pytest.mark.parametrize("G, devices", BN_LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_group_batchnorm_equals_batchnorm2d_train_and_eval_forward_and_backward(G, devices, momentum):
    pl = LocalPlacement(G, devices)
    ours = GroupBatchNorm2d(pl, 8, momentum=momentum, dtype=torch.float64)
    twin = nn.BatchNorm2d(8, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        twin.weight.uniform_(0.5, 1.5)
        twin.bias.uniform_(-1, 1)
    load_full_state_dict(nn.ModuleDict({"bn": ours}), {f"bn.{k}": v for k, v in twin.state_dict().items()})
    for step in range(3):  # three training batches, then evaluation on the running statistics
        x = torch.randn(5, 8, 4, 3, dtype=torch.float64) * (step + 1) + step
        xs = Sharded(tuple(p.clone().requires_grad_() for p in shard(x, pl).parts), (8 // G,) * G)
        xr = x.clone().requires_grad_()
        y, yr = torch.cat(ours(xs).parts, 1), twin(xr)
        assert_close(y, yr)
        g = torch.randn_like(y)
        y.backward(g)
        yr.backward(g)
        assert_close(torch.cat([p.grad for p in xs.parts], 1), xr.grad)
    grads = ours.to_full(lambda p: p.grad)
    assert_close(grads["weight"], twin.weight.grad)
    assert_close(grads["bias"], twin.bias.grad)
    state = ours.to_full()
    for key, value in twin.state_dict().items():
        assert_close(state[key].double(), value.double(), msg=lambda m: f"{key}: {m}")
    ours.eval()
    twin.eval()
    x = torch.randn(2, 8, 4, 3, dtype=torch.float64)
    assert_close(torch.cat(ours(shard(x, pl)).parts, 1), twin(x))


def test_group_batchnorm_without_affine_or_running_statistics_and_its_errors():
    pl = LocalPlacement(2, ["cpu", "cpu"])
    bare = GroupBatchNorm2d(pl, 4, affine=False, track_running_stats=False)
    assert bare.full_keys == () and not list(bare.parameters())
    x = torch.randn(3, 4, 2, 2)
    bare.eval()  # no running statistics: the batch's own, as nn.BatchNorm2d does
    assert_close(torch.cat(bare(shard(x, pl)).parts, 1), nn.BatchNorm2d(4, affine=False, track_running_stats=False)(x))
    with pytest.raises(ValueError, match="6 channels do not divide by 4 groups"):
        GroupBatchNorm2d(LocalPlacement(4, ["cpu"]), 6)
    with pytest.raises(ValueError, match=r"expected \(N, 2, H, W\) maps"):
        GroupBatchNorm2d(pl, 4)(Sharded((torch.randn(3, 2), torch.randn(3, 2)), (2, 2)))
    with pytest.raises(ValueError, match="GroupBatchNorm2d"):
        PerGroup(pl, nn.BatchNorm2d(4))


def bn_batch():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64)
    return x, torch.randn(8, 4, 4, 4, generator=gen, dtype=torch.float64)


def test_synced_batchnorm_over_unequal_replicas_equals_one_process_on_the_global_batch(tmp_path):
    out = str(tmp_path / "bn.pt")
    mp.spawn(dist_worker.synced_batchnorm, args=(2, dist_worker.rendezvous_file(), out), nprocs=2, join=True)
    replicas = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, dtype=torch.float64), nn.BatchNorm2d(4, dtype=torch.float64)
    x, target = bn_batch()
    y = bn(conv(x))
    (y - target).square().mean().backward()
    assert_close(torch.cat([r["y"] for r in replicas]), y)
    expected = {"conv.weight": conv.weight.grad, "conv.bias": conv.bias.grad, "bn.weight": bn.weight.grad,
                "bn.bias": bn.bias.grad}
    for r in replicas:
        for key, value in expected.items():
            assert_close(r["grads"][key], value, msg=lambda m: f"{key}: {m}")
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.allclose(r["state"][f"bn.{key}"].double(), getattr(bn, key).double(), rtol=1e-10), key


# --- byte counts, shuffles, residuals ------------------------------------------------------------

def test_unnamed_layers_never_share_a_byte_count_and_report_by_module_path():
    pl = LocalPlacement(2, ["cpu", "cpu"])
    net = nn.Sequential(*[GroupConv2d(pl, 4, 4, 1, exchange="all") for _ in range(3)])
    net(shard(torch.randn(2, 4, 3, 3), pl))
    one = 2 * (2 * 4 * 3 * 3 * 4 // 2)  # each of 2 groups receives the other's half of the fp32 maps
    assert pl.counter.total() == 3 * 2 * one  # three layers, forward and backward each
    assert pl.counter.by_module(net) == {f"{i}/{d}": one for i in range(3) for d in ("fwd", "bwd")}
    assert len({m.key for m in net}) == 3


def test_a_name_is_free_again_once_its_layer_is_gone():
    pl = LocalPlacement(2, ["cpu"])
    first = GroupConv2d(pl, 4, 4, 1, name="mix")
    assert GroupConv2d(pl, 4, 4, 1, name="mix").key == "mix.2"
    del first
    assert GroupConv2d(pl, 4, 4, 1, name="mix").key == "mix"


def shuffle_reference(x, G):
    return x.unflatten(1, (G, G, -1)).transpose(1, 2).flatten(1, 3)


@pytest.mark.parametrize("G, devices", [(2, ["cpu"]), (2, ["cpu", "cpu"]), (4, ["cpu", "cpu"]), (4, ["cpu"] * 4)])
def test_channel_shuffle_module_equals_the_reference_permutation_and_counts_like_the_fused_one(G, devices):
    pl = LocalPlacement(G, devices)
    module = ChannelShuffle(pl)
    x = torch.randn(2, 2 * G * G, 3, 3, requires_grad=True)
    xs = Sharded(tuple(p.detach().clone().requires_grad_() for p in shard(x.detach(), pl).parts), (2 * G,) * G)
    y = torch.cat(module(xs).parts, 1)
    expected = shuffle_reference(x, G)
    assert torch.equal(y, expected)
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g)
    assert torch.equal(torch.cat([p.grad for p in xs.parts], 1), x.grad)
    fused = LocalPlacement(G, devices)
    GroupConv2d(fused, 2 * G * G, G, 1, exchange="shuffle", name="shuffle")(shard(x.detach(), fused))
    assert pl.counter.snapshot() == fused.counter.snapshot()
    with pytest.raises(ValueError, match=f"do not divide by {G * G}"):
        module(shard(torch.randn(1, G * (G + 1), 2, 2), pl))


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]])
def test_residual_sum_and_concatenation_inside_groups(devices):
    pl = LocalPlacement(2, devices)
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    got = cat(shard(a, pl), shard(b, pl))
    a0, a1, b0, b1 = *a.chunk(2, 1), *b.chunk(2, 1)
    assert torch.equal(torch.cat(got.parts, 1), torch.cat([a0, b0, a1, b1], 1)) and got.group_sizes == (5, 5)
    assert torch.equal(torch.cat(add(shard(a, pl), shard(a, pl)).parts, 1), 2 * a)
    with pytest.raises(ValueError, match="split differently"):
        add(shard(a, pl), shard(b, pl))


# --- roles and portable state ----------------------------------------------------------------------

def test_parameters_carry_their_role_and_state_dict_refuses_another_placement():
    two = readme_network(LocalPlacement(2, ["cpu", "cpu"]))
    assert all(hasattr(p, "parallel_role") and split_over(p) is None for p in two.parameters())
    one = readme_network(LocalPlacement(2, ["cpu"]))
    with pytest.raises(PlacementError, match="full_state_dict"):
        one.load_state_dict(two.state_dict())
    load_full_state_dict(one, full_state_dict(two))  # the portable format loads under any placement
    assert_same_state(full_state_dict(one), full_state_dict(two))
    x = torch.randn(2, 1, 6, 6)
    assert_close(one(x), two(x))


# --- nn.Conv2d's padding ------------------------------------------------------------------------

@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]])
@pytest.mark.parametrize("padding, mode", [("same", "zeros"), ("valid", "zeros"), ("same", "reflect"),
                                           (1, "replicate"), ((2, 1), "circular"), ("same", "circular")])
def test_conv_padding_and_padding_mode_equal_nn_conv2d(devices, padding, mode):
    pl = LocalPlacement(2, devices)
    torch.manual_seed(0)
    layer = GroupConv2d(pl, 4, 6, (4, 3), padding=padding, padding_mode=mode, dilation=(1, 2))
    torch.manual_seed(0)
    twin = nn.Conv2d(4, 6, (4, 3), padding=padding, padding_mode=mode, dilation=(1, 2), groups=2)
    x = torch.randn(2, 4, 7, 8, requires_grad=True)
    xs = Sharded(tuple(p.detach().clone().requires_grad_() for p in shard(x.detach(), pl).parts), (2, 2))
    y = torch.cat(layer(xs).parts, 1)
    assert_close(y, twin(x))
    y.square().sum().backward()
    twin(x).square().sum().backward()
    assert_close(torch.cat([p.grad for p in xs.parts], 1), x.grad)
    assert_close(layer.to_full(lambda p: p.grad)["weight"], twin.weight.grad)


def test_conv_arguments_it_cannot_honour_are_refused_at_construction():
    pl = LocalPlacement(2, ["cpu"])
    with pytest.raises(ValueError, match="not supported for strided"):
        GroupConv2d(pl, 4, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        GroupConv2d(pl, 4, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="'same' or 'valid'"):
        GroupConv2d(pl, 4, 4, 3, padding="full")
    with pytest.raises(ValueError, match="device='cpu' is not accepted"):
        GroupConv2d(pl, 4, 4, 3, device="cpu")  # the placement says where the weights live
