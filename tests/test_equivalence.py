"""The model-parallel AlexNet computes exactly what the grouped-convolution reference computes."""
import pytest
import torch
import torch.nn.functional as F

from alexnet.init import init_reference_state
from alexnet.model import GroupAlexNet
from alexnet.reference import ReferenceAlexNet
from alexnet.spec import PAPER_EXCHANGE
from conftest import assert_close, tiny_spec
from parallel import LocalPlacement, full_state_dict, load_full_state_dict

def build_pair(spec, devices, seed=0):
    ref = ReferenceAlexNet(spec)
    state = init_reference_state(spec, seed)
    ref.load_state_dict(state)
    model = GroupAlexNet(spec, LocalPlacement(spec.slot_groups, devices))
    load_full_state_dict(model, state)
    return ref, model


@pytest.mark.parametrize("G", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["slot_per_group", "one_slot"])
def test_logits_and_gradients_match_reference(G, layout):
    spec = tiny_spec(G)
    devices = ["cpu"] * G if layout == "slot_per_group" else ["cpu"]
    ref, model = build_pair(spec, devices)
    x = torch.randn(6, 1, 32, 32)
    y = torch.randint(0, 10, (6,))
    ref_logits, logits = ref(x), model(x)
    assert_close(logits, ref_logits)
    F.cross_entropy(ref_logits, y).backward()
    F.cross_entropy(logits, y).backward()
    grads = full_state_dict(model, lambda p: p.grad)
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    for key in grads:
        assert_close(grads[key], ref_grads[key], msg=lambda m: f"{key}: {m}")


def test_two_groups_per_slot_match_reference():
    """G = 4 over 2 slots: each slot computes its two groups in one grouped call."""
    spec = tiny_spec(4, exchange={**PAPER_EXCHANGE, "fc6": "own"})  # fc6 block-diagonal: batched matmul path
    ref, model = build_pair(spec, ["cpu", "cpu"])
    assert [list(s.groups) for s in model.placement.slots] == [[0, 1], [2, 3]]
    x = torch.randn(3, 1, 32, 32)
    assert_close(model(x), ref(x))
    y = torch.randint(0, 10, (3,))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    grads = full_state_dict(model, lambda p: p.grad)
    for key, p in ref.named_parameters():
        assert_close(grads[key], p.grad)


@pytest.mark.parametrize("G", [1, 2, 3, 4])
def test_weight_mapping_round_trips_exactly(G):
    spec = tiny_spec(G)
    state = init_reference_state(spec, 3)
    for devices in (["cpu"] * G, ["cpu"]):
        model = GroupAlexNet(spec, LocalPlacement(G, devices))
        load_full_state_dict(model, state)
        back = full_state_dict(model)
        assert back.keys() == state.keys()
        for key in state:
            assert torch.equal(back[key], state[key]), key
        # and shards -> reference -> shards
        other = GroupAlexNet(spec, LocalPlacement(G, devices))
        load_full_state_dict(other, back)
        for p, q in zip(model.parameters(), other.parameters()):
            assert torch.equal(p, q)


def test_modules_and_full_state_are_named_as_the_reference():
    """GroupAlexNet's layers carry the reference's names, so parallel.full_state_dict is the reference's
    state_dict (keys and shapes, block-diagonal fc layers included) and loads into it strictly."""
    spec = tiny_spec(4, conv_channels=[12, 32, 36, 36, 24], exchange={"conv3": "shuffle", "fc7": "all", "fc8": "all"})
    ref, model = build_pair(spec, ["cpu", "cpu"])
    fused = ("shuffle3", "flatten")  # the shuffle is GroupConv2d's exchange, the flatten GroupLinear's
    assert [n for n, _ in model.named_children()] == [n for n, _ in ref.named_children() if n not in fused]
    full = full_state_dict(model)
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert full["fc6.weight"].shape == (48, 24 * 3 * 3 // 4)  # pool5: 24 maps of 3 x 3; fc6 reads its group's
    other = ReferenceAlexNet(spec)
    other.load_state_dict(full)  # strict
    x = torch.randn(2, 1, 32, 32)
    assert_close(other(x), ref(x))


def test_mapping_rejects_another_group_count():
    state = init_reference_state(tiny_spec(2), 0)
    model = GroupAlexNet(tiny_spec(4), LocalPlacement(4, ["cpu"]))
    with pytest.raises(ValueError, match="conv2.weight"):
        load_full_state_dict(model, state)


def test_paper_counters():
    from alexnet.spec import AlexNetSpec
    expected = {1: (62_378_344, 1_135_256_096), 2: (60_965_224, 724_406_816), 4: (60_258_664, 518_982_176)}
    for G, (params, macs) in expected.items():
        spec = AlexNetSpec(groups=G)
        assert (spec.params(), spec.macs()) == (params, macs)


def test_counted_params_equal_real_params():
    for G in (1, 2, 3, 4):
        spec = tiny_spec(G)
        assert spec.params() == sum(p.numel() for p in ReferenceAlexNet(spec).parameters())
        model = GroupAlexNet(spec, LocalPlacement(G, ["cpu"] * G))
        assert spec.params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("G", [2, 4])
def test_cross_group_bytes_follow_design_formula(G):
    spec = tiny_spec(G)
    _, model = build_pair(spec, ["cpu"] * G)
    n = 5
    model(torch.randn(n, 1, 32, 32)).sum().backward()
    counted = model.placement.counter.snapshot()
    for name, nbytes in spec.cross_group_bytes(n).items():
        assert counted[f"{name}/fwd"] == nbytes
        assert counted[f"{name}/bwd"] == nbytes
