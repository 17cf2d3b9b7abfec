"""The group-count report, computed from the runs' own files (metrics.jsonl, summary.json).

A header says what was run (family, epochs, batch, data limit, train/val sizes, seeds,
device, torch, commit). Rows per config (runs named <config>-s<seed>: g1 .. g4, and any
other member of the family such as g4_shuffle or root, shown with its per-layer G): parameters, multiply-accumulates (and relative to
G = 1), final and best validation top-1/top-5 error as mean and sample standard deviation
over seeds with n, the difference of final top-1 to G = 1 with a 95% confidence interval
(paired by seed where the seeds match, else Welch; ``study_stats``), the mean |correlation|
of conv1 filters within and between groups, images/s and cross-group MB per step; then
Ioannou's ImageNet rows (Ioannou et al., Deep Roots, CVPR 2017) for comparison, a statement computed from the numbers
that says "inconclusive" when the interval includes 0, and warnings (few seeds, missing
runs, runs still improving). comparison.csv holds one row per run and one per config.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics

from alexnet.spec import groups_label

from study_halves import (efficiency_sentences, efficiency_table, read_speed, response_rows, response_statement,
                          response_table)
from study_stats import EQUIVALENCE_MARGIN, difference, verdict

RUN_NAME = re.compile(r"^(.+)-s(\d+)$")
BASELINE = "g1"
# Ioannou's AlexNet on ILSVRC-2012 (Ioannou et al., Deep Roots, CVPR 2017): reference only, not measured here.
IMAGENET_REFERENCE = [
    {"groups": 1, "top1": 41.80, "top5": 18.97, "params": 62_378_344, "macs": 1_135_266_664},
    {"groups": 2, "top1": 41.84, "top5": 18.14, "params": 60_965_224, "macs": 724_417_384},
    {"groups": 4, "top1": 43.46, "top5": 19.38, "params": 60_258_664, "macs": 518_992_744},
]
COLUMNS = ["kind", "config", "groups", "exchanges", "seed", "params", "macs", "macs_rel_g1", "final_top1_mean", "final_top1_std",
           "final_top5_mean", "final_top5_std", "best_top1_mean", "best_top1_std", "best_top5_mean", "best_top5_std",
           "seeds", "diff_top1_vs_g1", "diff_ci_low", "diff_ci_high", "diff_method", "corr_within_mean",
           "corr_within_std", "corr_between_mean", "corr_between_std", "images_per_s", "cross_group_mb_per_step"]
# A last-epoch drop in val top-1 error larger than this (points) means the runs are still learning.
STILL_LEARNING_POINTS = 1.0


def read_run(run_dir: str) -> dict | None:
    """A finished run (summary.json present) with its per-epoch history, else None."""
    summary_path = os.path.join(run_dir, "summary.json")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not (os.path.isfile(summary_path) and os.path.isfile(metrics_path)):
        return None
    with open(summary_path) as f:
        summary = json.load(f)
    with open(metrics_path) as f:
        history = [json.loads(line) for line in f if line.strip()]
    return {"summary": summary, "history": history} if history else None


def config_order(name: str) -> tuple:
    """g1, g2, g3, g4 first (by G), then the other configs by name."""
    match = re.fullmatch(r"g(\d+)", name)
    return (0, int(match.group(1)), "") if match else (1, 0, name)


def collect(family_dir: str) -> dict[str, list[dict]]:
    """{config: [run, ...]} for every finished run named <config>-s<seed> under ``family_dir``, in config order."""
    runs: dict[str, list[dict]] = {}
    for name in sorted(os.listdir(family_dir)) if os.path.isdir(family_dir) else []:
        match = RUN_NAME.match(name)
        run = read_run(os.path.join(family_dir, name)) if match else None
        if run:
            run["seed"] = int(match.group(2))
            runs.setdefault(match.group(1), []).append(run)
    return {name: runs[name] for name in sorted(runs, key=config_order)}


def exchanges_of(run: dict) -> str:
    """Where the groups exchange maps, from the run's summary (older runs: the paper's layers)."""
    return run["summary"].get("exchanges", exchanges_default())


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single seed: one run has no spread to show)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def _final(run: dict, key: str) -> float:
    return run["history"][-1].get(key, math.nan)


def rows(runs: dict[str, list[dict]]) -> list[dict]:
    """One aggregated row per config (mean, sample std and n over seeds; the difference to G = 1 with its CI)."""
    out = []
    base_macs = runs[BASELINE][0]["summary"]["macs"] if BASELINE in runs else None
    base = {r["seed"]: _final(r, "val_top1_err") for r in runs.get(BASELINE, [])}
    for name, group in runs.items():
        hist = [r["history"] for r in group]
        row = {"kind": "mean over seeds", "config": name, "groups": groups_label(group[0]["summary"]["groups"]),
               "exchanges": exchanges_of(group[0]), "seed": "", "params": group[0]["summary"]["params"],
               "macs": group[0]["summary"]["macs"], "seeds": len(group)}
        row["macs_rel_g1"] = row["macs"] / base_macs if base_macs else math.nan
        for kind, pick in (("final", lambda h, k: h[-1][k]), ("best", lambda h, k: min(e[k] for e in h))):
            for k, key in (("top1", "val_top1_err"), ("top5", "val_top5_err")):
                row[f"{kind}_{k}_mean"], row[f"{kind}_{k}_std"] = mean_std([pick(h, key) for h in hist])
        d = difference(base, {r["seed"]: _final(r, "val_top1_err") for r in group}) if base and name != BASELINE \
            else None
        row["diff_top1_vs_g1"] = d["diff"] if d else math.nan
        row["diff_ci_low"], row["diff_ci_high"] = (d["low"], d["high"]) if d else (math.nan, math.nan)
        row["diff_method"] = d["method"] if d else ""
        row["diff"] = d
        row["finals"] = {r["seed"]: _final(r, "val_top1_err") for r in group}
        for which in ("within", "between"):
            values = [_final(r, f"conv1_corr_{which}") for r in group]
            values = [v for v in values if not math.isnan(v)]
            row[f"corr_{which}_mean"], row[f"corr_{which}_std"] = mean_std(values) if values else (math.nan, math.nan)
        row["images_per_s"] = statistics.fmean(statistics.fmean(e["images_per_s"] for e in h) for h in hist)
        row["cross_group_mb_per_step"] = statistics.fmean(h[-1]["cross_group_mb_per_step"] for h in hist)
        row["last_epoch_drop"] = statistics.fmean(
            h[-2]["val_top1_err"] - h[-1]["val_top1_err"] if len(h) > 1 else math.nan for h in hist)
        out.append(row)
    return out


def run_rows(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per run, beside the aggregated ones in comparison.csv."""
    out = []
    for name, group in runs.items():
        for r in sorted(group, key=lambda r: r["seed"]):
            h = r["history"]
            out.append({"kind": "run", "config": name, "groups": groups_label(r["summary"]["groups"]),
                        "exchanges": exchanges_of(r), "seed": r["seed"], "params": r["summary"]["params"],
                        "macs": r["summary"]["macs"], "seeds": 1,
                        "final_top1_mean": h[-1]["val_top1_err"], "final_top5_mean": h[-1]["val_top5_err"],
                        "best_top1_mean": min(e["val_top1_err"] for e in h),
                        "best_top5_mean": min(e["val_top5_err"] for e in h),
                        "corr_within_mean": _final(r, "conv1_corr_within"),
                        "corr_between_mean": _final(r, "conv1_corr_between"),
                        "images_per_s": statistics.fmean(e["images_per_s"] for e in h),
                        "cross_group_mb_per_step": h[-1]["cross_group_mb_per_step"]})
    return out


