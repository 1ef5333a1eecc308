"""One dispatcher for grids and searches: claim each point, run its job, read its outcome.

A *source* hands out points (:mod:`sweeper.launch.grid`: a fixed grid; :mod:`sweeper.launch.study`: an
Optuna study that asks for the next trial whenever a slot frees up); a *backend*
(:mod:`sweeper.launch.backends`: local processes or Slurm) runs their jobs. The dispatcher owns
what both share:

* :meth:`Dispatcher.claim` -- the one decision for a point: start it, resume it, retry it,
  skip it (done, or failed and not retried), leave it to a live job elsewhere, or share the
  run of an identical point of this dispatch;
* :meth:`Dispatcher.run` -- slots, submit, poll, the outcome of each ended job (read from
  the store, where each job records its own), and cancel: Ctrl-C or SIGTERM stops the jobs,
  their runs end ``interrupted``, and the same command resumes them;
* a job whose process vanished without recording an outcome (a signal, a lost node) is
  recorded killed: ``interrupted`` (resumed by the same command) or, killed twice without
  progress, ``failed`` (:mod:`sweeper.store.lease`). A job that raised before recording
  anything is ``failed`` with its error.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import functools
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sweeper.config.identity import grid_columns, resolved_config
from sweeper.config.launcher import LauncherParams
from sweeper.config.schema import Config
from sweeper.errors import disk_full, disk_full_line
from sweeper.launch.backends import Backend, LocalBackend, Submission, make_backend
from sweeper.launch.job import TRACKED_BY_SWEEPER
from sweeper.launch.slurm import job_alive_elsewhere
from sweeper.store import (
    HEARTBEAT_S,
    LostRun,
    RunRecord,
    RunStatus,
    Store,
    StoreFull,
    StoreUnavailable,
)

# what a job records as its outcome; a pruned run is not final for a grid (asked for again,
# it resumes from its checkpoint to the last epoch)
OUTCOMES = {RunStatus.done, RunStatus.failed, RunStatus.diverged, RunStatus.pruned}


class Decision(enum.Enum):
    START = "start"  # a new (queued) run
    RESUME = "resume"  # interrupted or pruned: continues from its checkpoint
    RETRY = "retry"  # failed / diverged, retried (requeued)
    DONE = "done"  # already done: never trained again
    FINISHED = "finished"  # failed / diverged, not retried
    # another live job trains it, or another live sweep has claimed it: never started
    # twice; followed to its outcome
    FOLLOW = "follow"
    SHARED = "shared"  # the same configuration as a point of this dispatch

    @property
    def dispatch(self) -> bool:
        return self in (Decision.START, Decision.RESUME, Decision.RETRY)


@dataclass
class Point:
    """One configuration of a grid or one trial of a search, and what became of it."""

    label: str  # the point's overrides, as typed
    cfg: Config
    config_hash: str
    identity: dict[str, Any]
    run: RunRecord | None = None
    status: str = "queued"  # then running, or the run's outcome, or skipped / shared
    started: float = 0.0
    sub: Submission | None = None
    twin: Point | None = None  # SHARED: the point whose run this one shares
    mlflow_tags: dict[str, str] = field(default_factory=dict)
    trial: Any = None  # searches: the Optuna trial (sweeper.launch.study.Trial)
    trial_link: Any = None  # searches: what the job reports to (sweeper.launch.trials.TrialLink)
    owner: int | None = None  # the run's token this dispatch claimed it with
    followed: bool = False  # its run was trained by another live job (FOLLOW)
    why: str | None = None  # why it ended interrupted, when not a cancel (a full disk, ...)

    @property
    def job_id(self) -> str | None:
        return str(self.sub.job.job_id) if self.sub is not None and self.sub.job else None


class Source(Protocol):
    """Where points come from."""

    def next_job(self, slots: float) -> list[Point] | None:
        """The points of the next job to dispatch (claimed: their decisions say dispatch;
        several when they are fused, :mod:`sweeper.launch.fuse`), or None when there is none now
        (a search asks again when a slot frees up). ``slots``: the backend's capacity."""
        ...

    def finished(self, p: Point) -> None:
        """``p``'s job ended; ``p.status`` is its outcome (``p.run`` re-read)."""
        ...


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM on the sweeper (``kill``, a closing login session, a batch system ending the
    allocation the sweeper runs in) is handled like Ctrl-C: running jobs are cancelled,
    record themselves ``interrupted``, and the same command resumes the sweep. Without this,
    SIGTERM would kill the sweeper alone and leave its local jobs orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class SweepBeat:
    """The sweeper's heartbeat (``sweeps.heartbeat_at``): its claims hold while it beats. A
    failing write is retried at the next beat."""

    def __init__(self, store: Store, sweep_id: int, every: float = HEARTBEAT_S) -> None:
        self.store, self.sweep_id, self.every = store, sweep_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gradsweep-sweep-beat",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):
                self.store.sweep_heartbeat(self.sweep_id)

    def stop(self) -> None:
        self._stop.set()


