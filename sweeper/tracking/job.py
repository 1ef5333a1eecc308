"""A training job's MLflow side: its run's MLflow record kept up to date from a thread of the
job's own, so the training loop never waits for MLflow.

:class:`JobTracker` opens (or, for a resumed run, re-opens) the run's MLflow run, then brings
it up to date from the results store after every epoch and once more when the run has ended
(:func:`sweeper.tracking.record.sync_run`, the same function the sweeper's thread and
``python -m sweeper mirror`` use). Calls are queued and run in order in the thread; the job
waits only for the MLflow run to be *open* before its first epoch (importing MLflow while
training competes for the interpreter and inflates the first epoch's recorded time) and for
the queue to drain at the end (at most ``timeout_s``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sweeper.store import RunRecord, Store
from sweeper.tracking.client import MlflowRun, finish_monitor, system_metrics_monitor
from sweeper.tracking.record import Logged, logged_of, sync_run
from trainers.registry import first_line


class JobTracker:
    """The MLflow record of one run, written from a thread of its job."""

    def __init__(self, mlrun: MlflowRun, store: Store, run: RunRecord, run_dir: Path,
                 tags: dict[str, str], system_metrics: bool = False, owner: int | None = None,
                 timeout_s: float = 300.0) -> None:  # fmt: skip
        self.mlrun, self.store, self.run_id_store = mlrun, store, run.id
        self.owner = owner  # the job's token: its writes to the run hold it
        self.timeout_s = timeout_s
        self.monitor: Any = None  # MLflow's SystemMetricsMonitor, when asked for
        self.logged = Logged()
        self._calls: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._open = threading.Event()
        self._thread = threading.Thread(target=self._work, name="gradsweep-mlflow", daemon=True)
        self._thread.start()
        self._calls.put(lambda: self._start(run, run_dir, tags, system_metrics))

    def _work(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            try:
                call()
            except Exception as e:  # MlflowRun guards its calls; this is a last resort
                self.mlrun.ok = False
                self.mlrun.warn(f"warning: MLflow tracking stopped ({type(e).__name__}: {e})")

    def _start(self, run: RunRecord, run_dir: Path, tags: dict[str, str], sysm: bool) -> None:
        rid = None
        try:
            rid = self.mlrun.open_run(run, run_dir, tags, run.mlflow_run_id, describe=False)
            if rid is not None:
                self.logged = logged_of(self.mlrun)
                if rid != run.mlflow_run_id:
                    self.store.set_fields(run.id, owner=self.owner, mlflow_run_id=rid)
        finally:
            self._open.set()  # the job's first epoch starts now; the rest is queued
        if rid is None:
            return
        if sysm:
            try:
                self.monitor = system_metrics_monitor(self.mlrun.tracking_uri, rid)
            except Exception as e:  # psutil/NVML trouble: the run goes on without
                self.mlrun.warn(f"warning: MLflow system metrics not started: {first_line(e)}")
        # hashing the data set's files overlaps the first epoch
        self.mlrun.describe_run(run, run_dir)

    def wait_open(self, timeout_s: float = 120.0) -> bool:
        """Wait until the MLflow run is open (or its failure warned); True when it is."""
        return self._open.wait(timeout_s)

    def sync(self) -> None:
        """Bring the record up to date with the store (after an epoch was recorded)."""
        self._calls.put(self._sync)

    def _sync(self) -> None:
        run = self.store.get_run_by_id(self.run_id_store)
        if run is not None and self.mlrun.run_id is not None:
            sync_run(self.store, run, self.mlrun, self.logged, self.owner)

    def abandon(self) -> None:
        """Stop the thread without touching the MLflow run again (its store run now belongs
        to another job, whose tracker keeps the record)."""
        self._calls.put(None)
        self._thread.join(self.timeout_s)

    def finish(self) -> bool:
        """The run has ended in the store: its last sync (outcome, MLflow status), then the
        thread stops. True when everything reached MLflow."""

        def last() -> None:
            if self.monitor is not None:  # its last samples before the run is closed
                try:
                    finish_monitor(self.monitor)
                except Exception:
                    pass
            self._sync()

        self._calls.put(last)
        self._calls.put(None)
        self._thread.join(self.timeout_s)
        if self._thread.is_alive():
            self.mlrun.warn(
                f"warning: MLflow did not answer within {self.timeout_s:g} s; the run is kept "
                "in the results store (python -m sweeper mirror copies it to MLflow later)"
            )
            return False
        return self.mlrun.ok and self.mlrun.run_id is not None
