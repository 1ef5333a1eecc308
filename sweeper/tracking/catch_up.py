"""``python -m sweeper mirror``: bring every finished run that missed MLflow into it, once.

A run whose MLflow store was down, read-only or unreachable still completes and lands in
the results store with ``mlflow_mirrored = false`` (the store is the source of truth).
Once MLflow is back, this command brings each such run's MLflow record up to date with
:func:`sweeper.tracking.record.sync_run` -- its parameters, tags, every epoch's metrics, its
cost, its artifacts -- then sets ``mlflow_mirrored = true``. No duplicates: a run already
known to MLflow (its ``mlflow_run_id``, or a run tagged with its ``config_hash``) is
completed in place with only what it lacks (read from MLflow's own history); a second call
finds nothing to do. Runs of sweeps run with ``mlflow.enabled=false`` are not wanted there.

    python -m sweeper mirror                                   # ./results
    python -m sweeper mirror results_dir=/scratch/results mlflow.tracking_uri=postgresql://...
"""

from __future__ import annotations

import sys
from pathlib import Path

from sweeper.store import RunRecord, Store, default_tracking_uri, default_url, engine_url
from sweeper.tracking.client import MlflowRun, init_tracking_store
from sweeper.tracking.record import FINISHED, logged_of, sync_run
from trainers.registry import ConfigError, first_line

KEYS = ("results_dir", "store.url", "mlflow.tracking_uri", "mlflow.experiment")
USAGE = "usage: python -m sweeper mirror [results_dir=DIR] [store.url=URL] " + (
    "[mlflow.tracking_uri=URI] [mlflow.experiment=NAME]"
)
HELP = f"""{USAGE}

Copy every finished run that is not in MLflow yet (its MLflow store was down, read-only or
unreachable while it trained) from the results store into MLflow: parameters, tags, every
epoch's metrics, cost and artifacts. Runs already partly in MLflow are completed in place;
nothing is logged twice. Exit status 0 when every such run was copied, 1 otherwise."""


def _first(e: BaseException) -> str:
    return first_line(e)[:300]


def wanted(run: RunRecord) -> bool:
    """Finished, not in MLflow yet, and its sweep wanted MLflow (``mlflow.enabled``)."""
    enabled = ((run.config or {}).get("mlflow") or {}).get("enabled", True)
    return not run.mlflow_mirrored and run.status in FINISHED and bool(enabled)


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


def catch_up_run(store: Store, run: RunRecord, uri: str, experiment: str,
                 results_dir: Path) -> bool:  # fmt: skip
    """One run's MLflow record completed; True when MLflow took everything."""
    from mlflow import MlflowClient

    errors: list[str] = []
    mlrun = MlflowRun(uri, experiment, results_dir / "mlartifacts", warn=errors.append)
    client = MlflowClient(tracking_uri=engine_url(uri))
    existing = _existing(client, experiment, run)
    run_dir = Path(run.run_dir) if run.run_dir else results_dir / "runs" / run.config_hash[:16]
    if mlrun.open_run(run, run_dir, {"mirrored_later": "true"}, existing) is None:
        raise ConfigError(f"MLflow store {uri} is not reachable: {errors[0] if errors else '?'}")
    mlrun.set_tags({"mirrored_later": "true"})
    sync_run(store, run, mlrun, logged_of(mlrun))
    return mlrun.ok


def catch_up(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    args = parse_args(argv)
    results_dir = Path(args.get("results_dir", "./results")).resolve()
    url = args.get("store.url") or default_url(results_dir)
    uri = args.get("mlflow.tracking_uri") or default_tracking_uri(results_dir)
    experiment = args.get("mlflow.experiment", "gradsweep")
    store = Store(url, create=False, missing_hint=USAGE)
    try:
        todo = [r for r in store.runs() if wanted(r)]
        if not todo:
            print("nothing to mirror: every finished run that asked for MLflow is in it already")
            return 0
        try:
            init_tracking_store(uri)
        except Exception as e:
            raise ConfigError(f"MLflow store {uri} cannot be opened: {_first(e)}") from None
        done = 0
        for r in todo:
            try:
                done += catch_up_run(store, r, uri, experiment, results_dir)
            except ConfigError:
                raise
            except Exception as e:  # one run's trouble: say so, go on; a rerun retries it
                print(f"warning: run {r.id} not mirrored: {_first(e)}", file=sys.stderr)
    finally:
        store.dispose()
    print(f"mirrored {done} of {len(todo)} run(s) into {uri}")
    return 0 if done == len(todo) else 1
