"""A run's MLflow record, brought up to date from the results store: the one function every
writer uses (:func:`sync_run`) -- a job for its own run, the sweeper's thread for the members
of fused jobs and for runs whose job could not, and ``python -m sweeper mirror`` for runs
that missed MLflow.

The store is the source of truth, so the MLflow record is a function of the run's rows: every
epoch's metrics (``epoch_metrics``), the filter-norm files and ``feature_norms.json`` in its
run folder, and once it has ended its cost, its outcome tags and its MLflow status. What is
logged is only what the MLflow run lacks, per metric key and step (:class:`Logged`): read
from MLflow's own history whenever an existing MLflow run is (re-)opened -- a resumed run, a
retried one, one taken over by another job, one completed later -- so no step of a metric is
ever logged twice. One writer at a time: a job's writes hold its token (a job that lost its
run stops writing), the sweeper's stop when another job takes the run over.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper.store import RunRecord, RunStatus, Store
from sweeper.tracking.client import epoch_ms
from sweeper.tracking.describe import STATUS_FOR_MLFLOW, outcome_tags
from trainers.records import EpochMetrics

if TYPE_CHECKING:
    from sweeper.tracking.client import MlflowRun

# outcomes: the run will not train again unless asked (a pruned run resumes when a grid asks)
FINISHED = (RunStatus.done, RunStatus.failed, RunStatus.diverged, RunStatus.pruned)
# the per-epoch metrics of a run (EpochMetrics without its step keys)
METRICS = [f.name for f in dc_fields(EpochMetrics) if f.name not in ("epoch", "step")]
COSTS = ("train_seconds", "gpu_hours")  # the cost metrics, logged at step 0 once it has ended


def ended_tags(run: RunRecord) -> dict[str, str]:
    """The ``status`` and ``reason`` tags of an ended run, from its row."""
    return outcome_tags(run.status.value, error=run.error, diverged_step=run.diverged_step,
                        epoch=run.epoch, epochs=run.epochs)  # fmt: skip


@dataclass
class Logged:
    """What an MLflow run already holds of its store run: the steps of each of its metrics
    (an epoch's metrics at step = epoch, the cost at step 0) and its artifact files
    (``filter_norms/epoch_0001.npz``, ``feature_norms.json``). ``twice``: the metric keys
    with a step logged more than once (by a version before this rule)."""

    steps: dict[str, set[int]] = field(default_factory=dict)
    files: set[str] = field(default_factory=set)
    twice: set[str] = field(default_factory=set)

    def missing(self, values: dict[str, float], step: int) -> dict[str, float]:
        """The ``values`` MLflow does not hold at ``step`` yet."""
        return {k: v for k, v in values.items() if step not in self.steps.get(k, ())}

    def add(self, keys: Iterable[str], step: int) -> None:
        for k in keys:
            self.steps.setdefault(k, set()).add(step)

    @classmethod
    def of(cls, client: Any, mlflow_run_id: str) -> Logged:
        """Read from MLflow's own history: every metric of ours the run holds, each key's
        steps (one history read per key), and its artifacts."""
        out = cls()
        ours = set(METRICS) | set(COSTS)
        for key in client.get_run(mlflow_run_id).data.metrics:
            if key in ours:
                steps = [m.step for m in client.get_metric_history(mlflow_run_id, key)]
                out.steps[key] = set(steps)
                if len(steps) != len(out.steps[key]):
                    out.twice.add(key)
        out.files = {a.path for a in client.list_artifacts(mlflow_run_id)}
        out.files |= {a.path for a in client.list_artifacts(mlflow_run_id, "filter_norms")}
        return out


def logged_of(mlrun: MlflowRun) -> Logged:
    """What ``mlrun`` holds already: read from MLflow when it re-opened an existing run,
    nothing for a new one (an unreadable history: warned, and treated as empty)."""
    if not mlrun.resumed or mlrun.client is None or mlrun.run_id is None:
        return Logged()
    try:
        return Logged.of(mlrun.client, mlrun.run_id)
    except Exception as e:  # MLflow unreachable: its guard switches the run off next call
        mlrun.warn(f"warning: MLflow history of run {mlrun.run_id} not read: {e}")
        return Logged()


def find_mlflow_run(client: Any, experiment: str, run: RunRecord) -> str | None:
    """The MLflow run already holding ``run`` in this tracking store: its ``mlflow_run_id``
    when MLflow still has it (not deleted), else an active run tagged with its config hash
    (e.g. opened by a job that died before it could record the id)."""
    if run.mlflow_run_id:
        try:
            if client.get_run(run.mlflow_run_id).info.lifecycle_stage == "active":
                return run.mlflow_run_id
        except Exception:  # deleted for good, or from another tracking store
            pass
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs(
        [exp.experiment_id], f"tags.config_hash = '{run.config_hash}'", max_results=1
    )  # the hash is 64 hex digits from our own store, never user text
    return found[0].info.run_id if found else None


def run_folder(run: RunRecord) -> Path | None:
    return Path(run.run_dir) if run.run_dir else None


def sync_run(store: Store, run: RunRecord, mlrun: MlflowRun, logged: Logged,
             owner: int | None = None) -> bool:  # fmt: skip
    """Bring ``mlrun`` up to date with ``run`` (read fresh from ``store`` by the caller):
    log what ``logged`` does not hold yet; once the run has ended, its cost, feature norms
    and outcome tags, and close the MLflow run with its status (the store then records
    ``mlflow_mirrored`` for a finished run). With ``owner``, a job's token: nothing is
    written once the run holds another (the job lost it; its new job keeps the record).
    Returns True when this writer is done: the run has ended and its record is complete, or
    the run is no longer ``owner``'s."""
    if owner is not None and (run.owner or 0) != owner:
        return True
    for em in store.epoch_metrics(run.id):
        vals = {k: v for k in METRICS if (v := getattr(em, k, None)) is not None}
        if todo := logged.missing(vals, em.epoch):
            mlrun.log_metrics(todo, step=em.epoch)
            logged.add(todo, em.epoch)
    folder = run_folder(run)
    if folder is not None:
        for f in sorted((folder / "filter_norms").glob("epoch_*.npz")):
            if f"filter_norms/{f.name}" not in logged.files:
                mlrun.log_artifact(f, "filter_norms")
                logged.files.add(f"filter_norms/{f.name}")
    if run.status not in FINISHED and run.status != RunStatus.interrupted:
        return False
    if run.status in FINISHED:
        if run.train_seconds is not None:
            cost = {"train_seconds": run.train_seconds, "gpu_hours": run.gpu_hours or 0.0}
            if todo := logged.missing(cost, 0):
                mlrun.log_metrics(todo, 0)
                logged.add(todo, 0)
        feats = folder / "feature_norms.json" if folder is not None else None
        if feats is not None and feats.exists() and "feature_norms.json" not in logged.files:
            mlrun.log_artifact(feats)
            logged.files.add("feature_norms.json")
    mlrun.set_tags(ended_tags(run))
    # it ended when the store says (a record completed later must not end now)
    ok = mlrun.end(STATUS_FOR_MLFLOW[run.status.value], epoch_ms(run.ended_at))
    fields: dict[str, Any] = {}
    if mlrun.run_id is not None and mlrun.run_id != run.mlflow_run_id:
        fields["mlflow_run_id"] = mlrun.run_id
    if run.status in FINISHED:
        fields["mlflow_mirrored"] = ok
    if fields:
        store.set_fields(run.id, owner=owner, **fields)
    return True
