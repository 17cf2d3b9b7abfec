"""The comparison as a user opens it: the real TensorBoard server on a tiny study's logdir. HParams opens
on what the study varies (groups, exchanges, seed, params, MACs) and the five metrics that matter, every
run listed with its groups and seed, values as written; Custom Scalars has its charts."""
import json
import re
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from alexnet.hparams import METRICS, STUDY_HPARAMS
import compare_groups
from test_study import write_family


class TensorBoard:
    """``tensorboard --logdir --port 0``: the OS picks the port and the server names it on stderr; stopped on exit."""

    def __init__(self, logdir):
        self.proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
                                      "--host", "127.0.0.1", "--port", "0", "--load_fast=false",
                                      "--reload_interval=1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.port, self.said = None, []

    def __enter__(self):
        # "TensorBoard 2.x at http://127.0.0.1:PORT/ (Press CTRL+C to quit)" once it listens
        while self.port is None:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"tensorboard exited: {''.join(self.said)[-2000:]}")
            self.said.append(line)
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            self.port = int(found.group(1)) if found else None
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.get("/data/runs"):
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError("tensorboard did not serve the logdir within 60 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return json.load(r)

    def poll(self, fetch, ready, timeout=60):
        """fetch() until ready(result): the server loads event files in the background."""
        deadline = time.time() + timeout
        while True:
            result = fetch()
            if ready(result) or time.time() > deadline:
                return result
            time.sleep(0.5)

    def post(self, path, body):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", "X-Requested-With": "XMLHttpRequest"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.load(r)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    fam = write_family(tmp)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert compare_groups.main([str(fam), "--seeds", "0", "1", "--groups", "1", "2"]) == 0
    finally:
        os.chdir(cwd)
    return tmp / "runs" / "tinyfam"


def test_hparams_opens_on_the_study_and_lists_every_run(study_dir):
    with TensorBoard(study_dir) as tb:
        experiment = tb.poll(lambda: tb.post("/data/plugin/hparams/experiment", {"experimentName": ""}),
                             lambda e: e.get("hparamInfos"))
        names = [h["name"] for h in experiment["hparamInfos"]]
        assert set(names[:5]) == set(STUDY_HPARAMS), names  # the five the dashboard shows
        domains = {h["name"]: h["domainDiscrete"] for h in experiment["hparamInfos"]}
        assert domains["groups"] == ["1", "2"] and domains["seed"] == ["0", "1"]
        assert domains["batch_size"] == ["32"] and domains["epochs"] == ["2"] and domains["data_replicas"] == ["1"]
        assert [m["name"]["tag"] for m in experiment["metricInfos"]][:len(METRICS)] == list(METRICS)
        columns = [{"hparam": n, "includeInResult": True} for n in names] + \
            [{"metric": {"tag": m}, "includeInResult": True} for m in METRICS]
        request = {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                                             "STATUS_RUNNING"],
                   "colParams": columns, "startIndex": 0, "sliceSize": 100}
        groups = tb.poll(lambda: tb.post("/data/plugin/hparams/session_groups", request)["sessionGroups"],
                         lambda g: len(g) == 4)
        listed = sorted((g["hparams"]["groups"], g["hparams"]["seed"]) for g in groups)
        assert listed == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
        params = {g["hparams"]["groups"]: g["hparams"]["params"] for g in groups}
        assert all(v.isdigit() for v in params.values()) and params["1"] != params["2"]
        assert all(len(g["metricValues"]) >= 1 for g in groups)


def test_custom_scalars_layout_is_served(study_dir):
    """Custom Scalars opens on the seed bands (a margin chart per compared metric), then the per-run charts."""
    from alexnet.logs import CUSTOM_SCALARS
    from study_bands import CATEGORY, COMPARED
    with TensorBoard(study_dir) as tb:
        layout = tb.poll(lambda: tb.get("/data/plugin/custom_scalars/layout"), lambda lay: len(lay.get("category", [])) > 1)
        first, *rest = layout["category"]
        assert first["title"] == CATEGORY
        assert [c["margin"]["series"][0] for c in first["chart"]] == [
            {"value": f"seeds/{m}", "lower": f"seeds/{m}/lower", "upper": f"seeds/{m}/upper"} for m in reversed(COMPARED)]
        titles = {c["title"]: [chart["title"] for chart in c["chart"]] for c in rest}
        assert titles == {category: list(charts) for category, charts in CUSTOM_SCALARS.items()}
        runs = tb.get("/data/runs")
        # no run "." (the study's HParams experiment lives in its first summary run); sorted, the summary runs lead
        assert "." not in runs and sorted(runs)[:2] == ["_mean/g1", "_mean/g2"], runs


def served_series(tb, run, tag):
    from urllib.parse import quote
    points = tb.poll(lambda: tb.get(f"/data/plugin/scalars/scalars?run={quote(run, safe='')}&tag={quote(tag, safe='')}"),
                     lambda p: len(p) > 0)
    return [(step, value) for _, step, value in points]


def test_seed_bands_are_the_mean_and_sd_of_the_runs_own_metrics(study_dir):
    import statistics
    with TensorBoard(study_dir) as tb:
        for config in ("g1", "g2"):
            histories = []
            for seed in (0, 1):
                with open(study_dir / f"{config}-s{seed}" / "metrics.jsonl") as f:
                    histories.append([json.loads(line) for line in f])
            for metric in ("val_top1_err", "train_loss"):
                per_epoch = [[h[e][metric] for h in histories] for e in range(len(histories[0]))]
                mean = served_series(tb, f"_mean/{config}", f"seeds/{metric}")
                lower = served_series(tb, f"_mean/{config}", f"seeds/{metric}/lower")
                upper = served_series(tb, f"_mean/{config}", f"seeds/{metric}/upper")
                assert [s for s, _ in mean] == list(range(1, len(per_epoch) + 1))
                for (step, m), (_, lo), (_, hi), values in zip(mean, lower, upper, per_epoch):
                    sd = statistics.stdev(values)
                    assert m == pytest.approx(statistics.mean(values), rel=1e-5)
                    assert lo == pytest.approx(m - sd, rel=1e-5, abs=1e-5)
                    assert hi == pytest.approx(m + sd, rel=1e-5, abs=1e-5)


def test_a_resumed_study_rewrites_the_bands_without_duplicate_steps(study_dir, tmp_path):
    import shutil
    copy = tmp_path / "tinyfam"
    shutil.copytree(study_dir, copy)
    from study_bands import write_summary_runs
    runs = [{"name": c, "dir": str(copy / f"{c}-s{s}")} for c in ("g1", "g2") for s in (0, 1)]
    for _ in range(2):  # as a study that stops and starts again does
        write_summary_runs(str(copy), runs)
    for config in ("g1", "g2"):
        files = [f for f in os.listdir(copy / "_mean" / config) if f.startswith("events.out.tfevents.")]
        assert len(files) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(copy / "_mean" / "g1"))
    events.Reload()
    steps = [e.step for e in events.Scalars("seeds/val_top1_err")]
    assert steps == sorted(set(steps)) and steps


def test_bands_use_only_epochs_every_seed_reached():
    from study_bands import bands
    a = [{"epoch": e, "val_top1_err": 10.0 + e} for e in (1, 2, 3)]
    b = [{"epoch": e, "val_top1_err": 12.0 + e} for e in (1, 2)]
    got = bands([a, b])["val_top1_err"]
    assert [p[0] for p in got] == [1, 2] and got[0][1] == pytest.approx(12.0)
    assert bands([a, []]) == {}
