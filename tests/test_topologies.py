"""Beyond a fixed exchange: channel shuffle and per-layer group counts, against plain-torch references."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import dist_worker
from alexnet.init import init_reference_state
from alexnet.model import GroupAlexNet
from alexnet.reference import ChannelShuffle, ReferenceAlexNet
from alexnet.spec import PAPER_EXCHANGE, SpecError
from conftest import assert_close, tiny_spec
from parallel import (CommCounter, GroupConv2d, LocalPlacement, PlacementError, Sharded, full_state_dict,
                      load_full_state_dict, shard)

# widths whose conv2 output (conv3's input) divides by 4 x 4, so conv3 can shuffle over 4 groups
SHUFFLE = dict(groups=4, conv_channels=[12, 32, 36, 36, 24], exchange={**PAPER_EXCHANGE, "conv3": "shuffle"})
ROOT = dict(groups=[2, 4, 4, 2, 2], exchange={**PAPER_EXCHANGE, "conv3": "own"})


def leaves(x, placement, groups=None):
    s = shard(x, placement, groups)
    return Sharded(tuple(p.clone().requires_grad_() for p in s.parts), s.group_sizes)


@pytest.mark.parametrize("G, devices", [(4, ["cpu"]), (4, ["cpu", "cpu"]), (4, ["cpu"] * 4), (2, ["cpu", "cpu"]),
                                        (3, ["cpu"] * 3)])
def test_shuffle_conv_equals_permutation_then_grouped_conv(G, devices):
    counter = CommCounter()
    pl = LocalPlacement(G, devices, counter=counter)
    C = 2 * G * G
    layer = GroupConv2d(pl, C, 2 * G, 3, padding=1, exchange="shuffle", name="s")
    ref = nn.Sequential(ChannelShuffle(G), nn.Conv2d(C, 2 * G, 3, padding=1, groups=G))
    layer.load_full({k.split(".", 1)[1]: v for k, v in ref.state_dict().items()})
    x = torch.randn(3, C, 5, 5, requires_grad=True)
    xs = leaves(x.detach(), pl)
    y = torch.cat(layer(xs).parts, 1)
    assert_close(y, ref(x))
    g = torch.randn_like(y)
    y.backward(g)
    ref(x).backward(g)
    assert_close(torch.cat([p.grad for p in xs.parts], 1), x.grad)
    # (G - 1) / G of the maps move once each way, whatever the slots
    assert counter.snapshot() == {"s/fwd": x.numel() * 4 * (G - 1) // G, "s/bwd": x.numel() * 4 * (G - 1) // G}


def test_channel_shuffle_sends_each_group_one_slice_of_every_group():
    # G = 2, 4 maps per group: group g receives maps [2g, 2g+2) of each group
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert ChannelShuffle(2)(x).flatten().tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]])
def test_layers_with_different_group_counts_chain_like_torch(devices):
    """4 groups, then 2, then 4 again over 2 slots: each slot reads only the maps it holds."""
    pl = LocalPlacement(2, devices)
    layers = [GroupConv2d(pl, 8, 8, 3, padding=1, exchange="own", name=f"c{i}", groups=g)
              for i, g in enumerate((4, 2, 4))]
    refs = [nn.Conv2d(8, 8, 3, padding=1, groups=g) for g in (4, 2, 4)]
    for layer, ref in zip(layers, refs):
        layer.load_full(ref.state_dict())
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    xs = leaves(x.detach(), pl, 4)
    y, expected = xs, x
    for layer, ref in zip(layers, refs):
        y, expected = layer(y), ref(expected)
    assert y.group_sizes == (2, 2, 2, 2)
    assert_close(torch.cat(y.parts, 1), expected)
    torch.cat(y.parts, 1).square().sum().backward()
    expected.square().sum().backward()
    assert_close(torch.cat([p.grad for p in xs.parts], 1), x.grad)
    for layer, ref in zip(layers, refs):
        assert_close(layer.to_full(lambda p: p.grad)["weight"], ref.weight.grad)


def test_group_count_that_does_not_fit_the_slots_is_refused():
    pl = LocalPlacement(2, ["cpu", "cpu"])
    with pytest.raises(PlacementError, match=r"c: 3 groups cannot be dealt evenly to 2 slots; use a multiple of 2"):
        GroupConv2d(pl, 6, 6, 3, exchange="own", name="c", groups=3)
    with pytest.raises(PlacementError, match="conv4: 1 groups cannot be dealt evenly to 2 slots"):
        GroupAlexNet(tiny_spec([2, 2, 2, 1, 2]), LocalPlacement(2, ["cpu", "cpu"]))


def test_spec_checks_shuffle_and_per_layer_widths():
    with pytest.raises(SpecError, match="conv3: a channel shuffle over 4 groups needs input channels divisible by 16"):
        tiny_spec(4, exchange={"conv3": "shuffle"})  # conv2 has 24 maps
    with pytest.raises(SpecError, match="model.exchange.fc6: shuffle is for conv2..conv5"):
        tiny_spec(2, exchange={"fc6": "shuffle"})
    with pytest.raises(SpecError, match="model.exchange.conv3: 'gather' is not one of"):
        tiny_spec(2, exchange={"conv3": "gather"})
    with pytest.raises(SpecError, match=r"model.groups must be one number or 5"):
        tiny_spec([2, 4])
    assert tiny_spec([2, 4, 4, 2, 2]).slot_groups == 2 and tiny_spec([2, 4, 4, 2, 2]).label == "2-4-4-2-2"


def pair(spec, devices):
    state = init_reference_state(spec, 0)
    ref = ReferenceAlexNet(spec)
    ref.load_state_dict(state)
    model = GroupAlexNet(spec, LocalPlacement(spec.slot_groups, devices))
    load_full_state_dict(model, state)
    return ref, model


@pytest.mark.parametrize("kw", [SHUFFLE, ROOT], ids=["shuffle", "root"])
@pytest.mark.parametrize("slots", [1, 2])
def test_alexnet_topologies_match_reference(kw, slots):
    spec = tiny_spec(**kw)
    ref, model = pair(spec, ["cpu"] * slots)
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    logits = model(x)
    assert_close(logits, ref(x))
    F.cross_entropy(logits, y).backward()
    F.cross_entropy(ref(x), y).backward()
    grads = full_state_dict(model, lambda p: p.grad)
    for key, p in ref.named_parameters():
        assert_close(grads[key], p.grad, msg=lambda m: f"{key}: {m}")
    counted = model.placement.counter.snapshot()
    for name, nbytes in spec.cross_group_bytes(4).items():
        assert counted[f"{name}/fwd"] == counted[f"{name}/bwd"] == nbytes


def test_shuffle_moves_g_times_less_than_an_all_gather():
    gathered = tiny_spec(4, conv_channels=[12, 32, 36, 36, 24]).cross_group_bytes(1)["conv3"]
    shuffled = tiny_spec(**SHUFFLE).cross_group_bytes(1)["conv3"]
    assert gathered == 4 * shuffled  # (G - 1) x the maps against (G - 1) / G of them


@pytest.mark.parametrize("kw, world", [(SHUFFLE, 2), (SHUFFLE, 4), (ROOT, 2)], ids=["shuffle-2", "shuffle-4", "root-2"])
def test_topologies_under_gloo_match_reference(kw, world, tmp_path):
    out = str(tmp_path / "got.pt")
    mp.spawn(dist_worker.topology_equivalence, args=(world, dist_worker.rendezvous_file(), kw, out), nprocs=world, join=True)
    got = torch.load(out, weights_only=True)
    assert got["slots"] == world
    spec = tiny_spec(**kw)
    ref, local = pair(spec, ["cpu"])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 32, 32, generator=gen)
    y = torch.randint(0, 10, (4,), generator=gen)
    logits = ref(x)
    assert_close(got["logits"], logits)
    F.cross_entropy(logits, y).backward()
    for key, p in ref.named_parameters():
        assert_close(got["grads"][key], p.grad, msg=lambda m: f"{key}: {m}")
    F.cross_entropy(local(x), y).backward()
    assert got["counted"] == local.placement.counter.snapshot()  # one counting rule for both placements


@pytest.mark.parametrize("groups, world, batch", [(2, 2, 6), (4, 2, 5), (1, 4, 7)])
def test_hybrid_placement_matches_one_process(groups, world, batch, tmp_path):
    """Convs data-parallel, fc layers split over the ranks: the single-device network's logits and gradients
    on the same global batch (slices of unequal size included: 5 over 2 ranks, 7 over 4)."""
    out = str(tmp_path / "got.pt")
    mp.spawn(dist_worker.hybrid_equivalence, args=(world, dist_worker.rendezvous_file(), groups, batch, out), nprocs=world, join=True)
    got = torch.load(out, weights_only=True)
    spec = tiny_spec(groups)
    ref = ReferenceAlexNet(spec)
    ref.load_state_dict(init_reference_state(spec, 0))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    logits = ref(x)
    assert_close(got["logits"], logits)
    F.cross_entropy(logits, y).backward()
    for key, p in ref.named_parameters():
        assert_close(got["grads"][key], p.grad, msg=lambda m: f"{key}: {m}")
    assert got["counted"]["fc6_rows/fwd"] > 0 and got["counted"]["logits/fwd"] > 0
    assert got["control_ok"]  # row counts and stop votes over a CPU control group agree with the default group
    assert got["row_count_gathers"] == 0  # planned by the sampler: no collective, no host read per step


def test_exchange_benchmark_reports_the_three_variants():
    """The benchmark runs (gloo, 2 processes, a tiny batch); its byte column follows the counting rule."""
    import exchange_benchmark
    rows = {r["variant"]: r for r in exchange_benchmark.run([2], "fashion_mnist", 8, 1, 1, "cpu")}
    assert set(rows) == {"all-gather", "shuffle", "hybrid"}
    assert all(r["step_ms"] > 0 and r["comm_ms"] > 0 for r in rows.values())
    conv3 = {name: rows[name]["bytes_by_layer"].get("conv3/fwd", 0) for name in ("all-gather", "shuffle")}
    assert conv3["shuffle"] * 2 == conv3["all-gather"]  # G = 2: (G-1)/G of the maps against (G-1) times them
    assert rows["hybrid"]["bytes_by_layer"]["fc6_rows/fwd"] > 0
    # train.py's hybrid, whose conv groups share each rank's device: their exchange is not process traffic
    assert "conv3/fwd" not in rows["hybrid"]["bytes_by_layer"] and "fc7/fwd" in rows["hybrid"]["bytes_by_layer"]


@pytest.mark.parametrize("placement", ["hybrid", "distributed"])
def test_process_placements_without_torchrun_are_one_clear_error(placement, monkeypatch):
    from alexnet.build import placement_from_config
    from alexnet.config import load
    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    cfg = load("configs/smoke.yaml", [f"parallel.placement={placement}"])
    with pytest.raises(PlacementError, match=f"parallel.placement={placement} runs one process per rank: launch it "
                                             "with torchrun"):
        placement_from_config(cfg)


def test_data_replicas_with_unequal_slices_average_by_rows(tmp_path):
    """4 ranks = 2 replicas x G = 2 on a batch of 7 (4 + 3 rows): the synced gradient is the full batch's."""
    out = str(tmp_path / "got.pt")
    mp.spawn(dist_worker.replicas_uneven, args=(4, dist_worker.rendezvous_file(), 2, 7, out), nprocs=4, join=True)
    got = torch.load(out, weights_only=True)
    spec = tiny_spec(2)
    ref = ReferenceAlexNet(spec)
    ref.load_state_dict(init_reference_state(spec, 0))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 1, 32, 32, generator=gen)
    y = torch.randint(0, 10, (7,), generator=gen)
    F.cross_entropy(ref(x), y).backward()
    for key, p in ref.named_parameters():
        assert_close(got["grads"][key], p.grad, msg=lambda m: f"{key}: {m}")
