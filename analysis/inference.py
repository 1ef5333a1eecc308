"""Verdicts on comparisons: better, worse, equivalent, unresolved or too few seeds.

Pure statistics over seed values (NumPy and SciPy, no torch, no store), so the report, the
notebook API, the MLflow summary and a future planner (``python -m sweeper resolve``) share
one definition:

* the difference treatment - baseline: **paired** by seed where both sides hold the same
  seeds (each once), **Welch** otherwise (the same choice as the tables' Δ,
  :func:`analysis.stats.compare`);
* its interval is **simultaneous** over the family (every comparison against one baseline in
  one table, e.g. the α of a grid): Bonferroni, each interval at ``1 - 0.05 / m``, so the best
  α chosen afterwards keeps its 95 % coverage (Bouthillier et al., MLSys 2021, warn of the
  winner's curse; Bonferroni holds under any dependence, the α sharing one baseline);
* P(improvement): the share of seed pairs where the treatment improves on the baseline
  (ties count half), the probability of improvement rliable and Bouthillier et al. recommend;
  its interval is Clopper-Pearson at the same level (see :func:`p_improvement`);
* the verdict (:func:`classify`): ``equivalent`` when the interval lies inside ±margin (even
  when it excludes 0), else ``better`` / ``worse`` when it excludes 0, else ``unresolved``
  with the seeds per side that would resolve it with 80 % power (:func:`seeds_needed`);
  ``too few seeds`` with fewer than 2 on a side. Zero spread gives a point interval.
* :func:`stein_n`: Stein's two-stage rule, the total seeds per side for a target half-width
  from a pilot's spread (for planning).

Array versions (:func:`paired_intervals`, :func:`classify`) let a simulation check the error
rates of these very rules (``tests/test_verdicts.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MARGIN = 0.2  # percentage points of top-1: differences this small count as no difference
LEVEL = 0.95  # simultaneous coverage of one family's intervals
POWER = 0.8  # what "seeds needed" aims at
MAX_SEEDS = 100_000  # beyond this, "seeds needed" is None (practically never resolves)

BETTER, WORSE, EQUIVALENT, UNRESOLVED, TOO_FEW = (
    "better", "worse", "equivalent", "unresolved", "too few seeds",
)  # fmt: skip
VERDICTS = (BETTER, WORSE, EQUIVALENT, UNRESOLVED, TOO_FEW)

# metrics a verdict can be on: +1 where higher is better, -1 where lower is
DIRECTIONS = {
    "test_acc": 1, "train_acc": 1, "test_top5": 1, "val_acc": 1,
    "test_loss": -1, "val_loss": -1,
}  # fmt: skip


@dataclass(frozen=True)
class Comparison:
    """One treatment against its baseline on one metric, and the verdict.

    ``diff`` and the interval are treatment - baseline in the metric's units; the interval is
    at ``confidence`` (``1 - (1 - LEVEL) / family_size``), None with fewer than 2 seeds on a
    side. ``wins`` of ``pairs``: seed pairs where the treatment improves (ties half)."""

    metric: str
    n_treatment: int
    n_baseline: int
    paired: bool
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    p_improve: float | None
    p_low: float | None
    p_high: float | None
    wins: float
    pairs: int
    verdict: str
    seeds_needed: int | None
    family_size: int
    confidence: float
    margin: float

    @property
    def excludes_zero(self) -> bool:
        lo, hi = self.ci_low, self.ci_high
        return lo is not None and hi is not None and (lo > 0 or hi < 0)


def family_confidence(m: int, level: float = LEVEL) -> float:
    """Bonferroni: the level of each of ``m`` intervals that holds ``level`` jointly."""
    if m < 1:
        raise ValueError(f"a family holds at least 1 comparison, got {m}")
    return 1.0 - (1.0 - level) / m


def direction(metric: str) -> int:
    """+1 where a higher ``metric`` is better, -1 where lower is."""
    if metric not in DIRECTIONS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(DIRECTIONS)}")
    return DIRECTIONS[metric]


def _tcrit(df: np.ndarray | float, confidence: float) -> np.ndarray:
    if np.ndim(df) == 0:  # one comparison: its quantile is one of few (cached)
        return np.asarray(_tcrit_scalar(float(df), float(confidence)))
    from scipy.stats import t

    return np.asarray(t.ppf(0.5 + confidence / 2, df), dtype=float)


@functools.lru_cache(maxsize=4096)
def _tcrit_scalar(df: float, confidence: float) -> float:
    # SciPy's ppf costs about 0.1 ms a call; a report or a simulation of thousands of
    # comparisons asks the same few (df, level) again and again
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


# ----------------------------------------------------------------- vectorised core
def paired_intervals(d: np.ndarray, confidence: float) -> tuple[np.ndarray, ...]:
    """Mean and t-interval of paired differences along the last axis (n >= 2)."""
    d = np.asarray(d, dtype=float)
    n = d.shape[-1]
    mean = d.mean(axis=-1)
    half = _tcrit(n - 1, confidence) * d.std(axis=-1, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def welch_intervals(t: np.ndarray, b: np.ndarray, confidence: float) -> tuple[np.ndarray, ...]:
    """Difference of means and Welch interval along the last axis (n >= 2 on each side)."""
    t, b = np.asarray(t, dtype=float), np.asarray(b, dtype=float)
    n1, n2 = t.shape[-1], b.shape[-1]
    va, vb = t.var(axis=-1, ddof=1) / n1, b.var(axis=-1, ddof=1) / n2
    se = np.sqrt(va + vb)
    with np.errstate(invalid="ignore", divide="ignore"):
        df = (va + vb) ** 2 / (va**2 / (n1 - 1) + vb**2 / (n2 - 1))
    half = np.where(se > 0, _tcrit(np.where(se > 0, df, 1.0), confidence) * se, 0.0)
    mean = t.mean(axis=-1) - b.mean(axis=-1)
    return mean, mean - half, mean + half


def classify(lo: np.ndarray, hi: np.ndarray, margin: float, sign: int = 1) -> np.ndarray:
    """The verdict of each interval: equivalent inside ±margin, else better / worse when it
    excludes 0 (``sign`` -1: lower is better), else unresolved."""
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    out = np.full(np.broadcast(lo, hi).shape, UNRESOLVED, dtype=object)
    up, down = (BETTER, WORSE) if sign > 0 else (WORSE, BETTER)
    out[lo > 0] = up
    out[hi < 0] = down
    out[(lo >= -margin) & (hi <= margin)] = EQUIVALENT
    return out


# ------------------------------------------------------------------------ power
def resolve_power(n: np.ndarray | int, diff: float, sd: float, margin: float,
                  confidence: float, df_factor: float = 1.0) -> np.ndarray:  # fmt: skip
    """The chance that a comparison with ``n`` seeds per side resolves (its interval
    excludes 0, or lies inside ±margin) when the true difference is ``diff`` and the
    differences' standard deviation per seed pair is ``sd``; df = ``df_factor`` (n - 1)
    (1 when paired; Welch's ratio otherwise). Noncentral t; for "inside ±margin" the usual
    lower bound P(lo >= -m) + P(hi <= m) - 1; the larger of the two ways is returned (a
    lower bound on resolving, so seeds needed errs on the safe side)."""
    from scipy.stats import nct

    n = np.asarray(n, dtype=float)
    df = df_factor * (n - 1)
    se = sd / np.sqrt(n)
    tc = _tcrit(df, confidence)
    with np.errstate(all="ignore"):
        apart = nct.sf(tc, df, diff / se) + nct.cdf(-tc, df, diff / se)
        inside = nct.sf(tc, df, (diff + margin) / se) + nct.cdf(-tc, df, (diff - margin) / se) - 1
    return np.nan_to_num(np.maximum(apart, np.maximum(inside, 0.0)))


def seeds_needed(diff: float, sd: float, margin: float, confidence: float,
                 power: float = POWER, df_factor: float = 1.0, at_least: int = 2) -> int | None:  # fmt: skip
    """The fewest seeds per side (>= ``at_least``) at which :func:`resolve_power` reaches
    ``power``, taking ``diff`` and ``sd`` as the truth; None beyond :data:`MAX_SEEDS`.
    The first n past a 10 % grid's first success, checked one by one."""
    if sd <= 0:
        return at_least
    lo = max(at_least, 2)
    if lo > MAX_SEEDS:
        return None

    def first(ns: np.ndarray) -> int | None:
        ok = resolve_power(ns, diff, sd, margin, confidence, df_factor) >= power
        return int(ns[int(np.argmax(ok))]) if ok.any() else None

    # a geometric grid (steps of about 10 %) finds the bracket, then every n inside it
    # (in chunks: the noncentral t is slow far out, where n is large)
    grid = np.unique(np.round(lo * 1.1 ** np.arange(0, 200)).astype(int).clip(lo, MAX_SEEDS))
    hit = None
    for k in range(0, grid.size, 16):
        hit = first(grid[k : k + 16])
        if hit is not None:
            break
    if hit is None:
        return None
    prev = grid[grid < hit]
    return first(np.arange(int(prev[-1]) + 1 if prev.size else lo, hit + 1))


def stein_n(pilot_sd: float, pilot_n: int, half_width: float,
            confidence: float = LEVEL) -> int:  # fmt: skip
    """Stein's two-stage rule: the total seeds (per side, or pairs) so that the interval's
    half-width is at most ``half_width`` whatever the true spread, from a pilot of
    ``pilot_n`` seeds with sample std ``pilot_sd``: max(n0, ceil((t_{n0-1} s / h)^2))."""
    if pilot_n < 2:
        raise ValueError(f"a pilot needs at least 2 seeds, got {pilot_n}")
    if half_width <= 0:
        raise ValueError(f"half_width must be > 0, got {half_width}")
    t = float(_tcrit(pilot_n - 1, confidence))
    return max(pilot_n, math.ceil((t * pilot_sd / half_width) ** 2))


# ----------------------------------------------------------- P(improvement)
@functools.lru_cache(maxsize=4096)
def _clopper_pearson(
    k_low: float, k_high: float, n: float, confidence: float
) -> tuple[float, float]:
    from scipy.stats import beta

    a = 1.0 - confidence
    lo = 0.0 if k_low <= 0 else float(beta.ppf(a / 2, k_low, n - k_low + 1))
    hi = 1.0 if k_high >= n else float(beta.ppf(1 - a / 2, k_high + 1, n - k_high))
    return lo, hi


def p_improvement(
    treat: Sequence[float], base: Sequence[float], paired: bool, confidence: float, sign: int = 1
) -> tuple[float, float, float, float, int]:
    """(P, low, high, wins, pairs): the share of seed pairs where the treatment improves.

    Paired: over the n seeds; the interval is Clopper-Pearson with the ties counted as losses
    for its low end and as wins for its high end. Unpaired: over all n1 x n2 pairs (the
    Mann-Whitney U / (n1 n2)); its interval is Clopper-Pearson at that share over
    min(n1, n2) trials (as many independent pairs as the data hold)."""
    t, b = sign * np.asarray(treat, dtype=float), sign * np.asarray(base, dtype=float)
    if paired:
        d = t - b
        wins, ties, n = float(np.sum(d > 0)), float(np.sum(d == 0)), len(d)
        lo, hi = _clopper_pearson(wins, wins + ties, n, confidence)
        return (wins + ties / 2) / n, lo, hi, wins + ties / 2, n
    diff = t[:, None] - b[None, :]
    pairs = diff.size
    wins = float(np.sum(diff > 0) + 0.5 * np.sum(diff == 0))
    p = wins / pairs
    m = min(len(t), len(b))
    lo, hi = _clopper_pearson(p * m, p * m, m, confidence)
    return p, lo, hi, wins, pairs


# ------------------------------------------------------------------ one comparison
def compare(
    treat: Sequence[tuple[int, float]],
    base: Sequence[tuple[int, float]],
    metric: str = "test_acc",
    margin: float = MARGIN,
    family_size: int = 1,
    level: float = LEVEL,
    plan: bool = True,
) -> Comparison:
    """The verdict on ``treat`` vs ``base`` given (seed, value) pairs, its interval
    simultaneous over a family of ``family_size`` comparisons at ``level``. ``plan``: give
    an unresolved one its ``seeds_needed`` (False leaves it None: the verdict is the same,
    and a simulation of thousands of comparisons skips the power search)."""
    from analysis.stats import paired_differences

    sign = direction(metric)
    conf = family_confidence(family_size, level)
    n1, n2 = len(treat), len(base)
    d = paired_differences(treat, base)
    paired = d is not None
    tv = np.asarray([v for _, v in treat], dtype=float)
    bv = np.asarray([v for _, v in base], dtype=float)
    diff = float(np.mean(d)) if paired else (float(tv.mean() - bv.mean()) if n1 and n2 else None)
    common = {"metric": metric, "n_treatment": n1, "n_baseline": n2, "paired": paired,
              "diff": diff, "family_size": family_size, "confidence": conf, "margin": margin}  # fmt: skip
    if n1 < 2 or n2 < 2 or (paired and len(d) < 2):
        return Comparison(**common, ci_low=None, ci_high=None, p_improve=None, p_low=None,
                          p_high=None, wins=0.0, pairs=0, verdict=TOO_FEW, seeds_needed=None)  # fmt: skip
    if paired:
        tmap = dict(treat)
        bmap = dict(base)
        order = sorted(bmap)
        _, lo, hi = paired_intervals(d, conf)
        sd, df_factor = float(np.std(d, ddof=1)), 1.0
        pt, pb = [tmap[s] for s in order], [bmap[s] for s in order]
    else:
        _, lo, hi = welch_intervals(tv, bv, conf)
        v1, v2 = float(np.var(tv, ddof=1)), float(np.var(bv, ddof=1))
        sd = math.sqrt(v1 + v2)
        df_factor = (v1 + v2) ** 2 / (v1**2 + v2**2) if sd > 0 else 1.0
        pt, pb = list(tv), list(bv)
    lo, hi = float(lo), float(hi)
    verdict = str(classify(lo, hi, margin, sign)[()])
    need = None
    if verdict == UNRESOLVED and plan:
        need = seeds_needed(diff, sd, margin, conf, df_factor=df_factor,
                            at_least=max(n1, n2) + 1)  # fmt: skip
    p, plo, phi, wins, pairs = p_improvement(pt, pb, paired, conf, sign)
    return Comparison(**common, ci_low=lo, ci_high=hi, p_improve=p, p_low=plo, p_high=phi,
                      wins=wins, pairs=pairs, verdict=verdict, seeds_needed=need)  # fmt: skip
