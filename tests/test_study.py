"""The group-count study: the report is computed from the runs' files; the runner skips and resumes."""
import csv
import json
import math
import os
import statistics

import pytest

import compare_groups
from study_report import build_report

SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke.yaml")


def fake_run(family_dir, G, seed, errors, macs, params=1000, speed=100.0, mb=1.5):
    run_dir = family_dir / f"g{G}-s{seed}"
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for epoch, (top1, top5) in enumerate(errors, 1):
            f.write(json.dumps({"epoch": epoch, "val_top1_err": top1, "val_top5_err": top5,
                                "images_per_s": speed + epoch, "cross_group_mb_per_step": mb}) + "\n")
    json.dump({"groups": G, "params": params, "macs": macs}, open(run_dir / "summary.json", "w"))


def test_report_numbers_are_recomputed_from_metrics(tmp_path):
    fam = tmp_path / "fam"
    curves = {(1, 0): [(30.0, 5.0), (20.0, 3.0)], (1, 1): [(28.0, 4.0), (22.0, 2.5)],
              (2, 0): [(25.0, 4.5), (21.0, 2.0)], (2, 1): [(24.0, 4.0), (19.5, 2.2)], (4, 0): [(40.0, 9.0), (26.0, 6.0)]}
    macs = {1: 1000, 2: 640, 4: 460}
    for (G, seed), errors in curves.items():
        fake_run(fam, G, seed, errors, macs[G], mb=0.5 * G)
    (fam / "g3-s0").mkdir()  # unfinished run: no summary, must be ignored
    text = build_report(str(fam))
    rows = {int(r["groups"]): r for r in csv.DictReader(open(fam / "comparison.csv")) if r["kind"] != "run"}
    assert sorted(rows) == [1, 2, 4]
    for G in (1, 2, 4):
        runs = [c for (g, _), c in curves.items() if g == G]
        finals = [c[-1][0] for c in runs]
        bests5 = [min(e[1] for e in c) for c in runs]
        assert float(rows[G]["final_top1_mean"]) == pytest.approx(statistics.fmean(finals))
        assert float(rows[G]["best_top5_mean"]) == pytest.approx(statistics.fmean(bests5))
        if len(runs) > 1:
            assert float(rows[G]["final_top1_std"]) == pytest.approx(statistics.stdev(finals))
        else:
            assert math.isnan(float(rows[G]["final_top1_std"]))
        assert float(rows[G]["macs_rel_g1"]) == pytest.approx(macs[G] / 1000)
        assert int(rows[G]["seeds"]) == len(runs)
        assert float(rows[G]["images_per_s"]) == pytest.approx(101.5)
        assert float(rows[G]["cross_group_mb_per_step"]) == pytest.approx(0.5 * G)
    # the statement is computed: G=2 mean 20.25 vs G=1 mean 21.0, paired by seed (d = +1.0, -2.5): the 95%
    # interval -0.75 +- 12.706 * 2.475 / sqrt(2) includes 0, so the verdict is "inconclusive"
    assert "G = 2 - G = 1 = -0.75 points" in text and "inconclusive" in text and "36.0%" in text
    assert "[-22.99, +21.49]" in text
    assert "fewer than 3 seeds" in text
    per_run = [r for r in csv.DictReader(open(fam / "comparison.csv")) if r["kind"] == "run"]
    assert sorted((int(r["groups"]), int(r["seed"])) for r in per_run) == sorted(curves)
    assert (fam / "comparison.png").stat().st_size > 10_000 and (fam / "comparison.md").exists()


def write_family(tmp_path):
    fam = tmp_path / "configs" / "tinyfam"
    fam.mkdir(parents=True)
    for G in (1, 2):
        (fam / f"g{G}.yaml").write_text(
            f"inherit: {SMOKE}\nmodel:\n  groups: {G}\n  conv_channels: [12, 24, 36, 36, 24]\n  fc_widths: [48, 48]\n"
            "train:\n  epochs: 2\n")
    return fam


