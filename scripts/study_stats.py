"""Small-sample statistics for the group-count report: the difference of two means with a 95% interval.

Seeds are few (often 3), so the interval uses Student's t: paired by seed when both
groups ran the same seeds (the seed fixes the data order and initialisation, so pairing
removes that shared noise), otherwise Welch's unequal-variance interval. No SciPy: the
0.975 quantiles of t are tabulated and interpolated in 1/df, which is exact at the
tabulated degrees of freedom and within 0.002 between them.
"""
from __future__ import annotations

import math
import statistics

# t_{0.975}(df), the two-sided 95% critical value of Student's t distribution.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
Z975 = 1.960


def t975(df: float) -> float:
    """The 0.975 quantile of t with ``df`` degrees of freedom (df >= 1, fractional allowed)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    points = sorted(T975)
    if df >= points[-1]:
        lo, hi = points[-1], math.inf
        w = (1 / lo - 1 / df) / (1 / lo)
        return T975[lo] + w * (Z975 - T975[lo])
    hi = next(p for p in points if p >= df)
    lo = max(p for p in points if p <= df)
    if lo == hi:
        return T975[lo]
    w = (1 / lo - 1 / df) / (1 / lo - 1 / hi)
    return T975[lo] + w * (T975[hi] - T975[lo])


def difference(base: dict[int, float], other: dict[int, float]) -> dict:
    """mean(other) - mean(base) with a 95% interval; inputs map seed -> value.

    Paired over the seeds both ran when they share at least two (a design may run more seeds of
    G = 1 and 2 than of the others; the difference and its interval then use the shared seeds
    only, as a pair needs both), otherwise Welch's interval over all runs.
    Returns {"diff", "low", "high", "method", "n"}; low/high are NaN when there are too few
    runs for an interval (fewer than 2 pairs, or fewer than 2 runs on a side).
    """
    diff = statistics.fmean(other.values()) - statistics.fmean(base.values())
    shared = sorted(set(base) & set(other))
    if len(shared) >= 2 or (shared and len(shared) == len(base) == len(other)):
        d = [other[s] - base[s] for s in shared]
        diff = statistics.fmean(d)
        n = len(d)
        if n < 2:
            return {"diff": diff, "low": math.nan, "high": math.nan, "method": "paired", "n": n}
        half = t975(n - 1) * statistics.stdev(d) / math.sqrt(n)
        return {"diff": diff, "low": diff - half, "high": diff + half, "method": "paired", "n": n}
    a, b = list(base.values()), list(other.values())
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "low": math.nan, "high": math.nan, "method": "welch", "n": min(len(a), len(b))}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "low": diff, "high": diff, "method": "welch", "n": min(len(a), len(b))}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t975(max(1.0, df)) * se
    return {"diff": diff, "low": diff - half, "high": diff + half, "method": "welch", "n": min(len(a), len(b))}


#: the default equivalence margin (points of top-1 error): a difference whose whole 95% interval lies
#: inside +-margin reads "equal within margin"; the paper's own G = 2 vs G = 1 gap on ImageNet is 0.04
EQUIVALENCE_MARGIN = 0.5


def verdict(d: dict, what: str = "G = 2", than: str = "G = 1", unit: str = "points",
            margin: float = EQUIVALENCE_MARGIN) -> str:
    """One sentence that never reads more into the numbers than the interval allows: higher / lower when
    the 95% interval excludes 0; equal within ``margin`` when the whole interval lies inside +-margin;
    inconclusive otherwise."""
    if math.isnan(d["low"]):
        return (f"{what} is {abs(d['diff']):.2f} {unit} {'below' if d['diff'] < 0 else 'above'} {than}, "
                f"but {d['n']} run(s) per side give no confidence interval: inconclusive")
    interval = f"95% CI [{d['low']:+.2f}, {d['high']:+.2f}], {d['method']}, n = {d['n']}"
    if d["low"] <= 0 <= d["high"]:
        half = (d["high"] - d["low"]) / 2
        if -margin <= d["low"] and d["high"] <= margin:
            return (f"{what} - {than} = {d['diff']:+.2f} {unit} ({interval}): equal within {margin:g} {unit} "
                    f"(the interval's half-width is {half:.2f})")
        return (f"{what} - {than} = {d['diff']:+.2f} {unit} ({interval}): inconclusive, the interval includes 0 "
                f"and reaches beyond +-{margin:g} {unit}")
    direction = "lower" if d["diff"] < 0 else "higher"
    return f"{what} is {abs(d['diff']):.2f} {unit} {direction} than {than} ({interval})"

def seeds_for(paired_sd: float, half_width: float, most: int = 200) -> int:
    """The fewest paired seeds n whose 95% interval, t_{0.975}(n - 1) * sd / sqrt(n), is at most
    ``half_width`` when the paired standard deviation is ``paired_sd``: the design's size."""
    for n in range(2, most + 1):
        if t975(n - 1) * paired_sd / math.sqrt(n) <= half_width:
            return n
    raise ValueError(f"more than {most} seeds would be needed for +-{half_width} at sd {paired_sd}")
