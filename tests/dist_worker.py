"""Code run inside spawned gloo ranks by test_distributed.py (importable by the children)."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel import full_state_dict, load_full_state_dict


def rendezvous_file() -> str:
    """A fresh FileStore path for one spawned world (no port to pick, so none another process can take)."""
    return os.path.join(tempfile.mkdtemp(prefix="rdzv"), "store")


def own_deprecations_are_errors() -> None:
    """A deprecated torch API called from this project's code fails the rank, as pyproject.toml's filters do in
    the pytest process (spawned ranks do not inherit those). Most such warnings are attributed to the calling
    module (parallel, alexnet, data); torch.distributed's deprecated collectives attribute theirs to their own
    wrapper (torch.distributed.c10d_logger), so warnings from there are errors too."""
    import warnings
    for module in ("parallel", "alexnet", "data", "torch.distributed"):
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("error", category=category, module=module)


def setup(rank: int, world: int, store: str):
    from parallel.distributed import join_spawned_world
    own_deprecations_are_errors()
    torch.set_num_threads(1)
    join_spawned_world(rank, world, store, "gloo")


def alexnet_on_this_rank(spec):
    """(placement, runtime, model) of the tiny AlexNet ``spec`` for this rank, loaded with seed 0's reference init."""
    from alexnet.init import init_reference_state
    from alexnet.model import GroupAlexNet
    from parallel.distributed import init_from_env
    placement, runtime = init_from_env(spec.slot_groups, "gloo")
    model = GroupAlexNet(spec, placement)
    load_full_state_dict(model, init_reference_state(spec, 0))
    return placement, runtime, model


