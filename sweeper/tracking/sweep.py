"""The sweeper's MLflow thread (:class:`SweepTracker`): the sweep's parent run, the runs of
its jobs that do not track themselves (fused members, CPU jobs), and the parent's summary of
the sweep -- its per-configuration statistics (:mod:`analysis.sweep`) as MLflow metrics,
tags, a Markdown description and artifacts.

MLflow metric names (and tag keys) allow letters, digits, ``_ - . / : space``; a
configuration's label (the sweep's point without its seed, ``method=pgt alpha=0.25``) becomes
``method:pgt alpha:0.25``, in ``test_acc.mean/<configuration>`` as in the tag
``verdict/<configuration>``.
"""

from __future__ import annotations

import csv
import io
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from analysis.inference import LEVEL, MAX_SEEDS, UNRESOLVED, Comparison
from analysis.render import fmt_summary
from analysis.sweep import SweepSummary
from sweeper.store import RunRecord, RunStatus, Store
from sweeper.tracking.client import MlflowRun, open_parent
from sweeper.tracking.describe import sweep_tags
from sweeper.tracking.record import Logged, find_mlflow_run, logged_of, run_folder, sync_run
from trainers.registry import first_line


def _first(e: BaseException) -> str:
    return first_line(e)[:300]


def metric_label(label: str) -> str:
    """A configuration's label as MLflow allows it in a metric name."""
    return re.sub(r"[^\w.\- :/]", "_", label.replace("=", ":")).replace("/", "_")[:180]


