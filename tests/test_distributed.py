"""One process per group (gloo on CPU) computes what the one-process placement and the reference compute."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import dist_worker
from alexnet.init import init_reference_state
from alexnet.model import GroupAlexNet
from alexnet.reference import ReferenceAlexNet
from conftest import OWN_DEPRECATION, assert_close, tiny_spec
from parallel import LocalPlacement, full_state_dict, load_full_state_dict

def standalone_torchrun(nproc: int) -> list[str]:
    """torchrun on this host; --standalone lets its store bind a port of the OS's choosing itself."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]


def local_run(groups: int, steps: int):
    spec = tiny_spec(groups)
    state = init_reference_state(spec, 0)
    ref = ReferenceAlexNet(spec)
    ref.load_state_dict(state)
    model = GroupAlexNet(spec, LocalPlacement(groups, ["cpu"] * groups))
    load_full_state_dict(model, state)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 32, 32, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    ref_logits = ref(x)
    F.cross_entropy(ref_logits, y).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return spec, ref, ref_logits, curve, full_state_dict(model)


@pytest.mark.parametrize("world, groups", [(2, 2), (4, 4), (4, 2)])
def test_distributed_matches_local_and_reference(tmp_path, world, groups):
    out = str(tmp_path / "rank0.pt")
    steps = 5
    mp.spawn(dist_worker.equivalence, args=(world, dist_worker.rendezvous_file(), groups, out, steps), nprocs=world, join=True)
    got = torch.load(out, weights_only=True)
    spec, ref, ref_logits, curve, final = local_run(groups, steps)
    assert_close(got["logits"], ref_logits)
    for key, p in ref.named_parameters():
        assert_close(got["grads"][key], p.grad, msg=lambda m: f"{key}: {m}")
    # the loss curve (dropout off) and the weights after 5 steps match the one-process placement
    torch.testing.assert_close(torch.tensor(got["curve"]), torch.tensor(curve), rtol=1e-5, atol=1e-6)
    for key in final:
        torch.testing.assert_close(got["final"][key], final[key], rtol=1e-4, atol=1e-5)
    # byte counters: DESIGN.md's formula, per replica batch
    for name, nbytes in spec.cross_group_bytes(got["replica_batch"]).items():
        assert got["counted"][f"{name}/fwd"] == nbytes
        assert got["counted"][f"{name}/bwd"] == nbytes
    # one counting rule for both placements, the logits included
    local = GroupAlexNet(spec, LocalPlacement(groups, ["cpu"] * groups))
    F.cross_entropy(local(torch.randn(got["replica_batch"], 1, 32, 32)), torch.zeros(got["replica_batch"],
                                                                                     dtype=torch.long)).backward()
    assert local.placement.counter.snapshot() == got["counted"]


def test_uneven_features_chain_over_four_ranks(tmp_path):
    """10 features over 4 groups (3, 3, 2, 2): gathers learn the shares, forward and backward equal dense torch."""
    out = str(tmp_path / "rank0.pt")
    mp.spawn(dist_worker.uneven_chain, args=(4, dist_worker.rendezvous_file(), out), nprocs=4, join=True)
    got = torch.load(out, weights_only=True)
    full, x = got["full"], got["x"].requires_grad_(False)
    wa = full["a"]["weight"].clone().requires_grad_(True)
    wb = full["b"]["weight"].clone().requires_grad_(True)
    y = F.linear(F.linear(x, wa, full["a"]["bias"]), wb, full["b"]["bias"])
    y.square().sum().backward()
    assert_close(got["y"], y.detach())
    assert_close(got["grads"]["a"], wa.grad)
    assert_close(got["grads"]["b"], wb.grad)
    # rank 0 (3 of 10 features) receives the other 7 of every sample at b: 5 x 7 x 4 bytes
    assert got["counted"]["b/fwd"] == sum(5 * (10 - n) * 4 for n in (3, 3, 2, 2))


# --- torchrun end to end: train.py under one process per group, pre-emption and restarts ---

