"""Where it runs does not change what it computes: every random draw (dropout masks, crops, flips, PCA
noise) is a function of the seed, the step or epoch and the global position it applies to, so each
placement draws slices of the one-process run's draws, and the loss curves agree."""
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
from conftest import ROOT
from parallel import LocalPlacement, shard
from parallel.dropout import GroupDropout, set_draws

STEPS, BATCH, WIDTH = 3, 12, 16


def one_slot_masks(seed=7):
    drop = GroupDropout(LocalPlacement(1, ["cpu"]), 0.5, name="fc6.dropout")
    masks = []
    for step in range(STEPS):
        set_draws([drop], seed, step, 0)
        masks.append(drop(shard(torch.ones(BATCH, WIDTH), drop.placement)).parts[0])
    return masks


def test_dropout_masks_under_local_slots_and_replicas_are_slices_of_the_one_slot_masks():
    expected = one_slot_masks()
    assert all(0.2 < (m > 0).float().mean() < 0.8 for m in expected) and not torch.equal(expected[0], expected[1])
    for G, devices in [(2, ["cpu", "cpu"]), (4, ["cpu", "cpu"]), (4, ["cpu"] * 4)]:
        drop = GroupDropout(LocalPlacement(G, devices), 0.5, name="fc6.dropout")
        for step in range(STEPS):
            for lo, hi in ((0, 5), (5, BATCH)):  # two replicas' rows of the global batch, unequal
                set_draws([drop], 7, step, lo)
                got = torch.cat(drop(shard(torch.ones(hi - lo, WIDTH), drop.placement)).parts, 1)
                assert torch.equal(got, expected[step][lo:hi]), (G, devices, step, lo)


def test_dropout_masks_come_from_global_indices_only_not_from_any_generator():
    """Stands in for two GPUs: a slot's mask may not depend on its device's generator (two GPUs seeded
    alike would drop the same units in both groups), so no generator may be used at all."""
    expected = one_slot_masks()
    torch.manual_seed(12345)  # another global RNG state changes nothing
    boom = mock.Mock(side_effect=AssertionError("dropout drew from a torch generator"))
    with mock.patch("torch.rand", boom), mock.patch("torch.bernoulli", boom), \
            mock.patch("torch.Tensor.bernoulli_", boom), mock.patch("torch.Tensor.uniform_", boom):
        got = one_slot_masks()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    drop = GroupDropout(LocalPlacement(2, ["cpu", "cpu"]), 0.5, name="fc6.dropout")
    set_draws([drop], 7, 0, 0)
    group0, group1 = drop(shard(torch.ones(BATCH, WIDTH), drop.placement)).parts
    assert not torch.equal(group0, group1)  # groups of the same shape drop different units
    assert not torch.equal(one_slot_masks(seed=8)[0], expected[0])


@pytest.mark.parametrize("world, groups", [(2, 2), (4, 2)])
def test_dropout_masks_under_gloo_ranks_are_slices_of_the_one_slot_masks(tmp_path, world, groups):
    out = str(tmp_path / "masks")
    mp.spawn(dist_worker.dropout_masks, args=(world, dist_worker.rendezvous_file(), groups, BATCH, WIDTH, STEPS, out), nprocs=world,
             join=True)
    expected = one_slot_masks()
    for rank in range(world):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for step in range(STEPS):
            assert torch.equal(got["masks"][step], expected[step][got["rows"]][:, got["cols"]]), (rank, step)


# --- augmentation: a sample's draws do not depend on the replica that takes it --------------------------

def replica_batches(make, replicas: int, epoch: int = 1):
    """Every replica's batches of one epoch, joined back into global batches."""
    loaders = [make(r, replicas) for r in range(replicas)]
    for loader in loaders:
        loader.set_epoch(epoch)
    per_replica = [list(loader) for loader in loaders]
    return [(torch.cat([b[i][0] for b in per_replica]), torch.cat([b[i][1] for b in per_replica]))
            for i in range(len(per_replica[0]))]


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(y, ey) and torch.equal(x, ex)