def test_runner_skips_finished_and_resumes_interrupted(tmp_path, monkeypatch):
    fam = write_family(tmp_path)
    monkeypatch.chdir(tmp_path)
    from alexnet.fit import fit
    runs = compare_groups.plan(str(fam), [1, 2], [0], [])
    assert [r["state"] for r in runs] == ["new", "new"]
    assert runs[0]["dir"] == os.path.join("runs", "tinyfam", "g1-s0")
    fit(runs[0]["cfg"], quiet=True)                         # G=1 finished
    fit(runs[1]["cfg"], stop_after_epoch=1, quiet=True)     # G=2 interrupted after epoch 1
    runs = compare_groups.plan(str(fam), [1, 2], [0], [])
    assert [r["state"] for r in runs] == ["done", "resume"]
    finished_before = os.path.getmtime(tmp_path / "runs" / "tinyfam" / "g1-s0" / "summary.json")
    assert compare_groups.main([str(fam), "--seeds", "0", "--groups", "1", "2", "--speed"]) == 0
    assert os.path.getmtime(tmp_path / "runs" / "tinyfam" / "g1-s0" / "summary.json") == finished_before
    speed = json.load(open(tmp_path / "runs" / "tinyfam" / "speed.json"))  # train.py's step, timed before training
    assert set(speed["configs"]) == {"g1", "g2"} and all(c["images_per_s"] > 0 for c in speed["configs"].values())
    assert "## Efficiency: time, not only MACs" in open(tmp_path / "runs" / "tinyfam" / "comparison.md").read()
    lines = [json.loads(x) for x in open(tmp_path / "runs" / "tinyfam" / "g2-s0" / "metrics.jsonl")]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert (tmp_path / "runs" / "tinyfam" / "comparison.csv").exists()
    assert compare_groups.main([str(fam), "--seeds", "0", "--groups", "1", "2", "--collect-only"]) == 0
    # a requested seed that never trained: named, non-zero, unless --allow-missing
    assert compare_groups.main([str(fam), "--seeds", "0", "1", "--groups", "1", "2", "--collect-only"]) == 2
    assert compare_groups.main([str(fam), "--seeds", "0", "1", "--groups", "1", "2", "--collect-only",
                                "--allow-missing"]) == 0
    report = open(tmp_path / "runs" / "tinyfam" / "comparison.md").read()
    assert "requested runs missing: g1 seed 1" in report and "epochs 2" in report and "batch 32" in report


def test_family_with_other_topologies_reports_each_config_by_name(tmp_path, monkeypatch):
    fam = write_family(tmp_path)
    (fam / "root.yaml").write_text(f"inherit: g1.yaml\nmodel:\n  groups: [2, 4, 4, 2, 2]\n  exchange: {{conv3: own}}\n")
    monkeypatch.chdir(tmp_path)
    assert compare_groups.main([str(fam), "--configs", "g1", "root", "--set", "train.epochs=1"]) == 0
    rows = {r["config"]: r for r in csv.DictReader(open(tmp_path / "runs" / "tinyfam" / "comparison.csv"))
            if r["kind"] != "run"}
    assert rows["root"]["groups"] == "2-4-4-2-2" and rows["root"]["exchanges"] == "fc6 all, fc7 all, fc8 all"
    assert int(rows["root"]["macs"]) < int(rows["g1"]["macs"])
    report = open(tmp_path / "runs" / "tinyfam" / "comparison.md").read()
    assert "| root | 2-4-4-2-2 |" in report and "root (G = 2-4-4-2-2; fc6 all, fc7 all, fc8 all): root" in report
    assert compare_groups.main([str(fam), "--configs", "nothere"]) == 2


def test_runner_rejects_overrides_it_owns(tmp_path):
    fam = write_family(tmp_path)
    assert compare_groups.main([str(fam), "--set", "run.seed=3"]) == 2


def test_smoke_run_events_hold_hparams_and_filter_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from alexnet.config import load
    from alexnet.fit import fit
    fit(load("configs/smoke.yaml", [f"run.dir={tmp_path}"]), quiet=True)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    images = events.Tags()["images"]
    assert {"filters/conv1_group0", "filters/conv1_group1", "filters/conv1_correlation"} <= set(images)
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    from tensorboard.plugins.hparams import plugin_data_pb2
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["groups"].string_value == "2" and start.hparams["seed"].string_value == "0"
    assert start.hparams["exchanges"].string_value == "conv3 all, fc6 all, fc7 all, fc8 all"
    assert {"macs", "epochs", "lr", "batch_size", "data_limit"} <= set(start.hparams)
    assert start.hparams["batch_size"].string_value == "32" and start.hparams["epochs"].string_value == "2"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    infos = {h.name: h for h in experiment.hparam_infos}
    assert [v.string_value for v in infos["groups"].domain_discrete.values] == ["2"]
    assert {h.name for h in experiment.hparam_infos if h.differs} == {"groups", "exchanges", "seed", "params", "macs"}
    assert [m.name.tag for m in experiment.metric_infos] == ["epoch/val_top1_err", "epoch/val_top5_err",
                                                             "epoch/train_loss", "epoch/images_per_s",
                                                             "epoch/peak_mib_max", "epoch/cross_group_mb_per_step"]
    scalars = set(events.Tags()["scalars"])
    assert "epoch/val_top1_err" in scalars and "train/loss" in scalars
    assert {"memory/peak_mib/cpu", "epoch/peak_mib_max"} <= scalars  # memory per device, and the largest
    assert not {"epoch/groups", "epoch/data_replicas", "epoch/step"} & scalars  # constants stay out
    assert not any(tag.startswith("hparam/") for tag in scalars)
    assert "custom_scalars__config__" in events.PluginTagToContent("custom_scalars")


