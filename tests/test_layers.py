"""Every parallel/ layer against its single-device torch reference, forward and backward."""
import pytest
import torch
from torch import nn

from conftest import assert_close
from parallel import (CommCounter, GroupConv2d, GroupLinear, LocalPlacement, PerGroup, PlacementError, Sharded,
                      gather_output)
from parallel import shard as shard_of
from parallel.placement import split_sizes


def shard(x, placement, groups=None):
    """A reference activation split into per-slot leaf tensors (channels in group order)."""
    s = shard_of(x, placement, groups)
    return Sharded(tuple(p.clone().requires_grad_() for p in s.parts), s.group_sizes)


def cat(y):
    return torch.cat(y.parts, 1)


def load_rows(layer, weight, bias):
    with torch.no_grad():
        for (lo, hi), w, b in zip(layer.slot_rows, layer.weights, layer.biases):
            w.copy_(weight[lo:hi].reshape(w.shape))
            b.copy_(bias[lo:hi])


def grads_by_rows(layer, ref_shape):
    return torch.cat([w.grad.reshape(w.shape[0], *ref_shape[1:]) for w in layer.weights]), \
        torch.cat([b.grad for b in layer.biases])


LAYOUTS = [(2, ["cpu", "cpu"]), (4, ["cpu"] * 4), (4, ["cpu", "cpu"]), (3, ["cpu"]), (1, ["cpu"])]


@pytest.mark.parametrize("G, devices", LAYOUTS)
@pytest.mark.parametrize("mode, formulation", [("own", "grouped"), ("own", "split"), ("own", "streams"),
                                               ("all", "grouped")])
def test_group_conv2d_matches_torch(G, devices, mode, formulation):
    """Every formulation of a slot's k groups (parallel.streams runs the k convolutions in order on CPU)."""
    pl = LocalPlacement(G, devices)
    ref = nn.Conv2d(12, 24, 3, padding=1, groups=G if mode == "own" else 1)
    layer = GroupConv2d(pl, 12, 24, 3, padding=1, exchange=mode, name="c")
    layer.formulation = formulation
    load_rows(layer, ref.weight, ref.bias)
    x = torch.randn(3, 12, 8, 8, requires_grad=True)
    xs = shard(x.detach(), pl)
    y = cat(layer(xs))
    assert_close(y, ref(x))
    g = torch.randn_like(y)
    y.backward(g)
    ref(x).backward(g)
    gw, gb = grads_by_rows(layer, ref.weight.shape)
    assert_close(gw, ref.weight.grad)
    assert_close(gb, ref.bias.grad)
    assert_close(torch.cat([t.grad for t in xs.parts], 1), x.grad)


def test_group_conv2d_replicated_input():
    pl = LocalPlacement(2, ["cpu", "cpu"])
    ref = nn.Conv2d(3, 8, 5, stride=2)
    layer = GroupConv2d(pl, 3, 8, 5, stride=2, exchange="replicated")
    load_rows(layer, ref.weight, ref.bias)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    y = cat(layer(x))
    assert_close(y, ref(x))
    g = torch.randn_like(y)
    y.backward(g)
    ref_x = x.detach().requires_grad_()
    ref(ref_x).backward(g)
    gw, gb = grads_by_rows(layer, ref.weight.shape)
    assert_close(gw, ref.weight.grad)
    assert_close(gb, ref.bias.grad)
    assert_close(x.grad, ref_x.grad)  # the replicated input's gradient sums every group's


@pytest.mark.parametrize("G, devices", LAYOUTS)
def test_group_linear_uneven_split_with_gathered_input(G, devices):
    pl = LocalPlacement(G, devices)
    ref = nn.Linear(24, 10)  # 10 outputs over 4 groups: 3, 3, 2, 2
    layer = GroupLinear(pl, 24, 10, exchange="all", name="fc")
    assert layer.group_out == split_sizes(10, G)
    load_rows(layer, ref.weight, ref.bias)
    x = torch.randn(5, 24, requires_grad=True)
    xs = shard(x.detach(), pl)
    y = gather_output(pl, layer(xs))
    assert_close(y, ref(x))
    y.sum().backward()
    ref(x).sum().backward()
    gw, gb = grads_by_rows(layer, ref.weight.shape)
    assert_close(gw, ref.weight.grad)
    assert_close(gb, ref.bias.grad)
    assert_close(torch.cat([t.grad for t in xs.parts], 1), x.grad)


