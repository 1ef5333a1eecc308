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
from dataclasses import fields as dc_fields
from pathlib import Path

from sweeper.store import (
    RunRecord,
    RunStatus,
    Store,
    default_tracking_uri,
    default_url,
    engine_url,
)
from sweeper.tracking import MlflowMirror, init_tracking_store, run_name
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

    from sweeper.job import STATUS_FOR_MLFLOW

    errors: list[str] = []
    m = MlflowMirror(uri, experiment, results_dir / "mlartifacts", warn=errors.append)
    client = MlflowClient(tracking_uri=engine_url(uri))
    existing = _existing(client, experiment, run)
    params = {**(run.config or {}).get("identity", {}), "results_run_id": run.id}
    tags = {"config_hash": run.config_hash, "method": run.method, "model": run.model}
    rid = m.start(existing, run_name(run.model, run.method, run.alpha, run.seed), params, tags)
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
    run_dir = Path(run.run_dir) if run.run_dir else results_dir / "runs" / run.config_hash[:16]
    for f in sorted((run_dir / "filter_norms").glob("epoch_*.npz")):
        if f"filter_norms/{f.name}" not in have:
            m.log_artifact(f, "filter_norms")
    feats = run_dir / "feature_norms.json"
    if feats.exists() and "feature_norms.json" not in have:
        m.log_artifact(feats)
    m.set_tags({"status": run.status.value, "mirrored_later": "true"})
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
