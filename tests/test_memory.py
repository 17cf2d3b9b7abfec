"""Memory per device: the prediction from the spec's shapes (alexnet.memory) held to torch's MemTracker
(alexnet.memwatch) over one SGD step, on 1 slot, 2 slots, 2 gloo ranks and 2 x 2 ranks, fp32 and bf16;
and every run reporting its peak per device."""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
from alexnet import memory, memwatch
from alexnet.build import spec_from_config
from alexnet.config import load
from alexnet.init import init_reference_state
from alexnet.model import GroupAlexNet
from conftest import ROOT, tiny_spec
from parallel import LocalPlacement, load_full_state_dict

BATCH = 16


def spec_for(groups):
    return tiny_spec(groups, dropout=0.5)


def close(predicted: int, measured: int, rel: float, what: str) -> None:
    assert abs(predicted - measured) <= rel * measured, \
        f"{what}: predicted {predicted:,} B, measured {measured:,} B ({predicted / measured - 1:+.1%})"


def compare(predicted: list, measured: dict) -> None:
    """Sums over the slots that share the measured device; the input batch was made before tracking.

    A slot's peak is predicted as if it had its device to itself; slots that share one run one after
    the other, so their device peaks below the sum of theirs (an upper bound, within 15%)."""
    fw, peak = measured["forward"]["cpu"], measured["peak"]["cpu"]
    total = {c: sum(getattr(m, c) for m in predicted) for c in memory.CATEGORIES + ("peak",)}
    for cat in ("parameters", "optimizer"):
        close(total[cat], fw[cat], 0.05, cat)
    close(total["gradients"], peak["parameters"], 0.05, "gradients (one per parameter)")
    # the forward holds every saved tensor, the exchange buffers and the logits
    close(total["activations"] + total["exchange"], fw["activations"], 0.05, "activations + exchange")
    if len(predicted) == 1:
        close(total["peak"] - total["input"], peak["total"], 0.10, "peak")
    else:
        assert peak["total"] <= total["peak"] - total["input"] <= 1.15 * peak["total"], (total, peak)


@pytest.mark.parametrize("groups,devices,precision", [
    (1, ["cpu"], "fp32"), (2, ["cpu"], "fp32"), (2, ["cpu", "cpu"], "fp32"), (4, ["cpu"] * 4, "fp32"),
    (2, ["cpu", "cpu"], "bf16")])
def test_prediction_matches_mem_tracker_in_one_process(groups, devices, precision):
    spec = spec_for(groups)
    model = GroupAlexNet(spec, LocalPlacement(groups, devices))
    load_full_state_dict(model, init_reference_state(spec, 0))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = dist_worker.batch_of(BATCH)
    measured = memwatch.measure_step(model, opt, x, y, precision=precision)
    predicted = memory.predict(spec, BATCH, len(devices), precision=precision, same_device=True)
    compare(predicted, measured)


def test_exchange_buffers_are_per_slot():
    """Every slot holds the whole gathered input: two slots hold twice one slot's exchange buffers."""
    one, (a, b) = memory.predict(spec_for(2), BATCH, 1), memory.predict(spec_for(2), BATCH, 2)
    assert a.exchange == b.exchange == one[0].exchange > 0
    assert a.parameters + b.parameters == one[0].parameters


def test_paper_geometry_split_halves_the_model_state():
    from alexnet.spec import AlexNetSpec
    spec = AlexNetSpec(groups=2)
    (one,), (r0, r1) = memory.predict(spec, 128, 1), memory.predict(spec, 128, 2, distributed=True)
    assert r0.parameters + r1.parameters == one.parameters == 4 * spec.params()
    assert r0.peak < 0.6 * one.peak


def test_largest_batch_is_the_largest_that_fits():
    from alexnet.spec import AlexNetSpec
    spec, budget = AlexNetSpec(groups=2), memory.parse_bytes("1.5GiB")
    b = memory.largest_batch(lambda n: max(m.peak for m in memory.predict(spec, n, 2, distributed=True)), budget)
    assert max(m.peak for m in memory.predict(spec, b, 2, distributed=True)) <= budget
    assert max(m.peak for m in memory.predict(spec, b + 1, 2, distributed=True)) > budget
    assert memory.parse_bytes("3GB") == 3 * 10 ** 9 and memory.parse_bytes("512") == 512


