"""One sweep's result: per configuration (its seeds together, by
:func:`analysis.configs.config_key`) the mean, sample std and n of the final test and train
top-1 over ``done`` runs; the best configuration; the counts of runs by status; for a search,
its best trial; the verdicts of its configurations against their settings' baselines
(:func:`analysis.comparisons.sweep_verdicts`); and the report's tables (:func:`analysis.render.markdown`) over the sweep's
runs. Read through the store's read API, like the rest of the analysis. The sweeper's MLflow
thread shows it on the sweep's parent run (:mod:`sweeper.tracking.sweep` formats it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from analysis.comparisons import SweepVerdicts, sweep_verdicts
from analysis.configs import config_key, config_label, point_label
from analysis.render import markdown
from analysis.stats import Summary, summarize
from analysis.tables import build_tables, cost_of
from sweeper.store import RunRecord, RunStatus, Store

STATUSES = ("done", "failed", "diverged", "pruned", "interrupted", "running", "queued")


@dataclass(frozen=True)
class ConfigRow:
    """One configuration of the sweep: its seeds' runs and their statistics."""

    key: str
    label: str
    runs: tuple[RunRecord, ...]
    test: Summary
    train: Summary
    trials: tuple[int, ...] = ()


@dataclass(frozen=True)
class Objective:
    """A search's objective: the epoch metric it optimises and in which direction."""

    metric: str
    direction: str  # maximize | minimize


@dataclass
class SweepSummary:
    sweep_id: int
    name: str
    rows: list[ConfigRow]
    counts: dict[str, int]
    runs: list[RunRecord]
    objective: Objective | None = None
    best_trial: tuple[int, float, str] | None = None  # number, value, configuration label
    report: str = ""
    notes: list[str] = field(default_factory=list)
    # final test top-1 of each configuration against its setting's baseline, by config key
    verdicts: SweepVerdicts = field(default_factory=lambda: SweepVerdicts([], {}))

    @property
    def best(self) -> ConfigRow | None:
        """The configuration with the highest mean final test top-1 over its done seeds."""
        scored = [r for r in self.rows if r.test.mean is not None]
        return max(scored, key=lambda r: r.test.mean or 0.0) if scored else None

    @property
    def ended(self) -> int:
        return sum(self.counts[s] for s in ("done", "failed", "diverged", "pruned"))


def _label(points: Sequence[str], identity: dict[str, Any]) -> str:
    for p in points:
        if rest := point_label(p, identity):
            return rest
    return config_label(identity)


def summarize_sweep(store: Store, sweep_id: int, objective: Objective | None = None,
                    with_report: bool = True) -> SweepSummary:  # fmt: skip
    """The sweep's summary from the store (every run it links, each once)."""
    sweep = store.sweeps([sweep_id])[0]
    links = store.sweep_runs(sweep_id)
    runs: dict[int, RunRecord] = {}
    points: dict[int, list[str]] = {}
    trials: dict[int, list[int]] = {}
    for link, run in links:
        runs[run.id] = run
        points.setdefault(run.id, []).append(link.point)
        if link.trial is not None:
            trials.setdefault(run.id, []).append(link.trial)
    groups: dict[str, list[RunRecord]] = {}
    for run in runs.values():
        groups.setdefault(config_key((run.config or {}).get("identity", {})), []).append(run)
    rows = []
    for key, members in groups.items():
        done = [r for r in members if r.status == RunStatus.done]
        ident = (members[0].config or {}).get("identity", {})
        labels = [p for r in members for p in points[r.id]]
        rows.append(ConfigRow(
            key, _label(labels, ident), tuple(sorted(members, key=lambda r: r.seed)),
            summarize([r.test_acc for r in done if r.test_acc is not None]),
            summarize([r.train_acc for r in done if r.train_acc is not None]),
            tuple(sorted(t for r in members for t in trials.get(r.id, []))),
        ))  # fmt: skip
    rows.sort(key=lambda r: r.label)
    rows = _distinct_labels(rows)
    counts = {s: 0 for s in STATUSES}
    for run in runs.values():
        counts[run.status.value] = counts.get(run.status.value, 0) + 1
    out = SweepSummary(sweep_id, sweep.name, rows, counts, list(runs.values()), objective)
    out.verdicts = sweep_verdicts(out.runs)  # cheap statistics: every summary has them
    if objective is not None:
        out.best_trial = _best_trial(store, rows, trials, objective)
    if with_report:
        every = list(runs.values())
        tables, ex = build_tables(every)  # as python -m analysis --sweep ID builds them
        out.report = markdown(tables, ex, (cost_of(every), cost_of(ex.runs)))
    return out


def _distinct_labels(rows: list[ConfigRow]) -> list[ConfigRow]:
    """Rows whose label another configuration shares get their config key appended: each
    label names one configuration (the parent's metrics are keyed by it)."""
    seen: dict[str, int] = {}
    for r in rows:
        seen[r.label] = seen.get(r.label, 0) + 1
    return [replace(r, label=f"{r.label} [{r.key}]") if seen[r.label] > 1 else r for r in rows]


def _best_trial(store: Store, rows: list[ConfigRow], trials: dict[int, list[int]],
                obj: Objective) -> tuple[int, float, str] | None:  # fmt: skip
    """The best finished trial by the search's own metric (its run's last epoch, as the
    study was told); ties go to the earliest trial. ``trials``: run id -> its trials."""
    done = [(t, run, row) for row in rows for run in row.runs if run.status == RunStatus.done
            for t in trials.get(run.id, [])]  # fmt: skip
    done.sort(key=lambda x: x[0])
    last = store.last_epochs([run.id for _, run, _ in done])
    best: tuple[int, float, str] | None = None
    for number, run, row in done:
        e = last.get(run.id)
        v = getattr(e, obj.metric, None) if e is not None else None
        if v is None or not math.isfinite(v):
            continue
        better = best is None or (v > best[1] if obj.direction == "maximize" else v < best[1])
        if better:
            best = (number, float(v), row.label)
    return best
