"""A run's MLflow record, brought up to date from the results store: the one function every
writer uses (:func:`sync_run`) -- a job for its own run, the sweeper's thread for the members
of fused jobs, and ``python -m sweeper mirror`` for runs that missed MLflow.

The store is the source of truth, so the MLflow record is a function of the run's rows: every
epoch's metrics (``epoch_metrics``), the filter-norm files and ``feature_norms.json`` in its
run folder, and once it has ended its cost, its outcome tags and its MLflow status. What the
MLflow run already holds (:class:`Logged`) is read from MLflow's own history when an
existing MLflow run is re-opened (a resumed run, or one completed later), so nothing is
logged twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper.store import RunRecord, RunStatus, Store
from sweeper.tracking.describe import STATUS_FOR_MLFLOW, outcome_tags
from trainers.records import EpochMetrics

if TYPE_CHECKING:
    from sweeper.tracking.client import MlflowRun

# outcomes: the run will not train again unless asked (a pruned run resumes when a grid asks)
FINISHED = (RunStatus.done, RunStatus.failed, RunStatus.diverged, RunStatus.pruned)
# the per-epoch metrics of a run (EpochMetrics without its step keys)
METRICS = [f.name for f in dc_fields(EpochMetrics) if f.name not in ("epoch", "step")]
COST = "train_seconds"  # the cost metrics, logged at step 0 once the run has ended


def ended_tags(run: RunRecord) -> dict[str, str]:
    """The ``status`` and ``reason`` tags of an ended run, from its row."""
    return outcome_tags(run.status.value, error=run.error, diverged_step=run.diverged_step,
                        epoch=run.epoch, epochs=run.epochs)  # fmt: skip


@dataclass
class Logged:
    """What an MLflow run already holds of its store run: the epochs (steps) of its metrics
    and its artifact files (``filter_norms/epoch_0001.npz``, ``feature_norms.json``)."""

    epochs: set[int] = field(default_factory=set)
    files: set[str] = field(default_factory=set)
    cost: bool = False

    @classmethod
    def of(cls, client: Any, mlflow_run_id: str) -> Logged:
        """Read from MLflow's own history (a re-opened run)."""
        epochs = {m.step for m in client.get_metric_history(mlflow_run_id, "test_acc")}
        files = {a.path for a in client.list_artifacts(mlflow_run_id)}
        files |= {a.path for a in client.list_artifacts(mlflow_run_id, "filter_norms")}
        cost = bool(client.get_metric_history(mlflow_run_id, COST))
        return cls(epochs, files, cost)


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


def run_folder(run: RunRecord) -> Path | None:
    return Path(run.run_dir) if run.run_dir else None


def sync_run(store: Store, run: RunRecord, mlrun: MlflowRun, logged: Logged,
             owner: int | None = None) -> bool:  # fmt: skip
    """Bring ``mlrun`` up to date with ``run`` (read fresh from ``store`` by the caller):
    log what ``logged`` does not hold yet; once the run has ended, its cost, feature norms
    and outcome tags, and close the MLflow run with its status (the store then records
    ``mlflow_mirrored`` for a finished run; with ``owner``, a job's token: only while the
    run holds it). Returns True once the run has ended and its record is complete."""
    for em in store.epoch_metrics(run.id):
        if em.epoch not in logged.epochs:
            vals = {k: getattr(em, k) for k in METRICS if getattr(em, k, None) is not None}
            mlrun.log_metrics(vals, step=em.epoch)
            logged.epochs.add(em.epoch)
    folder = run_folder(run)
    if folder is not None:
        for f in sorted((folder / "filter_norms").glob("epoch_*.npz")):
            if f"filter_norms/{f.name}" not in logged.files:
                mlrun.log_artifact(f, "filter_norms")
                logged.files.add(f"filter_norms/{f.name}")
    if run.status not in FINISHED and run.status != RunStatus.interrupted:
        return False
    if run.status in FINISHED:
        if run.train_seconds is not None and not logged.cost:
            mlrun.log_metrics({COST: run.train_seconds, "gpu_hours": run.gpu_hours or 0.0}, 0)
            logged.cost = True
        feats = folder / "feature_norms.json" if folder is not None else None
        if feats is not None and feats.exists() and "feature_norms.json" not in logged.files:
            mlrun.log_artifact(feats)
            logged.files.add("feature_norms.json")
    mlrun.set_tags(ended_tags(run))
    ok = mlrun.end(STATUS_FOR_MLFLOW[run.status.value])
    fields: dict[str, Any] = {}
    if mlrun.run_id is not None and mlrun.run_id != run.mlflow_run_id:
        fields["mlflow_run_id"] = mlrun.run_id
    if run.status in FINISHED:
        fields["mlflow_mirrored"] = ok
    if fields:
        store.set_fields(run.id, owner=owner, **fields)
    return True