def batch_of(n: int):
    """The tests' batch: n tiny images and labels from seed 1."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def equivalence(rank: int, world: int, store: str, groups: int, out: str, steps: int):
    """Forward/backward one batch, then ``steps`` SGD steps; rank 0 saves what it saw."""
    setup(rank, world, store)
    from conftest import tiny_spec
    placement, runtime, model = alexnet_on_this_rank(tiny_spec(groups))
    x, y = batch_of(8)
    mine = torch.tensor_split(torch.arange(8), runtime.num_replicas)[runtime.replica]
    logits = model(x[mine])
    loss = F.cross_entropy(logits, y[mine])
    loss.backward()
    runtime.sync_gradients(model.parameters())
    grads = full_state_dict(model, lambda p: p.grad)
    counted = placement.counter.snapshot()
    all_logits = [torch.empty(0)] * runtime.num_replicas
    dist.all_gather_object(all_logits, logits.detach(), group=runtime.data_pg)
    # a few SGD steps: the replica-averaged loss curve
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[mine]), y[mine])
        loss.backward()
        runtime.sync_gradients(model.parameters())
        opt.step()
        curve.append(runtime.all_reduce_sum(loss.detach().reshape(1)).item() / runtime.num_replicas)
    final = full_state_dict(model)
    if rank == 0:
        torch.save({"logits": torch.cat(all_logits), "grads": grads, "counted": counted, "curve": curve,
                    "final": final, "replica_batch": len(mine)}, out)
    finish()


def uneven_chain(rank: int, world: int, store: str, out: str):
    """Two chained GroupLinear over ``world`` ranks with 10 features (3, 3, 2, 2 over 4): forward and backward."""
    setup(rank, world, store)
    from parallel import GroupLinear, gather_output
    from parallel.distributed import init_from_env
    placement, _ = init_from_env(world, "gloo")
    first = GroupLinear(placement, 6, 10, exchange="replicated", name="a")
    second = GroupLinear(placement, 10, 10, exchange="all", name="b")
    gen = torch.Generator().manual_seed(3)
    full = {"a": {"weight": torch.randn(10, 6, generator=gen), "bias": torch.randn(10, generator=gen)},
            "b": {"weight": torch.randn(10, 10, generator=gen), "bias": torch.randn(10, generator=gen)}}
    first.load_full(full["a"])
    second.load_full(full["b"])
    x = torch.randn(5, 6, generator=gen)
    y = gather_output(placement, second(first(x)))
    y.square().sum().backward()
    grads = {name: placement.assemble_rows([layer.weights[0].grad])
             for name, layer in (("a", first), ("b", second))}
    if rank == 0:
        torch.save({"y": y.detach(), "grads": grads, "full": full, "x": x,
                    "counted": placement.counter.snapshot()}, out)
    finish()


def resnext_equivalence(rank: int, world: int, store: str, out: str):
    """examples/resnext.py with one group per rank: logits and every weight's gradient, gathered on rank 0."""
    setup(rank, world, store)
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import resnext
    from parallel.distributed import init_from_env
    from parallel.layers import sharded_layers
    placement, _ = init_from_env(world, "gloo")
    torch.manual_seed(0)
    reference = resnext.Reference(world)
    model = resnext.GroupResNeXt(placement)
    load_full_state_dict(model, reference.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    grads = {f"{name}.weight": placement.assemble_rows([w.grad for w in layer.weights])
             for name, layer in sharded_layers(model).items()}
    if rank == 0:
        torch.save({"logits": logits.detach(), "grads": grads}, out)
    finish()


def topology_equivalence(rank: int, world: int, store: str, spec_kw: dict, out: str):
    """GroupAlexNet of ``spec_kw`` (per-layer groups, shuffles) over ``world`` ranks: logits and every
    reference gradient on rank 0, plus the byte counter."""
    setup(rank, world, store)
    from conftest import tiny_spec
    placement, _, model = alexnet_on_this_rank(tiny_spec(**spec_kw))
    x, y = batch_of(4)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    grads = full_state_dict(model, lambda p: p.grad)
    if rank == 0:
        torch.save({"logits": logits.detach(), "grads": grads, "counted": placement.counter.snapshot(),
                    "slots": placement.num_slots}, out)
    finish()


def hybrid_equivalence(rank: int, world: int, store: str, groups: int, batch: int, out: str):
    """The hybrid placement (convs data-parallel, fc split over ranks): each rank's logits rows and
    every reference gradient after the runtime's gradient sync, on rank 0."""
    setup(rank, world, store)
    from alexnet.init import init_reference_state
    from alexnet.model import GroupAlexNet
    from conftest import tiny_spec
    from parallel.hybrid import init_hybrid_from_env
    spec = tiny_spec(groups)
    conv, fc, rows, runtime = init_hybrid_from_env(spec.slot_groups, "gloo")
    model = GroupAlexNet(spec, conv, fc_placement=fc, rows=rows)
    load_full_state_dict(model, init_reference_state(spec, 0))
    x, y = batch_of(batch)
    mine = torch.tensor_split(torch.arange(batch), world)[rank]
    # the row counts as train.py's loop plans them from its sampler: the forward gathers none
    rows.plan([len(t) for t in torch.tensor_split(torch.arange(batch), world)])
    from unittest import mock
    with mock.patch.object(dist, "all_gather", wraps=dist.all_gather) as gathers:
        logits = model(x[mine])
    F.cross_entropy(logits, y[mine]).backward()
    runtime.sync_gradients(model.parameters())
    grads = full_state_dict(model, lambda p: p.grad)
    all_logits = [None] * world
    dist.all_gather_object(all_logits, logits.detach())
    # the CPU control group that NCCL runs use for row counts and stop votes, driven on gloo here
    from parallel.hybrid import RowExchange
    from parallel.runtime import DistributedRuntime
    control = dist.new_group(backend="gloo")
    on_control = RowExchange(dist.group.WORLD, rank, world, torch.device("cpu"), conv.counter, control_pg=control)
    voter = DistributedRuntime(dist.group.WORLD, control, rank, rank, world, torch.device("cpu"))
    control_ok = (on_control.batch_sizes(len(mine)) == rows.batch_sizes(len(mine))
                  and voter.any_rank(rank == world - 1) and not voter.any_rank(False))
    if rank == 0:
        torch.save({"logits": torch.cat(all_logits), "grads": grads, "counted": conv.counter.snapshot(),
                    "control_ok": control_ok, "row_count_gathers": gathers.call_count}, out)
    finish()


def replicas_uneven(rank: int, world: int, store: str, groups: int, batch: int, out: str):
    """D = world / G replicas on slices of unequal size (7 over 2): gradients synced with rows, on rank 0."""
    setup(rank, world, store)
    from conftest import tiny_spec
    _, runtime, model = alexnet_on_this_rank(tiny_spec(groups))
    x, y = batch_of(batch)
    mine = torch.tensor_split(torch.arange(batch), runtime.num_replicas)[runtime.replica]
    F.cross_entropy(model(x[mine]), y[mine]).backward()
    runtime.sync_gradients(model.parameters(), rows=len(mine))
    grads = full_state_dict(model, lambda p: p.grad)
    if rank == 0:
        torch.save({"grads": grads}, out)
    finish()


def finish():
    """Every rank done with every collective before any rank tears its process group down (a rank that
    leaves while a peer's last send is still in flight can abort the peer), then leave at once.

    Leaving by ``os._exit(0)`` skips the interpreter's finalisation, where gloo's worker threads can
    still be torn down and abort the process ("terminate called without an active exception",
    SIGABRT: seen about once in eight full runs here; upstream: pytorch/pytorch#179291). The rank's
    results are already written and closed by then.
    """
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def example_network(name: str, placement):
    """A seeded example network (float64) for ``placement``: the twin's initial weights by construction."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import resnext
    import shufflenet
    torch.manual_seed(0)
    net = resnext.GroupResNeXt(placement) if name == "resnext" else shufflenet.GroupShuffleNet(placement)
    return net.double()


def example_batch(name: str):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3 if name == "resnext" else 1, 32, 32, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 10, (4,), generator=gen)


def example_step(net, name: str) -> dict:
    """What the test compares with the twin: the initial state, train-mode logits and every gradient,
    the state after (running statistics), and eval-mode logits."""
    initial = full_state_dict(net)
    x, y = example_batch(name)
    logits = net(x)
    F.cross_entropy(logits, y).backward()
    out = {"initial": initial, "train_logits": logits.detach(), "grads": full_state_dict(net, lambda p: p.grad),
           "after": full_state_dict(net)}
    net.eval()
    with torch.no_grad():
        out["eval_logits"] = net(x)
    return out


def example_equivalence(rank: int, world: int, store: str, name: str, groups: int, out: str):
    """An example network under torchrun-like ranks: rank 0 saves ``example_step``'s results."""
    setup(rank, world, store)
    from parallel.distributed import init_from_env
    placement, _ = init_from_env(groups, "gloo")
    got = example_step(example_network(name, placement), name)
    if rank == 0:
        torch.save(got, out)
    finish()


def seeded_init(rank: int, world: int, store: str, groups: int, out: str):
    """The README's API, seeded, under ``world`` ranks (world / groups replicas): every rank saves its
    full_state_dict (rank r to out.r)."""
    setup(rank, world, store)
    from parallel.distributed import init_from_env
    from test_library import readme_network
    placement, _ = init_from_env(groups, "gloo")
    torch.manual_seed(0)
    torch.save(full_state_dict(readme_network(placement)), f"{out}.{rank}")
    finish()


def synced_batchnorm(rank: int, world: int, store: str, out: str):
    """D = world replicas of G = 1 on unequal slices (3 and 5 rows): a conv, GroupBatchNorm2d(sync=True)
    and a loss; rank 0 saves the output rows, the synced gradients and the running statistics."""
    setup(rank, world, store)
    from parallel import GroupBatchNorm2d, GroupConv2d
    from parallel.distributed import init_from_env
    from test_library import bn_batch
    placement, runtime = init_from_env(1, "gloo")
    torch.manual_seed(0)
    conv = GroupConv2d(placement, 3, 4, 3, exchange="replicated", dtype=torch.float64)
    bn = GroupBatchNorm2d(placement, 4, sync=True, dtype=torch.float64)
    x, target = bn_batch()
    mine = [slice(0, 3), slice(3, 8)][runtime.replica]
    y = bn(conv(x[mine])).parts[0]
    (y - target[mine]).square().mean().backward()
    runtime.sync_gradients(list(conv.parameters()) + list(bn.parameters()), rows=y.shape[0])
    net = torch.nn.ModuleDict({"conv": conv, "bn": bn})
    got = {"y": y.detach(), "grads": full_state_dict(net, lambda p: p.grad), "state": full_state_dict(net)}
    everyone = [None] * world
    dist.all_gather_object(everyone, got)
    if rank == 0:
        torch.save(everyone, out)
    finish()


def dropout_masks(rank: int, world: int, store: str, groups: int, batch: int, width: int, steps: int, out: str):
    """GroupDropout on ones under init_from_env (world / groups replicas, each taking its rows of a
    ``batch``-row global batch): every rank saves its masks of ``steps`` steps with its rows and columns."""
    setup(rank, world, store)
    from parallel import shard
    from parallel.distributed import init_from_env
    from parallel.dropout import GroupDropout, set_draws
    placement, runtime = init_from_env(groups, "gloo")
    drop = GroupDropout(placement, 0.5, name="fc6.dropout")
    rows = torch.tensor_split(torch.arange(batch), runtime.num_replicas)[runtime.replica]
    cols = torch.tensor_split(torch.arange(width), placement.num_slots)[placement.local_slots[0].index]
    masks = []
    for step in range(steps):
        set_draws([drop], 7, step, int(rows[0]))
        masks.append(drop(shard(torch.ones(len(rows), width), placement)).parts[0])
    torch.save({"rows": rows, "cols": cols, "masks": masks}, f"{out}.{rank}")
    finish()


def exchange_layouts(rank: int, world: int, store: str, out: str):
    """channels_last maps through the all-gather and the shuffle between ranks, forward and backward,
    and an uneven all-gather (5 channels as 3 + 2) against the full tensor: rank 0 saves what it saw."""
    setup(rank, world, store)
    from parallel.distributed import init_from_env
    placement, _ = init_from_env(2, "gloo")
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(2, 8, 5, 5, generator=gen)
    weight = torch.randn(2, 8, 5, 5, generator=gen)  # what each consumer multiplies the gathered maps by
    mine = full[:, 4 * rank:4 * rank + 4].contiguous(memory_format=torch.channels_last).requires_grad_()
    (gathered,) = placement.gather([mine], 1, "g", (4, 4))
    (gathered * weight * (rank + 1)).sum().backward()
    shuffle_in = mine.detach().clone().requires_grad_()
    (shuffled,) = placement.shuffle([shuffle_in], "s", 2)
    shuffled.backward(torch.ones_like(shuffled).contiguous(memory_format=torch.channels_last))
    uneven_full = torch.randn(2, 5, generator=gen)
    part = uneven_full[:, :3] if rank == 0 else uneven_full[:, 3:]
    part = part.clone().requires_grad_()
    (uneven,) = placement.gather([part], 1, "u", (3, 2))
    (uneven * (rank + 1)).sum().backward()
    got = {"gathered_cl": gathered.is_contiguous(memory_format=torch.channels_last),
           "grad_cl": mine.grad.is_contiguous(memory_format=torch.channels_last),
           "shuffled_cl": shuffled.is_contiguous(memory_format=torch.channels_last),
           "shuffle_grad_cl": shuffle_in.grad.is_contiguous(memory_format=torch.channels_last),
           "gathered": gathered.detach(), "grad": mine.grad, "full": full, "weight": weight,
           "uneven": uneven.detach(), "uneven_full": uneven_full, "uneven_grad": part.grad,
           "counted": placement.counter.snapshot()}
    if rank == 0:
        torch.save(got, out)
    finish()


def checkpoint_gather(rank: int, world: int, store: str, groups: int, out: str):
    """Checkpoint state under world / groups replicas: rank 0 alone assembles the reference weights and
    momentum; every rank saves what it got (rank r to out.r)."""
    setup(rank, world, store)
    from alexnet import checkpoint as ckpt_io
    from conftest import tiny_spec
    _, _, model = alexnet_on_this_rank(tiny_spec(groups))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"weights": ckpt_io.model_state(model), "optimizer": ckpt_io.optimizer_state(model, optimizer),
                "everywhere": full_state_dict(model)}, f"{out}.{rank}")
    finish()


