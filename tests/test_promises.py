"""parallel/ keeps its promises to a loop written on it (not train.py's): dropout that draws anew every
step by itself and resumes its stream, strict portable loading, the nn modules' arguments, renamed
arguments that warn, and one line for a model moved off its placement's devices."""
import inspect
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import dist_worker
from parallel import (GroupBatchNorm2d, GroupConv2d, GroupDropout, GroupLinear, LocalPlacement, PlacementError,
                      StateDictError, full_state_dict, load_full_state_dict, shard)
from parallel.dropout import set_draws, step_key

ROWS, WIDTH = 12, 16


def masks_of(placement, steps=3, rows=ROWS):
    """A plain loop: GroupDropout on ones, no set_draws; the full mask of every step."""
    torch.manual_seed(3)
    drop = GroupDropout(placement, 0.5, name="drop")
    drop.train()
    return [torch.cat(drop(shard(torch.ones(rows, WIDTH), placement)).parts, 1) for _ in range(steps)]


def test_dropout_draws_a_new_mask_every_forward_by_itself():
    a, b, c = masks_of(LocalPlacement(1, ["cpu"]))
    assert not torch.equal(a, b) and not torch.equal(b, c)
    assert 0.3 < (a > 0).float().mean() < 0.7


def test_dropout_without_set_draws_is_the_same_on_one_and_two_slots():
    one = masks_of(LocalPlacement(1, ["cpu"]))
    for G, devices in ((2, ["cpu", "cpu"]), (4, ["cpu", "cpu"])):
        for a, b in zip(one, masks_of(LocalPlacement(G, devices))):
            assert torch.equal(a, b)


def test_dropout_step_key_on_tensors_equals_the_int_key():
    for seed, step in ((0, 0), (7, 12345), (2 ** 31 + 5, 2 ** 33 + 9)):
        assert step_key(torch.tensor(seed), torch.tensor(step)).item() == step_key(seed, step)


def test_a_changed_p_takes_effect():
    placement = LocalPlacement(1, ["cpu"])
    drop = GroupDropout(placement, 0.5)
    drop.p = 0.9
    set_draws([drop], 0, 0)
    kept = (drop(shard(torch.ones(64, 256), placement)).parts[0] > 0).float().mean().item()
    assert 0.07 < kept < 0.13, kept
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop.p = 1.0


def test_a_resumed_loop_continues_the_mask_stream():
    placement = LocalPlacement(2, ["cpu", "cpu"])
    straight = masks_of(placement, steps=4)
    torch.manual_seed(3)
    drop = GroupDropout(placement, 0.5, name="drop")
    x = shard(torch.ones(ROWS, WIDTH), placement)
    first = [torch.cat(drop(x).parts, 1) for _ in range(2)]
    saved = drop.state_dict()
    torch.manual_seed(99)  # another process, another default seed: the state decides
    resumed = GroupDropout(LocalPlacement(2, ["cpu", "cpu"]), 0.5, name="drop")
    resumed.load_state_dict(saved)
    rest = [torch.cat(resumed(x).parts, 1) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first + rest, straight))
    assert resumed.position()[1] == 4


def ranks_masks(rank, world, store, groups, out):
    dist_worker.setup(rank, world, store)
    from parallel.distributed import init_from_env
    placement, runtime = init_from_env(groups, "gloo")
    rows = torch.tensor_split(torch.arange(ROWS), runtime.num_replicas)[runtime.replica]
    cols = torch.tensor_split(torch.arange(WIDTH), placement.num_slots)[placement.local_slots[0].index]
    masks = masks_of(placement, rows=len(rows))
    torch.save({"rows": rows, "cols": cols, "masks": [m for m in masks]}, f"{out}.{rank}")
    dist_worker.finish()