def ranks_measure(rank, world, store, groups, out):
    dist_worker.setup(rank, world, store)
    from parallel.distributed import init_from_env
    spec = spec_for(groups)
    placement, runtime = init_from_env(spec.slot_groups, "gloo")
    model = GroupAlexNet(spec, placement)
    load_full_state_dict(model, init_reference_state(spec, 0))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = dist_worker.batch_of(BATCH)
    mine = torch.tensor_split(torch.arange(BATCH), runtime.num_replicas)[runtime.replica]
    measured = memwatch.measure_step(model, opt, x[mine].contiguous(), y[mine].contiguous(), runtime)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(measured, f)
    dist_worker.finish()


@pytest.mark.parametrize("world,groups", [(2, 2), (4, 2)])
def test_prediction_matches_mem_tracker_on_gloo_ranks(tmp_path, world, groups):
    out = str(tmp_path / "mem")
    mp.spawn(ranks_measure, args=(world, dist_worker.rendezvous_file(), groups, out), nprocs=world, join=True)
    slots = groups
    predicted = memory.predict(spec_for(groups), BATCH, slots, replicas=world // slots, distributed=True)
    for rank in range(world):
        with open(f"{out}.{rank}") as f:
            measured = json.load(f)
        compare([predicted[rank % slots]], measured)


def test_a_run_reports_its_peak_per_device(tmp_path, root):
    from alexnet.config import load
    from alexnet.fit import fit
    cfg = load(os.path.join(root, "configs/smoke.yaml"),
               [f"run.dir={tmp_path}", "parallel.devices=[cpu,cpu]", "train.epochs=1"])
    summary = fit(cfg, quiet=True)
    with open(tmp_path / "metrics.jsonl") as f:
        record = json.loads(f.readline())
    assert list(record["peak_mib"]) == ["cpu"] and record["peak_mib"]["cpu"] > 0.1
    assert record["memory_measured"].startswith("MemTracker over one step")
    assert summary["peak_mib"] == record["peak_mib"] and summary["peak_mib_max"] == record["peak_mib"]["cpu"]


def test_memory_snapshot_is_refused_on_cpu_in_one_line(tmp_path, root):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/smoke.yaml", "--set", f"run.dir={tmp_path}",
                        "--set", "train.memory_snapshot=true"], capture_output=True, text=True, cwd=root)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "train.memory_snapshot" in r.stderr and "CPU" in r.stderr