def test_visualize_filters_writes_pngs(tmp_path):
    from alexnet.config import load
    from alexnet.fit import fit
    from visualize_filters import main
    fit(load("configs/smoke.yaml", [f"run.dir={tmp_path / 'run'}", "train.epochs=1"]), quiet=True)
    assert main([str(tmp_path / "run" / "checkpoints" / "last.pt"), "--out", str(tmp_path / "png")]) == 0
    for name in ("conv1_filters.png", "conv1_correlation.png", "conv3_input_group_share.png"):
        assert (tmp_path / "png" / name).stat().st_size > 1000
    # a root topology: conv1's groups are pictured; conv3 does not gather, so no input-share picture
    fit(load("configs/smoke.yaml", [f"run.dir={tmp_path / 'root'}", "train.epochs=1", "model.groups=[2,4,4,2,2]",
                                    "model.exchange.conv3=own"]), quiet=True)
    assert main([str(tmp_path / "root" / "checkpoints" / "last.pt"), "--out", str(tmp_path / "root_png")]) == 0
    assert sorted(os.listdir(tmp_path / "root_png")) == ["conv1_correlation.png", "conv1_filters.png"]


def test_runner_refuses_a_run_folder_with_other_settings(tmp_path, monkeypatch):
    fam = write_family(tmp_path)
    monkeypatch.chdir(tmp_path)
    from alexnet.fit import fit
    fit(compare_groups.plan(str(fam), [1], [0], [])[0]["cfg"], stop_after_epoch=1, quiet=True)
    assert compare_groups.main([str(fam), "--groups", "1", "--set", "optim.lr=0.5"]) == 2
    runs = compare_groups.plan(str(fam), [1], [0], ["optim.lr=0.5"], runs_dir=str(tmp_path / "other"))
    assert runs[0]["state"] == "new" and runs[0]["dir"] == str(tmp_path / "other" / "g1-s0")


def test_confidence_intervals_paired_and_welch():
    from study_stats import difference, t975, verdict
    assert t975(2) == 4.303 and t975(1e9) == pytest.approx(1.960, abs=1e-3) and 2.042 < t975(25) < 2.086
    # paired: differences 1, 2, 3 -> mean 2, sd 1, n 3: 2 +- 4.303 / sqrt(3)
    d = difference({0: 10.0, 1: 11.0, 2: 12.0}, {0: 11.0, 1: 13.0, 2: 15.0})
    assert d["method"] == "paired" and d["diff"] == pytest.approx(2.0)
    assert d["low"] == pytest.approx(2 - 4.303 / math.sqrt(3)) and d["high"] == pytest.approx(2 + 4.303 / math.sqrt(3))
    assert "inconclusive" in verdict(d)  # 4.303 / sqrt(3) = 2.48 > 2: the interval includes 0
    clear = difference({0: 10.0, 1: 11.0, 2: 12.0}, {0: 12.0, 1: 13.1, 2: 13.9})  # d = 2.0, 2.1, 1.9
    assert clear["low"] == pytest.approx(2 - 4.303 * 0.1 / math.sqrt(3)) and "2.00 points higher than G = 1" in \
        verdict(clear)
    # Welch: other seeds; equal variances 1 and n 3 -> se sqrt(2/3), df 4
    w = difference({0: 10.0, 1: 11.0, 2: 12.0}, {5: 14.0, 6: 15.0, 7: 16.0})
    assert w["method"] == "welch" and w["low"] == pytest.approx(4 - 2.776 * math.sqrt(2 / 3))
    # one run per side: no interval, never a finding
    one = difference({0: 10.0}, {0: 9.0})
    assert math.isnan(one["low"]) and "inconclusive" in verdict(one)