def _new_row(p: Point, memo: dict) -> tuple[dict[str, Any], dict]:
    """A new run's grid columns and resolved config (made only for runs not yet stored)."""
    return grid_columns(p.cfg), resolved_config(p.cfg, p.identity, memo)


@contextlib.contextmanager
def open_sweep(cfg0: Config, params: LauncherParams, name: str, command: str, label: str,
               n_points: int, out: Callable[[str], None],
               parent_id: int | None = None) -> Iterator[Dispatcher]:  # fmt: skip
    """A sweep's record and its dispatcher, for a grid and a search alike: the results store
    is open for the sweep's life, and the sweep's end is recorded however it ends (an error
    that escapes closes it as failed)."""
    cfg0.make_results_dir()
    store = cfg0.open_store(warn=out)
    d: Dispatcher | None = None
    try:
        d = Dispatcher(store, params, cfg0, name, command, label, n_points, out, parent_id)
        yield d
    finally:
        if d is not None and not d.closed:
            try:
                d.close(failed=True)
            except (StoreUnavailable, StoreFull):  # the next command records it abandoned
                pass
        store.dispose()


def tracks_itself(cfg: Config, members: int, local_cpu: bool) -> bool:
    """Whether a sweep's job of ``members`` runs keeps its own MLflow run
    (:class:`~sweeper.tracking.job.JobTracker`) instead of the sweeper's thread keeping it, as
    it does for every fused job; ``local_cpu``: a local job on a machine without a GPU.

    A job that does not talk to MLflow skips MLflow's import and its tracking store's set-up
    (seconds of CPU in each job, on its critical path). It keeps its own run only where
    MLflow's system metrics may be on (``mlflow.system_metrics=true``, or ``auto`` and a GPU):
    their monitor needs the run from the job's first second, and a short job can end before
    the sweeper's thread has opened it."""
    surely_cpu = cfg.device == "cpu" or local_cpu
    return members == 1 and cfg.mlflow.system_metrics_on("cpu" if surely_cpu else "cuda")


def _returned(sub: Submission, run_id: int) -> str | None:
    """Why the job, which returned normally, left run ``run_id`` interrupted without
    recording it (None: it did not say so)."""
    try:
        outcomes = sub.job.result() if sub.job is not None else None
    except Exception:  # it raised, or left no result
        return None
    for o in outcomes or []:
        if getattr(o, "run_id", None) == run_id and getattr(o, "status", "") == "interrupted":
            return getattr(o, "why", None) or "its job stopped without recording it"
    return None