class SweepTracker:
    """The sweeper's MLflow side: the sweep's parent run, and the runs of its jobs that do not
    track themselves.

    Everything here runs in one thread of the sweeper, which is otherwise idle while its
    jobs train: MLflow's import and its tracking store's set-up overlap the first job's
    start instead of delaying it. A fused job does not talk to MLflow at all (its members
    would pay the import and a run's set-up each, on the job's critical path); this thread
    brings each member's MLflow record up to date from the results store instead
    (:func:`~sweeper.tracking.record.sync_run`, the function every writer uses), every
    ``every`` seconds while it trains and once more when it ends. An unfused job whose MLflow
    system metrics are surely off (on the CPU) is kept the same way; only a job whose metrics
    may be on tracks itself (:class:`~sweeper.tracking.job.JobTracker`; the rule is
    :func:`sweeper.launch.dispatch.tracks_itself`), and such jobs are submitted after
    :meth:`wait_parent`, so that only this thread ever creates the tracking store. The
    parent run shows the sweep's result so far (:mod:`analysis.sweep` computes it; this
    module formats it for MLflow).
    """

    def __init__(
        self,
        store_url: str,
        tracking_uri: str,
        experiment: str,
        results_dir: Path,
        sweep_name: str,
        params: dict[str, object],
        sweep_id: int,
        warn: Callable[[str], None],
        every: float = 5.0,
        objective: tuple[str, str] | None = None,
    ) -> None:
        self.store_url, self.uri, self.experiment = store_url, tracking_uri, experiment
        self.results_dir, self.sweep_name, self.params = results_dir, sweep_name, params
        self.sweep_id, self.warn, self.every = sweep_id, warn, every
        self.parent: Any = None
        self.parent_ready = threading.Event()
        self._lock = threading.Lock()
        self._watch: dict[int, dict[str, str]] = {}  # run id -> its tags
        self._live: dict[int, Any] = {}  # run id -> its MlflowRun while it trains
        self._logged: dict[int, Logged] = {}  # run id -> what its MLflow run holds
        self._ended: set[int] = set()  # runs the sweeper recorded ended for their jobs
        self._owner: dict[int, int] = {}  # run id -> the token of the job it mirrors
        self._reset: set[int] = set()  # watched again: a new job, its record opened afresh
        self.objective = objective  # a search's (metric, direction)
        self._summarized: object = None  # the state the parent's summary was made from
        self.failed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="gradsweep-mlflow", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- the sweeper's side
    def wait_parent(self, timeout_s: float = 300.0) -> str | None:
        """The parent run's id once it is open (None when MLflow cannot be used)."""
        self.parent_ready.wait(timeout_s)
        return self.parent.run_id if self.parent is not None else None

    def watch(self, run_ids: list[int], tags: list[dict[str, str]]) -> None:
        """Mirror these runs (a job's, which does not track them itself) until they end. A run
        watched again (a new job of this sweep trains it) is opened afresh."""
        with self._lock:
            for rid, t in zip(run_ids, tags, strict=True):
                self._watch[rid] = t
                self._reset.add(rid)

    def ended(self, run_ids: list[int]) -> None:
        """The sweeper recorded these runs' outcome for jobs that could not (killed, lost,
        cancelled, or raised before they recorded anything): their MLflow records are
        brought up to date from the store and closed with that outcome -- a run whose job
        never opened its MLflow run gets one, under this sweep's parent."""
        with self._lock:
            self._ended.update(run_ids)

    def close(self, failed: bool) -> None:
        """Mirror what is left, give the parent its last summary, end it, stop the thread."""
        self.failed = failed
        self._stop.set()
        self._thread.join(timeout=600)
        if self.parent is not None:
            self.parent.end("FAILED" if failed else "FINISHED")
            self.parent = None

    # ------------------------------------------------------------------- the thread
    def _work(self) -> None:
        try:
            self.parent = open_parent(self.uri, self.experiment, self.results_dir / "mlartifacts",
                                      self.sweep_name, self.params, self.sweep_id, self.warn)  # fmt: skip
        except Exception as e:  # never let the mirror take the sweep down
            self.warn(f"warning: MLflow parent run not opened: {_first(e)}")
        finally:
            self.parent_ready.set()
        store = Store(self.store_url, create=False)
        try:
            if self.parent is not None and self.parent.run_id:
                store.set_sweep_fields(self.sweep_id, mlflow_parent_run_id=self.parent.run_id)
            while True:
                stopping = self._stop.wait(self.every)
                self._sync(store)
                self._close_ended(store)
                self._summarize(store, final=stopping)
                if stopping:
                    return
        except Exception as e:
            self.warn(f"warning: MLflow mirroring of the sweep stopped: {_first(e)}")
        finally:
            store.dispose()

    def _sync(self, store: Store) -> None:
        with self._lock:
            todo = dict(self._watch)
            reset, self._reset = self._reset, set()
        for rid in reset:
            self._forget(rid)
        for rid, tags in todo.items():
            run = store.get_run_by_id(rid)
            if run is None or run.status == RunStatus.queued:
                continue  # its job has not started it yet
            if self.parent is None:  # MLflow unusable: `python -m sweeper mirror` later
                with self._lock:
                    self._watch.pop(rid, None)
                continue
            if rid not in self._owner:
                if run.claimed_by != self.sweep_id:  # another sweep's (or a single run's)
                    with self._lock:  # claim since: that one keeps the record
                        self._watch.pop(rid, None)
                    continue
                self._owner[rid] = run.owner  # the token of the job this sweep started
            if run.owner != self._owner[rid]:
                # another token: its job was declared dead. Running (or claimed) again: the
                # new job keeps the record. Ended (the sweeper recorded the kill): closed
                # here, from what MLflow holds now (read again, not remembered)
                self._forget(rid)
                if run.status in (RunStatus.running, RunStatus.queued):
                    with self._lock:
                        self._watch.pop(rid, None)
                    continue
            try:
                if self._sync_run(store, run, tags):
                    with self._lock:  # closed here: nothing left for _close_ended
                        self._watch.pop(rid, None)
                        self._ended.discard(rid)
            except Exception as e:  # one run's trouble: say so; `mirror` completes it later
                self.warn(f"warning: run {rid} not mirrored to MLflow: {_first(e)}")
                with self._lock:
                    self._watch.pop(rid, None)

    def _forget(self, rid: int) -> None:
        self._live.pop(rid, None)
        self._logged.pop(rid, None)
        self._owner.pop(rid, None)

    def _close_ended(self, store: Store) -> None:
        with self._lock:
            todo = {rid for rid in self._ended if rid not in self._watch}
            self._ended -= todo
        if self.parent is None or self.parent.client is None or not todo:
            return
        links = {link.run_id: link for link, _ in store.sweep_runs(self.sweep_id)}
        for rid in sorted(todo):
            run = store.get_run_by_id(rid)
            if run is None or run.status in (RunStatus.queued, RunStatus.running):
                continue  # trained again meanwhile: its new job keeps the record
            link = links.get(rid)
            ident = (run.config or {}).get("identity", {})
            tags = sweep_tags(self.sweep_id, self.sweep_name, self.parent.run_id,
                              link.point if link else "", ident,
                              link.trial if link else None)  # fmt: skip
            try:
                existing = find_mlflow_run(self.parent.client, self.experiment, run)
                m = MlflowRun(self.uri, self.experiment, self.results_dir / "mlartifacts",
                              warn=self.warn)  # fmt: skip
                if m.open_run(run, run_folder(run), tags, existing, after_the_fact=True):
                    sync_run(store, run, m, logged_of(m))
            except Exception as e:  # that run only; the sweep goes on
                self.warn(f"warning: MLflow run of run {rid} not closed: {_first(e)}")

    def _summarize(self, store: Store, final: bool) -> None:
        """The parent run tells the sweep's result so far (:func:`write_summary`), again
        whenever a run's status changes."""
        if self.parent is None or not self.parent.ok:
            return
        state = store.sweep_run_states(self.sweep_id)  # cheap: no config decoded
        if state == self._summarized and not final:
            return
        write_summary(self.parent, store, self.sweep_id, self.results_dir, self.objective)
        self._summarized = state

    def _sync_run(self, store: Store, run: RunRecord, tags: dict[str, str]) -> bool:
        """Bring ``run``'s MLflow record up to date; True once it ended and is complete."""
        m = self._live.get(run.id)
        if m is None:
            m = MlflowRun(self.uri, self.experiment, self.results_dir / "mlartifacts",
                          warn=self.warn)  # fmt: skip
            all_tags = dict(tags)
            if self.parent is not None and self.parent.run_id:
                all_tags["mlflow.parentRunId"] = self.parent.run_id
            # an MLflow run of an earlier attempt is re-opened (moved under this sweep's
            # parent) and completed with only what it lacks
            rid = m.open_run(run, run_folder(run), all_tags, run.mlflow_run_id)
            if rid is None:
                return True  # MLflow refused: left for `python -m sweeper mirror`
            if rid != run.mlflow_run_id:
                store.set_fields(run.id, mlflow_run_id=rid)
            self._live[run.id] = m
            self._logged[run.id] = logged_of(m)
        if not sync_run(store, run, m, self._logged[run.id]):
            return False
        self._forget(run.id)
        return True


