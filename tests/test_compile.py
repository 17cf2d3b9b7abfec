"""train.compile: the local placement's model compiles into one graph, equals eager, and does not recompile."""
import torch
import torch._dynamo as dynamo

from alexnet.init import init_reference_state
from alexnet.model import GroupAlexNet
from alexnet.spec import PAPER_EXCHANGE
from conftest import assert_close, tiny_spec
from parallel import LocalPlacement, load_full_state_dict


def _model(G, devices, **spec_kw):
    spec = tiny_spec(G, **spec_kw)
    model = GroupAlexNet(spec, LocalPlacement(spec.slot_groups, devices))
    load_full_state_dict(model, init_reference_state(spec, 0))
    return model


SHUFFLE = dict(conv_channels=[12, 32, 36, 36, 24], exchange={**PAPER_EXCHANGE, "conv3": "shuffle"})


def test_no_graph_breaks_on_one_and_several_slots():
    for G, devices, kw in ((1, ["cpu"], {}), (2, ["cpu"], {}), (4, ["cpu", "cpu"], {}), (4, ["cpu", "cpu"], SHUFFLE),
                           ([2, 4, 4, 2, 2], ["cpu"], {"exchange": {**PAPER_EXCHANGE, "conv3": "own"}})):
        dynamo.reset()
        explained = dynamo.explain(_model(G, devices, **kw))(torch.randn(3, 1, 32, 32))
        assert explained.graph_break_count == 0, (G, devices, kw, explained.break_reasons)
        assert explained.graph_count == 1


def test_compiled_equals_eager_forward_backward_and_counts_bytes_without_recompiling():
    dynamo.reset()
    model = _model(2, ["cpu"])
    compiled = torch.compile(model)
    x = torch.randn(4, 1, 32, 32)
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    expected = model(x)
    expected.square().sum().backward()
    assert_close(y, expected)
    for got, p in zip(grads, model.parameters()):
        assert_close(got, p.grad)
    eager_bytes = model.placement.counter.snapshot()
    # later steps run the same graph: no recompilation, and the byte counter is still recorded
    with dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            model.placement.counter.reset()
            compiled(x).sum().backward()
            assert model.placement.counter.snapshot() == eager_bytes


def test_cuda_speed_settings_run_on_cpu_tensors(monkeypatch):
    """accel.prepare's CUDA branch (NHWC weights, conv formulation timing), driven on the CPU."""
    from alexnet import accel
    from alexnet.config import load
    monkeypatch.setattr(accel, "on_cuda", lambda placement: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored afterwards
    cfg = load("configs/smoke.yaml", ["model.groups=4", "model.conv_channels=[12,24,36,36,24]",
                                      "model.fc_widths=[48,48]", "train.conv_formulation=auto",
                                      "train.channels_last=true"])
    model = _model(4, ["cpu"])
    model.eval()
    x = torch.randn(3, 1, 32, 32)
    expected = model(x)
    said = []
    runner, choices = accel.prepare(model, cfg, model.placement, (3, 1, 32, 32), say=said.append)
    assert runner is model and choices["channels_last"] and torch.backends.cudnn.benchmark
    conv2 = model.conv2
    assert conv2.weights[0].is_contiguous(memory_format=torch.channels_last)
    assert [line.split(":")[0] for line in said] == ["conv2", "conv4", "conv5"]
    assert conv2.formulation in ("grouped", "split") and conv2.formulation in said[0]
    assert_close(model(x.contiguous(memory_format=torch.channels_last)), expected)


def test_dropout_compiles_into_the_graph_equals_eager_and_new_steps_do_not_recompile():
    """GroupDropout's step and row offset are tensors: a new step draws new masks in the same graph."""
    from parallel.dropout import dropout_layers, set_draws
    dynamo.reset()
    model = _model(2, ["cpu", "cpu"], dropout=0.5)
    drops = dropout_layers(model)
    assert len(drops) == 2
    x = torch.randn(4, 1, 32, 32)
    set_draws(drops, 0, 0)
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    dynamo.reset()
    compiled = torch.compile(model)
    outputs = []
    for step in range(3):
        set_draws(drops, 0, step, 4 * step)
        with dynamo.config.patch(error_on_recompile=step > 0):
            y = compiled(x)
        set_draws(drops, 0, step, 4 * step)
        assert_close(y, model(x))  # the same masks as eager
        outputs.append(y)
    assert not torch.equal(outputs[0], outputs[1])
