"""How strong the tests are: plant known bugs one at a time, run the tests that should notice, count kills.

  python scripts/kill_rate.py                 # every planted bug (about 5 minutes on 2 cores)
  python scripts/kill_rate.py --only 3 7      # some of them, by number

Each bug is a one-line edit of parallel/, alexnet/ or data/ (the line must exist exactly once,
so a refactor that moves it makes the script say so instead of silently testing nothing).
The edit is made in a throw-away copy of the checkout (git ls-files), the named fast tests run
there with ``-x``, and the bug is *killed* when they fail. The script prints one line per bug
and the kill rate; a bug that survives is a missing test.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: (what the bug is, file, the line as it is, the line with the bug, the tests that should notice)
BUGS = [
    ("local gather concatenates groups in reverse order", "parallel/comm.py",
     "return tuple(torch.cat([s.to(t, non_blocking=True) for s in shards], dim=dim) for t in targets)",
     "return tuple(torch.cat([s.to(t, non_blocking=True) for s in reversed(shards)], dim=dim) for t in targets)",
     ["tests/test_layers.py"]),
    ("local gather's backward drops every consumer's gradient but the first", "parallel/comm.py",
     "total = piece if total is None else total + piece", "total = piece if total is None else total",
     ["tests/test_layers.py"]),
    ("channel shuffle forgets the transpose (wrong permutation)", "parallel/comm.py",
     "y = torch.cat(received, dim=dim).transpose(dim, dim + 1)  # (.., g_t, h, c, ..)",
     "y = torch.cat(received, dim=dim)  # (.., g_t, h, c, ..)", ["tests/test_topologies.py", "tests/test_library.py"]),
    ("reduce-scatter between ranks keeps its own gradient instead of the sum", "parallel/comm.py",
     "_reduce_scatter_into(out, send, pg)", "out.copy_(chunks[index])",
     ["tests/test_library.py", "tests/test_distributed.py::test_exchanges_between_ranks_keep_channels_last_and_"
      "reduce_scatter_uneven_shares"]),
    ("a replica's batch slice is off by one", "data/sampler.py",
     "start = lo + self.replica * size + min(self.replica, extra)",
     "start = lo + self.replica * size + min(self.replica + 1, extra)",
     ["tests/test_data.py", "tests/test_invariance.py::test_in_memory_augmentation_is_the_same_for_every_number_of_"
      "replicas"]),
    ("a resumed run loses the SGD momentum", "alexnet/checkpoint.py",
     'optimizer.state[p]["momentum_buffer"] = value.clone()',
     'optimizer.state[p]["momentum_buffer"] = torch.zeros_like(value)', ["tests/test_reliability.py"]),
    ("the NaN guard never fires", "alexnet/engine.py",
     "diverged |= ~torch.isfinite(loss.detach())", "diverged |= torch.isfinite(loss.detach()) & False",
     ["tests/test_reliability.py"]),
    ("the run-directory lock is never taken", "alexnet/rundir.py",
     "fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass", ["tests/test_reliability.py", "tests/test_cli.py"]),
    ("replicas' gradients are not weighted by their rows", "parallel/runtime.py",
     "flat[:-1] *= rows  # in place on the buffer the all-reduce needs anyway", "flat[:-1] *= 1",
     ["tests/test_topologies.py"]),
    ("dropout ignores the replica's row offset", "parallel/dropout.py",
     "draw[2].fill_(0 if self.global_rows or row_offset is None else row_offset)", "draw[2].fill_(0)",
     ["tests/test_invariance.py"]),
    ("synced BatchNorm keeps the biased variance as running variance", "parallel/norm.py",
     "norm.running_var.mul_(1 - f).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=f)",
     "norm.running_var.mul_(1 - f).add_(var.detach(), alpha=f)", ["tests/test_library.py"]),
    ("every slot keeps the first rows of the drawn weights (groups start as copies)", "parallel/layers.py",
     "self.weights[i].copy_(weight[lo:hi].reshape(self.weights[i].shape))",
     "self.weights[i].copy_(weight[:hi - lo].reshape(self.weights[i].shape))", ["tests/test_library.py"]),
    ("unnamed layers share one byte-count key", "parallel/comm.py",
     "while key in self._owners and self._owners[key] is not owner:", "while False:", ["tests/test_library.py"]),
    ("the hybrid's fc gradients are not divided by the ranks", "parallel/hybrid.py",
     "p.grad.div_(self.num_replicas)", "p.grad.div_(1)", ["tests/test_topologies.py"]),
    ("the logged loss is this replica's, not the global batch's", "alexnet/engine.py",
     "on_log(step, loss_sum / rows, lr)", "on_log(step, loss.item(), lr)",
     ["tests/test_invariance.py::test_first_steps_equal_the_one_process_curve"]),
    ("a replica reuses the first rows' crops and flips", "data/fashion_mnist.py",
     "draws.append(torch.stack([top, left, flip])[:, start - lo:end - lo])",
     "draws.append(torch.stack([top, left, flip])[:, :end - start])",
     ["tests/test_invariance.py::test_in_memory_augmentation_is_the_same_for_every_number_of_replicas"]),
    ("full weights assembled in reverse slot order", "parallel/placement.py",
     "return torch.cat([p.cpu() for p in parts], dim=0)", "return torch.cat([p.cpu() for p in parts[::-1]], dim=0)",
     ["tests/test_layers.py", "tests/test_library.py"]),
    ("HParams no longer marks the study's hyperparameters", "alexnet/hparams.py",
     "name=name, type=api_pb2.DATA_TYPE_STRING, differs=name in varying or len(values) > 1,",
     "name=name, type=api_pb2.DATA_TYPE_STRING, differs=len(values) > 1,",
     ["tests/test_study.py", "tests/test_tensorboard.py"]),
    ("the report calls any interval around 0 'equal'", "scripts/study_stats.py",
     'if -margin <= d["low"] and d["high"] <= margin:', "if True:", ["tests/test_study.py"]),
    ("GPU decode forgets the PCA colour noise", "data/device_decode.py",
     "x = x + shift.to(device, non_blocking=True)[:, :, None, None]", "x = x",
     ["tests/test_device_decode.py"]),
    ("GPU decode never flips", "data/device_decode.py",
     "flip = (u[:, 2] < 0.5).to(device, non_blocking=True)", "flip = (u[:, 2] < 0.0).to(device, non_blocking=True)",
     ["tests/test_device_decode.py"]),
    ("the caller's stream reads the outputs without waiting for the side streams", "parallel/streams.py",
     "        main.wait_stream(side)\n", "", ["tests/test_speed_paths.py"]),
    ("training FLOPs counted as one forward pass (2 x MACs)", "alexnet/mfu.py",
     "return 6.0 * macs", "return 2.0 * macs", ["tests/test_speed_paths.py"]),
    ("a mid-epoch checkpoint resumes at the epoch's first step", "alexnet/checkpoint.py",
     'ckpt.get("epoch_step", 0)', "0", ["tests/test_reliability.py"]),
    ("a format-1 checkpoint's block-diagonal fc layers keep their old keys", "alexnet/checkpoint.py",
     'key = f"{parts[0]}.{parts[2]}"', "key = key",
     ["tests/test_cli.py::test_format_1_checkpoint_resumes_as_the_run_that_wrote_it"]),
    ("the retired cross_group's replacement leaves out the paper's layers it did not list", "alexnet/config.py",
     "named = [n for n in CROSSABLE if n in PAPER_EXCHANGE or n in cross_group]",
     "named = [n for n in CROSSABLE if n in cross_group]",
     ["tests/test_cli.py::test_retired_cross_group_names_the_exchange_that_means_the_same"]),
    ("the hybrid counts its conv groups' exchange as process traffic", "parallel/hybrid.py",
     "counter=conv_counter if conv_counter is not None else counter)", "counter=counter)",
     ["tests/test_topologies.py::test_exchange_benchmark_reports_the_three_variants"]),
    ("memory: exchange buffers counted once per process instead of on every device", "alexnet/memory.py",
     'mine = whole if info.exchange == "all" else whole // slots',
     'mine = (whole if info.exchange == "all" else whole // slots) if k == 0 else 0', ["tests/test_memory.py"]),
    ("memory: momentum counted for one slot only", "alexnet/memory.py",
     "mem.optimizer = mem.parameters if momentum else 0", "mem.optimizer = mem.parameters if momentum and k == 0 else 0",
     ["tests/test_memory.py"]),
    ("MFU divides by one device's peak whatever the slots", "alexnet/mfu.py",
     "return len({s.device for s in placement.local_slots}) * world", "return world",
     ["tests/test_two_gpu_paths.py"]),
    ("the local shuffle turns channels_last maps into NCHW", "parallel/comm.py",
     "if all(_format_of(p) is torch.channels_last for p in parts):", "if False:", ["tests/test_two_gpu_paths.py"]),
    ("the compiled LRN guards on every shape (recompiles past the limit on two devices)", "alexnet/lrn.py",
     "return torch.compile(local_response_norm, dynamic=True)", "return torch.compile(local_response_norm)",
     ["tests/test_two_gpu_paths.py"]),
    ("the CPU LRN's band reaches one channel too far", "alexnet/lrn.py",
     "inside = (offset >= -(size // 2)) & (offset <= (size - 1) // 2)",
     "inside = (offset >= -(size // 2)) & (offset <= (size - 1) // 2 + 1)", ["tests/test_cpu_speed.py"]),
    ("the CPU LRN's backward forgets the window's adjoint (uses the band, not its transpose)", "alexnet/lrn.py",
     "back = t @ ctx.band.t() if ctx.channels_last else ctx.band @ t",
     "back = t @ ctx.band if ctx.channels_last else ctx.band.t() @ t", ["tests/test_cpu_speed.py"]),
    ("the CPU LRN's window sum runs in bf16 under autocast", "alexnet/lrn.py",
     "with torch.autocast(x.device.type, enabled=False):  # the window sum stays in fp32 under bf16 autocast",
     "with torch.autocast(x.device.type, enabled=torch.is_autocast_enabled(x.device.type)):",
     ["tests/test_memory.py"]),
    ("choosing a layout keeps the slower one", "parallel/tuning.py",
     "best = min(ms, key=ms.get)", "best = max(ms, key=ms.get)", ["tests/test_cpu_speed.py"]),
    ("within- and between-group correlation swapped", "alexnet/filters.py",
     "return corr[same & off_diagonal].mean().item(), (between.mean().item() if between.numel() else float(\"nan\"))",
     "return (between.mean().item() if between.numel() else float(\"nan\")), corr[same & off_diagonal].mean().item()",
     ["tests/test_study.py"]),
    ("no CUDA graph recorded is reported as recorded once, then replayed", "alexnet/graphs.py",
     "if recorded == 0:", "if recorded < 0:", ["tests/test_two_gpu_paths.py"]),
    ("two local ranks share a GPU when fewer are visible", "parallel/distributed.py",
     "if local_world > visible:", "if False:", ["tests/test_two_gpu_paths.py"]),
    ("a strided slice is copied to another device as it is", "parallel/comm.py",
     "return t.contiguous(memory_format=_format_of(t)).to(device, non_blocking=True)",
     "return t.to(device, non_blocking=True)", ["tests/test_two_gpu_paths.py"]),
    ("the hybrid gathers its row counts every step although the sampler planned them", "parallel/hybrid.py",
     "if planned is not None and planned[self.index] == rows:", "if False:",
     ["tests/test_topologies.py::test_hybrid_placement_matches_one_process"]),
    ("GroupDropout draws the same mask every forward unless set_draws is called", "parallel/dropout.py",
     "draw[1] += 1  # the next forward draws the next step, as nn.Dropout draws anew",
     "draw[1] += 0", ["tests/test_promises.py"]),
    ("a changed dropout p keeps the rate it was built with", "parallel/dropout.py",
     "threshold, scale = round(self.p * 2 ** 32), 1.0 / (1.0 - self.p)  # kept: hash >= p 2^32",
     "threshold, scale = round(0.5 * 2 ** 32), 2.0", ["tests/test_promises.py"]),
    ("a loaded GroupDropout restarts its mask stream", "parallel/dropout.py",
     'self.set_position(state["seed"], state["step"])', "pass", ["tests/test_promises.py"]),
    ("a data replica's dropout rows start at 0 when the loop names no offset", "parallel/dropout.py",
     'return getattr(self.placement, "replica", 0) * rows', "return 0",
     ["tests/test_promises.py::test_dropout_without_set_draws_is_the_same_on_gloo_ranks"]),
    ("load_full_state_dict ignores keys it does not know", "parallel/layers.py",
     "return pairs, missing, [k for k in state if k not in expected], problems", "return pairs, missing, [], problems",
     ["tests/test_promises.py"]),
    ("a sharded model moved off its devices fails inside a convolution", "parallel/layers.py",
     "        self._check_devices()\n", "", ["tests/test_promises.py"]),
    ("input_mode= is dropped without a word", "parallel/layers.py",
     "    if input_mode is None:\n", "    if True:\n", ["tests/test_promises.py"]),
    ("DDP's buckets are averaged, not weighted by the replicas' rows", "parallel/overlap.py",
     "buffer.mul_(state.weight)", "buffer.mul_(1.0 / state.replicas)", ["tests/test_grad_sync.py"]),
    ("the seed band is the population sd", "scripts/study_bands.py",
     "sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0",
     "sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))", ["tests/test_tensorboard.py"]),
    ("the seed bands reach epochs some seeds have not", "scripts/study_bands.py",
     'reached = min(h[-1]["epoch"] for h in histories)  # the last epoch every seed has reached',
     'reached = max(h[-1]["epoch"] for h in histories)',
     ["tests/test_tensorboard.py::test_bands_use_only_epochs_every_seed_reached"]),
    ("a resumed study appends its seed bands to the old ones", "scripts/study_bands.py",
     "shutil.rmtree(folder, ignore_errors=True)", "pass",
     ["tests/test_tensorboard.py::test_a_resumed_study_rewrites_the_bands_without_duplicate_steps"]),
    ("a script's flag renamed while the docs still name the old one", "scripts/model_stats.py",
     'p.add_argument("--fit", help=', 'p.add_argument("--fit-in", help=', ["tests/test_docs.py"]),
    ("teardown leaves gloo's worker threads no time without the GIL before finalisation", "parallel/distributed.py",
     "FINISH_S = 0.1", "FINISH_S = 0", ["tests/test_teardown.py::test_tear_down_waits_for_peers_only_after_a_clean_"
                                        "exit_then_yields_the_gil"]),
    ("model_stats --memory prints the model-parallel figures for the hybrid placement", "scripts/model_stats.py",
     '    if placement == "hybrid":\n', '    if False:\n', ["tests/test_teardown.py::test_tools_refuse_what_they_do_"
                                                          "not_model_in_one_line"]),
    ("the hybrid's conv layers predicted on the whole batch, not the rank's rows", "alexnet/memory.py",
     "n_conv = -(-batch // slots) if hybrid else n_rows", "n_conv = n_rows",
     ["tests/test_memory.py::test_hybrid_prediction_matches_mem_tracker_on_gloo_ranks"]),
    ("the all-gather between ranks calls torch 2.14's deprecated name", "parallel/comm.py",
     '(dist.all_gather_single if hasattr(dist, "all_gather_single") else dist.all_gather_into_tensor)(',
     "(dist.all_gather_into_tensor)(", ["tests/test_convert.py::test_converted_under_gloo_ranks_equals_the_original_"
                                       "and_holds_1_over_k"]),
    ("train.py accepts a key this run ignores (no scope check)", "alexnet/fit.py",
     "    scope.check(cfg, scope.scope_of(where))", "    pass", ["tests/test_scope.py::test_train_py_refuses_a_key_"
                                                                   "this_run_would_ignore_with_one_line_and_exit_2"]),
    ("a scoped key counts as set only when asked by value", "alexnet/scope.py",
     "asked = rule.set_to(value) if rule.set_to else value != _default(rule.key)",
     "asked = rule.set_to(value) if rule.set_to else False", ["tests/test_scope.py"]),
    ("under torchrun the peers exit at once on a user error, so torchrun can end rank 0 before it speaks", "train.py",
     "    time.sleep(PEER_REPORT_WAIT_S)\n", "", ["tests/test_distributed.py::test_world_size_that_does_not_fit_"
                                                "groups_is_one_line"]),
]


def copy_checkout(dest: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        src = os.path.join(ROOT, name)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, name))


def plant(tree: str, path: str, before: str, after: str) -> None:
    full = os.path.join(tree, path)
    text = open(full).read()
    if text.count(before) != 1:
        raise SystemExit(f"error: {path} holds {text.count(before)} copies of the line to change "
                         f"({before!r}); update scripts/kill_rate.py to the code as it is now")
    with open(full, "w") as f:
        f.write(text.replace(before, after))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", type=int, help="bug numbers (1-based) to plant")
    args = p.parse_args(argv)
    chosen = [(i, b) for i, b in enumerate(BUGS, 1) if not args.only or i in args.only]
    killed = 0
    for i, (what, path, before, after, tests) in chosen:
        with tempfile.TemporaryDirectory() as tree:
            copy_checkout(tree)
            plant(tree, path, before, after)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                  cwd=tree, capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONPATH=tree))  # the copy, not the installed checkout
            dead = proc.returncode != 0
            killed += dead
            print(f"{i:2d}. {'killed  ' if dead else 'SURVIVED'} {what} ({path}; {time.perf_counter() - start:.0f} s)",
                  flush=True)
    print(f"kill rate: {killed} / {len(chosen)} ({100.0 * killed / len(chosen):.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