def write_summary(parent: MlflowRun, store: Store, sweep_id: int, results_dir: Path,
                  objective: tuple[str, str] | None = None) -> None:  # fmt: skip
    """The sweep's result so far on its parent run (:mod:`analysis.sweep`): metrics logged
    with step = the number of ended runs, so their history is the sweep's progress; the
    tags naming the best configuration; each configuration's verdict as the tag
    ``verdict/<configuration>`` (:func:`verdict_tags`; those of configurations without a
    verdict now are deleted: judged no longer, or renamed); the description, which opens
    with the verdicts; ``sweep_summary.csv``, ``verdicts.md`` and ``report.md``."""
    from analysis.sweep import Objective, summarize_sweep

    obj = Objective(*objective) if objective else None
    s = summarize_sweep(store, sweep_id, obj)
    parent.log_metrics(summary_metrics(s), step=s.ended)
    folder = results_dir / "logs" / "jobs" / f"sweep{sweep_id}" / "summary"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("sweep_summary.csv", summary_csv(s)), ("verdicts.md",
                       verdicts_markdown(s)), ("report.md", s.report)):  # fmt: skip
        (folder / name).write_text(text)
        parent.log_artifact(folder / name)
    verdicts = verdict_tags(s)
    parent.set_tags({**summary_tags(s), **verdicts, "mlflow.note.content": summary_markdown(s),
                     "runs_ended": f"{s.ended}/{len(s.runs)}"})  # fmt: skip
    # set first, then the stale ones go: a reader never sees the verdicts vanish
    parent.drop_tags(VERDICT, keep=verdicts)


