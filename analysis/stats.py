"""Seed statistics: mean, sample std and n per cell; differences vs a baseline with a 95% CI.

CI choice (``compare``):

* **paired**: both cells hold exactly the same seeds, each once, and n >= 2: t-interval on
  the per-seed differences (df = n - 1);
* **welch**: otherwise, with n >= 2 on both sides: difference of means, Welch standard
  error and Welch-Satterthwaite df;
* **none**: a side with n = 1 (or a single shared seed): the difference, no interval.

The t quantile comes from SciPy (always installed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


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


def t_quantile(df: float, confidence: float = CONFIDENCE) -> float:
    """Two-sided critical value of Student's t with ``df`` degrees of freedom (SciPy)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def _interval(diff: float, se: float, df: float, kind: str) -> Comparison:
    if se == 0.0:
        return Comparison(diff, diff, diff, kind)
    half = t_quantile(df) * se
    return Comparison(diff, diff - half, diff + half, kind)


def paired_differences(
    treat: Sequence[tuple[int, float]], base: Sequence[tuple[int, float]]
) -> np.ndarray | None:
    """Per-seed ``treat - base`` (in the treatment's seed order) when both sides hold exactly
    the same seeds, each once; None otherwise (then the comparison is Welch's)."""
    t_seeds = [s for s, _ in treat]
    b_seeds = [s for s, _ in base]
    same = (
        bool(t_seeds)
        and len(set(t_seeds)) == len(t_seeds)
        and len(set(b_seeds)) == len(b_seeds)
        and set(t_seeds) == set(b_seeds)
    )
    if not same:
        return None
    bmap = dict(base)
    return np.asarray([v - bmap[s] for s, v in treat], dtype=float)


def compare(
    treat: Sequence[tuple[int, float]], base: Sequence[tuple[int, float]]
) -> Comparison | None:
    """``treat`` minus ``base`` given (seed, value) pairs; None when a side is empty."""
    if not treat or not base:
        return None
    d = paired_differences(treat, base)
    if d is not None:
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