@pytest.mark.parametrize("world,groups", [(2, 2), (2, 1)])
def test_dropout_without_set_draws_is_the_same_on_gloo_ranks(tmp_path, world, groups):
    """Two ranks holding one group each, and two data replicas (rows offset by the placement)."""
    out = str(tmp_path / "m")
    mp.spawn(ranks_masks, args=(world, dist_worker.rendezvous_file(), groups, out), nprocs=world, join=True)
    one = masks_of(LocalPlacement(1, ["cpu"]))
    for rank in range(world):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for step, mask in enumerate(got["masks"]):
            assert torch.equal(mask, one[step][got["rows"]][:, got["cols"]]), (rank, step)


# --- strict portable state ---

def small_model(placement):
    return nn.Sequential(GroupConv2d(placement, 4, 8, 3, padding=1, exchange="replicated", name="a"),
                         GroupConv2d(placement, 8, 8, 3, padding=1, exchange="all", name="b"))


def test_strict_loading_names_every_missing_unexpected_and_misshaped_key():
    placement = LocalPlacement(2, ["cpu", "cpu"])
    model = small_model(placement)
    state = full_state_dict(model)
    bad = dict(state)
    bad["1.wieght"] = bad.pop("1.weight")
    bad["0.weight"] = state["0.weight"].permute(0, 3, 2, 1).contiguous()  # (out, kw, kh, in): right size
    with pytest.raises(StateDictError) as e:
        load_full_state_dict(model, bad)
    text = str(e.value)
    assert "missing keys: 1.weight" in text and "unexpected keys: 1.wieght" in text and "0.weight: shape" in text
    assert "\n" not in text and isinstance(e.value, RuntimeError) and isinstance(e.value, ValueError)
    before = full_state_dict(model)
    extra = dict(state, stale=torch.zeros(1))
    del extra["1.bias"]
    keys = load_full_state_dict(model, extra, strict=False)
    assert keys.missing_keys == ["1.bias"] and keys.unexpected_keys == ["stale"]
    assert torch.equal(full_state_dict(model)["1.weight"], before["1.weight"])
    with pytest.raises(StateDictError, match="0.weight: shape"):  # a wrong shape is refused even then
        load_full_state_dict(model, dict(state, **{"0.weight": bad["0.weight"]}), strict=False)
    assert load_full_state_dict(model, state).missing_keys == []


# --- every argument of the nn module a layer stands for ---

#: the nn arguments a sharded layer takes under another meaning, or refuses (in one line)
OURS = {nn.Conv2d: GroupConv2d, nn.Linear: GroupLinear, nn.BatchNorm2d: GroupBatchNorm2d, nn.Dropout: GroupDropout}


@pytest.mark.parametrize("twin", list(OURS), ids=lambda c: c.__name__)
def test_every_nn_argument_is_accepted_or_refused_by_name(twin):
    ours = inspect.signature(OURS[twin].__init__).parameters
    for name in inspect.signature(twin.__init__).parameters:
        if name != "self":
            assert name in ours, f"{OURS[twin].__name__} has no {name}= ({twin.__name__} has)"


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]])
def test_each_argument_computes_what_the_nn_module_computes(devices):
    G = 2
    placement = LocalPlacement(G, devices)
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    conv_cases = [dict(), dict(stride=2), dict(padding=2), dict(padding="same"), dict(dilation=2), dict(bias=False),
                  dict(padding=1, padding_mode="reflect"), dict(padding=1, padding_mode="circular"),
                  dict(kernel_size=(3, 1), padding=(1, 0))]
    for kw in conv_cases:
        kw = {"kernel_size": 3, **kw}
        ours = GroupConv2d(placement, 8, 4, exchange="own", dtype=torch.float64, **kw)
        twin = nn.Conv2d(8, 4, groups=G, dtype=torch.float64, **kw)
        twin.load_state_dict(ours.to_full())
        check_twins(ours, twin, x, placement, str(kw))
    for bias in (True, False):
        ours = GroupLinear(placement, 8, 6, exchange="all", bias=bias, dtype=torch.float64)
        twin = nn.Linear(8, 6, bias=bias, dtype=torch.float64)
        twin.load_state_dict(ours.to_full())
        check_twins(ours, twin, torch.randn(5, 8, dtype=torch.float64), placement, f"linear bias={bias}")
    bn_cases = [dict(), dict(eps=1e-3), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                dict(bias=False)]
    if "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters:
        bn_cases.pop()
    for kw in bn_cases:
        ours = GroupBatchNorm2d(placement, 8, dtype=torch.float64, **kw)
        twin = nn.BatchNorm2d(8, dtype=torch.float64, **kw)
        with torch.no_grad():
            for p in twin.parameters():
                p.uniform_(0.5, 1.5)
        ours.load_full(twin.state_dict())
        check_twins(ours, twin, x, placement, f"bn {kw}")
        if twin.track_running_stats:
            for key, value in ours.to_full().items():
                torch.testing.assert_close(value, twin.state_dict()[key])
    drop = GroupDropout(placement, 0.0, inplace=True)
    assert torch.equal(torch.cat(drop(shard(x, placement)).parts, 1), nn.Dropout(0.0, inplace=True)(x.clone()))


