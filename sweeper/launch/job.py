"""One job: claim its runs in the store, train them (resuming), record each outcome.

A job trains a *group* of runs -- one (a single run, an unfused sweep point) or several that
a sweep fused (:mod:`sweeper.launch.fuse`, trained together by :mod:`trainers.fused`) -- and
every job goes through :func:`run_group`: the claim, the already-done skip, the set-up before
any row changes, the trial reporter, the log lines, the heartbeat, the record of each run as
soon as it ends, and what an interruption, a requeue or a crash leaves in the store. The
store is the source of truth; each run's MLflow record follows it from a thread
(:class:`~sweeper.tracking.job.JobTracker`), or from the sweeper's thread when the sweeper
tags the job so (fused members, CPU jobs: :func:`sweeper.launch.dispatch.tracks_itself`).

:func:`run_job` (one run) is what the CLI calls; :class:`TrainJob` is what a launcher ships
to a worker process. Both take typed :class:`~sweeper.config.schema.Config` objects, never a
DictConfig.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper import provenance
from sweeper.config.identity import (
    grid_columns,
    identity_of,
    preflight,
    resolved_config,
    run_dir_of,
)
from sweeper.config.schema import Config
from sweeper.errors import disk_full, disk_full_line
from sweeper.store import (
    HEARTBEAT_S,
    LostRun,
    RunRecord,
    RunStatus,
    Store,
    StoreFull,
    StoreUnavailable,
)
from trainers.files import naming
from trainers.records import EpochMetrics, LayerFilterStats, TrainResult

if TYPE_CHECKING:
    from sweeper.launch.trials import TrialLink, TrialReporter
    from sweeper.tracking.job import JobTracker
    from trainers.train import Trainer

log = logging.getLogger("gradsweep")
REQUEUED = "requeued (time-out or pre-emption)"
PAUSE_S = 2.0  # a heartbeat tick this late means the process was stopped, not slow
INTERRUPTED = (
    "interrupted (Ctrl-C, SIGTERM or a cancelled sweep); a rerun resumes it from its last "
    "checkpoint"
)
# a job's MLflow tag saying the sweeper tracks its runs (sweeper.tracking.sweep.SweepTracker)
TRACKED_BY_SWEEPER = "gradsweep.mirror"


@dataclass
class JobOutcome:
    config_hash: str
    # done | diverged | pruned | failed | interrupted | skipped (already done) | lost (taken
    # over by another job while this one was paused)
    status: str
    run_id: int
    test_acc: float | None = None
    why: str | None = None  # an interrupted run's reason (a full disk, the store away)


class Heartbeat:
    """A daemon thread that keeps a job's runs alive in the store and notices two things.

    Every ``every`` seconds it writes each run's ``heartbeat_at`` (epochs write it too; this
    covers long epochs), conditional on the job still owning the run: a run taken over while
    this job was paused is marked lost, and the job stops at its next write. It also ticks
    every second and counts the time the process was stopped (``SIGSTOP``, a suspended
    Slurm job): a tick that comes more than :data:`PAUSE_S` late is a pause, and ``paused``
    grows by it (an epoch's recorded time leaves it out). A failing write warns once and
    keeps trying."""

    def __init__(
        self, store: Store, runs: list[tuple[int, int]], every: float = HEARTBEAT_S
    ) -> None:
        self.store, self.every = store, every
        self.runs = dict(runs)  # run id -> its token
        self.lost: set[int] = set()
        self.paused = 0.0  # seconds this process was stopped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gradsweep-heartbeat", daemon=True)
        self._warned = False

    def _loop(self) -> None:
        tick = min(1.0, self.every)
        next_beat = time.monotonic() + self.every
        while True:
            # only the wait is timed: a slow store call below is not a pause
            before = time.monotonic()
            if self._stop.wait(tick):
                return
            now = time.monotonic()
            if now - before > tick + PAUSE_S:
                self.paused += now - before - tick
            if now < next_beat:
                continue
            next_beat = now + self.every
            for rid, owner in list(self.runs.items()):
                try:
                    with self.store.patience(0):  # never block the pause clock
                        if not self.store.heartbeat(rid, owner):
                            self.lost.add(rid)
                except Exception as e:  # a busy or briefly unreachable store: try again later
                    if not self._warned:
                        log.warning(f"heartbeat of run {rid} failed ({type(e).__name__}); retrying")
                        self._warned = True

    def drop(self, run_id: int) -> None:
        self.runs.pop(run_id, None)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class StoreSink:
    """Trainer -> results store (source of truth), then its MLflow record (a sync queued in
    the tracker's thread) and, for a search trial, the Optuna study (its intermediate values
    and pruning decisions). Every write holds the run's token: a run this job lost raises
    :class:`~sweeper.store.LostRun` before anything of it is written.

    **Write-behind.** A store that stops answering (a server restart) does not stop the
    training: an epoch's rows that cannot be written are kept, in order, and written first
    thing when the store answers again; meanwhile the checkpoint is not advanced (a job
    killed then resumes from the last epoch whose rows are in the store, so no row is ever
    missing). A store away for longer than ``store.retry_s`` ends the job
    (:class:`~sweeper.store.StoreUnavailable`): its run is left ``interrupted``, resumable."""

    def __init__(self, store: Store, run: RunRecord, owner: int, run_dir: Path,
                 tracker: JobTracker | None, reporter: TrialReporter | None, gpus: int,
                 sources: dict[str, str]) -> None:  # fmt: skip
        self.store, self.run, self.owner, self.run_dir = store, run, owner, run_dir
        self.tracker, self.reporter = tracker, reporter
        self.gpus = gpus  # for the run's GPU-hours
        self.sources = sources  # custom method pieces' source fingerprints (trainers.custom)
        self.beat: Heartbeat | None = None  # set when the group's heartbeat starts
        self.pending: list[tuple[EpochMetrics, list[LayerFilterStats]]] = []
        self.down_since: float | None = None  # when the store stopped answering

    def should_stop(self, m: EpochMetrics) -> bool:
        return self.reporter.report(m) if self.reporter is not None else False

    def _owned(self) -> bool | None:
        """Whether this job still owns the run (None: the store does not answer now)."""
        if self.beat is not None and self.run.id in self.beat.lost:
            return False
        try:
            with self.store.patience(0):
                return self.store.owns(self.run.id, self.owner)
        except StoreUnavailable:
            return None

    def hold(self) -> None:
        """Before writing a file of the run (its filter norms): this job still owns it
        (LostRun otherwise; while the store does not answer, the rows' writes check)."""
        if not self.pending and self._owned() is False:
            raise LostRun(self.run.id)

    def may_replace(self) -> bool:
        """Before the checkpoint replaces the last one: only once the epoch's rows are in
        the store (False: the last checkpoint stays), and only while this job owns the run
        (LostRun otherwise)."""
        if self.pending:
            return False
        owned = self._owned()
        if owned is False:
            raise LostRun(self.run.id)
        return owned is True

    def paused(self) -> float:
        return self.beat.paused if self.beat is not None else 0.0

    def on_start(self, resume_epoch: int, device: str, precision: str) -> None:
        self.store.start_run(
            self.run.id,
            self.owner,
            {
                "host": provenance.host(),
                "pid": os.getpid(),
                "device": device,
                "precision": precision,
                "versions": {**provenance.versions(), **self.sources},
                "git_sha": provenance.git_sha(),
                "gpus": self.gpus,
                "run_dir": str(self.run_dir),
            },
            resume_epoch,
        )

    def on_epoch(self, m: EpochMetrics, stats: list[LayerFilterStats], _file: Path | None) -> None:
        self.pending.append((m, stats))
        self.flush(wait=False)
        if self.tracker is not None and not self.pending:
            self.tracker.sync()

    def flush(self, wait: bool) -> None:
        """Write the kept epoch rows, oldest first. ``wait``: for as long as ``store.retry_s``
        allows (the run's end); else one try, and training goes on (StoreUnavailable once
        the store has been away for longer than ``store.retry_s``)."""
        while self.pending:
            m, stats = self.pending[0]
            try:
                with self.store.patience(self.store.retry_s if wait else 0):
                    self.store.record_epoch(self.run.id, self.owner, m, stats)
            except StoreUnavailable as e:
                now = time.monotonic()
                if self.down_since is None:
                    self.down_since = now
                    log.warning(f"run {self.run.id}: the results store is not answering "
                                f"({e}); training goes on, its epoch rows are kept and "
                                "written in order when it answers (the checkpoint waits "
                                "for them)")  # fmt: skip
                if wait or now - self.down_since > self.store.retry_s:
                    raise StoreUnavailable(
                        f"the results store did not answer for "
                        f"{now - self.down_since:.0f} s (store.retry_s="
                        f"{self.store.retry_s:g}); {len(self.pending)} epoch row(s) of run "
                        f"{self.run.id} not written"
                    ) from None
                return
            self.pending.pop(0)
        if self.down_since is not None:
            log.info(f"run {self.run.id}: the results store answers again; its kept epoch "
                     "rows are written")  # fmt: skip
            self.down_since = None


@dataclass
class Member:
    """One run of a job: its config, identity, trainer (once torch is needed), row and
    MLflow side."""

    cfg: Config
    ident: dict[str, Any]
    chash: str
    tags: dict[str, str]
    trial: TrialLink | None
    owner: int | None = None  # the run's token for this job (sweeper.store.lease)
    trainer: Trainer | None = None
    run: RunRecord | None = None
    tracker: JobTracker | None = None


def run_job(cfg: Config, mlflow_tags: dict[str, str] | None = None,
            trial: TrialLink | None = None) -> JobOutcome:  # fmt: skip
    """Train one configuration to completion (or resume it); record everything. A group of
    one (:func:`run_group`). ``mlflow_tags`` are added to its MLflow run (a sweep passes its
    id and parent run); ``trial``: the Optuna trial it serves (each epoch's metric is
    reported; the pruner may stop it, status ``pruned``)."""
    return run_group([cfg], [mlflow_tags or {}], [trial])[0]


def run_group(cfgs: list[Config], mlflow_tags: list[dict[str, str]],
              trials: list[TrialLink | None] | None = None,
              owners: list[int] | None = None) -> list[JobOutcome]:  # fmt: skip
    """Train a group of runs; each is claimed, recorded and tracked on its own -- its row,
    epochs, checkpoint, MLflow run and outcome, recorded as soon as it ends. Runs already
    ``done`` are skipped (before torch is imported); the others resume from their
    checkpoints. Data and model errors are raised before any row changes.

    ``owners``: the tokens a sweeper claimed the runs with (one per run); without them
    (a single run from the command line) the job claims each run itself, and a run another
    live job or sweep holds is followed to its end instead of being trained twice."""
    links = trials or [None] * len(cfgs)
    members = []
    for i, (cfg, tags, link) in enumerate(zip(cfgs, mlflow_tags, links, strict=True)):
        preflight(cfg)
        ident, chash = identity_of(cfg)
        members.append(Member(cfg, ident, chash, tags, link, owners[i] if owners else None))
    cfgs[0].make_results_dir()
    # a job waits out a store that is restarting (its sweeper has opened it already)
    store = cfgs[0].open_store(wait_open=True, warn=log.warning)
    try:
        outcomes = _skip_done(store, members)
        todo = [m for m in members if m.run is None or m.run.status != RunStatus.done]
        if not todo:
            return outcomes
        _setup(todo)  # imports torch; data/model errors before any row changes
        first = todo[0].trainer
        assert first is not None
        if not first.dist.is_main:  # a data-parallel worker: trains, records nothing
            result = first.fit()
            return [JobOutcome(todo[0].chash, result.status, -1)]
        mine = []
        for m in todo:
            m.run = store.claim_run(m.chash, grid_columns(m.cfg), resolved_config(m.cfg, m.ident))
            if m.owner is None:  # a single run: this job claims it
                m.owner = _claim_single(store, m.run)
            if m.owner is None:
                outcomes.append(_follow(store, m.run))
            else:
                mine.append(m)
        if mine:
            got = _train(store, mine)
            if owners is None:  # a single run lost to another job: followed to its end
                for i, o in enumerate(got):
                    if o.status == "lost" and (run := store.get_run_by_id(o.run_id)):
                        got[i] = _follow(store, run, taken=True)
            outcomes += got
        return outcomes
    finally:
        store.dispose()


def _claim_single(store: Store, run: RunRecord) -> int | None:
    """A single run's claim: a run whose job is gone (its process dead here, or its
    lease lapsed and its backend does not list it) is recorded killed first, then taken."""
    if run.status == RunStatus.running and not store.job_alive(run):
        from sweeper.launch.dispatch import job_alive_elsewhere

        store.expire_leases(alive=job_alive_elsewhere(store))
    return store.claim(run.id, None)


def _follow(store: Store, run: RunRecord, every: float = 2.0, taken: bool = False) -> JobOutcome:
    """A run another live job trains (or a live sweep has claimed): followed until it ends,
    never trained twice; its outcome is this job's report of it. ``taken``: this job
    trained it until another took it over."""
    if run.status == RunStatus.done and not taken:
        return _skipped(run)
    where = f" (pid {run.pid} on {run.host})" if run.pid and run.host else ""
    if not taken:
        log.info(f"run {run.id} ({run.config_hash[:12]}) is being trained by another job"
                 f"{where}; following it to its end instead of training it twice")  # fmt: skip
    while True:
        cur = store.get_run_by_id(run.id)
        assert cur is not None
        if cur.status in (RunStatus.done, RunStatus.failed, RunStatus.diverged, RunStatus.pruned):
            log.info(f"run {cur.id} ended {cur.status} (trained by another job)")
            return JobOutcome(cur.config_hash, cur.status.value, cur.id, cur.test_acc)
        if cur.status == RunStatus.interrupted or (cur.status == RunStatus.running
                                                   and not store.job_alive(cur)):  # fmt: skip
            return JobOutcome(cur.config_hash, "interrupted", cur.id, cur.test_acc)
        time.sleep(every)


def _skipped(run: RunRecord) -> JobOutcome:
    acc = f" (test_acc {run.test_acc:.2f}%)" if run.test_acc is not None else ""
    log.info(f"run {run.id} ({run.config_hash[:12]}) is already done{acc}; not training it again")
    return JobOutcome(run.config_hash, "skipped", run.id, run.test_acc)


def _skip_done(store: Store, members: list[Member]) -> list[JobOutcome]:
    """Runs of the group that are ``done`` already, recognised before torch is imported."""
    out = []
    for m in members:
        run = store.get_run(m.chash)
        if run is not None and run.status == RunStatus.done:
            m.run = run
            out.append(_skipped(run))
    return out


def _setup(members: list[Member]) -> None:
    """Every member's Trainer, built: the group shares one copy of the data set."""
    from trainers.fused import reseeded
    from trainers.train import Trainer

    for m in members:
        m.trainer = Trainer(m.cfg, run_dir_of(m.cfg, m.chash), log=log.info, config_hash=m.chash)
    first = members[0].trainer
    assert first is not None
    first.setup()
    for m in members[1:]:
        assert m.trainer is not None
        m.trainer.setup(data=reseeded(first.data, m.cfg.seed))


def _describe(m: Member) -> str:
    cfg = m.cfg
    assert m.run is not None
    return (f"run {m.run.id} ({m.chash[:12]}): {cfg.model.effective_name} / "
            f"{cfg.method.spec.name}" + (f" alpha={cfg.alpha:g}" if cfg.uses_pgt() else "")
            + f" / {cfg.data.effective_name} / batch {cfg.batch_size} / lr "
            f"{cfg.resolved_lr():.4g} / {cfg.epochs} epochs / seed {cfg.seed}")  # fmt: skip


def _open_tracker(store: Store, m: Member, extra: dict[str, str]) -> JobTracker | None:
    """The run's MLflow side in a thread of the job (None without MLflow, or when the
    sweeper's thread tracks it)."""
    cfg = m.cfg
    if not cfg.mlflow.enabled or m.tags.get(TRACKED_BY_SWEEPER) == "sweeper":
        return None
    from sweeper.tracking.client import MlflowRun
    from sweeper.tracking.job import JobTracker

    assert m.run is not None and m.trainer is not None
    mlrun = MlflowRun(cfg.tracking_uri(), cfg.mlflow.experiment,
                      Path(cfg.results_dir) / "mlartifacts", warn=log.warning)  # fmt: skip
    return JobTracker(mlrun, store, m.run, m.trainer.run_dir, {**m.tags, **extra},
                      cfg.mlflow.system_metrics_on(m.trainer.device.type), m.owner)  # fmt: skip


def _train(store: Store, todo: list[Member]) -> list[JobOutcome]:
    from trainers.custom import fingerprints

    fit, mode = _runner([m.trainer for m in todo])  # type: ignore[misc]
    fused = len(todo) > 1
    if fused:
        ids = ", ".join(str(m.run.id) for m in todo)  # type: ignore[union-attr]
        log.info(f"fused group of {len(todo)} runs ({mode}): {ids}")
    extra = {"fused_group": str(len(todo))} if fused else {}
    for m in todo:
        m.tracker = _open_tracker(store, m, extra)
        if m.trainer is not None:
            m.trainer.log = (
                (lambda s, r=m.run.id: log.info(f"[run {r}] {s}")) if fused else log.info
            )  # type: ignore[union-attr,misc]
    monitors = _group_system_metrics(store, todo)
    for m in todo:
        if m.tracker is not None and not m.tracker.wait_open():
            log.warning("warning: MLflow has not answered in 120 s; training goes on")
    for m in todo:
        assert m.trainer is not None and m.run is not None
        reporter = None
        if m.trial is not None:
            from sweeper.launch.trials import TrialReporter

            reporter = TrialReporter(m.trial, warn=log.warning)
        assert m.owner is not None
        m.trainer.sink = StoreSink(store, m.run, m.owner, m.trainer.run_dir, m.tracker,
                                   reporter, _gpus(m.trainer), fingerprints(m.cfg.method.spec))  # fmt: skip
        log.info(("  " if fused else "") + _describe(m))
    outcomes: list[JobOutcome] = []
    ended: set[int] = set()
    with Heartbeat(store, [(m.run.id, m.owner) for m in todo]) as beat:  # type: ignore[union-attr,misc]
        for m in todo:
            m.trainer.sink.beat = beat  # type: ignore[union-attr]

        def on_end(i: int, result: TrainResult) -> None:
            outcomes.append(_record(store, todo[i], result))
            ended.add(i)
            beat.drop(todo[i].run.id)  # type: ignore[union-attr]

        try:
            fit(on_end)
        except LostRun as e:
            # paused (SIGSTOP, a suspended Slurm job) and declared dead meanwhile: another job
            # owns the run now. Not a word more from this one about it.
            log.warning(f"{e}: it was taken over by another job while this one was paused; "
                        "stopping without writing anything more")  # fmt: skip
            lost = beat.lost | {e.run_id}
            left = [m for i, m in enumerate(todo) if i not in ended]
            for m in left:  # a lost run's MLflow record is its new owner's to keep
                if m.run.id in lost and m.tracker is not None:  # type: ignore[union-attr]
                    m.tracker.abandon()
                    m.tracker = None
            # members still this job's (a fused group) stop with it, resumable
            _stopped(store, left, KeyboardInterrupt("a member of its group was taken over"))
            for m in left:
                what = "lost" if m.run.id in lost else "interrupted"  # type: ignore[union-attr]
                outcomes.append(JobOutcome(m.chash, what, m.run.id))  # type: ignore[union-attr]
        except BaseException as e:
            left = [m for i, m in enumerate(todo) if i not in ended]
            why = resource_stop(e)
            if why is None:
                _stopped(store, left, e)
                raise
            # a full disk or a store away for too long: not the run's fault, and not a
            # crash: one line, the runs interrupted (resumable), the job ends normally
            ids = ", ".join(str(m.run.id) for m in left)  # type: ignore[union-attr]
            log.error(f"error: {why}; stopping run(s) {ids}, interrupted: the same command "
                      "resumes them once that is fixed")  # fmt: skip
            _interrupted(store, left, why)
            outcomes += [JobOutcome(m.chash, "interrupted", m.run.id, why=why)  # type: ignore[union-attr]
                         for m in left]  # fmt: skip
        finally:
            if monitors is not None:
                monitors.stop()
    return outcomes


def resource_stop(e: BaseException) -> str | None:
    """The one line for a stop that is the machine's, not the run's: a full disk (naming
    the file) or the results store away for longer than ``store.retry_s``; None otherwise."""
    if isinstance(e, StoreUnavailable):
        return str(e)
    if isinstance(e, OSError) and disk_full(e):
        return disk_full_line(e)
    return None


def _interrupted(store: Store, left: list[Member], why: str) -> None:
    """Runs stopped by :func:`resource_stop`: ``interrupted`` with the reason, where the
    store takes the write (else the sweeper, or the next command, records it)."""
    for m in left:
        try:
            with store.patience(10.0):
                store.finish_run(m.run.id, RunStatus.interrupted, owner=m.owner,  # type: ignore[union-attr]
                                 error=f"interrupted: {why}; the same command resumes it "
                                 "from its last checkpoint")  # fmt: skip
        except (LostRun, StoreUnavailable, StoreFull):
            pass
        except Exception as e:  # the store's disk is full too, and so on: said, not raised
            log.warning(f"run {m.run.id}: could not record it interrupted ({type(e).__name__})")  # type: ignore[union-attr]
        if m.tracker is not None:
            m.tracker.finish()


def _gpus(trainer: Trainer) -> int:
    """GPUs the run holds (its GPU-hours): its data-parallel processes, each on one GPU."""
    return trainer.dist.world if trainer.device.type == "cuda" else 0


def _group_system_metrics(store: Store, todo: list[Member]) -> Any:
    """MLflow's system metrics on fused members whose MLflow runs the sweeper opens."""
    cfg, trainer = todo[0].cfg, todo[0].trainer
    assert trainer is not None
    if not (cfg.mlflow.enabled and cfg.mlflow.system_metrics_on(trainer.device.type)
            and any(m.tracker is None for m in todo)):  # fmt: skip
        return None
    from sweeper.tracking.client import GroupSystemMetrics

    return GroupSystemMetrics(cfg.tracking_uri(), cfg.store_url(),
                              [m.run.id for m in todo if m.tracker is None],  # type: ignore[union-attr]
                              log.warning)  # fmt: skip


def _runner(trainers: list[Trainer]) -> tuple[Any, str]:
    """``fit(on_end)`` for the group and how it trains: one run alone, several as a fused
    group (:mod:`trainers.fused`: ``stacked`` or ``interleaved``)."""
    if len(trainers) == 1:
        return (lambda on_end: on_end(0, trainers[0].fit())), "alone"
    from trainers.fused import FusedTrainer

    group = FusedTrainer(trainers, log=log.info)
    return (lambda on_end: group.fit(on_end=on_end)), "stacked" if group.stacked else "interleaved"


def _stopped(store: Store, left: list[Member], e: BaseException) -> None:
    """The runs still training when the job stopped: a requeue (time-out, pre-emption) and
    Ctrl-C or a cancelled sweep leave them ``interrupted`` (the same command resumes them),
    anything else ``failed`` with its traceback -- each only while this job still owns it."""
    if isinstance(e, SystemExit):  # submitit requeues the job, then exits: not a kill
        store.mark_cancelled([(m.run.id, m.owner) for m in left], REQUEUED)  # type: ignore[misc,union-attr]
    else:
        status = RunStatus.interrupted if isinstance(e, KeyboardInterrupt) else RunStatus.failed
        err = traceback.format_exc()
        if status == RunStatus.interrupted:
            err = INTERRUPTED + "\n" + err
        for m in left:
            try:
                store.finish_run(m.run.id, status, owner=m.owner, error=err)  # type: ignore[union-attr]
            except LostRun:
                continue  # another job owns it: nothing of this one's is written
    for m in left:
        if m.tracker is not None:
            m.tracker.finish()


def _record(store: Store, m: Member, result: TrainResult) -> JobOutcome:
    """A run's outcome: final metrics, feature norms, its row finished, its MLflow record
    completed."""
    assert m.run is not None and m.trainer is not None
    run, run_dir, final = m.run, m.trainer.run_dir, result.final
    fields: dict[str, Any] = {"device": result.device, "precision": result.precision}
    if final is not None:
        fields.update(train_acc=final.train_acc, test_acc=final.test_acc,
                      test_top5=final.test_top5, test_loss=final.test_loss,
                      logit_norm=final.logit_norm, val_acc=final.val_acc,
                      val_loss=final.val_loss)  # fmt: skip
    if result.feature_norms:
        fields.update(n_features=len(result.feature_norms), zero_features=result.zero_features)
        fpath = run_dir / "feature_norms.json"
        tmp = fpath.with_suffix(".tmp")
        try:
            with naming(fpath):
                tmp.write_text(json.dumps(result.feature_norms))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, fpath)
    if result.status == "diverged":
        fields["diverged_step"] = result.diverged_step
    sink = m.trainer.sink
    if isinstance(sink, StoreSink):  # rows kept while the store was away go first
        sink.flush(wait=True)
    store.finish_run(run.id, RunStatus(result.status), owner=m.owner, **fields)
    if m.tracker is not None:
        m.tracker.finish()
    if final is not None:
        val = "" if final.val_acc is None else f"val {final.val_acc:.2f}%  "
        log.info(f"run {run.id} {result.status}: train {final.train_acc:.2f}%  "
                 f"test {final.test_acc:.2f}%  loss {final.test_loss:.4f}  {val}"
                 f"|z| {final.logit_norm:.3f}")  # fmt: skip
    return JobOutcome(run.config_hash, result.status, run.id, final.test_acc if final else None)


class TrainJob:
    """What a worker process runs (pickled by submitit). On Slurm pre-emption or time-out
    submitit requeues the same call (:meth:`checkpoint`), and the runs resume from their
    checkpoints."""

    def __call__(
        self,
        cfgs: list[Config],
        mlflow_tags: list[dict[str, str]],
        threads: int | None,
        trials: list[TrialLink | None] | None = None,
        owners: list[int] | None = None,
    ) -> list[JobOutcome]:
        import submitit

        if threading.current_thread() is threading.main_thread():
            # cancelling a local job sends SIGINT; a sweeper started with nohup or in the
            # background of a script hands its children SIGINT *ignored*, so restore Python's
            # handler: the job then stops and records its runs ``interrupted``
            signal.signal(signal.SIGINT, signal.default_int_handler)
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # a multi-GPU job: one task per GPU; RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for
            # torch.distributed. Every task sees all the node's GPUs and takes cuda:LOCAL_RANK.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if threads:
            import torch

            torch.set_num_threads(threads)  # share the CPU cores between parallel jobs
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stdout, force=True)  # fmt: skip
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        return run_group(cfgs, mlflow_tags, trials, owners)

    def checkpoint(self, *args: object, **kwargs: object) -> object:
        """submitit's requeue hook (time-out / pre-emption): the same call again."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
