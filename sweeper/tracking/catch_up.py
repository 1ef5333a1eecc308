"""``python -m sweeper mirror``: make MLflow tell what the results store holds, once.

The store is the source of truth. A run whose MLflow store was down, read-only or unreachable
still completes and lands in the store with ``mlflow_mirrored = false``; a run made with
``mlflow.enabled=false`` never went to MLflow. This command brings each finished run's MLflow
record up to date with :func:`sweeper.tracking.record.sync_run` -- parameters, tags, every
epoch's metrics, its cost, its artifacts, its outcome -- then sets ``mlflow_mirrored = true``:

* a run not in MLflow yet is copied (``mlflow.enabled=false`` asked to keep it out while it
  trained; asking for ``mirror`` is asking for it now), under its sweep's parent run (the
  sweep that last trained it: ``runs.claimed_by``), which is made, with the sweep's summary,
  when that sweep has none in this tracking store;
* a run MLflow partly holds (its ``mlflow_run_id``, or a run tagged with its
  ``config_hash``) is completed in place with only what it lacks, per metric key and step,
  read from MLflow's own history; a run marked mirrored is checked too (its steps, its
  metrics, its outcome, its parent) and completed the same way when it lacks something;
* a run whose MLflow record holds a step of a metric twice (written by an earlier version)
  is rebuilt: MLflow cannot delete single points, so a new MLflow run is made from the store
  (with the old one's tags, its other metrics such as ``system/...`` and its artifacts the
  run folder no longer has) and the old one is deleted (MLflow keeps a deleted run until
  ``mlflow gc``; ``MlflowClient().restore_run(ID)`` brings it back);
* runs of a sweep whose sweeper is still running are left to it.

A second call finds nothing to do. Runs marked mirrored into another tracking store (not
found in this one) are left alone.

    python -m sweeper mirror                                   # ./results
    python -m sweeper mirror results_dir=/scratch/results mlflow.tracking_uri=postgresql://...
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper.store import (
    LEASE_S,
    RunRecord,
    Store,
    SweepRecord,
    SweepRunRecord,
    default_tracking_uri,
    default_url,
    engine_url,
    pid_alive,
)
from sweeper.tracking.client import MlflowRun, epoch_ms, init_tracking_store
from sweeper.tracking.describe import STATUS_FOR_MLFLOW, sweep_tags
from sweeper.tracking.record import (
    COSTS,
    FINISHED,
    METRICS,
    Logged,
    find_mlflow_run,
    logged_of,
    run_folder,
    sync_run,
)
from trainers.registry import ConfigError, first_line

KEYS = ("results_dir", "store.url", "mlflow.tracking_uri", "mlflow.experiment")
USAGE = "usage: python -m sweeper mirror [results_dir=DIR] [store.url=URL] " + (
    "[mlflow.tracking_uri=URI] [mlflow.experiment=NAME]"
)
HELP = f"""{USAGE}

Make MLflow hold every finished run of the results store, as the store has it: copy the
runs not in MLflow yet (its store was down, read-only or unreachable while they trained, or
they were made with mlflow.enabled=false), each under its sweep's parent run; complete the
runs MLflow holds only in part with what they lack; rebuild a run whose MLflow record holds
a metric point twice. Nothing is logged twice; runs of a sweep still running are left to
it. Exit status 0 when every such run was brought up to date, 1 otherwise."""

# a sweep's outcome -> its parent's MLflow status
PARENT_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED",
                 "abandoned": "KILLED"}  # fmt: skip


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


def sweep_live(sw: SweepRecord) -> bool:
    """Whether the sweep's sweeper may still be running (it then mirrors its own runs)."""
    if sw.ended_at is not None:
        return False
    seen = pid_alive(sw.host, sw.pid)
    if seen is not None:
        return seen
    from sweeper.store.models import utcnow

    beat = sw.heartbeat_at or sw.created_at
    return beat is not None and (utcnow() - beat).total_seconds() < LEASE_S


