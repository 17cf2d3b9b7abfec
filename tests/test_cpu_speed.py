"""The CPU fast path: the band-matrix LRN, the layout timed at start-up, glibc keeping freed memory.

Each changes how a step runs, never what it computes: the LRN equals torch's per group in
both memory formats, forward and backward; choosing a layout moves weights in memory, not
their values, and leaves no gradient or dropout draw behind.
"""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from alexnet.lrn import _band_lrn, band, local_response_norm


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_band_lrn_equals_torch_per_group_in_both_layouts(groups, channels_last):
    torch.manual_seed(0)
    x = torch.randn(3, 6 * groups, 5, 4, dtype=torch.float64) * 10
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    theirs = nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0)
    expected = torch.cat([theirs(c) for c in x.chunk(groups, 1)], 1)
    ours = _band_lrn(x, 5, 5e-4, 0.75, 2.0, groups)
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(ours, expected)
    dy = torch.randn_like(expected)
    g_ours, = torch.autograd.grad(ours, x, dy)
    g_theirs, = torch.autograd.grad(expected, x, dy)
    assert_close(g_ours, g_theirs)


def test_band_lrn_other_beta_and_even_window_and_the_cpu_dispatch():
    torch.manual_seed(1)
    x = (torch.randn(2, 8, 3, 3, dtype=torch.float64) * 5).requires_grad_(True)
    theirs = nn.LocalResponseNorm(4, 1e-3, 0.6, 1.5)  # even n: the window reaches 2 before, 1 after
    expected = torch.cat([theirs(c) for c in x.chunk(2, 1)], 1)
    assert_close(local_response_norm(x, 4, 1e-3, 0.6, 1.5, groups=2), expected)
    g1, = torch.autograd.grad(local_response_norm(x, 4, 1e-3, 0.6, 1.5, groups=2).sum(), x)
    g2, = torch.autograd.grad(expected.sum(), x)
    assert_close(g1, g2)


def test_band_matrix_is_the_window_clipped_to_each_group():
    b = band(6, 2, 3, torch.float32, "cpu")  # window [j - 1, j + 1] inside groups {0,1,2}, {3,4,5}
    expected = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.float32)
    assert torch.equal(b, expected)


def _tiny_model(dropout=0.5):
    from alexnet.config import load
    from alexnet.fit import build_run
    cfg = load("configs/smoke.yaml", ["model.groups=2", "model.conv_channels=[8,16,16,16,16]",
                                      "model.fc_widths=[16,16]", f"model.dropout={dropout}"])
    spec, placement, runtime, model, optimizer = build_run(cfg)
    return cfg, spec, placement, runtime, model, optimizer


def test_choosing_the_layout_keeps_the_network_and_leaves_no_gradient_or_draw():
    from parallel import full_state_dict
    from parallel.dropout import dropout_layers
    from parallel.tuning import choose_memory_format
    cfg, spec, placement, runtime, model, _ = _tiny_model()
    before = {k: v.clone() for k, v in full_state_dict(model).items()}
    draws = [d.clone() for layer in dropout_layers(model) for d in layer.buffers()]
    x = torch.randn(4, 1, 32, 32)
    fake_ms = {False: 40.0, True: 1.0}  # NHWC "faster": the choice follows the timings, not a rule

    def forward_backward(channels_last):
        out = model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        out.sum().backward()

    record = choose_memory_format(model, forward_backward, rounds=1)
    assert record["choice"] in (False, True) and set(record["ms"]) == {False, True}
    for k, v in full_state_dict(model).items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(draws, [d for layer in dropout_layers(model) for d in layer.buffers()]))
    # the faster layout is kept, measured: a forward_backward that is slow in NCHW makes NHWC win
    import time
    record = choose_memory_format(model, lambda cl: time.sleep(fake_ms[cl] / 1000), rounds=1)
    assert record["choice"] is True and model.conv2.weights[0].is_contiguous(memory_format=torch.channels_last)
    record = choose_memory_format(model, lambda cl: time.sleep(fake_ms[not cl] / 1000), rounds=1)
    assert record["choice"] is False and model.conv2.weights[0].is_contiguous()


def test_train_py_prepare_times_the_layout_on_cpu_and_obeys_an_explicit_one():
    from alexnet import accel
    for asked, expect in (("auto", None), (True, True), (False, False)):
        cfg, spec, placement, runtime, model, _ = _tiny_model()
        cfg["train"]["channels_last"] = asked
        said = []
        runner, choices = accel.prepare(model, cfg, placement, (4, 1, 32, 32), say=said.append, runtime=runtime)
        channels_last = choices["channels_last"]
        assert runner is model and set(choices["formulations"]) == {"conv2", "conv4", "conv5"}
        if expect is None:
            assert any(line.startswith("layout: ") for line in said), said
        else:
            assert channels_last is expect and not any(line.startswith("layout: ") for line in said)
        assert model.conv2.weights[0].is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_a_mistyped_layout_is_refused_by_name():
    from alexnet.config import ConfigError, load
    with pytest.raises(ConfigError, match="train.channels_last: expected true, false or auto"):
        load("configs/smoke.yaml", ["train.channels_last=fast"])


def test_keep_freed_memory_sets_glibc_thresholds(monkeypatch):
    from alexnet import accel
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(accel.ctypes, "CDLL", lambda name: FakeLibc())
    assert accel.keep_freed_memory()
    assert calls == [(-1, 1 << 30), (-3, 1 << 30)]  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD

    def no_glibc(name):
        raise OSError(name)

    monkeypatch.setattr(accel.ctypes, "CDLL", no_glibc)
    assert not accel.keep_freed_memory()


def test_a_resumed_run_reuses_the_choices_of_the_run_it_continues():
    """Timing again could choose another layout or formulation, and round otherwise: the checkpoint's win."""
    from alexnet import accel
    cfg, spec, placement, runtime, model, _ = _tiny_model()
    said = []
    decided = {"channels_last": True, "formulations": {"conv2": "split", "conv4": "grouped", "conv5": "split"}}
    _, choices = accel.prepare(model, cfg, placement, (4, 1, 32, 32), say=said.append, runtime=runtime,
                               decided=decided)
    assert choices == decided and model.conv2.formulation == "split"
    assert model.conv2.weights[0].is_contiguous(memory_format=torch.channels_last)
    assert not any(line.startswith("layout: ") for line in said)


def test_cpu_ranks_under_torchrun_keep_nchw_and_grouped_untimed():
    from alexnet import accel
    cfg, spec, placement, runtime, model, _ = _tiny_model()

    class SomeRank:  # any runtime but one process's
        pass

    said = []
    _, choices = accel.prepare(model, cfg, placement, (4, 1, 32, 32), say=said.append, runtime=SomeRank())
    assert choices == {"channels_last": False, "formulations": {"conv2": "grouped", "conv4": "grouped",
                                                                "conv5": "grouped"}} and not said


def test_speed_ceiling_splits_the_step_into_convolutions_and_the_rest(capsys):
    """scripts/speed_ceiling.py: one row per G whose parts add up, and a verdict per (G, target)."""
    import speed_ceiling  # scripts/ is on the path (conftest)
    assert speed_ceiling.main(["--groups", "1", "2", "--batch", "4", "--rounds", "1", "--steps", "1",
                               "--targets", "1.25"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert len(rows) == 2
    for row in rows:
        step, convs, rest = map(float, row[1:4])
        assert abs(step - convs - rest) < 0.11 and convs > 0  # printed to 0.1 ms
        assert abs(sum(map(float, row[4:9])) - convs) < 0.3  # five convolutions
    assert "G=2 at 1.25x G=1:" in out
