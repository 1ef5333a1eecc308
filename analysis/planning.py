"""Seeds planned for unresolved comparisons, in two looks whose error rates hold.

``python -m sweeper resolve`` looks at each comparison of a family (every treatment against
one baseline, :mod:`analysis.comparisons`) twice, and only twice:

1. **The pilot look**, on the runs already done: intervals simultaneous over the family at
   :data:`LEVEL_PILOT`. A comparison it resolves (better, worse, equivalent) gets no seed.
2. **The plan**, made once from the pilot: **Stein's two-stage rule** fixes the total seeds
   per side from the pilot's spread alone, n = max(n0, ceil((t_{n0-1} s0 / h)^2)) with the
   t quantile at the final look's family level and h = margin / 2: an interval no wider than
   ±margin/2 either excludes 0 or lies inside ±margin, so it must resolve. n is capped at
   ``max_seeds``. The plan never uses the pilot's *difference*: a plan that adds fewer seeds
   where the pilot difference looks large calls about 6 % of A/A comparisons better or worse
   at these levels (``tests/test_resolve_plan.py`` measures it), the classic cost of
   re-sizing on an interim effect.
3. **The final look**, on the planned seeds (the pilot's seeds both sides hold, then the
   lowest seeds no run of the family holds, the same for every side, so the difference is
   paired by seed): intervals simultaneous at :data:`LEVEL_FINAL`, the report's rules.

Two looks at 5 % each would call about 9 % of A/A comparisons better or worse (two
chances); the family's 5 % is therefore split between the looks (Bonferroni over the looks,
which holds whatever their dependence): 2.5 % at the pilot, 2.5 % at the end. So a verdict
the report reaches narrowly at 95 % can still be unresolved at the pilot look and get seeds.
With a two-seed pilot (one degree of freedom) the pilot look resolves only very large
differences or exact ties (zero spread). After the plan nothing is looked at again: the
final verdict is the verdict, resolved or not.

Pure statistics over (seed, value) pairs: the simulation in the tests runs these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from analysis.inference import (
    BETTER,
    EQUIVALENT,
    LEVEL,
    TOO_FEW,
    WORSE,
    Comparison,
    compare,
    family_confidence,
    stein_n,
)

ALPHA = 1.0 - LEVEL  # the family's error budget over the whole procedure (5 %)
LEVEL_PILOT = 1.0 - ALPHA / 2  # the pilot look spends half of it ...
LEVEL_FINAL = 1.0 - ALPHA / 2  # ... the final look the other half
MAX_SEEDS = 10  # per side, the default cap of a plan

Values = Sequence[tuple[int, float]]  # (seed, value) of one side


@dataclass(frozen=True)
class SeedPlan:
    """One comparison's plan: its pilot look, Stein's total and the seeds of the final look.

    ``n_pilot``: the pilot's seeds per side (pairs where both sides hold the same seeds);
    ``n_stein``: Stein's total per side, uncapped (None where nothing is planned);
    ``n_planned``: the total per side after the plan; ``seeds``: the seeds both sides hold
    for the final look (the pilot's first)."""

    pilot: Comparison
    n_pilot: int
    n_stein: int | None
    n_planned: int
    seeds: tuple[int, ...]

    @property
    def resolved(self) -> bool:
        """Resolved at the pilot look: it gets no seed."""
        return self.pilot.verdict in (BETTER, WORSE, EQUIVALENT)

    @property
    def planned(self) -> bool:
        """Seeds are planned for it (unresolved, with a pilot of two seeds or more)."""
        return self.n_stein is not None

    @property
    def capped(self) -> bool:
        return self.n_stein is not None and self.n_stein > self.n_planned


def pilot_spread(treat: Values, base: Values) -> tuple[float, int] | None:
    """(s0, n0): the pilot's standard deviation of one treatment - baseline difference and
    its seeds per side: over the seeds both sides hold (paired) when there are two or more,
    else Welch's sqrt(s_t^2 + s_b^2) with the smaller side's count; None below two seeds."""
    b = dict(base)
    common = sorted(s for s, _ in treat if s in b)
    if len(common) >= 2:
        t = dict(treat)
        d = np.asarray([t[s] - b[s] for s in common], dtype=float)
        return float(np.std(d, ddof=1)), len(common)
    tv = np.asarray([v for _, v in treat], dtype=float)
    bv = np.asarray([v for _, v in base], dtype=float)
    if len(tv) < 2 or len(bv) < 2:
        return None
    return math.sqrt(float(np.var(tv, ddof=1)) + float(np.var(bv, ddof=1))), min(len(tv), len(bv))


def plan_total(
    s0: float, n0: int, margin: float, family_size: int, max_seeds: int
) -> tuple[int, int]:
    """(Stein's total per side, the planned total: Stein's capped at ``max_seeds``, never
    below the pilot's ``n0``)."""
    conf = family_confidence(family_size, LEVEL_FINAL)
    need = stein_n(s0, n0, margin / 2, conf) if s0 > 0 else n0
    return need, max(n0, min(max_seeds, need))


def _lowest_free(taken: set[int], k: int) -> list[int]:
    """The ``k`` lowest non-negative seeds not in ``taken``."""
    out, s = [], 0
    while len(out) < k:
        if s not in taken:
            out.append(s)
        s += 1
    return out


def plan_family(
    treatments: Sequence[Values],
    base: Values,
    metric: str,
    margin: float,
    max_seeds: int = MAX_SEEDS,
) -> list[SeedPlan]:
    """The plan of one family: each treatment against the one baseline, their pilot looks
    simultaneous over the family, then Stein's total for each unresolved one. The seeds
    added are the same for every side (the lowest that no pilot run of the family holds), so
    the baseline's new seeds serve every treatment."""
    if max_seeds < 2:
        raise ValueError(f"max_seeds must be >= 2, got {max_seeds}")
    m = len(treatments)
    taken = {s for s, _ in base} | {s for t in treatments for s, _ in t}
    plans: list[tuple[Comparison, int, int | None, int, list[int]]] = []
    for treat in treatments:
        pilot = compare(treat, base, metric, margin, m, level=LEVEL_PILOT, plan=False)
        b = {s for s, _ in base}
        common = sorted(s for s, _ in treat if s in b)
        spread = pilot_spread(treat, base)
        if (
            pilot.verdict in (BETTER, WORSE, EQUIVALENT)
            or pilot.verdict == TOO_FEW
            or spread is None
        ):
            plans.append((pilot, len(common), None, len(common), common))
            continue
        s0, n0 = spread
        need, total = plan_total(s0, n0, margin, m, max_seeds)
        plans.append((pilot, n0, need, max(total, len(common)), common))
    extra = max((total - len(common) for _, _, need, total, common in plans if need is not None),
                default=0)  # fmt: skip
    fresh = _lowest_free(taken, extra)
    out = []
    for pilot, n0, need, total, common in plans:
        seeds = tuple(common) if need is None else tuple(common + fresh[: total - len(common)])
        out.append(SeedPlan(pilot, n0, need, total if need is not None else len(common), seeds))
    return out


def final_look(
    plan: SeedPlan,
    treat: Values,
    base: Values,
    metric: str,
    margin: float,
    family_size: int,
    plan_more: bool = True,
) -> Comparison:
    """The verdict after the plan: the pilot look where nothing was planned, else the
    comparison on the planned seeds that both sides finished (paired by seed), simultaneous
    over the family at :data:`LEVEL_FINAL`. ``plan_more``: state the seeds that would
    resolve a comparison still unresolved (as the report's lines do; the verdict is the
    same without)."""
    if not plan.planned:
        return plan.pilot
    want = set(plan.seeds)
    t, b = dict(treat), dict(base)
    both = [s for s in plan.seeds if s in t and s in b and s in want]
    return compare([(s, t[s]) for s in both], [(s, b[s]) for s in both], metric, margin,
                   family_size, level=LEVEL_FINAL, plan=plan_more)  # fmt: skip