@dataclass
class Mirror:
    """One ``mirror`` call: the stores, the sweeps and their links, the parents made."""

    store: Store
    client: Any
    uri: str
    experiment: str
    results_dir: Path
    sweeps: dict[int, SweepRecord] = field(default_factory=dict)
    links: dict[int, dict[int, SweepRunRecord]] = field(default_factory=dict)  # run -> sweep ->
    parents: dict[int, str | None] = field(default_factory=dict)  # sweep id -> parent run id
    made: dict[int, MlflowRun] = field(default_factory=dict)  # parents made by this call

    def load(self) -> None:
        for sw in self.store.sweeps():
            self.sweeps[sw.id] = sw
            for link, _ in self.store.sweep_runs(sw.id):
                self.links.setdefault(link.run_id, {})[sw.id] = link

    def sweep_of(self, run: RunRecord) -> SweepRecord | None:
        """The sweep the run belongs to: the one that last claimed it (trained it), else
        (last claimed by the single-run command, or a store from before claims were
        recorded) the last sweep that asked for it."""
        links = self.links.get(run.id, {})
        if run.claimed_by in links:
            return self.sweeps[run.claimed_by]  # type: ignore[index]
        return self.sweeps[max(links)] if links else None

    def _active(self, mlflow_id: str | None) -> bool:
        if not mlflow_id:
            return False
        try:
            return self.client.get_run(mlflow_id).info.lifecycle_stage == "active"
        except Exception:  # not in this tracking store
            return False

    def parent_of(self, sw: SweepRecord, make: bool) -> str | None:
        """The sweep's parent run in this tracking store; made (``make``) when it has none
        (a sweep run with ``mlflow.enabled=false``, or while MLflow was down)."""
        if sw.id in self.parents:
            return self.parents[sw.id]
        pid: str | None = sw.mlflow_parent_run_id
        if not self._active(pid):
            pid = None
            if make:
                parent = MlflowRun(self.uri, self.experiment, self.results_dir / "mlartifacts",
                                   warn=lambda m: print(m, file=sys.stderr))  # fmt: skip
                pid = parent.start(None, sw.name, {"sweep_command": sw.command,
                                                   "n_points": sw.n_points},
                                   {"sweep_id": str(sw.id), "sweep": "parent",
                                    "mirrored_later": "true"},
                                   epoch_ms(sw.created_at))  # fmt: skip
                if pid is not None:
                    self.store.set_sweep_fields(sw.id, mlflow_parent_run_id=pid)
                    self.made[sw.id] = parent
        if pid is not None or make:
            self.parents[sw.id] = pid
        return pid

    def tags_of(self, run: RunRecord, make_parent: bool) -> dict[str, str]:
        """The run's sweep tags (its point, its configuration's label, its parent)."""
        sw = self.sweep_of(run)
        if sw is None:
            return {}
        link = self.links[run.id][sw.id]
        ident = (run.config or {}).get("identity", {})
        return sweep_tags(sw.id, sw.name, self.parent_of(sw, make_parent), link.point, ident,
                          link.trial)  # fmt: skip

    # ---------------------------------------------------------------- one run
    def lacks(self, run: RunRecord, mlflow_id: str) -> bool:
        """Whether the MLflow record of a run marked mirrored falls short of the store: an
        epoch's step missing or logged twice (read on ``test_acc``, logged with every
        epoch's batch), a metric or the cost missing, another outcome, another parent."""
        got = self.client.get_run(mlflow_id)
        epochs = self.store.epoch_metrics(run.id)
        steps = [m.step for m in self.client.get_metric_history(mlflow_id, "test_acc")]
        if sorted(steps) != [e.epoch for e in epochs]:
            return True
        last = epochs[-1] if epochs else None
        keys = {k for k in METRICS if last is not None and getattr(last, k, None) is not None}
        keys |= set(COSTS) if run.train_seconds is not None else set()
        if not keys <= set(got.data.metrics):
            return True
        if got.data.tags.get("status") != run.status.value:
            return True
        if got.info.status != STATUS_FOR_MLFLOW[run.status.value]:
            return True
        if run.claimed_by is None:  # its sweep is a guess: its parent is left as it is
            return False
        want = self.tags_of(run, make_parent=False).get("mlflow.parentRunId")
        return want is not None and got.data.tags.get("mlflow.parentRunId") != want

    def mirror_run(self, run: RunRecord) -> str:
        """One run's MLflow record made complete; what was done (``copied``, ``completed``,
        ``rebuilt``, ``complete``, ``elsewhere``). Raises on MLflow errors."""
        existing = find_mlflow_run(self.client, self.experiment, run)
        if run.mlflow_mirrored:
            if existing is None:
                return "elsewhere"  # mirrored into another tracking store
            if not self.lacks(run, existing):
                return "complete"
        # under its sweep's parent; a run whose sweep is only a guess (no claim recorded)
        # and which MLflow holds already stays where it is
        sweep = self.tags_of(run, True) if run.claimed_by or existing is None else {}
        tags = {**sweep, "mirrored_later": "true"}
        if existing is not None and Logged.of(self.client, existing).twice:
            self.rebuild(run, existing, tags)
            return "rebuilt"
        errors: list[str] = []
        mlrun = MlflowRun(self.uri, self.experiment, self.results_dir / "mlartifacts",
                          warn=errors.append)  # fmt: skip
        if mlrun.open_run(run, self.run_dir(run), tags, existing, after_the_fact=True) is None:
            raise ConfigError(f"MLflow store {self.uri} is not reachable: "
                              f"{errors[0] if errors else '?'}")  # fmt: skip
        sync_run(self.store, run, mlrun, logged_of(mlrun))
        if not mlrun.ok:
            raise RuntimeError(errors[0] if errors else "MLflow refused a write")
        return "completed" if existing is not None else "copied"

    def run_dir(self, run: RunRecord) -> Path:
        return run_folder(run) or self.results_dir / "runs" / run.config_hash[:16]

    def rebuild(self, run: RunRecord, old_id: str, tags: dict[str, str]) -> None:
        """A new MLflow run for ``run`` from the store, the old one's tags, other metrics
        and artifacts carried over; then the old one is deleted."""
        from mlflow.entities import Metric, RunTag

        old = self.client.get_run(old_id)
        errors: list[str] = []
        mlrun = MlflowRun(self.uri, self.experiment, self.results_dir / "mlartifacts",
                          warn=errors.append)  # fmt: skip
        keep = {k: v for k, v in old.data.tags.items()
                if not k.startswith("mlflow.") and k not in ("status", "reason")}  # fmt: skip
        if "mlflow.note.content" in old.data.tags:
            keep["mlflow.note.content"] = old.data.tags["mlflow.note.content"]
        rid = mlrun.open_run(run, self.run_dir(run), {**keep, **tags, "rebuilt_from": old_id},
                             None, after_the_fact=True)  # fmt: skip
        if rid is None:
            raise RuntimeError(errors[0] if errors else "MLflow refused the new run")
        ours = set(METRICS) | set(COSTS)
        for key in old.data.metrics:
            if key in ours:
                continue  # from the store
            points = {(m.step, m.timestamp, m.value) for m in
                      self.client.get_metric_history(old_id, key)}  # fmt: skip
            batch = [Metric(key, v, ts, step) for step, ts, v in sorted(points)]
            for i in range(0, len(batch), 1000):
                self.client.log_batch(rid, metrics=batch[i : i + 1000])
        # the artifacts the run folder gives again (sync_run logs them) and the others,
        # copied from the old run (the folder may be gone: another machine)
        folder = self.run_dir(run)
        again = {"config.yaml"} if run.config else set()
        again |= {f"filter_norms/{f.name}" for f in (folder / "filter_norms").glob("epoch_*.npz")}
        again |= {"feature_norms.json"} if (folder / "feature_norms.json").exists() else set()
        with tempfile.TemporaryDirectory() as tmp:
            for path in _artifact_files(self.client, old_id):
                if path not in again:
                    local = self.client.download_artifacts(old_id, path, tmp)
                    mlrun.log_artifact(Path(local), str(Path(path).parent) if "/" in path
                                       else None)  # fmt: skip
        sync_run(self.store, run, mlrun, Logged())
        if not mlrun.ok:
            raise RuntimeError(errors[0] if errors else "MLflow refused a write")
        self.client.log_batch(rid, tags=[RunTag("rebuilt_from", old_id)])
        self.client.delete_run(old_id)

    def close_parents(self) -> None:
        """The parents this call made: the sweep's summary, then closed as the sweep ended
        (a sweep still running keeps its own parent and is never given one here)."""
        from sweeper.tracking.sweep import write_summary

        for sid, parent in self.made.items():
            sw = self.sweeps[sid]
            write_summary(parent, self.store, sid, self.results_dir)
            parent.end(PARENT_STATUS.get(sw.outcome or "", "KILLED"), epoch_ms(sw.ended_at))