def grad_sync_curve(rank: int, world: int, store: str, groups: int, mode: str, hybrid: bool, steps: int, out: str):
    """``steps`` SGD steps on 7-row global batches (slices of unequal size), gradients synced ``flat`` (the
    runtime's one all-reduce after backward) or ``overlap`` (DDP's buckets during backward): every rank's
    losses and, on rank 0, the final reference-layout weights."""
    setup(rank, world, store)
    from alexnet.init import init_reference_state
    from alexnet.model import GroupAlexNet
    from conftest import tiny_spec
    from parallel.overlap import overlap_replicas
    spec = tiny_spec(groups)
    rows = None
    if hybrid:
        from parallel.hybrid import init_hybrid_from_env
        conv, fc, rows, runtime = init_hybrid_from_env(spec.slot_groups, "gloo")
        model = GroupAlexNet(spec, conv, fc_placement=fc, rows=rows)
    else:
        _, runtime, model = alexnet_on_this_rank(spec)
    load_full_state_dict(model, init_reference_state(spec, 0))
    trained = overlap_replicas(model, runtime, torch.device("cpu")) if mode == "overlap" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = batch_of(7 * steps)
    losses = []
    for step in range(steps):
        sizes = [len(t) for t in torch.tensor_split(torch.arange(7), runtime.num_replicas)]
        lo = 7 * step + sum(sizes[:runtime.replica])
        mine = slice(lo, lo + sizes[runtime.replica])
        runtime.plan_rows(sizes)
        if rows is not None:
            rows.plan(sizes)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(trained(x[mine]), y[mine])
        loss.backward()
        runtime.sync_gradients(model.parameters(), rows=sizes[runtime.replica])
        opt.step()
        losses.append(loss.item())
    weights = full_state_dict(model)
    if rank == 0:
        torch.save({"weights": weights}, f"{out}.weights")
    torch.save({"losses": losses}, f"{out}.{rank}")
    finish()