def test_in_memory_augmentation_is_the_same_for_every_number_of_replicas():
    from data.fashion_mnist import InMemoryLoader
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (40, 28, 28), generator=gen, dtype=torch.uint8), torch.arange(40) % 10

    def make(replica, replicas):
        return InMemoryLoader(images, labels, 16, 32, True, seed=3, replica=replica, num_replicas=replicas,
                              crop_padding=2)
    one = replica_batches(make, 1)
    assert not torch.equal(one[0][0], replica_batches(make, 1, epoch=2)[0][0])  # draws change per epoch
    for replicas in (2, 3):
        assert_same_batches(replica_batches(make, replicas), one)


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    from test_device_decode import tree
    return str(tree(tmp_path_factory.mktemp("jpegs"), per_class=6))


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_image_folder_augmentation_is_the_same_for_every_replica_and_worker(jpeg_tree, decode):
    """PIL workers (crop, flip, PCA noise from a per-sample seed) and the on-device decode path (one
    draw per global batch row), run on CPU tensors."""
    from data import imagefolder

    def make(replica, replicas, workers=0):
        train, _ = imagefolder.build(jpeg_tree, 4, 4, 64, 5, replica, replicas, workers=workers, decode=decode,
                                     device="cpu")
        return train
    one = replica_batches(make, 1)
    assert len(one) >= 2
    assert_same_batches(replica_batches(make, 2), one)
    if decode == "cpu":
        assert_same_batches(replica_batches(lambda r, n: make(r, n, workers=2), 2), one)


# --- the loss curve: train.py at the default config (dropout 0.5, random crops and flips) ----------------

CURVE_SETTINGS = ["model.conv_channels=[12,24,36,36,24]", "model.fc_widths=[48,48]", "data.batch_size=32",
                  "data.crop_padding=2", "train.log_every=1", "train.epochs=1", "optim.schedule=step",
                  "optim.step_size=100", "train.filter_images_every=0"]
#: torchrun only (in one process train.py refuses a backend: there is no process group to give it)
TORCHRUN_SETTINGS = ["parallel.backend=gloo"]
STEPS_PER_EPOCH = 8


@pytest.fixture(scope="module")
def fashion_env(tmp_path_factory):
    from test_data import tiny_fashion
    data = tmp_path_factory.mktemp("fm")
    tiny_fashion(data, n_train=32 * STEPS_PER_EPOCH, n_val=32)
    return dict(os.environ, FASHION_MNIST_DIR=str(data))


def train_cmd(run_dir, extra=(), launcher=()):
    cmd = [*launcher, os.path.join(ROOT, "train.py"), "--config", "configs/fashion_mnist/g2.yaml",
           "--set", f"run.dir={run_dir}"]
    for item in CURVE_SETTINGS + (TORCHRUN_SETTINGS if launcher else []) + list(extra):
        cmd += ["--set", item]
    return cmd


def torchrun_launcher(nproc):
    from test_distributed import standalone_torchrun
    return standalone_torchrun(nproc)


def losses(run_dir) -> dict[int, float]:
    """The train/loss scalars train.py logged, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def run(cmd, env, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process_curve(fashion_env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("curve") / "one"
    run([sys.executable] + train_cmd(run_dir, ["parallel.devices=[cpu]", "train.epochs=2"]), fashion_env)
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    return curve


def assert_same_curve(got: dict, expected: dict, steps):
    for s in steps:
        assert got[s] == pytest.approx(expected[s], rel=1e-4), (s, got[s], expected[s])


PLACEMENTS = {
    "2 local slots": lambda d: [sys.executable] + train_cmd(d, ["parallel.devices=[cpu,cpu]"]),
    "torchrun 2": lambda d: train_cmd(d, launcher=torchrun_launcher(2)),
    "torchrun 4 (2 x 2)": lambda d: train_cmd(d, launcher=torchrun_launcher(4)),
    "hybrid 2": lambda d: train_cmd(d, ["parallel.placement=hybrid"], launcher=torchrun_launcher(2)),
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_first_steps_equal_the_one_process_curve(placement, one_process_curve, fashion_env, tmp_path):
    run(PLACEMENTS[placement](tmp_path / "run"), fashion_env)
    assert_same_curve(losses(tmp_path / "run"), one_process_curve, range(1, STEPS_PER_EPOCH + 1))


def test_two_torchrun_agents_on_localhost_equal_the_one_process_curve(one_process_curve, fashion_env, tmp_path):
    """--nnodes 2, c10d rendezvous: the multi-node launch line, one process per node here.

    This test hosts the rendezvous store itself on a port the OS picked and holds it open;
    both agents join it as clients (is_host=false), so no port changes hands in between.
    """
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    agent = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--nnodes", "2",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{store.port}", "--rdzv-conf", "is_host=false",
             "--rdzv-id", "invariance"]
    agents = [subprocess.Popen(train_cmd(tmp_path / "run", launcher=agent), env=fashion_env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in agents:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    del store
    assert_same_curve(losses(tmp_path / "run"), one_process_curve, range(1, STEPS_PER_EPOCH + 1))