def test_verdict_tells_equal_within_a_margin_from_inconclusive_and_from_a_difference():
    from study_stats import difference, verdict
    base = {s: 12.0 + 0.1 * s for s in range(5)}
    # the measured case: -0.01 points, 95% CI about [-0.20, +0.18]: equal within 0.5 points
    narrow = difference(base, {0: 11.90, 1: 12.15, 2: 12.12, 3: 12.35, 4: 12.33})
    assert -0.5 < narrow["low"] < 0 < narrow["high"] < 0.5
    said = verdict(narrow)
    half = (narrow["high"] - narrow["low"]) / 2
    assert "equal within 0.5 points" in said and f"half-width is {half:.2f}" in said and "inconclusive" not in said
    assert "inconclusive" in verdict(narrow, margin=0.1)  # the margin is a setting
    wide = difference(base, {0: 11.5, 1: 12.9, 2: 11.8, 3: 12.9, 4: 12.4})  # interval about +-0.8
    assert wide["low"] < -0.5 and "inconclusive, the interval includes 0 and reaches beyond +-0.5" in verdict(wide)
    higher = difference(base, {s: v + 1.0 + 0.01 * s for s, v in base.items()})
    assert higher["low"] > 0 and "points higher than G = 1" in verdict(higher)


def test_report_header_states_the_margin(tmp_path):
    fam = tmp_path / "fam"
    for seed in range(3):
        fake_run(fam, 1, seed, [(12.0, 1.0), (11.0 + 0.1 * seed, 1.0)], macs=100)
        fake_run(fam, 2, seed, [(12.0, 1.0), (11.0 + 0.1 * seed + (0.05, -0.12, 0.05)[seed], 1.0)], macs=60)
    text = build_report(str(fam), margin=0.4)  # differences +0.05, -0.12, +0.05: 95% CI about +-0.24
    assert "equivalence margin +- 0.4 points" in text and "equal within 0.4 points" in text


def test_within_between_correlation_on_made_up_filters():
    import torch
    from alexnet.filters import within_between_correlation
    base = torch.randn(3, 5, 5)
    other = torch.randn(3, 5, 5)
    # group 0: two copies of one filter (|corr| 1); group 1: a filter and its negative (|corr| 1)
    w = torch.stack([base, 2 * base, other, -other])
    within, between = within_between_correlation({"conv1.weight": w}, 2)
    assert within == pytest.approx(1.0)
    b = base.flatten() - base.mean()
    o = other.flatten() - other.mean()
    expected = (b @ o).abs() / (b.norm() * o.norm())
    assert between == pytest.approx(expected.item(), rel=1e-5)
    assert math.isnan(within_between_correlation({"conv1.weight": w}, 1)[1])


def test_conv3_input_group_share_on_made_up_weights():
    import torch
    from alexnet.filters import input_group_share
    w = torch.zeros(4, 4, 3, 3)
    w[0, 0] = 1.0           # group 0, filter 0: all on input group 0
    w[1, :2] = 1.0          # group 0, filter 1: half/half? no: channels 0,1 are both input group 0
    w[2, 2] = 1.0           # group 1, filter 2: all on input group 1
    w[3, 0] = 1.0
    w[3, 3] = 1.0           # group 1, filter 3: half on each
    share = input_group_share({"conv3.weight": w}, 2)
    expected = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    torch.testing.assert_close(share, expected)