def test_model_stats_memory_json_and_fit(capsys):
    from model_stats import main
    assert main(["--config", "configs/imagenet/g2.yaml", "--memory", "--batch", "128", "--world", "2", "--json",
                 "--fit", "1.5GiB"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["devices"]) == ["rank0", "rank1"]
    for dev in report["devices"].values():
        assert set(memory.CATEGORIES) | {"peak", "total"} <= set(dev) and dev["total"] == dev["peak"]
    assert report["largest_batch"] > 128


def test_readme_memory_table_is_the_committed_measurement(root):
    """The README's table is memory_check.py's, from docs/memory/paper_b128_fp32.json, not retyped."""
    import re

    from memory_check import markdown
    with open(os.path.join(root, "docs/memory/paper_b128_fp32.json")) as f:
        saved = json.load(f)
    with open(os.path.join(root, "README.md")) as f:
        table = re.search(r"<!-- memory-table -->\n(.*?)\n\n", f.read(), re.S).group(1)
    assert table == markdown(saved["rows"], saved["batch"], saved["precision"], saved["fit_bytes"])
    row = {r["placement"]: r for r in saved["rows"]}
    two, one = row["G = 2, two devices"], row["G = 2, one device"]
    assert two["measured_peak"] <= 0.55 * one["measured_peak"]  # the target, measured
    for r in saved["rows"]:  # the prediction held to the measurement at the paper's geometry
        assert abs(r["predicted_peak_without_input"] - r["measured_peak"]) <= 0.05 * r["measured_peak"]


def test_cuda_paths_reset_read_and_snapshot_per_device(tmp_path, monkeypatch):
    """The CUDA branches, on CPU with the allocator mocked: each epoch resets every slot device's peak, reads
    it back per device, and train.memory_snapshot records the first steps then writes one file atomically."""
    from parallel.placement import Slot

    class TwoGPUs:
        local_slots = [Slot(torch.device("cuda", 0), 0, 0, 1), Slot(torch.device("cuda", 1), 1, 1, 1)]
        output_device = torch.device("cuda", 0)

    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", str(d))))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: {0: 3, 1: 5}[d.index] * memwatch.MIB)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kw: calls.append(("record", enabled)))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot",
                        lambda path: calls.append(("dump", path)) or open(path, "wb").write(b"snapshot"))
    target = str(tmp_path / "memory_snapshot.pickle")
    watch = memwatch.MemoryWatch(TwoGPUs(), None, None, None, snapshot_path=target)
    assert watch.cuda and watch.how.startswith("allocator peak")
    watch.start_epoch()
    assert calls == [("reset", "cuda:0"), ("reset", "cuda:1")]
    for _ in range(memwatch.SNAPSHOT_STEPS + 2):
        with watch.step():
            pass
    assert [c[0] for c in calls[2:]] == ["record", "dump", "record"] and calls[-1] == ("record", None)
    assert open(target, "rb").read() == b"snapshot" and not calls[3][1] == target  # dumped to a temporary first
    assert watch.peaks() == {"cuda:0": 3.0, "cuda:1": 5.0}
    assert memwatch.describe(watch.peaks()) == "peak cuda:0 3 MiB, cuda:1 5 MiB"


def hybrid_ranks_measure(rank, world, store, spec, out):
    """One SGD step of the hybrid placement (convs data-parallel, fc layers split over the ranks) under MemTracker."""
    dist_worker.setup(rank, world, store)
    from parallel.hybrid import init_hybrid_from_env
    conv, fc, rows, runtime = init_hybrid_from_env(spec.slot_groups, "gloo")
    model = GroupAlexNet(spec, conv, fc_placement=fc, rows=rows)
    load_full_state_dict(model, init_reference_state(spec, 0))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, spec.in_channels, spec.input_size, spec.input_size, generator=gen)
    y = torch.randint(0, spec.num_classes, (BATCH,), generator=gen)
    mine = torch.tensor_split(torch.arange(BATCH), world)[rank]
    rows.plan([len(r) for r in torch.tensor_split(torch.arange(BATCH), world)])
    measured = memwatch.measure_step(model, opt, x[mine].contiguous(), y[mine].contiguous(), runtime)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(measured, f)
    dist_worker.finish()


HYBRID_SPECS = {"tiny": lambda: spec_for(2),
                "fashion": lambda: spec_from_config(load(os.path.join(ROOT, "configs/fashion_mnist/g2.yaml"))),
                "paper": lambda: spec_from_config(load(os.path.join(ROOT, "configs/imagenet/g2.yaml")))}


@pytest.mark.parametrize("name", list(HYBRID_SPECS))
def test_hybrid_prediction_matches_mem_tracker_on_gloo_ranks(tmp_path, name):
    """The hybrid on 2 ranks (fp32, batch 16): every category within 5% of MemTracker, the peak within 5% at the
    Fashion-MNIST and the paper geometry (the tiny test network's peak, dominated by small buffers, within 10%)."""
    spec, out, world = HYBRID_SPECS[name](), str(tmp_path / "mem"), 2
    mp.spawn(hybrid_ranks_measure, args=(world, dist_worker.rendezvous_file(), spec, out), nprocs=world, join=True)
    predicted = memory.predict(spec, BATCH, world, distributed=True, hybrid=True)
    for rank in range(world):
        with open(f"{out}.{rank}") as f:
            measured = json.load(f)
        compare([predicted[rank]], measured)
        if name != "tiny":
            close(predicted[rank].peak - predicted[rank].input, measured["peak"]["cpu"]["total"], 0.05, "peak")
