"""The MLflow client side: one MLflow run (:class:`MlflowRun`), a sweep's parent run, the
tracking store's one-time set-up, and MLflow's system-metrics monitors.

The results store is the source of truth; MLflow shows it for browsing. Every MLflow call
goes through :meth:`MlflowRun._guard`: an MLflow error prints one warning, switches that
run's MLflow calls off, and never loses the run from the results store (its row keeps
``mlflow_mirrored = false`` until ``python -m sweeper mirror`` completes it).

``mlflow`` is imported lazily: it is slow to import and the training hot path never needs
it (a GPU machine without it still trains).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sweeper.store.url import engine_url, sqlite_path
from trainers.registry import first_line

if TYPE_CHECKING:
    from sweeper.store.records import RunRecord

T = TypeVar("T")

# MLflow 3's UI opens an experiment by its kind; without the tag it guesses "GenAI" (traces,
# judges) for an experiment of training runs
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'method': {'name': 'pgt'}} -> {'method.name': 'pgt'} (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _quiet_mlflow() -> None:
    """MLflow narrates its DB migrations at INFO on first use; keep the terminal for ours."""
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


_ready: set[str] = set()  # tracking stores this process has set up


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held across processes (``flock`` on ``path``; released when the
    process ends, however it ends)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def init_tracking_store(tracking_uri: str, attempts: int = 4) -> None:
    """Create / migrate the MLflow tracking DB, safe when several processes do it at once
    (two sweeps started together on one results dir, a single run beside a sweep): MLflow
    creates and migrates its schema with alembic on first use, and two processes doing that
    on one database at once fail (alembic ``CommandError``, a table that already exists).
    A SQLite tracking DB is set up under an exclusive file lock next to it (``<db>.lock``);
    another database (PostgreSQL, MySQL) is retried a few times. Once per process and URI."""
    if tracking_uri in _ready:
        return
    from mlflow import MlflowClient

    _quiet_mlflow()
    url = engine_url(tracking_uri)

    def go() -> None:
        MlflowClient(tracking_uri=url).search_experiments(max_results=1)

    db = sqlite_path(url)
    if db is not None and db.parent.is_dir():
        with _file_lock(db.with_name(db.name + ".lock")):
            go()
    elif url.split("://", 1)[0].split("+")[0] in ("postgresql", "mysql", "mssql"):
        for attempt in range(attempts):  # a database server: the migration race, retried
            try:
                go()
                break
            except Exception:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
    else:  # a tracking server migrates its own database; a SQLite URI without a usable
        go()  # folder fails here as it would anywhere
    _ready.add(tracking_uri)


def run_name(model: str, method: str, alpha: float | None, seed: int) -> str:
    """The MLflow run name of a run, e.g. ``resnet18-pgt-a0.25-s0`` (alpha only with PGT)."""
    return f"{model}-{method}" + (f"-a{alpha:g}" if alpha is not None else "") + f"-s{seed}"


class MlflowRun:
    """One MLflow run: every call guarded -- a failure warns once and switches the rest of
    this run's MLflow calls off (the results store keeps the run either way)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_root: Path,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_root = artifact_root
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.ok = True
        self.client: Any = None
        self.run_id: str | None = None
        self.resumed = False  # start() re-opened an existing MLflow run

    def _guard(self, what: str, fn: Callable[[], T]) -> T | None:
        if not self.ok:
            return None
        try:
            return fn()
        except Exception as e:  # any MLflow/DB/filesystem failure: warn, keep training
            self.ok = False
            first = first_line(e)
            self.warn(
                f"warning: MLflow {what} failed ({type(e).__name__}: {first}); "
                "the run continues and is kept in the results store, not mirrored"
            )
            return None

    def start(
        self,
        existing_run_id: str | None,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        start_time: int | None = None,
    ) -> str | None:
        """Open (or re-open, when resuming) the MLflow run; returns its id. ``start_time``
        (ms since the epoch) for a run made after the fact (default: now)."""

        def go() -> str:
            from mlflow import MlflowClient
            from mlflow.entities import Param, RunTag

            init_tracking_store(self.tracking_uri)
            self.client = MlflowClient(tracking_uri=engine_url(self.tracking_uri))
            if existing_run_id:
                try:
                    self.client.update_run(existing_run_id, status="RUNNING")
                except Exception:  # deleted meanwhile: start a fresh one
                    pass
                else:
                    self.resumed = True
                    self._retag(existing_run_id, tags)
                    return existing_run_id
            run = self.client.create_run(self._experiment_id(), start_time=start_time,
                                         run_name=run_name, tags=tags)  # fmt: skip
            rid = run.info.run_id
            flat = flatten(params)
            self.client.log_batch(
                rid,
                params=[Param(k, str(v)[:6000]) for k, v in flat.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )
            return rid

        self.run_id = self._guard("start", go)
        return self.run_id

    def _experiment_id(self) -> str:
        """The experiment's id, made when missing (as training runs: MLflow 3's UI kind).
        Two processes making it at once: the loser finds the winner's."""
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            self.artifact_root.mkdir(parents=True, exist_ok=True)
            try:
                return self.client.create_experiment(
                    self.experiment,
                    artifact_location=self.artifact_root.resolve().as_uri(),
                    tags={EXPERIMENT_KIND: MODEL_TRAINING},
                )
            except Exception:  # made meanwhile by another process (a unique name)
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
        if EXPERIMENT_KIND not in exp.tags:  # made by an older version: open it as training
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return exp.experiment_id

    def _retag(self, rid: str, tags: dict[str, str]) -> None:
        """A re-opened run: running again (the last stop's ``reason`` no longer holds), and
        when a sweep opens it (``sweep_id`` in ``tags``: it resumes, retries or takes over the
        run) it moves under that sweep's parent -- its sweep tags all replaced, a stale one
        (``fused_group`` of an earlier fused job...) removed. Opened outside a sweep (the
        single-run command resuming a sweep's run) it stays where it was."""
        from mlflow.entities import RunTag

        from sweeper.tracking.describe import SWEEP_TAGS

        old = self.client.get_run(rid).data.tags
        new = dict(tags)
        if "sweep_id" in new:
            stale = [k for k in SWEEP_TAGS if k in old and k not in new]
        else:
            new = {k: v for k, v in new.items() if k not in SWEEP_TAGS}
            stale = []
        new["status"] = "running"
        stale += ["reason"] if "reason" in old else []
        self.client.log_batch(rid, tags=[RunTag(k, v) for k, v in new.items()])
        for k in stale:
            self.client.delete_tag(rid, k)

    def open_run(self, run: RunRecord, run_dir: Path | None, tags: dict[str, str],
                 existing_run_id: str | None = None, describe: bool = True,
                 after_the_fact: bool = False) -> str | None:  # fmt: skip
        """Open the MLflow run of a store run, described as :mod:`sweeper.tracking.describe` says:
        its params, grouping tags and ``tags``; then (``describe``) :meth:`describe_run`.
        ``after_the_fact``: made for a run that trained earlier (the sweeper closing a dead
        job's run, ``mirror``): it starts when the run started, not now."""
        from sweeper.tracking.describe import run_params, run_tags

        ident = (run.config or {}).get("identity", {})
        name = run_name(run.model, run.method, run.alpha, run.seed)
        all_tags = {**run_tags(ident, run.config_hash, run.method, run.model), **tags}
        start = epoch_ms(run.started_at or run.created_at) if after_the_fact else None
        rid = self.start(existing_run_id, name, run_params(ident, run.id), all_tags, start)
        if rid is not None and describe:
            self.describe_run(run, run_dir)
        return rid

    def describe_run(self, run: RunRecord, run_dir: Path | None) -> None:
        """Once, when the MLflow run was created (not when a resumed run re-opens it): its
        data set as a dataset input and its full resolved config as ``config.yaml``."""
        if self.run_id is None or self.resumed:
            return
        from sweeper.tracking.describe import config_yaml

        self.log_dataset((run.config or {}).get("identity", {}).get("data") or {})
        if run_dir is not None and run.config:
            try:
                path = config_yaml(run_dir, run.config)
            except OSError as e:  # e.g. `mirror` on another machine: the run folder is gone
                self.warn(f"warning: config.yaml of run {run.id} not written: {first_line(e)}")
                return
            self.log_artifact(path)

    def log_dataset(self, data: dict[str, Any]) -> None:
        """The run's data set as an MLflow dataset input (``trainers.catalog.dataset_ref``);
        a data set that cannot be described (its files gone) is warned about, not fatal."""
        if self.run_id is None:
            return
        from trainers.catalog import dataset_ref

        try:
            ref = dataset_ref(data)
        except Exception as e:
            self.warn(f"warning: the run's data set is not recorded in MLflow: {first_line(e)}")
            return

        def go() -> None:
            import json

            from mlflow.entities import Dataset, DatasetInput, InputTag

            ds = Dataset(ref.name, ref.digest, ref.source_type, ref.source,
                         profile=json.dumps(ref.profile, default=str))  # fmt: skip
            ctx = InputTag("mlflow.data.context", "training")
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds, [ctx])])

        # Not through _guard: runs of one data set started together race on MLflow's "get or
        # create" of the shared dataset row (one of them gets a unique-constraint error); a
        # retry finds the row. A dataset that still cannot be logged costs only the input,
        # never the rest of the run's mirror.
        for attempt in range(4):
            try:
                go()
                return
            except Exception as e:
                if attempt == 3:
                    self.warn(f"warning: the run's data set is not recorded in MLflow: "
                              f"{first_line(e)}")  # fmt: skip
                    return
                time.sleep(0.2 * (attempt + 1))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return

        def go() -> None:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
            for i in range(0, len(batch), 1000):  # MLflow takes 1,000 metrics per batch
                self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

        self._guard("log_metrics", go)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.run_id is None:
            return
        self._guard(
            "log_artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path)
        )

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id is None:
            return

        def go() -> None:
            from mlflow.entities import RunTag

            # one batch, one transaction (set_tag per key was one round trip each); a
            # tracking server refuses more than 100 tags in one (a sweep's verdict tags)
            batch = [RunTag(k, v) for k, v in tags.items()]
            for i in range(0, len(batch), 100):
                self.client.log_batch(self.run_id, tags=batch[i : i + 100])

        self._guard("set_tag", go)

    def drop_tags(self, prefix: str, keep: Collection[str]) -> None:
        """Delete this run's tags under ``prefix`` that ``keep`` does not name: read from
        what MLflow holds (an earlier process may have written them), not remembered."""
        if self.run_id is None:
            return

        def go() -> None:
            tags = self.client.get_run(self.run_id).data.tags
            for k in sorted(k for k in tags if k.startswith(prefix) and k not in keep):
                self.client.delete_tag(self.run_id, k)

        self._guard("delete_tag", go)

    def end(self, status: str, end_time: int | None = None) -> bool:
        """Close the run (FINISHED / FAILED / KILLED) at ``end_time`` (ms since the epoch;
        default now); True when everything was mirrored."""
        if self.run_id is None:
            return False
        self._guard("end", lambda: self.client.set_terminated(self.run_id, status=status,
                                                              end_time=end_time))  # fmt: skip
        return self.ok