def check_twins(ours, twin, x, placement, what):
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo = torch.cat(ours(shard(xo, placement)).parts, 1)
    yt = twin(xt)
    torch.testing.assert_close(yo, yt, msg=what)
    g = torch.randn_like(yt)
    yo.backward(g)
    yt.backward(g)
    torch.testing.assert_close(xo.grad, xt.grad, msg=what)
    mine = ours.to_full(lambda p: p.grad) if any(True for _ in ours.parameters()) else {}
    for key, value in mine.items():
        if key in dict(twin.named_parameters()):
            torch.testing.assert_close(value, dict(twin.named_parameters())[key].grad, msg=f"{what}: {key}")


@pytest.mark.parametrize("make", [lambda p: GroupConv2d(p, 4, 4, 3, device="cpu"),
                                  lambda p: GroupLinear(p, 4, 4, device="cpu"),
                                  lambda p: GroupBatchNorm2d(p, 4, device="cpu")])
def test_device_argument_is_refused_in_one_line(make):
    with pytest.raises(ValueError, match="device='cpu' is not accepted") as e:
        make(LocalPlacement(2, ["cpu"]))
    assert "\n" not in str(e.value)


def test_renamed_input_mode_still_works_with_a_warning():
    placement = LocalPlacement(2, ["cpu"])
    with pytest.warns(DeprecationWarning, match="input_mode= is renamed exchange="):
        conv = GroupConv2d(placement, 4, 4, 3, input_mode="all")
    with pytest.warns(DeprecationWarning, match="input_mode= is renamed exchange="):
        fc = GroupLinear(placement, 4, 4, input_mode="own")
    assert conv.exchange == "all" and fc.exchange == "own"
    from data.sampler import KeyedBatchSampler, ReplicaBatchSampler
    sampler = ReplicaBatchSampler(10, 4, shuffle=True, seed=1)
    with pytest.warns(DeprecationWarning, match="keyed=True"):
        keyed = KeyedBatchSampler(sampler)
    assert list(keyed) == list(ReplicaBatchSampler(10, 4, shuffle=True, seed=1, keyed=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GroupConv2d(placement, 4, 4, 3, exchange="all")  # today's spelling: no warning


def test_version_and_changelog(root):
    import parallel
    assert parallel.__version__ == "0.3.0"
    with open(os.path.join(root, "pyproject.toml")) as f:
        assert f'version = "{parallel.__version__}"' in f.read()
    with open(os.path.join(root, "CHANGELOG.md")) as f:
        text = f.read()
    assert f"## [{parallel.__version__}]" in text and "input_mode=" in text and "### Deprecated" in text


def test_a_model_moved_off_its_devices_fails_in_one_line():
    placement = LocalPlacement(2, ["cpu", "cpu"])
    model = small_model(placement)
    model.to("meta")  # stands in for .cuda() on a placement of CPU slots
    with pytest.raises(PlacementError) as e:
        model(torch.randn(1, 4, 5, 5))
    text = str(e.value)
    assert "a: slot 0's weights are on meta but the placement puts that slot on cpu" in text and "\n" not in text