def settings(runs: dict[str, list[dict]]) -> dict:
    """What was run, from the runs' summary.json (values that differ between runs are listed)."""
    found: dict[str, list] = {}
    for group in runs.values():
        for r in group:
            for key, value in (r["summary"].get("settings") or {}).items():
                if value not in found.setdefault(key, []):
                    found[key].append(value)
    out = {key: values[0] if len(values) == 1 else values for key, values in found.items()}
    if isinstance(out.get("placement"), list):  # one description per config: say what they share
        devices = sorted({p.rsplit(" on ", 1)[-1].rstrip(")") for p in out["placement"]})
        out["placement"] = f"groups on {', '.join(devices)}"
    out["seeds"] = sorted({r["seed"] for group in runs.values() for r in group})
    return out


def settings_line(info: dict, family: str) -> str:
    parts = [f"family {family}"]
    labels = (("dataset", "data"), ("epochs", "epochs"), ("batch_size", "batch"), ("lr", "lr"),
              ("data_limit", "data.limit"), ("train_samples", "train images"), ("val_samples", "val images"),
              ("seeds", "seeds"), ("precision", "precision"), ("placement", "placement"), ("torch", "torch"),
              ("commit", "commit"), ("margin", "equivalence margin +-"))
    for key, label in labels:
        if key in info and info[key] not in (None, ""):
            parts.append(f"{label} {info[key]}")
    return "; ".join(parts)