class Dispatcher:
    """Claims points in one sweep's record and runs their jobs through a backend."""

    def __init__(
        self,
        store: Store,
        params: LauncherParams,
        cfg0: Config,
        sweep_name: str,
        command: str,
        launcher_label: str,
        n_points: int,
        out: Callable[[str], None],
        parent_id: int | None = None,
    ) -> None:
        self.store, self.params, self.cfg0 = store, params, cfg0
        self.name, self.command, self.out = sweep_name, command, out
        abandoned = store.close_abandoned()  # sweeps whose sweeper died: their end recorded
        if abandoned:
            out(f"sweep(s) {', '.join(map(str, abandoned))} lost their sweeper; recorded "
                "abandoned")  # fmt: skip
        lost = store.expire_leases(alive=job_alive_elsewhere(store))
        if lost:  # killed jobs of earlier sweeps: resumed when asked
            out(f"{lost} run(s) whose job was killed marked interrupted; resuming them")
        self.sweep = store.create_sweep(sweep_name, command, launcher_label, n_points, parent_id)
        self._beat = SweepBeat(store, self.sweep.id)
        self.tracker: Any = None  # the sweep's MLflow side (sweeper.tracking.sweep.SweepTracker)
        self.base_tags: dict[str, str] = {"sweep_id": str(self.sweep.id), "sweep_name": sweep_name}
        if getattr(params, "jobs_per_gpu", 1) > 1:  # packed jobs share a GPU: read their
            self.base_tags["jobs_per_gpu"] = str(params.jobs_per_gpu)  # system metrics so
        self.running: list[Point] = []
        self.following: list[Point] = []  # points whose run another live job trains
        self.closed = False

    # ------------------------------------------------------------------- claiming
    def claim(
        self, p: Point, retry_failed: bool, twins: dict[str, Point], trial: int | None = None
    ) -> Decision:
        """The one decision for a point: see :class:`Decision`. ``twins`` maps the config
        hashes this dispatch already holds to their point (a grid: every earlier point; a
        search: the running ones)."""
        twin = twins.get(p.config_hash)
        if twin is not None and twin is not p:
            p.twin, p.run = twin, twin.run
            if twin.run is not None:
                self.store.link_run(self.sweep.id, twin.run.id, p.label, trial=trial)
            return Decision.SHARED
        run = self.store.claim_run(p.config_hash, grid_columns(p.cfg),
                                   resolved_config(p.cfg, p.identity))  # fmt: skip
        self.store.link_run(self.sweep.id, run.id, p.label, trial=trial)
        p.run = run
        st = run.status
        if st == RunStatus.done:
            return Decision.DONE
        if st in (RunStatus.failed, RunStatus.diverged) and not retry_failed:
            return Decision.FINISHED
        if st == RunStatus.running and not self.store.job_alive(run):
            self.store.expire_leases(alive=job_alive_elsewhere(self.store))  # its job died
        # one compare-and-set decides who trains it: two sweepers asking for the same
        # configuration never both start it; the loser follows the winner's run
        p.owner = self.store.claim(run.id, self.sweep.id, retry=retry_failed)
        if p.owner is None:
            return Decision.FOLLOW
        if st in (RunStatus.failed, RunStatus.diverged):
            return Decision.RETRY
        return Decision.START if st == RunStatus.queued else Decision.RESUME

    def claim_many(self, points: Sequence[Point], retry_failed: bool) -> list[Decision]:
        """:meth:`claim` for every point of a grid, in order, in a few transactions
        (:meth:`Store.claim_runs`, :meth:`Store.claim_many`): the same decisions, the same
        compare-and-set on each run's token, the same links; a point whose hash an earlier
        one holds is SHARED."""
        memo: dict = {}  # sub-configs the points share, each turned into a dict once
        want = [(p.config_hash, p.label, functools.partial(_new_row, p, memo)) for p in points]
        runs = self.store.claim_runs(self.sweep.id, want)
        before = runs
        dead = next((r for r in (runs[p.config_hash] for p in points)
                     if r.status == RunStatus.running and not self.store.job_alive(r)), None)  # fmt: skip
        if dead is not None:  # a job died: recorded before claiming, as claim does at its point
            self.store.expire_leases(alive=job_alive_elsewhere(self.store))
            runs = self.store.runs_by_hash(list(runs))

        def record(p: Point) -> RunRecord:
            # claim reads the point that saw the dead job before expiring it, later ones after
            r = runs[p.config_hash]
            return before[p.config_hash] if dead is not None and r.id == dead.id else r

        ended = (RunStatus.failed, RunStatus.diverged)
        asked = [r.id for r in map(record, points) if r.status != RunStatus.done
                 and (retry_failed or r.status not in ended)]  # fmt: skip
        tokens = self.store.claim_many(asked, self.sweep.id, retry=retry_failed)
        out: list[Decision] = []
        firsts: dict[str, Point] = {}
        for p in points:
            twin = firsts.setdefault(p.config_hash, p)
            if twin is not p:
                p.twin, p.run = twin, twin.run
                out.append(Decision.SHARED)
                continue
            run = p.run = record(p)
            st = run.status
            if st == RunStatus.done:
                out.append(Decision.DONE)
            elif st in ended and not retry_failed:
                out.append(Decision.FINISHED)
            elif (owner := tokens.get(run.id)) is None:
                out.append(Decision.FOLLOW)
            else:
                p.owner = owner
                out.append(Decision.RETRY if st in ended else
                           Decision.START if st == RunStatus.queued else Decision.RESUME)  # fmt: skip
        return out

    def follow_message(self, p: Point) -> str:
        assert p.run is not None
        return (f"point [{p.label}]: run {p.run.id} is being trained by another live job or "
                "claimed by another live sweep; following it to its outcome instead of "
                "starting it twice")  # fmt: skip

    # -------------------------------------------------------------------- running
    def job_folder(self) -> Path:
        folder = Path(self.cfg0.results_dir) / "logs" / "jobs" / f"sweep{self.sweep.id}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def open_mlflow_parent(self, n_points: int, objective: tuple[str, str] | None = None) -> None:
        """The sweep's MLflow side (:class:`sweeper.tracking.sweep.SweepTracker`): its parent run (the
        jobs' runs are its children), opened in a thread so that MLflow's set-up overlaps
        the first job's start; the same thread mirrors the members of fused jobs and keeps
        the parent's summary of the sweep current. ``objective``: a search's (metric,
        direction), for its best trial."""
        if not self.cfg0.mlflow.enabled:
            return
        from sweeper.tracking.sweep import SweepTracker

        self.tracker = SweepTracker(self.cfg0.store_url(), self.cfg0.tracking_uri(),
                                    self.cfg0.mlflow.experiment, Path(self.cfg0.results_dir),
                                    self.name, {"sweep_command": self.command,
                                                "n_points": n_points},
                                    self.sweep.id, self.out, objective=objective)  # fmt: skip

    @property
    def parent(self) -> Any:
        """The sweep's MLflow parent run once open (None without MLflow)."""
        if self.tracker is None:
            return None
        self.tracker.wait_parent()
        return self.tracker.parent

    def _parent_tag(self) -> None:
        """Jobs that track themselves start after the parent run is open: they are its
        children, and only the sweeper's thread creates the tracking store (several
        processes creating one SQLite tracking store at once race on its migrations)."""
        if self.tracker is not None and "mlflow.parentRunId" not in self.base_tags:
            rid = self.tracker.wait_parent()
            if rid:
                self.base_tags["mlflow.parentRunId"] = rid

    def dispatch(self, source: Source, n_points: int, interrupted: str,
                 objective: tuple[str, str] | None = None, cap: int | None = None,
                 batch: bool = True) -> None:  # fmt: skip
        """Open the sweep's MLflow side, then :meth:`run`; on Ctrl-C or SIGTERM say
        ``interrupted`` (what became of the running jobs and how to resume) and re-raise."""
        self.open_mlflow_parent(n_points, objective)
        try:
            self.run(source, cap, batch)
        except KeyboardInterrupt:
            self.out(interrupted)
            raise

    def run(self, source: Source, cap: int | None = None, batch: bool = True) -> None:
        """Dispatch the source's points until none is left and every job has ended.
        ``cap``: at most this many jobs in flight (a search's n_jobs). ``batch``: points
        available together go out as one submission (on Slurm, one job array: a grid);
        else one job each (a search's trials)."""
        folder = self.job_folder()
        self.out(f"job logs: {folder}")
        backend = make_backend(self.params, folder, self.name, cap, self.out)
        with terminate_as_interrupt():
            try:
                self._loop(source, backend, batch)
            except KeyboardInterrupt:
                self._cancel(backend)
                raise

    def _subs(self) -> list[Submission]:
        """The running jobs (the members of a fused job share one submission)."""
        seen: dict[int, Submission] = {}
        for p in self.running:
            if p.sub is not None:
                seen.setdefault(id(p.sub), p.sub)
        return list(seen.values())

    def _loop(self, source: Source, backend: Backend, together: bool) -> None:
        while True:
            batch: list[list[Point]] = []
            while len(self._subs()) + len(batch) < backend.capacity:
                job = source.next_job(backend.capacity)
                if not job:
                    break
                batch.append(job)
            for jobs in [batch] if together else [[j] for j in batch]:
                if jobs:
                    self._submit(jobs, backend)
            if not self.running and not self.following:
                return
            time.sleep(self.params.poll_s)
            gone = {id(sub) for sub in backend.gone(self._subs())}
            ended = [q for q in self.running if id(q.sub) in gone]
            for p in ended:
                self.running.remove(p)
                self._outcome(p, backend)
            for p in ended:
                backend.release(p.sub)  # type: ignore[arg-type]  # once per job: idempotent
                if p.status == "following":
                    continue  # another job took its run over: followed to its outcome
                source.finished(p)
            self._follow(source, backend)

    def _follow(self, source: Source, backend: Backend) -> None:
        """Points whose run another live job trains: their outcome once it ends. A run
        whose trainer died meanwhile (interrupted, or a claim of a dead sweep) is claimed
        here and trained by a job of this sweep. Thousands may be followed: each poll
        looks at their leases in bulk (no configs read), claims the free ones in one go
        (:meth:`Store.claim_many`: the same compare-and-set as one claim each) and reads
        in full only the runs that ended or were claimed."""
        if not self.following:
            return
        ids = [p.run.id for p in self.following]  # type: ignore[union-attr]

        def trained() -> tuple[dict, set[int]]:  # the runs' leases, those trained by a live job
            leases = self.store.lease_states(ids)
            return leases, {i for i, r in leases.items() if r.status == RunStatus.running
                            and self.store.job_alive(r)}  # type: ignore[arg-type]  # fmt: skip

        leases, live = trained()
        if any(r.status == RunStatus.running and i not in live for i, r in leases.items()):
            self.store.expire_leases(alive=job_alive_elsewhere(self.store))  # a job died
            leases, live = trained()
        ended = [i for i, r in leases.items() if r.status in OUTCOMES]
        free = [i for i, r in leases.items() if r.status not in OUTCOMES and i not in live]
        tokens = self.store.claim_many(free, self.sweep.id) if free else {}
        runs = self.store.runs_by_id(ended + [i for i, t in tokens.items() if t is not None])
        for p in list(self.following):
            assert p.run is not None
            rid = p.run.id
            if rid in runs and leases[rid].status in OUTCOMES:
                p.run = runs[rid]
                self.following.remove(p)
                p.status = p.run.status.value
                source.finished(p)
            elif (owner := tokens.pop(rid, None)) is not None:  # one point a run takes it
                p.run, p.owner = runs[rid], owner  # its trainer is gone: ours to train now
                self.following.remove(p)
                p.followed = False
                self.out(f"point [{p.label}]: run {rid} lost the job that trained it; "
                         "training it here")  # fmt: skip
                self._submit([[p]], backend)

    def _submit(self, jobs: list[list[Point]], backend: Backend) -> None:
        subs = []
        local_cpu = isinstance(backend, LocalBackend) and not any(backend.slots)
        ours = [self.tracker is not None and not tracks_itself(job[0].cfg, len(job), local_cpu)
                for job in jobs]  # fmt: skip
        if not all(ours):
            self._parent_tag()
        for job, by_sweeper in zip(jobs, ours, strict=True):
            tags = [self._tags(p) for p in job]
            if by_sweeper:
                tags = [{**t, TRACKED_BY_SWEEPER: "sweeper"} for t in tags]
            links = [p.trial_link for p in job]
            # what TrainJob()(...) gets: the group's configs, tags, threads and trial links
            sub = Submission(([p.cfg for p in job], tags, backend.threads,
                              links if any(links) else None, [p.owner for p in job]))  # fmt: skip
            for p in job:
                p.sub = sub
            subs.append(sub)
        backend.submit(subs)
        for job, by_sweeper in zip(jobs, ours, strict=True):
            if by_sweeper and self.tracker is not None:
                fused = {"fused_group": str(len(job))} if len(job) > 1 else {}
                self.tracker.watch(
                    [p.run.id for p in job],  # type: ignore[union-attr]
                    [{**self._tags(p), **fused} for p in job],
                )
            for p in job:
                self.running.append(p)  # from here on a signal cancels it too
                p.started, p.status = time.monotonic(), "running"
                assert p.run is not None
                self.store.set_job_id(self.sweep.id, p.run.id, str(p.job_id))

    def _tags(self, p: Point) -> dict[str, str]:
        """A point's MLflow tags: the sweep's, its point, its configuration's name within
        the sweep (the point without its seed and the keys that do not change its run: what
        the parent's summary calls it)."""
        from sweeper.tracking.describe import point_tags

        return {**self.base_tags, **point_tags(p.label, p.identity), **p.mlflow_tags}

    def _outcome(self, p: Point, backend: Backend) -> None:
        """A job is over when its process is gone; its outcome is its run's row. Every
        write here holds the point's token: a run another job took over is followed. A
        store that cannot take the write (its disk full) leaves the run as it is, said
        once: the next command finds its job dead and resumes it."""
        try:
            self._read_outcome(p, backend)
        except OSError as e:
            if not disk_full(e):
                raise
            p.status, p.why = "interrupted", disk_full_line(e)
            self.out(f"point [{p.label}]: its outcome could not be recorded ({p.why}); the "
                     "same command resumes it once there is space")  # fmt: skip
            with contextlib.suppress(Exception):  # reading may still work
                p.run = self.store.get_run_by_id(p.run.id) or p.run  # type: ignore[union-attr]

    def _read_outcome(self, p: Point, backend: Backend) -> None:
        assert p.run is not None and p.sub is not None and p.owner is not None
        run = self.store.get_run_by_id(p.run.id)
        assert run is not None
        if (run.owner or 0) != p.owner:  # taken over (its job was declared dead, and was not)
            p.run, p.status, p.followed = run, "following", True
            self.following.append(p)
            return
        if run.status in OUTCOMES:
            p.status = run.status.value
        elif run.status == RunStatus.interrupted:  # it recorded its own stop
            p.status = "interrupted"
        elif backend.ended_without_result(p.sub):  # vanished: a signal, a lost node
            why = f"its job {p.job_id} ended without recording an outcome (killed or lost)"
            self.store.mark_killed([(run.id, p.owner)], why, self._error(p.sub, backend))
            run = self.store.get_run_by_id(run.id)
            assert run is not None
            p.status = "interrupted" if run.status == RunStatus.interrupted else run.status.value
            self._ended_here(run.id)
        elif (said := _returned(p.sub, run.id)) is not None:
            # the job ended normally but could not record this run's stop (a full disk,
            # the store away): what it said, recorded here
            self.store.mark_cancelled([(run.id, p.owner)], said)
            p.status, p.why = "interrupted", said
            self._ended_here(run.id)
        else:  # it raised before it could record anything (e.g. while loading the data)
            error = self._error(p.sub, backend)
            last = (error or "").strip().splitlines()[-1:] or [""]
            try:
                if last[0].startswith("KeyboardInterrupt"):
                    # cancelled (Ctrl-C, a cancelled sweep) before it could record that
                    # itself, e.g. a second SIGINT while it was writing its row: a stop
                    self.store.mark_cancelled([(run.id, p.owner)],
                                              f"{last[0]} before it could record it")  # fmt: skip
                    if run.status == RunStatus.queued:
                        self.store.finish_run(run.id, RunStatus.interrupted, owner=p.owner,
                                              error=f"interrupted: {last[0]} before it "
                                              "started")  # fmt: skip
                    p.status = "interrupted"
                else:
                    self.store.finish_run(run.id, RunStatus.failed, owner=p.owner, error=error)
                    p.status = "failed"
            except LostRun:
                p.run, p.status, p.followed = run, "following", True
                self.following.append(p)
                return
            self._ended_here(run.id)
        p.run = self.store.get_run_by_id(run.id)

    def _ended_here(self, run_id: int) -> None:
        """The sweeper recorded this run's outcome for its job: its MLflow run is closed."""
        if self.tracker is not None:
            self.tracker.ended([run_id])

    @staticmethod
    def _error(sub: Submission, backend: Backend) -> str:
        """Why a job ended without an outcome, asked once per job (the members of a fused
        job share it)."""
        if sub.error is None:
            sub.error = backend.error(sub)
        return sub.error

    def _cancel(self, backend: Backend) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one: finish cleaning up
        backend.cancel(self._subs())
        # a job SIGKILLed by submitit's controller before it could record: say it here, so a
        # rerun resumes it at once instead of waiting for its lease to run out
        held = [(p.run.id, p.owner) for p in self.running if p.run and p.owner is not None]
        self.store.mark_cancelled(held, "its sweep was interrupted")
        if self.tracker is not None:
            self.tracker.ended([rid for rid, _ in held])
        self.close(failed=True, outcome="interrupted")

    def close(self, failed: bool, outcome: str | None = None) -> None:
        """The sweep's end (its time and outcome: finished, failed or interrupted), its
        sweeper's heartbeat stopped, and its MLflow parent run's status."""
        self.closed = True
        self._beat.stop()
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        try:
            self.store.set_sweep_fields(self.sweep.id, ended_at=now,
                                        outcome=outcome or ("failed" if failed else "finished"))  # fmt: skip
        except (StoreFull, StoreUnavailable) as e:  # the next command records it abandoned
            self.out(f"the sweep's end could not be recorded ({e})")
        if self.tracker is not None:
            self.tracker.close(failed)
            self.tracker = None
