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
    from alexnet.logs import CUSTOM_SCALARS
    with TensorBoard(study_dir) as tb:
        layout = tb.poll(lambda: tb.get("/data/plugin/custom_scalars/layout"), lambda lay: lay.get("category"))
        titles = {c["title"]: [chart["title"] for chart in c["chart"]] for c in layout["category"]}
        assert titles == {category: list(charts) for category, charts in CUSTOM_SCALARS.items()}