def warnings(table: list[dict], missing: list[str]) -> list[str]:
    out = []
    small = [f"{r['config']}: n = {r['seeds']}" for r in table if r["seeds"] < 3]
    if small:
        out.append(f"fewer than 3 seeds ({', '.join(small)}): standard deviations and intervals are unreliable "
                   "or missing; run more seeds (--seeds 0 1 2)")
    if missing:
        out.append(f"requested runs missing: {', '.join(missing)}; they are left out of every number here")
    learning = [f"{r['config']} ({r['last_epoch_drop']:.1f})" for r in table
                if not math.isnan(r["last_epoch_drop"]) and r["last_epoch_drop"] > STILL_LEARNING_POINTS]
    if learning:
        out.append(f"not converged: val top-1 error still fell by more than {STILL_LEARNING_POINTS:g} point in the "
                   f"last epoch ({', '.join(learning)} points); differences may change with more epochs")
    return out


def statement(table: list[dict], margin: float = EQUIVALENCE_MARGIN) -> str:
    """What the data shows about G = 2 against G = 1, computed, never canned."""
    by_name = {r["config"]: r for r in table}
    if BASELINE not in by_name or "g2" not in by_name:
        return "G = 1 and G = 2 are both needed for the comparison; run them first."
    g1, g2 = by_name[BASELINE], by_name["g2"]
    drop = 100.0 * (1 - g2["macs"] / g1["macs"])
    return (f"Final val top-1 error: G = 1 {_pm(g1['final_top1_mean'], g1['final_top1_std'])}% (n = {g1['seeds']}), "
            f"G = 2 {_pm(g2['final_top1_mean'], g2['final_top1_std'])}% (n = {g2['seeds']}); "
            f"{verdict(g2['diff'], margin=margin)}; multiply-accumulates drop by {drop:.1f}% ({g1['macs']:,} -> {g2['macs']:,}).")


def other_statements(table: list[dict], margin: float = EQUIVALENCE_MARGIN) -> list[str]:
    """The same computed sentence for every config beyond g1/g2 (g4_shuffle, root, ...) against G = 1."""
    by_name = {r["config"]: r for r in table}
    if BASELINE not in by_name:
        return []
    g1 = by_name[BASELINE]
    out = []
    for r in table:
        if r["config"] in (BASELINE, "g2") or not r.get("diff"):
            continue
        change = 100.0 * (r["macs"] / g1["macs"] - 1)
        # against every plain G, and against every other config of the same cost (same MACs)
        against = [verdict(difference(other["finals"], r["finals"]), what=r["config"], than=other["config"],
                           margin=margin)
                   for other in table if other["config"] not in (BASELINE, r["config"])
                   and (re.fullmatch(r"g\d+", other["config"]) or other["macs"] == r["macs"])]
        out.append(f"{r['config']} (G = {r['groups']}; {r['exchanges']}): "
                   f"{verdict(r['diff'], what=r['config'], than='G = 1', margin=margin)}; multiply-accumulates "
                   f"{'+' if change >= 0 else ''}{change:.1f}%, cross-group traffic {r['cross_group_mb_per_step']:.2f} "
                   "MB/step." + (f" Pairwise: {'; '.join(against)}." if against else ""))
    return out


