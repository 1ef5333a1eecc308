"""One sweep's result, as its MLflow parent run shows it (:class:`sweeper.mirror.SweepMirror`
updates it as runs finish): per configuration (its seeds together, by
:func:`sweeper.describe.config_key`) the mean, sample std and n of the final test and train
top-1 over ``done`` runs; the best configuration; the counts of runs by status; for a search,
its best trial; and the report's tables (:func:`analysis.render.markdown`) over the sweep's
runs. Read through the store's read API, like the rest of the analysis.

MLflow metric names allow letters, digits, ``_ - . / : space``; a configuration's label (the
sweep's point without its seed, ``method=pgt alpha=0.25``) becomes ``method:pgt alpha:0.25``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from analysis.render import fmt_summary, markdown
from analysis.stats import Summary, summarize
from analysis.tables import build_tables, cost_of
from sweeper.describe import config_key, config_label, point_label
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

    @property
    def metric_label(self) -> str:
        """The label as MLflow allows it in a metric name."""
        s = re.sub(r"[^\w.\- :/]", "_", self.label.replace("=", ":")).replace("/", "_")
        return s[:180]


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
        if rest := point_label(p):
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


def summary_metrics(s: SweepSummary) -> dict[str, float]:
    """The parent run's metrics: ``test_acc.mean/<configuration>`` (and ``.std``, ``.n``,
    the same for ``train_acc``), ``best/test_acc.mean``, ``runs/<status>``, and for a
    search ``best/<metric>`` and ``best/trial``."""
    out: dict[str, float] = {}
    for row in s.rows:
        for name, summ in (("test_acc", row.test), ("train_acc", row.train)):
            out[f"{name}.n/{row.metric_label}"] = float(summ.n)
            if summ.mean is not None:
                out[f"{name}.mean/{row.metric_label}"] = summ.mean
            if summ.std is not None:
                out[f"{name}.std/{row.metric_label}"] = summ.std
    best = s.best
    if best is not None and best.test.mean is not None:
        out["best/test_acc.mean"] = best.test.mean
    for status, n in s.counts.items():
        out[f"runs/{status}"] = float(n)
    out["runs/total"] = float(len(s.runs))
    if s.best_trial is not None and s.objective is not None:
        out[f"best/{s.objective.metric}"] = s.best_trial[1]
        out["best/trial"] = float(s.best_trial[0])
    return out


def summary_tags(s: SweepSummary) -> dict[str, str]:
    """The parent run's tags naming the best configuration (and trial)."""
    tags: dict[str, str] = {}
    best = s.best
    if best is not None and best.test.mean is not None:
        tags.update(best_config=best.label, best_config_key=best.key,
                    best_test_acc=f"{best.test.mean:.2f}")  # fmt: skip
    if s.best_trial is not None:
        tags.update(best_trial=str(s.best_trial[0]), best_value=f"{s.best_trial[1]:.6g}")
    return tags


HEADER = ["configuration", "config_key", "runs", "seeds", "test top-1", "train top-1",
          "status"]  # fmt: skip


def _rows(s: SweepSummary) -> list[list[str]]:
    best = s.best
    out = []
    for row in s.rows:
        st: dict[str, int] = {}
        for r in row.runs:
            st[r.status.value] = st.get(r.status.value, 0) + 1
        mark = " **best**" if best is not None and row.key == best.key else ""
        out.append([row.label + mark, row.key, str(len(row.runs)),
                    ",".join(str(r.seed) for r in row.runs),
                    fmt_summary(row.test), fmt_summary(row.train),
                    ", ".join(f"{n} {k}" for k, n in st.items())])  # fmt: skip
    return out


def summary_markdown(s: SweepSummary, limit: int = 7900) -> str:
    """The parent run's description (MLflow renders it as Markdown on the run page):
    progress, the best configuration, the per-configuration table, then the report's
    tables while they fit in ``limit`` characters (MLflow's tag limit is 8,000)."""
    c = s.counts
    lines = [f"## Sweep {s.sweep_id}: {s.name}", ""]
    lines.append(f"**{s.ended} of {len(s.runs)} runs ended**: " + " · ".join(
        f"{n} {k}" for k, n in c.items() if n) + ".")  # fmt: skip
    best = s.best
    if best is not None and best.test.mean is not None:
        lines.append(f"\n**Best configuration**: `{best.label}`: test top-1 "
                     f"{fmt_summary(best.test)} (mean ± sample std (n seeds)).")  # fmt: skip
    if s.best_trial is not None and s.objective is not None:
        n, v, label = s.best_trial
        lines.append(f"\n**Best trial**: {n} (`{label}`): {s.objective.metric} {v:.4g} "
                     f"({s.objective.direction}).")  # fmt: skip
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in _rows(s)]
    lines += ["", "Final epoch's top-1 in %, over `done` runs; a run's own page has its "
              "curves. The table is also the artifact `sweep_summary.csv`."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    if s.report:
        report = "\n" + s.report.replace("\n## ", "\n### ").replace(
            "# gradsweep report", "## The report's tables", 1
        )
        if len(text) + len(report) <= limit:
            text += report
        else:
            text += ("\n_The report's tables are in the artifact `report.md` (too long for "
                     "this description)._\n")  # fmt: skip
    return text[:limit]


def summary_csv(s: SweepSummary) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["configuration", "config_key", "runs", "seeds", "test_mean", "test_std",
                "test_n", "train_mean", "train_std", "train_n", "best"])  # fmt: skip
    best = s.best
    for row in s.rows:
        w.writerow([row.label, row.key, len(row.runs), " ".join(str(r.seed) for r in row.runs),
                    row.test.mean, row.test.std, row.test.n, row.train.mean, row.train.std,
                    row.train.n, int(best is not None and row.key == best.key)])  # fmt: skip
    return buf.getvalue()