def _artifact_files(client: Any, run_id: str, path: str | None = None) -> list[str]:
    out: list[str] = []
    for a in client.list_artifacts(run_id, path):
        out += _artifact_files(client, run_id, a.path) if a.is_dir else [a.path]
    return out


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
        finished = [r for r in store.runs() if r.status in FINISHED]
        if not finished:
            print("nothing to mirror: the results store has no finished run")
            return 0
        try:
            init_tracking_store(uri)
        except Exception as e:
            raise ConfigError(f"MLflow store {uri} cannot be opened: {_first(e)}") from None
        from mlflow import MlflowClient

        m = Mirror(store, MlflowClient(tracking_uri=engine_url(uri)), uri, experiment,
                   results_dir)  # fmt: skip
        m.load()
        done: dict[str, int] = {}
        failed = left = 0
        for r in finished:
            sw = m.sweep_of(r)
            if sw is not None and sweep_live(sw):
                left += 1
                continue
            try:
                what = m.mirror_run(r)
            except ConfigError:
                raise
            except Exception as e:  # one run's trouble: say so, go on; a rerun retries it
                print(f"warning: run {r.id} not mirrored: {_first(e)}", file=sys.stderr)
                failed += 1
                continue
            done[what] = done.get(what, 0) + 1
        m.close_parents()
    finally:
        store.dispose()
    print(summary_line(done, failed, left, len(m.made), uri))
    return 1 if failed else 0


def summary_line(done: dict[str, int], failed: int, left: int, parents: int, uri: str) -> str:
    """What ``mirror`` did, in one line."""
    changed = {k: n for k, n in done.items() if k in ("copied", "completed", "rebuilt")}
    n = sum(changed.values())
    notes = [f"{c} {k}" for k, c in changed.items()]
    if parents:
        notes.append(f"{parents} sweep parent run(s) made")
    if done.get("complete"):
        notes.append(f"{done['complete']} already complete")
    if done.get("elsewhere"):
        notes.append(f"{done['elsewhere']} mirrored into another tracking store, left alone")
    if left:
        notes.append(f"{left} left to their sweep, still running")
    rest = f" ({'; '.join(notes)})" if notes else ""
    if not n and not failed:
        return f"nothing to mirror: every finished run is in MLflow as the store has it{rest}"
    return f"mirrored {n} of {n + failed} run(s) into {uri}{rest}"
