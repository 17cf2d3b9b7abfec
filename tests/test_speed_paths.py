"""The GPU speed paths that CPU can check: the streams formulation, its hand-over order, compile modes,
CUDA graph recording counts and the MFU arithmetic (their speed is measured only on a GPU)."""
import contextlib

import pytest
import torch
from torch import nn

from conftest import assert_close
from parallel import GroupConv2d, LocalPlacement, shard


def test_an_unknown_formulation_is_refused_by_name():
    layer = GroupConv2d(LocalPlacement(2, ["cpu"]), 4, 4, 1, name="c")
    with pytest.raises(ValueError, match="c: formulation must be one of"):
        layer.formulation = "fast"
    assert layer.formulation == "grouped"


def test_side_streams_are_made_once_per_device_and_reused(monkeypatch):
    """SideStreams on a (faked) CUDA device: k streams on first use, the same ones after, more only when asked."""
    from parallel.streams import SideStreams
    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: made.append(device) or f"stream{len(made)}")
    streams = SideStreams()
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert streams.get(cuda0, 2) == ["stream1", "stream2"] and streams.get(cuda0, 2) == ["stream1", "stream2"]
    assert streams.get(cuda0, 3) == ["stream1", "stream2", "stream3"] and streams.get(cuda0, 1) == ["stream1"]
    assert streams.get(cuda1, 1) == ["stream4"] and made == [cuda0] * 3 + [cuda1]
    assert streams.get(torch.device("cpu"), 4) is None


class FakeStream:
    """Records what run_on_streams asks of a stream."""

    def __init__(self, name, said):
        self.name, self.said = name, said

    def wait_stream(self, other):
        self.said.append(f"{self.name} waits {other.name}")


def test_run_on_streams_hands_over_by_waits_in_order_and_records_outputs_on_the_main_stream():
    from parallel.streams import run_on_streams
    said = []
    main = FakeStream("main", said)
    sides = [FakeStream(f"s{g}", said) for g in range(3)]

    @contextlib.contextmanager
    def enter(stream):
        said.append(f"enter {stream.name}")
        yield
        said.append(f"leave {stream.name}")

    class Out:
        def __init__(self, g):
            self.g = g

        def record_stream(self, stream):
            said.append(f"out{self.g} used on {stream.name}")

    def work(g):
        def run():
            said.append(f"work {g}")
            return Out(g)
        return run

    outs = run_on_streams([work(g) for g in range(3)], sides, main=main, enter=enter)
    assert [o.g for o in outs] == [0, 1, 2]
    expected = []
    for g in range(3):
        expected += [f"s{g} waits main", f"enter s{g}", f"work {g}", f"leave s{g}"]
    for g in range(3):
        expected += [f"main waits s{g}", f"out{g} used on main"]
    assert said == expected
    with pytest.raises(ValueError, match="3 computations need as many streams, got 2"):
        run_on_streams([work(g) for g in range(3)], sides[:2], main=main, enter=enter)
    assert [o.g for o in run_on_streams([work(g) for g in range(2)], None)] == [0, 1]  # CPU: in order


def test_formulations_timed_per_device_and_mode():
    assert GroupConv2d.formulations_for(torch.device("cuda", 0)) == ("grouped", "split", "streams")
    assert GroupConv2d.formulations_for(torch.device("cuda", 0), eager=False) == ("grouped", "split")
    assert GroupConv2d.formulations_for(torch.device("cpu")) == ("grouped", "split")
    from parallel.tuning import choose_conv_formulations
    layer = GroupConv2d(LocalPlacement(4, ["cpu"]), 8, 8, 3, padding=1, name="c")
    x = shard(torch.randn(2, 8, 6, 6), layer.placement)
    records = choose_conv_formulations(nn.Sequential(layer), lambda: layer(x), repeats=1)
    assert set(records[0]["ms"]) == {"grouped", "split"} and layer.formulation == records[0]["choice"]