def test_report_statements_on_made_up_runs(tmp_path):
    """The report's own sentences, each computed from the runs: header fields, the not-converged warning,
    the conv1 correlation verdict, and the pairwise statement between configs of equal MACs."""
    fam = tmp_path / "fam"
    settings = {"dataset": "fashion_mnist", "epochs": 2, "batch_size": 128, "lr": 0.05, "commit": "abc1234",
                "torch": "2.14.1"}

    def run(name, seed, errors, macs, within, between, groups):
        run_dir = fam / f"{name}-s{seed}"
        run_dir.mkdir(parents=True)
        with open(run_dir / "metrics.jsonl", "w") as f:
            for epoch, top1 in enumerate(errors, 1):
                f.write(json.dumps({"epoch": epoch, "val_top1_err": top1, "val_top5_err": 1.0, "images_per_s": 100.0,
                                    "cross_group_mb_per_step": 1.0, "conv1_corr_within": within,
                                    "conv1_corr_between": between}) + "\n")
        json.dump({"groups": groups, "params": 10, "macs": macs, "settings": settings}, open(run_dir / "summary.json", "w"))
    for seed in range(3):
        run("g1", seed, [20.0, 12.0 + 0.1 * seed], 1000, 0.2, float("nan"), 1)   # still fell 8 points: not converged
        run("g4", seed, [13.0, 12.5 + 0.1 * seed], 500, 0.2, 0.1, 4)
        run("g4_own", seed, [13.0, 13.5 + 0.2 * seed], 300, 0.2, 0.1, 4)
        run("g4_shuffle", seed, [13.0, 12.5 + (0.0, 0.1, 0.05)[seed]], 300, 0.2, 0.1, 4)
    text = build_report(str(fam))
    header = text.splitlines()[2]
    for field in ("data fashion_mnist", "epochs 2", "batch 128", "lr 0.05", "seeds [0, 1, 2]", "torch 2.14.1",
                  "commit abc1234", "equivalence margin +- 0.5 points"):
        assert field in header, field
    assert "not converged: val top-1 error still fell by more than" in text and "g1 (7.9)" in text
    assert "between-group correlation is lower in every G" in text
    # g4_shuffle against g4_own (the same MACs): paired d = -1.0, -1.1, -1.35, interval below 0
    assert "g4_shuffle is 1.15 points lower than g4_own (95% CI [-1.60, -0.70], paired, n = 3)" in text
    assert "g4_own is 1.10 points higher than g4 (95% CI [+0.85, +1.35], paired, n = 3)" in text


def test_response_correlation_on_made_up_responses():
    """Channels 0-1 copy one signal, 2-3 another (groups of two): within |corr| 1, between 0."""
    import torch
    from alexnet.filters import within_between
    from alexnet.responses import correlation_matrix
    torch.manual_seed(0)
    a, b = torch.randn(50, 1, 3, 3, dtype=torch.float64), torch.randn(50, 1, 3, 3, dtype=torch.float64)
    a = a - a.mean()
    b = b - b.mean()
    b = b - (a * b).sum() / (a * a).sum() * a  # exactly uncorrelated with a
    responses = torch.cat([a, 2 * a + 1, b, -3 * b], dim=1)
    corr = correlation_matrix(responses)
    within, between = within_between(corr, 2)
    assert within == pytest.approx(1.0) and between == pytest.approx(0.0, abs=1e-12)
    # the same channels in other groups: (0, 2) and (1, 3) share nothing, (0, 1) and (2, 3) are split apart
    within, between = within_between(correlation_matrix(responses[:, [0, 2, 1, 3]]), 2)
    assert within == pytest.approx(0.0, abs=1e-12) and between == pytest.approx(0.5)


