"""The group-count report, computed from the runs' own files (metrics.jsonl, summary.json).

Rows per G: parameters, multiply-accumulates (and relative to G = 1), final and best
validation top-1/top-5 error as mean and sample standard deviation over seeds, seed count,
images/s and cross-group MB per step; then Ioannou's ImageNet rows (DESIGN.md) for
comparison, and a statement computed from the numbers.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics

RUN_NAME = re.compile(r"^g(\d+)-s(\d+)$")
# Ioannou's AlexNet on ILSVRC-2012 (DESIGN.md, section 2): reference only, not measured here.
IMAGENET_REFERENCE = [
    {"groups": 1, "top1": 41.80, "top5": 18.97, "params": 62_378_344, "macs": 1_135_266_664},
    {"groups": 2, "top1": 41.84, "top5": 18.14, "params": 60_965_224, "macs": 724_417_384},
    {"groups": 4, "top1": 43.46, "top5": 19.38, "params": 60_258_664, "macs": 518_992_744},
]
COLUMNS = ["groups", "params", "macs", "macs_rel_g1", "final_top1_mean", "final_top1_std", "final_top5_mean",
           "final_top5_std", "best_top1_mean", "best_top1_std", "best_top5_mean", "best_top5_std", "seeds",
           "images_per_s", "cross_group_mb_per_step"]


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


def collect(family_dir: str) -> dict[int, list[dict]]:
    """{G: [run, ...]} for every finished run named g<G>-s<seed> under ``family_dir``."""
    runs: dict[int, list[dict]] = {}
    for name in sorted(os.listdir(family_dir)) if os.path.isdir(family_dir) else []:
        match = RUN_NAME.match(name)
        run = read_run(os.path.join(family_dir, name)) if match else None
        if run:
            run["seed"] = int(match.group(2))
            runs.setdefault(int(match.group(1)), []).append(run)
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single seed: one run has no spread to show)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def rows(runs: dict[int, list[dict]]) -> list[dict]:
    out = []
    base_macs = runs[1][0]["summary"]["macs"] if 1 in runs else None
    for G in sorted(runs):
        group = runs[G]
        hist = [r["history"] for r in group]
        row = {"groups": G, "params": group[0]["summary"]["params"], "macs": group[0]["summary"]["macs"],
               "seeds": len(group)}
        row["macs_rel_g1"] = row["macs"] / base_macs if base_macs else math.nan
        for kind, pick in (("final", lambda h, k: h[-1][k]), ("best", lambda h, k: min(e[k] for e in h))):
            for k, key in (("top1", "val_top1_err"), ("top5", "val_top5_err")):
                row[f"{kind}_{k}_mean"], row[f"{kind}_{k}_std"] = mean_std([pick(h, key) for h in hist])
        row["images_per_s"] = statistics.fmean(statistics.fmean(e["images_per_s"] for e in h) for h in hist)
        row["cross_group_mb_per_step"] = statistics.fmean(h[-1]["cross_group_mb_per_step"] for h in hist)
        out.append(row)
    return out


def statement(table: list[dict]) -> str:
    """What the data shows about G = 2 against G = 1, computed, never canned."""
    by_g = {r["groups"]: r for r in table}
    if 1 not in by_g or 2 not in by_g:
        return "G = 1 and G = 2 are both needed for the comparison; run them first."
    g1, g2 = by_g[1], by_g[2]
    diff = g2["final_top1_mean"] - g1["final_top1_mean"]
    drop = 100.0 * (1 - g2["macs"] / g1["macs"])
    spread = g1["final_top1_std"]
    if math.isnan(spread):
        verdict = (f"single seed, so no standard deviation: G = 2 is {abs(diff):.2f} points "
                   f"{'below' if diff < 0 else 'above'} G = 1")
    elif diff < 0:
        verdict = f"G = 2 is {-diff:.2f} points below G = 1 (G = 1 std {spread:.2f})"
    elif diff <= spread:
        verdict = f"G = 2 is within one standard deviation of G = 1 ({diff:+.2f} points, G = 1 std {spread:.2f})"
    else:
        verdict = (f"G = 2 is {diff:.2f} points above G = 1, more than one standard deviation "
                   f"(G = 1 std {spread:.2f})")
    return (f"Final val top-1 error: G = 1 {g1['final_top1_mean']:.2f}%, G = 2 {g2['final_top1_mean']:.2f}% "
            f"over {g1['seeds']} and {g2['seeds']} seed(s); {verdict}; multiply-accumulates drop by {drop:.1f}% "
            f"({g1['macs']:,} -> {g2['macs']:,}).")


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown(table: list[dict], family: str) -> str:
    lines = [f"# Group-count comparison: {family}", "",
             "| G | params | MACs | MACs vs G=1 | final top-1 err % | final top-5 err % | best top-1 err % | "
             "seeds | images/s | cross-group MB/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['groups']} | {r['params']:,} | {r['macs']:,} | {r['macs_rel_g1']:.3f} | "
                     f"{_pm(r['final_top1_mean'], r['final_top1_std'])} | {_pm(r['final_top5_mean'], r['final_top5_std'])} | "
                     f"{_pm(r['best_top1_mean'], r['best_top1_std'])} | {r['seeds']} | {r['images_per_s']:.0f} | "
                     f"{r['cross_group_mb_per_step']:.2f} |")
    lines += ["", "Mean ± sample standard deviation over seeds; errors in percent on the validation set.", "",
              "Reference, not measured here: Ioannou's AlexNet on ImageNet (ILSVRC-2012 val, one model):", "",
              "| G | top-1 err % | top-5 err % | params | MACs |", "|---|---|---|---|---|"]
    for r in IMAGENET_REFERENCE:
        lines.append(f"| {r['groups']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['params']:,} | {r['macs']:,} |")
    lines += ["", statement(table), ""]
    return "\n".join(lines)


def write_csv(table: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in table:
            writer.writerow({k: r[k] for k in COLUMNS})


def plot(runs: dict[int, list[dict]], table: list[dict], path: str, family: str) -> None:
    """Val error against MACs and params (error bars over seeds), and against epoch (band over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, label in ((axes[0], "macs", "multiply-accumulates per image"), (axes[1], "params", "parameters")):
        for r in table:
            err = 0.0 if math.isnan(r["final_top1_std"]) else r["final_top1_std"]
            ax.errorbar(r[key], r["final_top1_mean"], yerr=err, fmt="o", capsize=4, label=f"G = {r['groups']}")
            ax.annotate(f"{r['groups']} group{'s' if r['groups'] > 1 else ''}", (r[key], r["final_top1_mean"]),
                        textcoords="offset points", xytext=(6, 6))
        ax.set_xlabel(label)
        ax.set_ylabel("final val top-1 error (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{family}: error vs compute")
    axes[1].set_title("error vs parameters")
    ax = axes[2]
    for G in sorted(runs):
        epochs = min(len(r["history"]) for r in runs[G])
        curves = [[e["val_top1_err"] for e in r["history"][:epochs]] for r in runs[G]]
        xs = list(range(1, epochs + 1))
        means = [statistics.fmean(c[i] for c in curves) for i in range(epochs)]
        ax.plot(xs, means, marker="o", label=f"G = {G}")
        if len(curves) > 1:
            stds = [statistics.stdev(c[i] for c in curves) for i in range(epochs)]
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 error (%)")
    ax.set_title("val error by epoch (band: ±1 std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def build_report(family_dir: str) -> str | None:
    """Write comparison.md/.csv/.png into ``family_dir``; return the markdown (None without runs)."""
    runs = collect(family_dir)
    if not runs:
        return None
    table = rows(runs)
    family = os.path.basename(os.path.normpath(family_dir))
    text = markdown(table, family)
    with open(os.path.join(family_dir, "comparison.md"), "w") as f:
        f.write(text)
    write_csv(table, os.path.join(family_dir, "comparison.csv"))
    plot(runs, table, os.path.join(family_dir, "comparison.png"), family)
    return text
