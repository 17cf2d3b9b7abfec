"""parallel.convert: a torchvision CNN split over slots or ranks computes exactly what the original computes."""
import os

import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from torch import nn

import dist_worker
from parallel import LocalPlacement, full_state_dict, load_full_state_dict
from parallel.convert import ConversionError, convert

#: (torchvision constructor, input size): small inputs keep float64 CPU work short
NETWORKS = [("alexnet", 64), ("vgg11_bn", 32), ("resnet18", 32), ("resnext50_32x4d", 32)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def no_dropout(model: nn.Module) -> None:
    """Dropout off (torch's masks are drawn by a generator; GroupDropout's by position), so train mode compares."""
    for m in model.modules():
        if hasattr(m, "p") and isinstance(getattr(m, "p"), float):
            m.p = 0.0


def weights_held(model: nn.Module) -> int:
    """Conv and linear weights (and any other parameter of 2 or more dimensions) in this process."""
    return sum(p.numel() for p in model.parameters() if p.dim() > 1)


@pytest.mark.parametrize("name,size", NETWORKS)
@pytest.mark.parametrize("slots", [1, 2])
def test_converted_torchvision_equals_the_original_forward_and_backward(name, size, slots):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).double()
    converted = convert(model, LocalPlacement(slots, ["cpu"] * slots))
    full = full_state_dict(converted)
    assert list(full) == list(model.state_dict())  # key for key, in order
    for key, value in model.state_dict().items():
        assert torch.equal(full[key], value), key  # the weights are the original's
    no_dropout(model)
    no_dropout(converted)
    for mode in ("eval", "train"):
        model.train(mode == "train")
        converted.train(mode == "train")
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(4, 3, size, size, dtype=torch.float64, generator=gen, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        y, y2 = model(x), converted(x2)
        assert relative_error(y2, y) <= 1e-10, mode
        y.square().sum().backward()
        y2.square().sum().backward()
        assert relative_error(x2.grad, x.grad) <= 1e-10, mode
        grads = full_state_dict(converted, lambda p: p.grad)
        # a conv bias before train-mode batch norm has gradient 0 in exact arithmetic (the norm removes the
        # mean): both sides hold rounding noise there, so errors are also measured against the largest gradient
        scale = max(p.grad.abs().max().item() for p in model.parameters())
        for key, p in model.named_parameters():
            err = (grads[key] - p.grad).abs().max().item()
            assert err <= 1e-10 * max(p.grad.abs().max().item(), 1e-3 * scale), (mode, key, err)
        model.zero_grad()
        converted.zero_grad()
    if slots == 2:  # each slot holds at most half of every conv and linear weight (nothing is replicated but 1-D)
        halves = [sum(w.numel() for m in converted.modules() if hasattr(m, "weights") for w in m.weights[s:s + 1])
                  for s in range(2)]
        assert max(halves) <= weights_held(model) / 2 + 1
    # the converted model's full state loads back (here: the original's, after the train-mode statistics moved)
    load_full_state_dict(converted, model.state_dict())
    full = full_state_dict(converted)
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("names,world", [(("alexnet", "vgg11_bn", "resnet18", "resnext50_32x4d"), 2),
                                         (("resnext50_32x4d",), 4)])
def test_converted_under_gloo_ranks_equals_the_original_and_holds_1_over_k(tmp_path, names, world):
    out = str(tmp_path / "errors.pt")
    sizes = dict(NETWORKS)
    mp.spawn(dist_worker.converted_torchvision,
             args=(world, dist_worker.rendezvous_file(), [(n, sizes[n]) for n in names], out), nprocs=world, join=True)
    errors = torch.load(out, weights_only=True)
    for name in names:
        model = getattr(torchvision.models, name)(num_classes=10)
        # 1/K of every weight's output rows, rounded up where they do not divide (10 classes over 4 ranks: 3, 3, 2, 2)
        share = sum(-(-p.shape[0] // world) * p[0].numel() for p in model.parameters() if p.dim() > 1)
        for mode in ("eval", "train"):
            got = errors[name, mode]
            assert got["y"] <= 1e-10 and got["x_grad"] <= 1e-10 and got["params"] <= 1e-10, (name, mode, got)
            assert got["held"] <= share, (name, got["held"], share)


class Concatenates(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.cat([y, y], dim=1)[:, :4])  # a channel order no rule can undo


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: no static graph
            return self.a(x)
        return x


def test_what_has_no_rule_is_refused_at_conversion_in_one_line_naming_node_op_and_line():
    with pytest.raises(ConversionError) as info:
        convert(Concatenates(), LocalPlacement(2, ["cpu", "cpu"]))
    message = str(info.value)
    assert "\n" not in message and "node cat" in message and "call_function cat" in message
    assert f"{os.path.basename(__file__)}:" in message  # the source line of the offending op
    with pytest.raises(ConversionError, match="cannot be traced by torch.fx") as info:
        convert(Branches(), LocalPlacement(2, ["cpu", "cpu"]))
    assert "\n" not in str(info.value)
    with pytest.raises(ConversionError, match="not a multiple of the placement's 4 slots"):
        convert(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2)), LocalPlacement(4, ["cpu"] * 4))
    with pytest.raises(ConversionError, match="not conv or linear layers of the model: nope"):
        convert(nn.Sequential(nn.Conv2d(3, 8, 1)), LocalPlacement(2, ["cpu"] * 2), exchange={"nope": "all"})


def test_a_converted_resnet_compiles_into_one_graph():
    import torch._dynamo as dynamo
    dynamo.reset()
    model = torchvision.models.resnet18(num_classes=10).eval()
    converted = convert(model, LocalPlacement(2, ["cpu", "cpu"])).eval()
    x = torch.randn(2, 3, 32, 32)
    explained = dynamo.explain(converted)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