def converted_torchvision(rank: int, world: int, store: str, networks: list, out: str):
    """Torchvision networks ((name, image size) pairs) converted over ``world`` gloo ranks (float64, one slot
    each), in eval then train mode (dropout off), each against the original that every rank also builds (seed 0): rank 0 saves, per
    network and mode, the largest relative error of the output, of the input gradient (summed over ranks:
    the image is replicated, each rank's share is its output channels') and of each parameter's gradient
    (gathered), plus how many conv/linear weights each rank held; no tensor is written."""
    setup(rank, world, store)
    import torchvision
    from parallel import full_state_dict
    from parallel.convert import convert
    from parallel.distributed import init_from_env
    placement, _ = init_from_env(world, "gloo")

    def relative(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()

    results = {}
    for name, size in networks:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10).double()
        converted = convert(model, placement)
        for m in (*model.modules(), *converted.modules()):
            if isinstance(getattr(m, "p", None), float):  # dropout off: torch draws masks by generator
                m.p = 0.0
        held = torch.tensor([float(sum(p.numel() for p in converted.parameters() if p.dim() > 1))])
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        for mode in ("eval", "train"):
            model.train(mode == "train")
            converted.train(mode == "train")
            x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            y_ours, y_ref = converted(x_ours), model(x_ref)
            y_ours.square().sum().backward()
            y_ref.square().sum().backward()
            dist.all_reduce(x_ours.grad)
            grads = full_state_dict(converted, lambda p: p.grad)
            largest = max(p.grad.abs().max().item() for p in model.parameters())
            # noise-level gradients (a conv bias before train-mode batch norm: 0 in exact arithmetic) are
            # measured against 1e-3 of the largest gradient, as the one-process test does
            param_error = max(((grads[k] - p.grad).abs().max()
                               / max(p.grad.abs().max().item(), 1e-3 * largest)).item()
                              for k, p in model.named_parameters())
            results[name, mode] = {"y": relative(y_ours.detach(), y_ref.detach()),
                                   "x_grad": relative(x_ours.grad, x_ref.grad), "params": param_error,
                                   "held": held.item()}
            model.zero_grad()
            converted.zero_grad()
        del model, converted
    if rank == 0:
        torch.save(results, out)
    finish()