@pytest.mark.parametrize("G, devices", LAYOUTS)
def test_group_linear_block_diagonal(G, devices):
    pl = LocalPlacement(G, devices)
    ref = nn.Conv1d(24, 12, 1, groups=G)  # grouped 1x1 conv == block-diagonal linear
    layer = GroupLinear(pl, 24, 12, exchange="own", name="fc")
    load_rows(layer, ref.weight, ref.bias)
    x = torch.randn(5, 24, requires_grad=True)
    xs = shard(x.detach(), pl)
    y = cat(layer(xs))
    expected = ref(x.unsqueeze(-1)).squeeze(-1)
    assert_close(y, expected)
    y.square().sum().backward()
    expected.square().sum().backward()
    gw, gb = grads_by_rows(layer, ref.weight.shape)
    assert_close(gw, ref.weight.grad)
    assert_close(gb, ref.bias.grad)
    assert_close(torch.cat([t.grad for t in xs.parts], 1), x.grad)


@pytest.mark.parametrize("G, devices", LAYOUTS)
def test_per_group_lrn_never_crosses_groups(G, devices):
    pl = LocalPlacement(G, devices)
    lrn = nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0)
    x = torch.randn(2, 4 * G, 6, 6) * 10
    y = cat(PerGroup(pl, lrn)(shard(x, pl)))
    expected = torch.cat([lrn(c) for c in x.chunk(G, 1)], 1)
    assert_close(y, expected)


@pytest.mark.parametrize("groups", [1, 3])
def test_fast_lrn_equals_torch_per_group(groups):
    from alexnet.lrn import FastLRN
    x = torch.randn(3, 6 * groups, 5, 5, dtype=torch.float64, requires_grad=True)
    ours, theirs = FastLRN(5, 5e-4, 0.75, 2.0), nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0)
    expected = torch.cat([theirs(c) for c in x.chunk(groups, 1)], 1)
    torch.testing.assert_close(ours(x, groups=groups), expected)
    g1, = torch.autograd.grad(ours(x, groups=groups).square().sum(), x)
    g2, = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(g1, g2)


def test_fast_lrn_keeps_bf16_and_channels_last():
    from alexnet.lrn import FastLRN
    x = (torch.randn(2, 16, 6, 6) * 10).contiguous(memory_format=torch.channels_last)
    lrn = FastLRN(5, 5e-4, 0.75, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lrn(x.bfloat16(), groups=2)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), lrn(x, groups=2), rtol=1.6e-2, atol=1e-2)  # bf16: 8 bits of mantissa


def test_placement_deals_contiguous_blocks_and_rejects_bad_layouts():
    pl = LocalPlacement(4, ["cpu", "cpu"])
    assert [list(s.groups) for s in pl.slots] == [[0, 1], [2, 3]]
    assert [s.device.type for s in pl.slots] == ["cpu", "cpu"]
    # auto: one slot per visible GPU, as many as divide G (1 GPU, or 2 for G = 3: one slot of 3 groups)
    gpus = torch.cuda.device_count()
    expected_slots = 1 if gpus < 3 else 3
    assert [s.count for s in LocalPlacement(3, ["auto"]).slots] == [3 // expected_slots] * expected_slots
    with pytest.raises(PlacementError, match="only 2 groups"):
        LocalPlacement(2, ["cpu"] * 3)
    with pytest.raises(PlacementError, match="evenly"):
        LocalPlacement(3, ["cpu", "cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(PlacementError, match="CUDA is not available"):
            LocalPlacement(2, ["cuda:0", "cuda:1"])


def test_gather_counts_bytes_both_directions():
    counter = CommCounter()
    pl = LocalPlacement(2, ["cpu", "cpu"], counter=counter)
    xs = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    outs = pl.gather(xs, 1, "x", [3, 3])
    sum(o.sum() for o in outs).backward()
    # each of 2 groups receives the other's 4x3 fp32 shard: 2 * 48 bytes each way
    assert counter.snapshot() == {"x/fwd": 96, "x/bwd": 96}
    # two consumers each used the gathered input once: gradient 2 on every element
    assert torch.equal(xs[0].grad, torch.full((4, 3), 2.0))


def assert_conv_equals_twin(layer, pl, ref, x):
    """The sharded conv, loaded with the twin's weights, gives the twin's output and input gradient."""
    layer.load_full({k: v.detach() for k, v in ref.state_dict().items()})
    x = x.requires_grad_(True)
    y = cat(layer(shard(x, pl)))
    assert_close(y, ref(x))
    g, = torch.autograd.grad(y.square().sum(), x)
    g_ref, = torch.autograd.grad(ref(x).square().sum(), x)
    assert_close(g, g_ref)


def test_split_formulation_equals_grouped_conv_forward_and_backward():
    pl = LocalPlacement(4, ["cpu", "cpu"])
    layer = GroupConv2d(pl, 8, 12, 3, padding=1, exchange="own")
    layer.formulation = "split"
    assert_conv_equals_twin(layer, pl, nn.Conv2d(8, 12, 3, padding=1, groups=4), torch.randn(2, 8, 5, 5))


def test_conv_formulation_tuner_decides_each_grouped_layer_and_caches():
    from parallel.tuning import choose_conv_formulations
    pl = LocalPlacement(4, ["cpu"])
    net = nn.Sequential(GroupConv2d(pl, 3, 8, 3, exchange="replicated", name="a"),
                        GroupConv2d(pl, 8, 8, 3, exchange="own", name="b"))
    x = torch.randn(2, 3, 9, 9)
    expected = net(x)
    cache = {}
    records = choose_conv_formulations(net, lambda: net(x), cache, repeats=1)
    assert [r["layer"] for r in records] == ["b"]  # the replicated layer has one dense conv per slot: nothing to choose
    assert records[0]["choice"] in ("grouped", "split") and set(records[0]["ms"]) == {"grouped", "split"}
    assert net[1].formulation == records[0]["choice"] and not records[0]["cached"]
    assert choose_conv_formulations(net, lambda: net(x), cache)[0]["cached"]
    assert_close(net(x).parts[0], expected.parts[0])


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]])
def test_conv_with_tuple_geometry_dilation_and_no_bias_equals_torch(devices):
    pl = LocalPlacement(2, devices)
    layer = GroupConv2d(pl, 4, 6, (3, 1), stride=(2, 1), padding=(2, 0), dilation=(2, 1), bias=False,
                        exchange="own")
    ref = nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(2, 0), dilation=(2, 1), groups=2, bias=False)
    assert_conv_equals_twin(layer, pl, ref, torch.randn(2, 4, 7, 5))
    assert set(layer.to_full()) == {"weight"} and torch.equal(layer.to_full()["weight"], ref.weight.detach())


