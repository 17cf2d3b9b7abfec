"""Whoever sets up tears down: a user's script on parallel/ under torchrun is torn down at exit without doing it
itself; the project's collectives use the installed torch's names (no deprecation noise)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import OWN_DEPRECATION
from test_distributed import standalone_torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_user_script():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([*standalone_torchrun(2), os.path.join(ROOT, "tests", "user_script_no_teardown.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_a_user_script_that_never_tears_down_is_exact_quiet_and_torn_down():
    """The script computes exactly, prints no deprecation warning of ours, its process groups are destroyed
    at exit (``tear_down``: no "could not destroy") and torchrun sees it succeed. The abort this guards
    against came in about 1 launch of 20 (4 of 80 here before ``FINISH_S``, 0 of 80 after), so one launch
    rarely shows its return; the next test pins the mechanism."""
    done = run_user_script()
    out = done.stdout + done.stderr
    assert "rank 0: exact" in out and "rank 1: exact" in out, out[-3000:]
    assert "could not destroy" not in out
    assert done.returncode == 0, out[-3000:]
    assert not OWN_DEPRECATION.search(out), [line for line in out.splitlines() if OWN_DEPRECATION.search(line)]


def test_tear_down_waits_for_peers_only_after_a_clean_exit_then_yields_the_gil(monkeypatch):
    """Barrier (clean exit only), destroy, then a sleep without the GIL so that gloo's worker threads can
    free their finished work while Python is whole (without it: "terminate called ..." at exit)."""
    from parallel import distributed
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(distributed.time, "sleep", lambda s: calls.append(("sleep", s)))
    monkeypatch.delattr(sys, "last_value", raising=False)
    distributed.tear_down()
    assert calls[:2] == ["barrier", "destroy"] and calls[2][0] == "sleep" and calls[2][1] >= 0.05, calls
    calls.clear()
    monkeypatch.setattr(sys, "last_value", RuntimeError("a step failed"), raising=False)
    distributed.tear_down()  # peers may never reach a barrier: destroy without waiting
    assert calls[0] == "destroy" and calls[1][0] == "sleep"


def test_teardown_is_registered_once_however_often_groups_are_made(monkeypatch):
    from parallel import distributed
    registered = []
    monkeypatch.setattr(distributed.atexit, "register", registered.append)
    monkeypatch.setattr(distributed.atexit, "unregister", lambda f: registered.remove(f) if f in registered else None)
    distributed.own_teardown()
    distributed.own_teardown()
    assert registered == [distributed.tear_down]


def test_collectives_use_the_installed_torchs_names(monkeypatch):
    """torch 2.14: all_gather_single / reduce_scatter_single; an older torch (2.11) only has the old names."""
    import torch
    from parallel import comm
    dist = torch.distributed
    used = []
    monkeypatch.setattr(dist, "all_gather_single", lambda out, send, group: used.append("new"), raising=False)
    monkeypatch.setattr(dist, "all_gather_into_tensor", lambda out, send, group: used.append("old"))
    comm._gather_into(torch.empty(2), torch.empty(1), None)
    monkeypatch.delattr(dist, "all_gather_single")
    comm._gather_into(torch.empty(2), torch.empty(1), None)
    monkeypatch.setattr(dist, "reduce_scatter_single", lambda out, send, group: used.append("new"), raising=False)
    monkeypatch.setattr(dist, "reduce_scatter_tensor", lambda out, send, group: used.append("old"))
    comm._reduce_scatter_into(torch.empty(1), torch.empty(2), None)
    monkeypatch.delattr(dist, "reduce_scatter_single")
    comm._reduce_scatter_into(torch.empty(1), torch.empty(2), None)
    assert used == ["new", "old", "new", "old"]


@pytest.mark.parametrize("script", ["model_stats"])
def test_tools_refuse_what_they_do_not_model_in_one_line(script, capsys):
    """Every key a tool would otherwise ignore for the placement, device or precision asked is refused by name."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import model_stats
    g2 = os.path.join(ROOT, "configs", "fashion_mnist", "g2.yaml")
    refusals = {("--set", "parallel.placement=hybrid"): "give the launch's --world N",
                ("--set", "parallel.placement=hybrid", "--world", "2", "--set", "model.exchange.fc7=own"):
                    "every fc layer must see all inputs",
                ("--set", "parallel.placement=local", "--world", "2"): "drop --world",
                ("--set", "parallel.placement=distributed"): "give the launch's --world N"}
    for extra, words in refusals.items():
        assert model_stats.main(["--config", g2, "--memory", "--batch", "16", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    # the hybrid's figures are its own (every rank holds every conv weight), not the model-parallel ones
    tables = {}
    for placement in ("distributed", "hybrid"):
        assert model_stats.main(["--config", g2, "--memory", "--batch", "16", "--world", "2", "--json", "--set",
                                 f"parallel.placement={placement}"]) == 0
        tables[placement] = json.loads(capsys.readouterr().out)
    params = {p: [d["parameters"] for d in t["devices"].values()] for p, t in tables.items()}
    assert params["hybrid"][0] > params["distributed"][0], params