def test_streams_with_compile_and_a_bad_compile_mode_are_refused_clearly():
    from alexnet import accel
    from alexnet.config import ConfigError, load
    with pytest.raises(ConfigError, match="compile_mode: 'fastest' is not one of"):
        load("configs/smoke.yaml", ["train.compile_mode=fastest"])
    cfg = load("configs/smoke.yaml", ["train.compile=true", "train.conv_formulation=streams"])
    layer = GroupConv2d(LocalPlacement(2, ["cpu"]), 4, 4, 1, name="c")
    with pytest.raises(ConfigError, match="streams runs eagerly"):
        accel.prepare(nn.Sequential(layer), cfg, layer.placement, (1, 4, 2, 2))


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compile_mode_reaches_torch_compile(mode, monkeypatch):
    from alexnet import accel
    from alexnet.config import load
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.update(kw) or model)
    cfg = load("configs/smoke.yaml", ["train.compile=true", f"train.compile_mode={mode}", "train.channels_last=false",
                                      "train.conv_formulation=grouped"])
    layer = GroupConv2d(LocalPlacement(2, ["cpu"]), 4, 4, 1, name="c")
    accel.prepare(nn.Sequential(layer), cfg, layer.placement, (1, 4, 2, 2))
    assert seen == {"mode": mode}


def test_reduce_overhead_on_cpu_equals_eager_and_records_no_graph():
    """On CPU inductor skips CUDA graphs: the compiled model still equals eager and nothing is recorded."""
    import torch._dynamo as dynamo

    from alexnet.graphs import GraphRecordings, describe_recordings
    from test_compile import _model
    dynamo.reset()
    recordings = GraphRecordings()
    try:
        model = _model(2, ["cpu"])
        compiled = torch.compile(model, mode="reduce-overhead")
        x = torch.randn(4, 1, 32, 32)
        for _ in range(2):
            y = compiled(x)
        assert_close(y, model(x))
        assert recordings.take() == 0
    finally:
        recordings.close()
    assert "not on CUDA" in describe_recordings(0, 10, on_cuda=False)


def test_graph_recordings_count_inductors_cudagraph_announcements_only():
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    from alexnet.graphs import GraphRecordings, describe_recordings
    recordings = GraphRecordings()
    try:
        for trigger in (CallbackTrigger.CUDAGRAPH_RECORDING, CallbackTrigger.DYNAMO,
                        CallbackTrigger.CUDAGRAPH_RECORDING):
            with callback_handler.install_callbacks(trigger, "0/0"):
                pass
        assert recordings.take() == 2 and recordings.take() == 0
    finally:
        recordings.close()
    with callback_handler.install_callbacks(CallbackTrigger.CUDAGRAPH_RECORDING, "0/1"):
        pass
    assert recordings.count == 2  # closed: no longer counting
    assert "re-captured about every step" in describe_recordings(40, 50, on_cuda=True)
    # what a run's log says after an epoch: the recordings since the last epoch's line
    from alexnet.fit import report_epoch
    from test_compile import _model
    from alexnet.engine import Trainer
    model = _model(2, ["cpu"])
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), model.placement, None)
    record = {"epoch": 1, "train_loss": 1.0, "val_top1_err": 50.0, "val_top5_err": 10.0, "lr": 0.1,
              "images_per_s": 100.0, "epoch_s": 1.0}
    said = []
    report_epoch({"train": {"epochs": 2}}, model.spec, trainer, record, recordings, 50,
                 lambda line, **kw: said.append(line))
    assert said[0].startswith("epoch 1/2  loss 1.0000") and said[1] == describe_recordings(0, 50, on_cuda=False)
    assert "recorded once, then replayed" in describe_recordings(2, 50, on_cuda=True)


def test_mfu_is_six_macs_per_image_against_the_named_dense_bf16_peak():
    from alexnet import mfu
    from alexnet.build import spec_from_config
    from alexnet.config import load
    macs = spec_from_config(load("configs/imagenet/g2.yaml")).macs()
    t = mfu.throughput(10_000, macs, "NVIDIA H200")
    assert t["tflops"] == pytest.approx(6 * macs * 10_000 / 1e12)
    assert t["peak_tflops"] == 989.5 and t["mfu"] == pytest.approx(t["tflops"] / 989.5)
    assert "H200" in t["peak_source"]
    assert mfu.peak_of("NVIDIA H100 PCIe")[0] == 756.5 and mfu.peak_of("NVIDIA H100 80GB HBM3")[0] == 989.5
    cpu = mfu.throughput(100, macs, "cpu")
    assert cpu["mfu"] is None and cpu["tflops"] > 0
    assert mfu.describe(100, macs, "cpu") == f"{cpu['tflops']:.3g} TFLOP/s"