# gloo on CPU: these test the CPU path, also on a machine with fewer GPUs than ranks
TORCHRUN_SETTINGS = ["parallel.backend=gloo", "model.conv_channels=[12,24,36,36,24]", "model.fc_widths=[48,48]", "model.dropout=0.5",
                     "data.fake_train_samples=3072", "data.batch_size=32", "train.epochs=3", "train.log_every=8"]


def torchrun(root, run_dir, nproc=2, extra=(), torchrun_args=()):
    cmd = [*standalone_torchrun(nproc), *torchrun_args, os.path.join(root, "train.py"), "--config", "configs/smoke.yaml",
           "--set", f"run.dir={run_dir}"]
    for item in TORCHRUN_SETTINGS:
        cmd += ["--set", item]
    return cmd + list(extra)


def final_metrics(run_dir):
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: m[k] for k in ("epoch", "step", "train_loss", "val_top1_err", "val_top5_err", "val_loss", "lr")}
            for m in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_dir = tmp_path_factory.mktemp("straight")
    proc = subprocess.run(torchrun(root, run_dir), capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert not OWN_DEPRECATION.search(out), [line for line in out.splitlines() if OWN_DEPRECATION.search(line)]
    return run_dir


def test_torchrun_run_logs_like_one_process(root, tmp_path, uninterrupted):
    """Same metrics keys and summary keys as the one-process run of the same config."""
    cmd = [sys.executable, os.path.join(root, "train.py"), "--config", "configs/smoke.yaml", "--set",
           f"run.dir={tmp_path}"] + [a for item in TORCHRUN_SETTINGS if not item.startswith("parallel.backend")
                                     for a in ("--set", item)]  # one process has no backend: refused
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    dist_lines = [json.loads(x) for x in open(uninterrupted / "metrics.jsonl")]
    assert [m["epoch"] for m in dist_lines] == [1, 2, 3]
    assert one[0].keys() == dist_lines[0].keys()
    one_summary = json.load(open(tmp_path / "summary.json"))
    dist_summary = json.load(open(uninterrupted / "summary.json"))
    assert one_summary.keys() == dist_summary.keys()
    assert dist_summary["cross_group_mb_per_step"] == pytest.approx(one_summary["cross_group_mb_per_step"])
    assert (dist_summary["params"], dist_summary["macs"]) == (one_summary["params"], one_summary["macs"])


def fault_env(spec: str) -> dict:
    """train.py's test-only trigger (FaultTrigger): the signal arrives at a given step, no sleeps."""
    return dict(os.environ, FILTER_GROUPS_FAULT=spec)


#: 96 steps per epoch (3072 samples, batch 32): the fault at step 140 falls in epoch 2, and every rank
#: stops after the step that reads the vote, 141: 45 steps into epoch 2
FAULT_STEP, STOPPED_AT = 140, 45


def test_sigterm_checkpoints_mid_epoch_and_resume_matches(root, tmp_path, uninterrupted):
    proc = subprocess.run(torchrun(root, tmp_path), cwd=root, capture_output=True, text=True, timeout=300,
                          env=fault_env(f"SIGTERM@{FAULT_STEP}"))
    assert proc.returncode != 0
    assert proc.stderr.count("exitcode  : 143") + proc.stderr.count("exitcode: 143") >= 1, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["epoch_step"]) == (1, STOPPED_AT), "SIGTERM should checkpoint mid-epoch"
    resumed = subprocess.run(torchrun(root, tmp_path, extra=["--resume"]), capture_output=True, text=True, cwd=root,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert final_metrics(tmp_path) == final_metrics(uninterrupted)


def test_sigkill_restart_finishes_like_uninterrupted(root, tmp_path, uninterrupted):
    """A rank dies; torchrun restarts the group, which resumes from the last checkpoint.

    Each restart round initialises on store keys of its own (parallel.distributed's
    restart store), so no restarted rank reads a dead peer's address; a short collective
    timeout still lets a stalled start fail fast and be retried by the next restart.
    """
    proc = subprocess.run(torchrun(root, tmp_path, torchrun_args=["--max-restarts", "2"],
                                   extra=["--set", "parallel.timeout_s=30"]), cwd=root, capture_output=True,
                          text=True, timeout=300, env=fault_env(f"SIGKILL@{FAULT_STEP}@1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torchrun restart 1: resuming" in proc.stdout  # the restart happened, from the epoch-1 checkpoint
    assert final_metrics(tmp_path) == final_metrics(uninterrupted)


SLOW_RANK_0 = """import os, runpy, sys, time
if os.environ["RANK"] == "0":
    time.sleep(float(os.environ["RANK_0_LATE_S"]))  # a rank 0 still importing when its peers fail (a busy machine)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_world_size_that_does_not_fit_groups_is_one_line(root, tmp_path):
    """Said once, by rank 0, even when rank 0 is the last to get there: torchrun ends every rank as
    soon as one has failed, so the peers must not fail before rank 0 has spoken (CI lost the line)."""
    late = tmp_path / "rank_0_late.py"
    late.write_text(SLOW_RANK_0)
    cmd = torchrun(root, tmp_path, nproc=3)
    cmd.insert(cmd.index(os.path.join(root, "train.py")), str(late))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=120,
                          env={**os.environ, "RANK_0_LATE_S": "4"})
    assert proc.returncode != 0
    assert proc.stderr.count("error: world size 3 does not fit 2 groups") == 1, proc.stderr[-3000:]
    assert "error (rank" not in proc.stderr, "the peers wait for rank 0 to say it"
    assert not (tmp_path / "metrics.jsonl").exists(), "nothing may train before the check"


def test_distributed_checkpoint_consolidates_and_evaluates_locally(root, tmp_path, uninterrupted):
    ckpt = uninterrupted / "checkpoints" / "last.pt"
    out = tmp_path / "ref.pt"
    proc = subprocess.run([sys.executable, os.path.join(root, "scripts", "consolidate.py"), "to-reference", str(ckpt),
                           str(out)], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    saved = torch.load(ckpt, weights_only=True)
    from alexnet.build import spec_from_config
    spec = spec_from_config(saved["config"])
    ref = ReferenceAlexNet(spec).eval()
    ref.load_state_dict(torch.load(out, weights_only=True))
    local = GroupAlexNet(spec, LocalPlacement(spec.groups, ["cpu"] * spec.groups)).eval()
    load_full_state_dict(local, saved["model"])
    x = torch.randn(4, spec.in_channels, spec.input_size, spec.input_size)
    assert_close(local(x), ref(x))
    # the one-process placement evaluates the torchrun run's checkpoint to the same validation error
    proc = subprocess.run([sys.executable, os.path.join(root, "train.py"), "--evaluate", str(ckpt), "--set",
                           "parallel.placement=local"], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = [json.loads(x) for x in open(uninterrupted / "metrics.jsonl")][-1]
    assert json.loads(proc.stdout)["val_top1_err"] == pytest.approx(last["val_top1_err"])
    # and back: reference state_dict -> checkpoint that loads
    back = tmp_path / "ckpt.pt"
    proc = subprocess.run([sys.executable, os.path.join(root, "scripts", "consolidate.py"), "from-reference", str(out),
                           "--config", "configs/smoke.yaml", *sum((["--set", s] for s in TORCHRUN_SETTINGS), []),
                           str(back)], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    again = torch.load(back, weights_only=True)
    for key, value in saved["model"].items():
        assert torch.equal(again["model"][key], value)


def test_torchrun_hybrid_trains_and_resumes_to_the_same_metrics(root, tmp_path):
    """train.py with parallel.placement=hybrid: a run pre-empted in epoch 2 and resumed ends where an
    uninterrupted one does (the fc shards and conv replicas checkpoint through the reference layout)."""
    hybrid = ["--set", "parallel.placement=hybrid", "--set", "train.epochs=2"]
    straight = subprocess.run(torchrun(root, tmp_path / "straight", extra=hybrid), capture_output=True, text=True,
                              cwd=root, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    summary = json.load(open(tmp_path / "straight" / "summary.json"))
    assert summary["data_replicas"] == 2 and summary["placement"].startswith("hybrid: convs data-parallel over 2")
    proc = subprocess.run(torchrun(root, tmp_path / "resumed", extra=hybrid), cwd=root, capture_output=True,
                          text=True, timeout=300, env=fault_env(f"SIGTERM@{FAULT_STEP}"))
    assert proc.returncode != 0 and "143" in proc.stderr, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["epoch_step"]) == (1, STOPPED_AT)
    again = subprocess.run(torchrun(root, tmp_path / "resumed", extra=hybrid + ["--resume"]), capture_output=True,
                           text=True, cwd=root, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert final_metrics(tmp_path / "resumed") == final_metrics(tmp_path / "straight")


def test_exchanges_between_ranks_keep_channels_last_and_reduce_scatter_uneven_shares(tmp_path):
    """The collectives NCCL runs (all_gather_into_tensor, reduce_scatter_tensor) driven on gloo: NHWC maps
    stay NHWC through the all-gather and the shuffle, both ways; uneven shares gather and sum exactly."""
    out = str(tmp_path / "rank0.pt")
    mp.spawn(dist_worker.exchange_layouts, args=(2, dist_worker.rendezvous_file(), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    assert got["gathered_cl"] and got["grad_cl"] and got["shuffled_cl"] and got["shuffle_grad_cl"]
    assert torch.equal(got["gathered"], got["full"])
    # rank r's consumer computed sum((r + 1) * weight * maps): rank 0's maps get (1 + 2) * weight
    torch.testing.assert_close(got["grad"], 3 * got["weight"][:, :4])
    assert torch.equal(got["uneven"], got["uneven_full"])
    assert torch.equal(got["uneven_grad"], torch.full((2, 3), 3.0))
    # 2 groups of 3 and 2 of 5 fp32 features x 2 rows: each receives the other's share
    assert got["counted"]["u/fwd"] == (2 * 2 + 2 * 3) * 4 and got["counted"]["u/bwd"] == got["counted"]["u/fwd"]


def test_one_gpu_per_task_is_used_whatever_the_local_rank(monkeypatch, capsys):
    """A cluster that shows each task one GPU (CUDA_VISIBLE_DEVICES per rank): LOCAL_RANK 3 with one GPU
    visible runs on cuda:0 and says so, instead of being refused. CUDA and the process group are mocked."""
    import torch.distributed as dist
    from parallel import distributed
    chosen = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(distributed, "pick_backend", lambda requested: "nccl")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "new_group", lambda backend: "control")
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    device, _, rank, control = distributed.init_process_group_from_env("nccl")
    assert device == torch.device("cuda", 0) and chosen == [device] and rank == 3 and control == "control"
    assert "LOCAL_RANK 3 but 1 GPU(s) visible; using cuda:0" in capsys.readouterr().out


@pytest.mark.parametrize("world, groups", [(2, 2), (4, 2)])
def test_checkpoint_state_is_assembled_on_rank_zero_only(tmp_path, world, groups):
    out = str(tmp_path / "state")
    mp.spawn(dist_worker.checkpoint_gather, args=(world, dist_worker.rendezvous_file(), groups, out), nprocs=world, join=True)
    got = [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]
    expected = init_reference_state(tiny_spec(groups), 0)
    assert set(got[0]["weights"]) == set(expected)
    assert all(torch.equal(got[0]["weights"][k], v) for k, v in expected.items())
    assert all(torch.equal(got[0]["optimizer"]["momentum"][k], torch.zeros_like(v)) for k, v in expected.items())
    for r in range(1, world):  # no full copy anywhere else
        assert got[r]["weights"] is None and got[r]["optimizer"] is None, r
        assert all(torch.equal(got[r]["everywhere"][k], v) for k, v in expected.items())  # the collective default