# ------------------------------------------------------------ the parent's summary
def summary_metrics(s: SweepSummary) -> dict[str, float]:
    """The parent run's metrics: ``test_acc.mean/<configuration>`` (and ``.std``, ``.n``,
    the same for ``train_acc``), ``best/test_acc.mean``, ``runs/<status>``, and for a
    search ``best/<metric>`` and ``best/trial``."""
    out: dict[str, float] = {}
    for row in s.rows:
        for name, summ in (("test_acc", row.test), ("train_acc", row.train)):
            out[f"{name}.n/{metric_label(row.label)}"] = float(summ.n)
            if summ.mean is not None:
                out[f"{name}.mean/{metric_label(row.label)}"] = summ.mean
            if summ.std is not None:
                out[f"{name}.std/{metric_label(row.label)}"] = summ.std
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


VERDICT = "verdict/"  # the prefix of the parent's verdict tags
NO_VERDICTS = ("No comparison yet: no setting of this sweep holds `done` runs of both a "
               "baseline and another method.")  # fmt: skip


def verdict_value(c: Comparison) -> str:
    """A verdict as its tag says it: the word (better, worse, equivalent, too few seeds);
    unresolved with the seeds per side that would resolve it with 80 % power
    (``unresolved (needs 7 seeds per side)``), as the verdict's line estimates them."""
    if c.verdict != UNRESOLVED:
        return c.verdict
    if c.seeds_needed is None:
        return f"unresolved (needs over {MAX_SEEDS:,} seeds per side)"
    return f"unresolved (needs {c.seeds_needed} seeds per side)"


def verdict_tags(s: SweepSummary) -> dict[str, str]:
    """``verdict/<configuration>`` -> :func:`verdict_value`, for each configuration judged
    against its setting's baseline (a baseline itself, a setting without one, or a
    configuration without a ``done`` seed has none). ``<configuration>`` is named as in the
    metrics (:func:`metric_label`: at most 188 characters with the prefix, under MLflow's
    250); where two would share a name, the second gets its config key."""
    out: dict[str, str] = {}
    for row in s.rows:
        j = s.verdicts.by_config.get(row.key)
        if j is None:
            continue
        name = VERDICT + metric_label(row.label)
        if name in out:
            name = VERDICT + metric_label(f"{row.label[:150]} [{row.key}]")
        out[name] = verdict_value(j.result)
    return out


def verdicts_markdown(s: SweepSummary, limit: int | None = None) -> str:
    """The description's opening: ``## Verdicts``, then one line per comparison as the
    report's Verdicts section writes it (:func:`analysis.render.verdict_line`), or one line
    saying there is none. Past ``limit`` characters the remaining lines are counted, not
    shown (the artifact ``verdicts.md`` has them all)."""
    head = ["## Verdicts", ""]
    if not s.verdicts.lines:
        return "\n".join([*head, NO_VERDICTS]) + "\n"
    foot = ["", f"_Final test top-1, treatment − baseline of the same setting; a setting's "
            f"configurations are one family, their intervals simultaneous at {LEVEL:.0%} (the "
            f"rules: `report.md`). Each verdict is also the tag `{VERDICT}<configuration>`._"]  # fmt: skip
    body = [f"- {line}" for line in s.verdicts.lines]
    if limit is not None:
        room = limit - sum(len(x) + 1 for x in [*head, *foot]) - 80  # the "more" line
        shown = 0
        while shown < len(body) and len(body[shown]) + 1 <= room:
            room -= len(body[shown]) + 1
            shown += 1
        if shown < len(body):
            body = [*body[:shown], f"- … and {len(body) - shown} more comparison(s): the "
                    "artifact `verdicts.md`."]  # fmt: skip
    return "\n".join([*head, *body, *foot]) + "\n"


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
    """The parent run's description (MLflow renders it as Markdown on the run page): the
    verdicts (:func:`verdicts_markdown`, in at most half of ``limit``), progress, the best
    configuration, the per-configuration table, then the report's tables while they fit in
    ``limit`` characters (MLflow's tag limit is 8,000)."""
    c = s.counts
    lines = [verdicts_markdown(s, limit // 2), f"## Sweep {s.sweep_id}: {s.name}", ""]
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