def correlation_statement(table: list[dict]) -> str | None:
    """The seed's claim: conv1 filters are less correlated across groups than within one."""
    rows_with = [r for r in table if not math.isnan(r["corr_between_mean"])]
    if not rows_with:
        return None
    parts = [f"{r['config']}: within {r['corr_within_mean']:.3f}, between {r['corr_between_mean']:.3f}"
             for r in rows_with]
    lower = [r for r in rows_with if r["corr_between_mean"] < r["corr_within_mean"]]
    claim = ("between-group correlation is lower in every G" if len(lower) == len(rows_with) else
             "between-group correlation is not lower in every G" if lower else
             "between-group correlation is not lower in any G")
    return (f"Mean |correlation| of conv1 filters ({'; '.join(parts)}): {claim} (the seed text's claim; "
            "means over seeds, no interval).")


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _ci(r: dict) -> str:
    if r["config"] == BASELINE or math.isnan(r["diff_top1_vs_g1"]):
        return ""
    if math.isnan(r["diff_ci_low"]):
        return f"{r['diff_top1_vs_g1']:+.2f} (no CI)"
    return f"{r['diff_top1_vs_g1']:+.2f} [{r['diff_ci_low']:+.2f}, {r['diff_ci_high']:+.2f}]"


def markdown(table: list[dict], family: str, info: dict | None = None, missing: list[str] = (),
             margin: float = EQUIVALENCE_MARGIN, runs: dict | None = None, speed: dict | None = None) -> str:
    lines = [f"# Group-count comparison: {family}", "", settings_line({**(info or {}), "margin": f"{margin:g} points"},
                                                                       family), "",
             "| config | G | params | MACs | MACs vs G=1 | final top-1 err % | Δ top-1 vs G=1 (95% CI) | "
             "final top-5 err % | best top-1 err % | n | conv1 corr within / between | images/s | "
             "cross-group MB/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        corr = "" if math.isnan(r["corr_within_mean"]) else (
            f"{r['corr_within_mean']:.3f} / " + ("–" if math.isnan(r["corr_between_mean"])
                                                 else f"{r['corr_between_mean']:.3f}"))
        lines.append(f"| {r['config']} | {r['groups']} | {r['params']:,} | {r['macs']:,} | {r['macs_rel_g1']:.3f} | "
                     f"{_pm(r['final_top1_mean'], r['final_top1_std'])} | {_ci(r)} | "
                     f"{_pm(r['final_top5_mean'], r['final_top5_std'])} | "
                     f"{_pm(r['best_top1_mean'], r['best_top1_std'])} | {r['seeds']} | {corr} | "
                     f"{r['images_per_s']:.0f} | {r['cross_group_mb_per_step']:.2f} |")
    lines += ["", "Mean ± sample standard deviation over seeds (n runs); errors in percent on the validation set. "
              "Δ: difference of final top-1 error to G = 1, 95% t-interval (paired by seed when the seeds match). "
              "\"best\" is the lowest error over epochs on the same validation set, so it is optimistic. "
              "images/s: the runs' own epochs, end to end (data loading and evaluation included); the "
              "efficiency section's are train.py's step measured alone.", "",
              "Reference, not measured here: Ioannou's AlexNet on ImageNet (ILSVRC-2012 val, one model; "
              "Ioannou et al., Deep Roots, CVPR 2017):", "",
              "| G | top-1 err % | top-5 err % | params | MACs |", "|---|---|---|---|---|"]
    for r in IMAGENET_REFERENCE:
        lines.append(f"| {r['groups']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['params']:,} | {r['macs']:,} |")
    lines += ["", statement(table, margin), ""]
    for sentence in other_statements(table, margin):
        lines += [sentence, ""]
    exchanges = sorted({(r["config"], r["exchanges"]) for r in table if r["exchanges"] != exchanges_default()})
    if exchanges:
        lines += ["Exchanges other than the paper's: " + "; ".join(f"{c}: {e}" for c, e in exchanges) + ".", ""]
    sentences = efficiency_sentences(table, speed)
    if sentences:
        lines += ["## Efficiency: time, not only MACs", ""] + efficiency_table(table, runs or {}, speed) + [""]
        for sentence in sentences:
            lines += [sentence, ""]
    responses = response_rows(runs or {})
    if responses:
        lines += ["## Filter responses within and between groups", ""] + response_table(responses) + [""]
        lines += [response_statement(responses), ""]
    corr = correlation_statement(table)
    if corr:
        lines += [corr, ""]
    for w in warnings(table, list(missing)):
        lines += [f"Warning: {w}.", ""]
    return "\n".join(lines)