def test_linear_without_bias_and_full_state_round_trip():
    from parallel import full_state_dict, load_full_state_dict
    pl = LocalPlacement(4, ["cpu", "cpu"])
    with pytest.raises(ValueError, match="10 input channels do not divide"):
        GroupLinear(pl, 10, 8, exchange="own")
    # an own-mode layer needs in_features divisible by G: 8 -> 8 over 4 groups
    net = nn.Sequential(GroupLinear(pl, 6, 8, exchange="replicated", bias=False),
                        GroupLinear(pl, 8, 8, exchange="own"))
    full = {"0.weight": torch.randn(8, 6), "1.weight": torch.randn(8, 2), "1.bias": torch.randn(8)}
    load_full_state_dict(net, full)
    back = full_state_dict(net)
    assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)
    x = torch.randn(3, 6)
    h = x @ full["0.weight"].T
    blocks = [h[:, 2 * g:2 * g + 2] @ full["1.weight"][2 * g:2 * g + 2].T for g in range(4)]
    expected = torch.cat(blocks, 1) + full["1.bias"]
    y = cat(net[1](net[0](x)))
    assert_close(y, expected)


def test_per_group_refuses_modules_with_state_or_shared_statistics():
    pl = LocalPlacement(2, ["cpu"])
    with pytest.raises(ValueError, match="parameters or running statistics"):
        PerGroup(pl, nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="share statistics across groups"):
        PerGroup(pl, nn.BatchNorm2d(4, affine=False, track_running_stats=False))
    bn = PerGroup(pl, nn.BatchNorm2d(8, affine=False, track_running_stats=False), channel_wise=True)
    x = torch.randn(4, 8, 3, 3)
    assert_close(bn(shard(x, pl)).parts[0], nn.functional.batch_norm(x, None, None, training=True))


def test_placements_and_runtimes_fulfil_their_contracts():
    """Every implementation has each contract member, methods with the contract's parameters (names
    and order), properties as properties: a renamed argument or a method turned attribute fails."""
    import inspect

    from parallel import GroupPlacement, LocalRuntime, Runtime
    from parallel.distributed import DistributedPlacement
    from parallel.hybrid import HybridRuntime
    from parallel.runtime import DistributedRuntime
    assert isinstance(LocalPlacement(2, ["cpu", "cpu"]), GroupPlacement) and isinstance(LocalRuntime(), Runtime)
    implementations = {GroupPlacement: (LocalPlacement, DistributedPlacement),
                       Runtime: (LocalRuntime, DistributedRuntime, HybridRuntime)}
    for contract, classes in implementations.items():
        for cls in classes:
            for name, member in vars(contract).items():
                if name.startswith("_"):
                    continue
                own = inspect.getattr_static(cls, name, None)
                assert own is not None, (cls.__name__, name)
                if isinstance(member, property):
                    assert isinstance(own, property), (cls.__name__, name, "should be a property")
                elif callable(member):
                    want = list(inspect.signature(member).parameters)
                    got = list(inspect.signature(own).parameters)[:len(want)]
                    assert got == want, (cls.__name__, name, got, want)
    # a placement is not a runtime: the training loop's members live on the runtime only
    assert not hasattr(LocalPlacement(2, ["cpu"]), "sync_gradients") and not hasattr(DistributedPlacement, "barrier")
