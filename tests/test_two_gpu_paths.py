"""What only two GPUs or NCCL execute, checked on CPU with stand-ins: MFU against every device's peak,
channels_last through the local shuffle, the compiled LRN under dynamo's recompile limit on two
devices, the CUDA-graph log line, the rank-to-GPU mapping, dense copies between devices and the
hybrid step's row counts."""
import pytest
import torch

from alexnet import mfu
from alexnet.graphs import describe_recordings
from parallel import LocalPlacement, PlacementError
from parallel.comm import moved, shuffle_to_devices
from parallel.distributed import gpu_of_local_rank
from parallel.placement import Slot


class TwoGPUs:
    """A stand-in placement with slots on cuda:0 and cuda:1 (nothing runs on them)."""
    local_slots = [Slot(torch.device("cuda", 0), 0, 0, 1), Slot(torch.device("cuda", 1), 1, 1, 1)]


def test_mfu_counts_the_peak_of_every_device(monkeypatch):
    monkeypatch.setattr(mfu, "device_name", lambda device: "NVIDIA H200")
    devices = mfu.devices_in_run(TwoGPUs())
    assert devices == 2
    t = mfu.throughput(1000.0, 10 ** 9, "NVIDIA H200", devices)
    assert t["peak_tflops"] == 2 * 989.5 and t["mfu"] == pytest.approx(6e12 / 1e12 / (2 * 989.5))
    assert "of 2 x NVIDIA H200's 989.5 dense bf16" in mfu.describe(1000.0, 10 ** 9, "cuda:0", devices)
    assert mfu.devices_in_run(LocalPlacement(2, ["cpu", "cpu"])) == 1  # two slots, one device


@pytest.mark.parametrize("slots", [1, 2])
def test_local_shuffle_keeps_channels_last(slots):
    groups, n, c = 4, 3, 16
    full = torch.randn(n, c, 5, 5, dtype=torch.float64)
    placement = LocalPlacement(groups, ["cpu"] * slots)
    parts = [p.contiguous(memory_format=torch.channels_last).requires_grad_() for p in full.chunk(slots, 1)]
    nchw = [p.detach().contiguous().requires_grad_() for p in parts]
    got = placement.shuffle(parts, "s", groups)
    want = placement.shuffle(nchw, "s", groups)
    for g, w in zip(got, want):
        assert g.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    grads = [torch.randn_like(w) for w in want]
    torch.autograd.backward(got, [g.contiguous(memory_format=torch.channels_last) for g in grads])
    torch.autograd.backward(want, grads)
    for p, q in zip(parts, nchw):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    # the reference: ShuffleNet's channel shuffle of the whole tensor
    ref = full.unflatten(1, (groups, groups, -1)).transpose(1, 2).flatten(1, 3)
    torch.testing.assert_close(torch.cat(got, 1), ref, rtol=0, atol=0)


def test_compiled_lrn_stays_under_the_recompile_limit_on_two_devices():
    """The LRN's compiled entries over tuning, training, the last batch and evaluation on two devices
    (a dtype stands in for each device: both are guards of the one cache)."""
    import torch._dynamo
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from alexnet.lrn import compiled_lrn, local_response_norm
    torch._dynamo.reset()
    fn = compiled_lrn()
    args = (5, 5e-4, 0.75, 2.0, 2)
    for dtype in (torch.float32, torch.float64):  # "cuda:0", "cuda:1"
        for rows, grad in ((4, True), (8, True), (3, True), (16, False), (5, False)):  # tune, train, last, eval
            x = torch.rand(rows, 8, 6, 6, dtype=dtype, requires_grad=grad)
            with torch.set_grad_enabled(grad):
                y = fn(x, *args)
            torch.testing.assert_close(y, local_response_norm(x, *args))
    entries = len(_debug_get_cache_entry_list(local_response_norm.__code__))
    assert 0 < entries <= 4 < torch._dynamo.config.recompile_limit, entries


def test_no_cuda_graph_recorded_is_not_called_replayed():
    line = describe_recordings(0, 50, on_cuda=True)
    assert "replayed" not in line and "none recorded" in line


def test_rank_to_gpu_mapping_never_picks_one_gpu_twice():
    assert [gpu_of_local_rank(r, 4, 4) for r in range(4)] == [torch.device("cuda", r) for r in range(4)]
    assert {gpu_of_local_rank(r, 4, 1) for r in range(4)} == {torch.device("cuda", 0)}  # one GPU per task
    for r in range(4):
        with pytest.raises(PlacementError, match="4 ranks on this node but 2 GPUs") as e:
            gpu_of_local_rank(r, 4, 2)
        assert "\n" not in str(e.value) and "--nproc-per-node 2" in str(e.value)
    with pytest.raises(PlacementError, match="sees no GPU"):
        gpu_of_local_rank(0, 1, 0)


def test_a_strided_slice_crosses_devices_as_one_dense_copy(monkeypatch):
    x = torch.randn(4, 8, 3, 3)
    part = x.narrow(1, 2, 3)
    assert moved(part, torch.device("cpu")) is part  # same device: no copy at all
    sent = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: sent.append(self.is_contiguous()) or self)
    moved(part, torch.device("meta"))
    assert sent == [True]
    sent.clear()
    shuffle_to_devices([x], [torch.device("meta")], 2)
    assert sent and all(sent)


def test_the_loop_finds_the_hybrid_row_exchange_through_ddp_and_compile():
    """train.py trains DDP(model) (and compiles it): the loop must still reach the row exchange to plan it."""
    from torch import nn

    from alexnet.engine import row_exchange_of

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.rows = nn.Linear(2, 2), object()

    class LikeDDP(nn.Module):  # DistributedDataParallel holds the model as .module and passes no attributes on
        def __init__(self, module):
            super().__init__()
            self.module = module

    net = Net()
    assert row_exchange_of(net) is net.rows
    assert row_exchange_of(LikeDDP(net)) is net.rows
    assert row_exchange_of(torch.compile(LikeDDP(net))) is net.rows
    assert row_exchange_of(nn.Linear(2, 2)) is None
