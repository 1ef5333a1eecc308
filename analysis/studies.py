"""Optuna searches in the report: each study's best trial, optimisation history and
parameter importances, read from the study storage (by default the results store, where
``hydra/sweeper=optuna`` keeps its studies).

Read-only: Optuna's storage is opened with table creation and the schema check skipped,
and only when the database already has Optuna's tables, so a report never writes to the
store it reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure as MplFigure
from sqlalchemy import create_engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from analysis.errors import AnalysisError
from sweeper.store import engine_url
from trainers.registry import first_line

DPI = 110
STUDIES_HEADER = [
    "study",
    "metric",
    "direction",
    "trials",
    "complete",
    "pruned",
    "failed",
    "running",
    "best trial",
    "best value",
    "best params",
    "best run",
]
TRIALS_HEADER = ["study", "trial", "state", "value", "params", "run", "run status"]
IMPORTANCE_HEADER = ["study", "parameter", "importance"]


@dataclass
class TrialRow:
    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    value: float | None  # the objective (COMPLETE) or the last reported value (PRUNED)
    params: dict[str, Any]
    run_id: int | None
    run_status: str | None


@dataclass
class StudySummary:
    name: str
    metric: str
    direction: str  # maximize | minimize
    trials: list[TrialRow]
    best: TrialRow | None
    importances: dict[str, float] = field(default_factory=dict)
    importance_note: str = ""  # why importances are missing, when they are

    def count(self, state: str) -> int:
        return sum(1 for t in self.trials if t.state == state)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def load_studies(url: str, names: set[str] | None = None) -> list[StudySummary]:
    """Every study in the storage at ``url`` (or only ``names``); [] when it has none."""
    try:
        engine = create_engine(engine_url(url))
        try:
            has = inspect(engine).has_table("studies") and inspect(engine).has_table("trials")
        finally:
            engine.dispose()
    except SQLAlchemyError as e:
        raise AnalysisError(f"cannot read the study storage {url}: {e}") from e
    if not has:
        return []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.RDBStorage(
            engine_url(url), skip_table_creation=True, skip_compatibility_check=True
        )
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    except Exception as e:  # an Optuna schema we cannot read: say so, keep the tables
        raise AnalysisError(f"cannot read the Optuna studies in {url}: {e}") from e
    out = []
    try:
        for s in summaries:
            if names is not None and s.study_name not in names:
                continue
            study = optuna.load_study(study_name=s.study_name, storage=storage)
            out.append(_summary(study))
    finally:
        storage.remove_session()
        storage.engine.dispose()
    return out


def _summary(study: Any) -> StudySummary:
    import optuna

    ts = optuna.trial.TrialState
    rows = []
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.state == ts.COMPLETE else None
        if value is None and t.state == ts.PRUNED and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        rows.append(
            TrialRow(
                t.number,
                t.state.name,
                value,
                dict(t.params),
                t.user_attrs.get("run_id"),
                t.user_attrs.get("status"),
            )
        )
    direction = study.direction.name.lower()
    complete = [r for r in rows if r.state == "COMPLETE" and r.value is not None]
    best = None
    if complete:
        pick = max if direction == "maximize" else min
        best = pick(complete, key=lambda r: (r.value, -r.number))
    summary = StudySummary(
        study.study_name,
        str(study.user_attrs.get("metric", "objective")),
        direction,
        rows,
        best,
    )
    if len(complete) < 2:
        summary.importance_note = "needs at least 2 complete trials"
    else:
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
            summary.importances = {k: float(v) for k, v in imp.items()}
        except Exception as e:  # e.g. every complete trial at the same value
            summary.importance_note = f"not computable ({first_line(e)})"
    return summary


# ------------------------------------------------------------------------------ tables
def studies_grid(studies: list[StudySummary]) -> list[list[str]]:
    rows = []
    for s in studies:
        b = s.best
        rows.append(
            [
                s.name,
                s.metric,
                s.direction,
                str(len(s.trials)),
                str(s.count("COMPLETE")),
                str(s.count("PRUNED")),
                str(s.count("FAIL")),
                str(s.count("RUNNING")),
                str(b.number) if b else "—",
                _fmt(b.value) if b and b.value is not None else "—",
                params_text(b.params) if b else "—",
                str(b.run_id) if b and b.run_id is not None else "—",
            ]
        )
    return rows


def trials_grid(studies: list[StudySummary]) -> list[list[str]]:
    return [
        [
            s.name,
            str(t.number),
            t.state,
            _fmt(t.value) if t.value is not None else "—",
            params_text(t.params),
            str(t.run_id) if t.run_id is not None else "—",
            t.run_status or "—",
        ]
        for s in studies
        for t in s.trials
    ]


def importance_grid(studies: list[StudySummary]) -> list[list[str]]:
    rows = []
    for s in studies:
        if not s.importances:
            rows.append([s.name, "—", s.importance_note or "—"])
        for k, v in s.importances.items():
            rows.append([s.name, k, f"{v:.3f}"])
    return rows


# ----------------------------------------------------------------------------- figures
@dataclass(frozen=True)
class StudyFigure:
    path: Path
    title: str
    caption: str


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)


def history_figure(s: StudySummary, out_dir: Path) -> StudyFigure | None:
    """Objective per trial (pruned trials at their last reported value) and the best so far."""
    pts = [t for t in s.trials if t.value is not None and math.isfinite(t.value)]
    if not pts:
        return None
    fig = MplFigure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    done = [t for t in pts if t.state == "COMPLETE"]
    pruned = [t for t in pts if t.state == "PRUNED"]
    ax.scatter([t.number for t in done], [t.value for t in done], label="complete", zorder=3)
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [t.value for t in pruned],
            marker="x",
            color="tab:red",
            label="pruned (last reported value)",
            zorder=3,
        )
    better = max if s.direction == "maximize" else min
    best_x, best_y, cur = [], [], None
    for t in sorted(done, key=lambda t: t.number):
        assert t.value is not None
        cur = t.value if cur is None else better(cur, t.value)
        best_x.append(t.number)
        best_y.append(cur)
    if best_x:
        best_x.append(max(t.number for t in pts) + 0.5)  # show the last level
        best_y.append(best_y[-1])
        ax.step(best_x, best_y, where="post", color="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(s.metric)
    ax.set_title(f"{s.name}: optimisation history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"optuna_history_{_slug(s.name)}.png"
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    b = s.best
    caption = (
        f"{len(s.trials)} trials ({s.count('COMPLETE')} complete, {s.count('PRUNED')} pruned, "
        f"{s.count('FAIL')} failed); {s.direction} {s.metric}."
        + (f" Best: trial {b.number}, {params_text(b.params)}, {_fmt(b.value)}." if b else "")
    )
    return StudyFigure(path, f"Optuna study {s.name}: optimisation history", caption)


def importance_figure(s: StudySummary, out_dir: Path) -> StudyFigure | None:
    if not s.importances:
        return None
    names = list(s.importances)[::-1]
    fig = MplFigure(figsize=(6.0, 0.6 + 0.45 * len(names)))
    ax = fig.add_subplot()
    ax.barh(names, [s.importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA)")
    ax.set_xlim(0, 1)
    ax.set_title(f"{s.name}: parameter importances")
    path = out_dir / f"optuna_importance_{_slug(s.name)}.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    caption = "; ".join(f"{k} {v:.3f}" for k, v in s.importances.items())
    return StudyFigure(path, f"Optuna study {s.name}: parameter importances", caption)


def study_figures(studies: list[StudySummary], out_dir: Path) -> list[StudyFigure]:
    figs: list[StudyFigure] = []
    for s in studies:
        for f in (history_figure(s, out_dir), importance_figure(s, out_dir)):
            if f is not None:
                figs.append(f)
    return figs