def test_response_correlations_hook_every_grouped_layer_in_reference_channel_order():
    import torch
    from alexnet.config import load
    from alexnet.fit import build_run
    from alexnet.reference import ReferenceAlexNet
    from alexnet.responses import correlation_matrix, response_correlations
    from parallel import full_state_dict
    cfg = load(SMOKE, ["model.groups=2", "model.conv_channels=[8,16,16,16,16]", "model.fc_widths=[16,16]",
                       "parallel.devices=[cpu,cpu]"])
    spec, placement, runtime, model, _ = build_run(cfg)
    reference = ReferenceAlexNet(spec)
    reference.load_state_dict(full_state_dict(model))
    reference.eval()
    images = torch.randn(6, 1, 32, 32)
    matrices = response_correlations(model, images)
    assert sorted(matrices) == ["conv2", "conv4", "conv5"] and model.training
    seen = {}
    hooks = [getattr(reference, n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
             for n in matrices]
    with torch.no_grad():
        reference(images)
    for h in hooks:
        h.remove()
    for name, corr in matrices.items():  # fp32 convolutions: grouped on two slots vs the twin's, rounding apart
        torch.testing.assert_close(corr, correlation_matrix(seen[name]), rtol=1e-5, atol=1e-5)


def test_report_efficiency_and_response_sections_on_made_up_runs(tmp_path):
    """speed.json's images/s make the sentence; paired response differences make the verdicts; a planted
    formula (between and within swapped) would flip the sign and is caught by the numbers."""
    import study_halves
    fam = tmp_path / "fam"
    for seed in range(3):
        fake_run(fam, 1, seed, [(20.0 + 0.1 * seed, 3.0)], 1000)
        fake_run(fam, 2, seed, [(20.2 + 0.1 * seed + 0.01 * seed ** 2, 3.0)], 600)
        metrics = fam / f"g2-s{seed}" / "metrics.jsonl"
        record = json.loads(metrics.read_text())
        record.update({"conv2_resp_within": 0.30 + 0.01 * seed, "conv2_resp_between": 0.20 + 0.012 * seed,
                       "conv4_resp_within": 0.25 + 0.02 * seed, "conv4_resp_between": 0.25 - 0.02 * seed,
                       "epoch_s": 10.0})
        metrics.write_text(json.dumps(record) + "\n")
        for G in (1,):
            m = fam / f"g{G}-s{seed}" / "metrics.jsonl"
            r = json.loads(m.read_text())
            r["epoch_s"] = 12.0
            m.write_text(json.dumps(r) + "\n")
    json.dump({"commit": "abc1234", "torch": "2.14.1", "threads": 2, "rounds": 5, "steps": 5,
               "configs": {"g1": {"images_per_s": 2000.0, "step_ms": 64.0, "channels_last": True},
                           "g2": {"images_per_s": 2600.0, "step_ms": 49.2, "channels_last": True}}},
              open(fam / "speed.json", "w"))
    text = build_report(str(fam))
    # g2 - g1: d = 0.2, 0.21, 0.24 -> mean 0.2167
    assert "g2 (G = 2): 40.0% fewer MACs, 1.30 x the images/s of G = 1, +0.22 points of top-1 error" in text
    assert "| g2 | 0.600 | 2600 | 1.30 | 49.2 | NHWC | 10.0 |" in text
    rows = {r["layer"]: r for r in study_halves.response_rows(study_halves_runs(fam))}
    # conv2: between - within = -0.10, -0.098, -0.096: lower; conv4: 0, -0.04, -0.08: no difference shown
    assert rows["conv2"]["diff"]["diff"] == pytest.approx(-0.098)
    assert rows["conv2"]["diff"]["high"] < 0 and "conv2: between - within = -0.098" in text
    assert "lower" in study_halves.response_verdict(rows["conv2"])
    assert study_halves.response_verdict(rows["conv4"]).endswith("no difference shown")
    assert "less correlated at 1 of 2 grouped layers, more at 0, no difference shown at 1" in text


def study_halves_runs(fam):
    from study_report import collect
    return collect(str(fam))


def test_design_sizes_and_seed_major_order():
    from study_stats import seeds_for, t975
    n = seeds_for(0.41, 0.25)
    assert t975(n - 1) * 0.41 / math.sqrt(n) <= 0.25 < t975(n - 2) * 0.41 / math.sqrt(n - 1)
    assert n == 13
    design = compare_groups.parse_design(["g1=3", "g3=1"])
    assert compare_groups.design_pairs(design) == [("g1", 0), ("g3", 0), ("g1", 1), ("g1", 2)]
    with pytest.raises(compare_groups.ConfigError, match="NAME=SEEDS"):
        compare_groups.parse_design(["g1:3"])


def test_pairing_uses_the_seeds_both_configs_ran():
    from study_stats import difference
    base = {0: 10.0, 1: 11.0, 2: 12.0, 3: 13.0, 4: 9.0}
    other = {0: 11.0, 1: 12.5, 2: 13.0}  # d = 1.0, 1.5, 1.0 on seeds 0-2 only
    d = difference(base, other)
    assert d["method"] == "paired" and d["n"] == 3 and d["diff"] == pytest.approx(7 / 6)


def test_a_design_trains_two_runs_at_a_time_and_reports_them(tmp_path, monkeypatch):
    fam = write_family(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert compare_groups.main([str(fam), "--design", "g1=2", "g2=1", "--jobs", "2"]) == 0
    done = sorted(p.name for p in (tmp_path / "runs" / "tinyfam").iterdir() if (p / "summary.json").exists())
    assert done == ["g1-s0", "g1-s1", "g2-s0"]
    report = (tmp_path / "runs" / "tinyfam" / "comparison.md").read_text()
    assert "| g1 |" in report and "| g2 |" in report
    assert compare_groups.main([str(fam), "--design", "g1=2", "--jobs", "0"]) == 2
