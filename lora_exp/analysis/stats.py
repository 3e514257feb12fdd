"""Statistics the report uses: the 95% t-interval of a mean (scipy's t quantiles) and share formatting."""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats


def ci95(values: pd.Series) -> float:
    """Half-width of the 95% t-interval of the mean (NaN for fewer than two values)."""
    v = values.dropna()
    n = len(v)
    if n < 2:
        return math.nan
    t = stats.t.ppf(0.975, df=n - 1)
    return t * v.std(ddof=1) / math.sqrt(n)


def pct(p: float) -> str:
    """A share in percent with two significant digits: 100%, 0.33%, 0.0034% (never 0.00% for a non-zero)."""
    if p is None or pd.isna(p):
        return "n/a"
    if p == 0 or p >= 10:
        return f"{p:.0f}%"
    return f"{p:.{max(1, 1 - math.floor(math.log10(abs(p))))}f}%"


def rate(value: float | None) -> str:
    """Samples/s, or "-" where a run had too few updates for a steady window (or predates it)."""
    return "-" if value is None or pd.isna(value) else f"{value:.1f}"


def mean_ci(mean: float, ci: float) -> str:
    """``0.8123 ± 0.0100``, or the mean alone where there is no interval (one seed)."""
    return f"{mean:.4f}" + ("" if pd.isna(ci) else f" ± {ci:.4f}")


def count(n: float | None) -> str:
    """A parameter count with thousands separators, or "n/a"."""
    return "n/a" if n is None or pd.isna(n) else f"{n:,.0f}"
