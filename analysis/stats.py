"""Seed statistics: mean, sample std and n per cell; differences vs a baseline with a 95% CI.

CI choice (``compare``):

* **paired**: both cells hold exactly the same seeds, each once, and n >= 2: t-interval on
  the per-seed differences (df = n - 1);
* **welch**: otherwise, with n >= 2 on both sides: difference of means, Welch standard
  error and Welch-Satterthwaite df;
* **none**: a side with n = 1 (or a single shared seed): the difference, no interval.

The t quantile comes from SciPy when it is installed. Without SciPy, :func:`t_quantile`
uses an exact table of the 97.5% quantile for df 1..30 (for non-integer df, log t
interpolated linearly in 1/df: relative error < 3% for 1 < df < 2, < 0.13% for df >= 3)
and the Cornish-Fisher expansion around the normal quantile above 30 (relative error
< 1e-5 there); that fallback supports only the 95% two-sided level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95

# 97.5% quantiles of Student's t for df = 1..30 (from scipy.stats.t.ppf)
_T975 = (
    12.706204736174694, 4.302652729749462, 3.1824463052837078, 2.7764451051977934,
    2.5705818356363146, 2.4469118511449786, 2.364624251592784, 2.306004135204166,
    2.262157162798205, 2.228138851986274, 2.200985160091639, 2.1788128296672284,
    2.1603686564627913, 2.144786687917804, 2.131449545559776, 2.1199052992212546,
    2.1098155778333156, 2.1009220402410382, 2.0930240544083087, 2.085963447265864,
    2.0796138447276795, 2.0738730679040254, 2.0686576104190486, 2.0638985616280245,
    2.0595385527532972, 2.0555294386428735, 2.0518305164802846, 2.0484071417952454,
    2.045229642132703, 2.0422724563012378,
)  # fmt: skip


@dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof=1; None when n < 2) and n of one metric in one cell."""

    n: int
    mean: float | None
    std: float | None


@dataclass(frozen=True)
class Comparison:
    """Treatment minus baseline, with a 95% CI (None when there is none)."""

    diff: float
    ci_low: float | None
    ci_high: float | None
    kind: str  # "paired", "welch" or "none"


def summarize(values: Sequence[float]) -> Summary:
    """Mean, sample std and n of ``values``."""
    n = len(values)
    if n == 0:
        return Summary(0, None, None)
    arr = np.asarray(values, dtype=float)
    std = float(np.std(arr, ddof=1)) if n >= 2 else None
    return Summary(n, float(np.mean(arr)), std)


def _t_fallback(df: float) -> float:
    if df <= 30:
        lo = max(1, math.floor(df))
        hi = min(30, lo + 1)
        if lo == hi or df == lo:
            return _T975[lo - 1]
        w = (1 / df - 1 / lo) / (1 / hi - 1 / lo)
        a, b = math.log(_T975[lo - 1]), math.log(_T975[hi - 1])
        return math.exp(a + w * (b - a))
    z = NormalDist().inv_cdf(0.975)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def t_quantile(df: float, use_scipy: bool = True) -> float:
    """Two-sided 95% critical value of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if use_scipy:
        try:
            from scipy.stats import t
        except ImportError:
            pass
        else:
            return float(t.ppf(0.5 + CONFIDENCE / 2, df))
    return _t_fallback(df)


def _interval(diff: float, se: float, df: float, kind: str) -> Comparison:
    if se == 0.0:
        return Comparison(diff, diff, diff, kind)
    half = t_quantile(df) * se
    return Comparison(diff, diff - half, diff + half, kind)


def compare(
    treat: Sequence[tuple[int, float]], base: Sequence[tuple[int, float]]
) -> Comparison | None:
    """``treat`` minus ``base`` given (seed, value) pairs; None when a side is empty."""
    if not treat or not base:
        return None
    t_seeds = [s for s, _ in treat]
    b_seeds = [s for s, _ in base]
    same = (
        len(set(t_seeds)) == len(t_seeds)
        and len(set(b_seeds)) == len(b_seeds)
        and set(t_seeds) == set(b_seeds)
    )
    if same:
        bmap = dict(base)
        d = np.asarray([v - bmap[s] for s, v in treat], dtype=float)
        diff = float(np.mean(d))
        n = len(d)
        if n < 2:
            return Comparison(diff, None, None, "none")
        return _interval(diff, float(np.std(d, ddof=1)) / math.sqrt(n), n - 1, "paired")
    tv = np.asarray([v for _, v in treat], dtype=float)
    bv = np.asarray([v for _, v in base], dtype=float)
    diff = float(np.mean(tv) - np.mean(bv))
    n1, n2 = len(tv), len(bv)
    if n1 < 2 or n2 < 2:
        return Comparison(diff, None, None, "none")
    a = float(np.var(tv, ddof=1)) / n1
    b = float(np.var(bv, ddof=1)) / n2
    se = math.sqrt(a + b)
    if se == 0.0:
        return Comparison(diff, diff, diff, "welch")
    df = (a + b) ** 2 / (a**2 / (n1 - 1) + b**2 / (n2 - 1))
    return _interval(diff, se, df, "welch")
