"""``python -m sweeper mirror``: copy runs that missed MLflow into it, once.

A run whose MLflow store was down, read-only or unreachable still completes and lands in
the results store with ``mlflow_mirrored = false`` (the store is the source of truth).
Once MLflow is back, this command mirrors every such finished run: its parameters, tags,
every epoch's metrics (from ``epoch_metrics``), its cost, and its artifacts (the
``filter_norms/*.npz`` and ``feature_norms.json`` in its run folder), then sets
``mlflow_mirrored = true``. No duplicates: a run already known to MLflow (its
``mlflow_run_id``, or a run tagged with its ``config_hash``) is completed in place, with
only the epochs it lacks; a second call finds nothing to do.

    python -m sweeper mirror                                   # ./results
    python -m sweeper mirror results_dir=/scratch/results mlflow.tracking_uri=postgresql://...
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any

from sweeper.describe import STATUS_FOR_MLFLOW, outcome_tags
from sweeper.store import (
    RunRecord,
    RunStatus,
    Store,
    default_tracking_uri,
    default_url,
    engine_url,
)
from sweeper.tracking import MlflowMirror, init_tracking_store
from trainers.records import EpochMetrics
from trainers.registry import ConfigError, first_line

KEYS = ("results_dir", "store.url", "mlflow.tracking_uri", "mlflow.experiment")
USAGE = "usage: python -m sweeper mirror [results_dir=DIR] [store.url=URL] " + (
    "[mlflow.tracking_uri=URI] [mlflow.experiment=NAME]"
)
FINISHED = (RunStatus.done, RunStatus.failed, RunStatus.diverged, RunStatus.pruned)


def _wanted(run: RunRecord) -> bool:
    """Finished, not mirrored, and its sweep wanted MLflow (``mlflow.enabled``)."""
    enabled = ((run.config or {}).get("mlflow") or {}).get("enabled", True)
    return not run.mlflow_mirrored and run.status in FINISHED and bool(enabled)


# the per-epoch metrics a job logs (EpochMetrics without its step keys)
METRICS = [f.name for f in dc_fields(EpochMetrics) if f.name not in ("epoch", "step")]


def ended_tags(run: RunRecord) -> dict[str, str]:
    """The ``status`` and ``reason`` tags of an ended run, from its row."""
    return outcome_tags(run.status.value, error=run.error, diverged_step=run.diverged_step,
                        epoch=run.epoch, epochs=run.epochs)  # fmt: skip


def _first(e: BaseException) -> str:
    return first_line(e)[:300]


def parse_args(argv: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in KEYS:
            raise ConfigError(f"mirror does not take {a!r}; {USAGE}")
        out[key] = value
    return out


def _existing(client: object, experiment: str, run: RunRecord) -> str | None:
    """The MLflow run already holding this run (id from the store, else by config hash)."""
    if run.mlflow_run_id:
        try:
            client.get_run(run.mlflow_run_id)  # type: ignore[attr-defined]
            return run.mlflow_run_id
        except Exception:  # deleted, or from another tracking store
            pass
    exp = client.get_experiment_by_name(experiment)  # type: ignore[attr-defined]
    if exp is None:
        return None
    found = client.search_runs(  # type: ignore[attr-defined]
        [exp.experiment_id], f"tags.config_hash = '{run.config_hash}'", max_results=1
    )  # the hash is 64 hex digits from our own store, never user text
    return found[0].info.run_id if found else None


def mirror_run(store: Store, run: RunRecord, uri: str, experiment: str, results_dir: Path) -> bool:
    """Mirror one run; True when MLflow took everything (then the store says so)."""
    from mlflow import MlflowClient

    errors: list[str] = []
    m = MlflowMirror(uri, experiment, results_dir / "mlartifacts", warn=errors.append)
    client = MlflowClient(tracking_uri=engine_url(uri))
    existing = _existing(client, experiment, run)
    run_dir = Path(run.run_dir) if run.run_dir else results_dir / "runs" / run.config_hash[:16]
    rid = m.open_run(run, run_dir, {}, existing)
    if rid is None:
        raise ConfigError(f"MLflow store {uri} is not reachable: {errors[0] if errors else '?'}")
    logged = {x.step for x in client.get_metric_history(rid, "test_acc")} if existing else set()
    for em in store.epoch_metrics(run.id):
        if em.epoch in logged:
            continue  # that epoch reached MLflow before the outage
        vals = {k: getattr(em, k) for k in METRICS if getattr(em, k, None) is not None}
        m.log_metrics(vals, step=em.epoch)
    if run.train_seconds is not None:
        m.log_metrics({"train_seconds": run.train_seconds, "gpu_hours": run.gpu_hours or 0.0}, 0)
    have = set()
    if existing:
        have = {a.path for a in client.list_artifacts(rid)}
        have |= {a.path for a in client.list_artifacts(rid, "filter_norms")}
    for f in sorted((run_dir / "filter_norms").glob("epoch_*.npz")):
        if f"filter_norms/{f.name}" not in have:
            m.log_artifact(f, "filter_norms")
    feats = run_dir / "feature_norms.json"
    if feats.exists() and "feature_norms.json" not in have:
        m.log_artifact(feats)
    m.set_tags({**ended_tags(run), "mirrored_later": "true"})
    ok = m.end(STATUS_FOR_MLFLOW[run.status.value])
    if ok:
        store.set_fields(run.id, mlflow_run_id=rid, mlflow_mirrored=True)
    else:
        store.set_fields(run.id, mlflow_run_id=rid)  # the next call completes this one
    return ok


def mirror(argv: list[str]) -> int:
    args = parse_args(argv)
    results_dir = Path(args.get("results_dir", "./results")).resolve()
    url = args.get("store.url") or default_url(results_dir)
    uri = args.get("mlflow.tracking_uri") or default_tracking_uri(results_dir)
    experiment = args.get("mlflow.experiment", "gradsweep")
    store = Store(url, create=False, missing_hint=USAGE)
    try:
        todo = [r for r in store.runs() if _wanted(r)]
        if not todo:
            print("nothing to mirror: every finished run is in MLflow already")
            return 0
        try:
            init_tracking_store(uri)
        except Exception as e:
            raise ConfigError(f"MLflow store {uri} cannot be opened: {_first(e)}") from None
        done = 0
        for r in todo:
            try:
                done += mirror_run(store, r, uri, experiment, results_dir)
            except ConfigError:
                raise
            except Exception as e:  # one run's trouble: say so, go on; a rerun retries it
                print(f"warning: run {r.id} not mirrored: {_first(e)}", file=sys.stderr)
    finally:
        store.dispose()
    print(f"mirrored {done} of {len(todo)} run(s) into {uri}")
    return 0 if done == len(todo) else 1


# ------------------------------------------------------------------ the sweeper's own mirror
class SweepMirror:
    """The sweeper's MLflow side: the sweep's parent run, and the runs of its fused jobs.

    Everything here runs in one thread of the sweeper, which is otherwise idle while its
    jobs train: MLflow's import and its tracking store's set-up (seconds) overlap the first
    job's start instead of delaying it. A fused job does not talk to MLflow at all (its
    members would pay the import and a run's set-up each, on the job's critical path);
    this thread mirrors each member from the results store instead, every ``every``
    seconds while it trains (new epochs, filter-norm files) and completely once it ends
    (cost, features, status), exactly as ``python -m sweeper mirror`` completes a run later
    -- the same code, so a member whose sweeper died is completed by that command. Jobs that
    are not fused mirror themselves as before (:class:`~sweeper.tracking.BackgroundMirror`);
    they are submitted after :meth:`wait_parent`, so that only this thread ever creates
    the tracking store.
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
        import threading

        self.store_url, self.uri, self.experiment = store_url, tracking_uri, experiment
        self.results_dir, self.sweep_name, self.params = results_dir, sweep_name, params
        self.sweep_id, self.warn, self.every = sweep_id, warn, every
        self.parent: Any = None
        self.parent_ready = threading.Event()
        self._lock = threading.Lock()
        self._watch: dict[int, dict[str, str]] = {}  # run id -> its tags
        self._live: dict[int, Any] = {}  # run id -> its MlflowMirror while it trains
        self._logged: dict[int, set[int]] = {}  # run id -> epochs logged
        self._files: dict[int, set[str]] = {}  # run id -> artifacts logged
        self._ended: set[int] = set()  # runs the sweeper recorded ended for their jobs
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
        """Mirror these runs (the members of a fused job) until they end."""
        with self._lock:
            for rid, t in zip(run_ids, tags, strict=True):
                self._watch[rid] = t

    def ended(self, run_ids: list[int]) -> None:
        """The sweeper recorded these runs' outcome for jobs that could not (killed, lost,
        cancelled): their MLflow runs, left RUNNING by the dead job, are closed with that
        outcome."""
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
        from sweeper.tracking import open_parent

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
        for rid, tags in todo.items():
            run = store.get_run_by_id(rid)
            if run is None or run.status == RunStatus.queued:
                continue  # its job has not started it yet
            if self.parent is None:  # MLflow unusable: `python -m sweeper mirror` later
                with self._lock:
                    self._watch.pop(rid, None)
                continue
            try:
                if self._sync_run(store, run, tags):
                    with self._lock:
                        self._watch.pop(rid, None)
            except Exception as e:  # one run's trouble: say so; `mirror` completes it later
                self.warn(f"warning: run {rid} not mirrored to MLflow: {_first(e)}")
                with self._lock:
                    self._watch.pop(rid, None)

    def _close_ended(self, store: Store) -> None:
        with self._lock:
            todo, self._ended = self._ended, set()
        if self.parent is None or self.parent.client is None:
            return
        client = self.parent.client
        for rid in sorted(todo):
            run = store.get_run_by_id(rid)
            if run is None or not run.mlflow_run_id or rid in self._live:
                continue  # no MLflow run, or one this thread mirrors (it closes it itself)
            if run.status in (RunStatus.queued, RunStatus.running):
                continue
            try:
                if client.get_run(run.mlflow_run_id).info.status != "RUNNING":
                    continue  # its job closed it before it went
                for k, v in ended_tags(run).items():
                    client.set_tag(run.mlflow_run_id, k, v)
                client.set_terminated(run.mlflow_run_id, status=STATUS_FOR_MLFLOW[run.status.value])
            except Exception as e:  # that run only; the sweep goes on
                self.warn(f"warning: MLflow run of run {rid} not closed: {_first(e)}")

    def _summarize(self, store: Store, final: bool) -> None:
        """The parent run tells the sweep's result so far (:mod:`analysis.sweep`): logged
        again whenever a run's status changes, with step = the number of ended runs, so
        its metric history is the sweep's progress."""
        if self.parent is None or not self.parent.ok:
            return
        state = tuple((link.run_id, run.status.value) for link, run in
                      store.sweep_runs(self.sweep_id))  # fmt: skip
        if state == self._summarized and not final:
            return
        from analysis.sweep import (
            Objective,
            summarize_sweep,
            summary_csv,
            summary_markdown,
            summary_metrics,
            summary_tags,
        )

        obj = Objective(*self.objective) if self.objective else None
        s = summarize_sweep(store, self.sweep_id, obj)
        self.parent.log_metrics(summary_metrics(s), step=s.ended)
        folder = self.results_dir / "logs" / "jobs" / f"sweep{self.sweep_id}" / "summary"
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in (("sweep_summary.csv", summary_csv(s)), ("report.md", s.report)):
            (folder / name).write_text(text)
            self.parent.log_artifact(folder / name)
        self.parent.set_tags({**summary_tags(s), "mlflow.note.content": summary_markdown(s),
                              "runs_ended": f"{s.ended}/{len(s.runs)}"})  # fmt: skip
        self._summarized = state

    def _sync_run(self, store: Store, run: RunRecord, tags: dict[str, str]) -> bool:
        """Mirror what is new of ``run``; True once it ended and is mirrored completely."""
        over = run.status in FINISHED or run.status == RunStatus.interrupted
        m = self._live.get(run.id)
        if m is None:
            m = MlflowMirror(self.uri, self.experiment, self.results_dir / "mlartifacts",
                             warn=self.warn)  # fmt: skip
            all_tags = dict(tags)
            if self.parent is not None and self.parent.run_id:
                all_tags["mlflow.parentRunId"] = self.parent.run_id
            run_dir = Path(run.run_dir) if run.run_dir else None
            rid = m.open_run(run, run_dir, all_tags, run.mlflow_run_id)
            if rid is None:
                return True  # MLflow refused: left unmirrored for `python -m sweeper mirror`
            if rid != run.mlflow_run_id:
                store.set_fields(run.id, mlflow_run_id=rid)
            self._live[run.id] = m
            self._logged[run.id] = set()
            self._files[run.id] = set()
        logged, files = self._logged[run.id], self._files[run.id]
        for em in store.epoch_metrics(run.id):
            if em.epoch not in logged:
                vals = {k: getattr(em, k) for k in METRICS if getattr(em, k, None) is not None}
                m.log_metrics(vals, step=em.epoch)
                logged.add(em.epoch)
        run_dir = Path(run.run_dir) if run.run_dir else None
        if run_dir is not None:
            for f in sorted((run_dir / "filter_norms").glob("epoch_*.npz")):
                if f.name not in files:
                    m.log_artifact(f, "filter_norms")
                    files.add(f.name)
        if not over:
            return False
        if run.status in FINISHED:
            secs = run.train_seconds or 0.0
            m.log_metrics({"train_seconds": secs, "gpu_hours": run.gpu_hours or 0.0}, step=0)
            feats = run_dir / "feature_norms.json" if run_dir is not None else None
            if feats is not None and feats.exists():
                m.log_artifact(feats)
        m.set_tags(ended_tags(run))
        ok = m.end(STATUS_FOR_MLFLOW[run.status.value])
        if run.status in FINISHED:
            store.set_fields(run.id, mlflow_mirrored=ok)
        self._live.pop(run.id, None)
        return True
