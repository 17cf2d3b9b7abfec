"""The report's two sections on the seed's claims beyond accuracy: efficiency in time, and filter responses.

Efficiency: per config, the images/s of train.py's step measured alone and side by side
before the study trained (``speed.json``, ``study_speed``), the wall time per epoch of its
runs, and one sentence per G against G = 1:
  "G = 2: 36.9% fewer MACs, 1.31 x the images/s of G = 1, +0.08 points of top-1 error [95% CI]".

Responses: per config and grouped layer, the mean |correlation| of the filters' responses
within and between groups (``alexnet.responses``; the runs' final epoch), and
between - within with a 95% interval paired over seeds: "lower" when the interval lies
below 0 (the seed text's claim holds there), "higher" above 0, "no difference shown" otherwise.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics

from study_stats import difference

RESPONSE_KEY = re.compile(r"^(conv\d+)_resp_within$")


def read_speed(family_dir: str) -> dict | None:
    """The study's speed.json (``study_speed``), or None when the study did not time its configs."""
    path = os.path.join(family_dir, "speed.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def epoch_seconds(group: list[dict]) -> float:
    """Mean wall time of an epoch (training + evaluation) over a config's runs."""
    return statistics.fmean(e["epoch_s"] for r in group for e in r["history"])


def efficiency_sentences(table: list[dict], speed: dict | None, baseline: str = "g1") -> list[str]:
    """One sentence per config against G = 1: fewer MACs, the speed ratio measured alone, the error difference."""
    by_name = {r["config"]: r for r in table}
    if baseline not in by_name or not speed:
        return []
    base, measured = by_name[baseline], speed["configs"]
    out = []
    for r in table:
        if r["config"] == baseline or r["config"] not in measured or baseline not in measured:
            continue
        ratio = measured[r["config"]]["images_per_s"] / measured[baseline]["images_per_s"]
        fewer = 100.0 * (1 - r["macs"] / base["macs"])
        d = r["diff"]
        error = (f"{d['diff']:+.2f} points of top-1 error (95% CI [{d['low']:+.2f}, {d['high']:+.2f}], "
                 f"{d['method']}, n = {d['n']})" if d and not math.isnan(d["low"]) else "no error interval")
        out.append(f"{r['config']} (G = {r['groups']}): {fewer:.1f}% fewer MACs, {ratio:.2f} x the images/s of "
                   f"G = 1, {error}.")
    return out


def efficiency_table(table: list[dict], runs: dict, speed: dict | None) -> list[str]:
    if not speed:
        return []
    lines = ["| config | MACs vs G=1 | images/s, train.py's step alone | vs G=1 | step ms | layout | "
             "epoch s (runs' mean) |", "|---|---|---|---|---|---|---|"]
    measured = speed["configs"]
    base = measured.get("g1", {}).get("images_per_s")
    for r in table:
        m = measured.get(r["config"])
        if not m:
            continue
        rel = f"{m['images_per_s'] / base:.2f}" if base else ""
        lines.append(f"| {r['config']} | {r['macs_rel_g1']:.3f} | {m['images_per_s']:.0f} | {rel} | "
                     f"{m['step_ms']:.1f} | {'NHWC' if m['channels_last'] else 'NCHW'} | "
                     f"{epoch_seconds(runs[r['config']]):.1f} |")
    return lines + ["", f"Timed at commit {speed.get('commit')} (torch {speed.get('torch')}, {speed.get('threads')} "
                        f"threads) before the study trained: configs alternating over {speed.get('rounds')} rounds of "
                        f"{speed.get('steps')} steps, the median round."]


def response_rows(runs: dict) -> list[dict]:
    """Per config and grouped layer: within and between |corr| (means over seeds) and between - within, paired."""
    out = []
    for name, group in runs.items():
        final = [r["history"][-1] for r in group]
        layers = sorted({m.group(1) for e in final for k in e if (m := RESPONSE_KEY.match(k))})
        for layer in layers:
            within = {r["seed"]: r["history"][-1][f"{layer}_resp_within"] for r in group
                      if f"{layer}_resp_within" in r["history"][-1]}
            between = {s: r["history"][-1][f"{layer}_resp_between"] for r in group
                       if (s := r["seed"]) in within}
            out.append({"config": name, "layer": layer, "within": statistics.fmean(within.values()),
                        "between": statistics.fmean(between.values()), "diff": difference(within, between)})
    return out


def response_verdict(row: dict) -> str:
    d = row["diff"]
    if math.isnan(d["low"]):
        return f"between - within = {d['diff']:+.3f} (n = {d['n']}, no interval)"
    word = "lower" if d["high"] < 0 else "higher" if d["low"] > 0 else "no difference shown"
    return (f"between - within = {d['diff']:+.3f} (95% CI [{d['low']:+.3f}, {d['high']:+.3f}], {d['method']}, "
            f"n = {d['n']}): {word}")


def response_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["| config | layer | response |corr| within groups | between groups | between - within (95% CI) |",
             "|---|---|---|---|---|"]
    for r in rows:
        d = r["diff"]
        ci = "" if math.isnan(d["low"]) else f" [{d['low']:+.3f}, {d['high']:+.3f}]"
        lines.append(f"| {r['config']} | {r['layer']} | {r['within']:.3f} | {r['between']:.3f} | "
                     f"{d['diff']:+.3f}{ci} |")
    return lines


def response_statement(rows: list[dict]) -> str | None:
    """What the seed's "correlation between filters of different groups is usually quite less" finds here."""
    if not rows:
        return None
    lower = [r for r in rows if not math.isnan(r["diff"]["low"]) and r["diff"]["high"] < 0]
    higher = [r for r in rows if not math.isnan(r["diff"]["low"]) and r["diff"]["low"] > 0]
    said = "; ".join(f"{r['config']} {r['layer']}: {response_verdict(r)}" for r in rows)
    summary = (f"between-group responses are less correlated at {len(lower)} of {len(rows)} grouped layers, "
               f"more at {len(higher)}, no difference shown at {len(rows) - len(lower) - len(higher)}")
    return f"Filter responses on validation images ({said}): {summary} (the seed text's claim, tested per layer)."