def exchanges_default() -> str:
    return "conv3 all, fc6 all, fc7 all, fc8 all"


def write_csv(table: list[dict], per_run: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        for r in per_run + table:
            writer.writerow({k: r.get(k, "") for k in COLUMNS})


def plot(runs: dict[str, list[dict]], table: list[dict], path: str, family: str, subtitle: str = "") -> None:
    """Val error against MACs and params (mean ± std over seeds, each seed a dot, G = 1's band across),
    and against epoch (band over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    by_name = {r["config"]: r for r in table}
    for ax, key, scale, label in ((axes[0], "macs", 1e6, "multiply-accumulates per image (millions)"),
                                  (axes[1], "params", 1e6, "parameters (millions)")):
        if BASELINE in by_name and not math.isnan(by_name[BASELINE]["final_top1_std"]):
            g1 = by_name[BASELINE]
            ax.axhspan(g1["final_top1_mean"] - g1["final_top1_std"], g1["final_top1_mean"] + g1["final_top1_std"],
                       color="grey", alpha=0.15, label="G = 1: mean ± 1 std")
        for r in table:
            x = r[key] / scale
            err = 0.0 if math.isnan(r["final_top1_std"]) else r["final_top1_std"]
            line = ax.errorbar(x, r["final_top1_mean"], yerr=err, fmt="o", capsize=4, ms=7)
            seeds = [run["history"][-1]["val_top1_err"] for run in runs[r["config"]]]
            ax.scatter([x] * len(seeds), seeds, s=14, alpha=0.6, color=line[0].get_color())
            ax.annotate(f"{r['config']}, n = {r['seeds']}", (x, r["final_top1_mean"]),
                        textcoords="offset points", xytext=(7, 5), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("final val top-1 error (%)")
        ax.grid(alpha=0.3)
        ax.text(0.02, 0.97, "mean ± 1 std over seeds; dots: seeds", transform=ax.transAxes, va="top", fontsize=8)
        ax.margins(x=0.15, y=0.2)
    axes[0].set_title("error vs compute")
    axes[1].set_title("error vs parameters")
    if BASELINE in by_name and not math.isnan(by_name[BASELINE]["final_top1_std"]):
        axes[0].legend(loc="lower right", fontsize=8)
    ax = axes[2]
    for name, group in runs.items():
        epochs = min(len(r["history"]) for r in group)
        curves = [[e["val_top1_err"] for e in r["history"][:epochs]] for r in group]
        xs = list(range(1, epochs + 1))
        means = [statistics.fmean(c[i] for c in curves) for i in range(epochs)]
        ax.plot(xs, means, marker="o", label=f"{name} (n = {len(curves)})")
        if len(curves) > 1:
            stds = [statistics.stdev(c[i] for c in curves) for i in range(epochs)]
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.margins(x=0.08)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 error (%)")
    ax.set_title("val error by epoch (band: ±1 std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    import textwrap
    fig.suptitle(f"{family}: AlexNet with G filter groups\n" + textwrap.fill(subtitle, 190), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def build_report(family_dir: str, missing: list[str] = (), margin: float = EQUIVALENCE_MARGIN) -> str | None:
    """Write comparison.md/.csv/.png into ``family_dir``; return the markdown (None without runs).

    ``missing`` names requested runs that have not finished (said in the report's warnings);
    ``margin``: differences whose 95% interval lies inside +-margin points read "equal within".
    """
    runs = collect(family_dir)
    if not runs:
        return None
    table = rows(runs)
    family = os.path.basename(os.path.normpath(family_dir))
    info = settings(runs)
    text = markdown(table, family, info, missing, margin, runs, read_speed(family_dir))
    with open(os.path.join(family_dir, "comparison.md"), "w") as f:
        f.write(text)
    write_csv(table, run_rows(runs), os.path.join(family_dir, "comparison.csv"))
    plot(runs, table, os.path.join(family_dir, "comparison.png"), family, settings_line(info, family))
    return text