def epoch_ms(t: dt.datetime | None) -> int | None:
    """A store time (naive UTC) as MLflow's milliseconds since the epoch."""
    return None if t is None else int(t.replace(tzinfo=dt.UTC).timestamp() * 1000)


def open_parent(
    tracking_uri: str,
    experiment: str,
    artifact_root: Path,
    sweep_name: str,
    params: dict[str, Any],
    sweep_id: int,
    warn: Callable[[str], None],
) -> MlflowRun | None:
    """A sweep's parent run, opened in the sweeper before any job starts: the tracking
    store is set up here once, because several processes initialising the same SQLite
    tracking DB at once race on MLflow's schema migration. None (with a warning) when MLflow
    cannot be used: the runs are then recorded in the results store only."""
    try:
        init_tracking_store(tracking_uri)
    except Exception as e:
        warn(
            f"warning: MLflow store {tracking_uri} cannot be initialised ({type(e).__name__}); "
            "runs are recorded in the results store only"
        )
        return None
    parent = MlflowRun(tracking_uri, experiment, artifact_root, warn=warn)
    parent.start(None, sweep_name, params, {"sweep_id": str(sweep_id), "sweep": "parent"})
    return parent


def system_metrics_monitor(tracking_uri: str, run_id: str) -> Any:
    """MLflow's own system-metrics monitor on ``run_id``, started: CPU, memory, disk and
    network through psutil, GPU utilisation and memory through NVML when a GPU is present,
    logged as ``system/...`` metrics every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds
    (MLflow's default 10) until the run ends. A resumed run continues its step count."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    mon = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=engine_url(tracking_uri))
    mon.start()
    return mon


def finish_monitor(mon: Any) -> None:
    """Stop a system-metrics monitor and log what it sampled since its last logged step:
    MLflow's ``finish`` drops the samples of an unfinished window, so a run shorter than
    one sampling interval would show no system metrics at all."""
    mon.finish()
    rest = mon.aggregate_metrics()  # empty when the last window was logged already
    if rest:
        mon.publish_metrics(rest)
        mon.mlflow_logger.flush()


class GroupSystemMetrics:
    """System metrics for the members of a fused job whose MLflow runs the sweeper opens
    (:class:`sweeper.tracking.sweep.SweepTracker`): a thread of the job waits for each member's MLflow
    run id to appear in the results store, then starts a monitor on it. Every member's run
    shows the job's machine (one GPU shared by the group: read with its ``fused_group`` tag)."""

    def __init__(self, tracking_uri: str, store_url: str, run_ids: list[int],
                 warn: Callable[[str], None], every: float = 5.0) -> None:  # fmt: skip
        self.uri, self.store_url, self.run_ids = tracking_uri, store_url, run_ids
        self.warn, self.every = warn, every
        self.monitors: dict[int, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="gradsweep-sysmetrics",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _work(self) -> None:
        from sweeper.store import Store

        store = Store(self.store_url, create=False)
        try:
            while not self._stop.is_set() and len(self.monitors) < len(self.run_ids):
                for rid in self.run_ids:
                    run = store.get_run_by_id(rid)
                    if rid not in self.monitors and run is not None and run.mlflow_run_id:
                        self.monitors[rid] = system_metrics_monitor(self.uri, run.mlflow_run_id)
                self._stop.wait(self.every)
        except Exception as e:  # never let monitoring take the job down
            self.warn(f"warning: MLflow system metrics stopped: {first_line(e)}")
        finally:
            store.dispose()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for mon in self.monitors.values():
            try:
                finish_monitor(mon)
            except Exception:  # its run may be gone already; nothing to keep
                pass
