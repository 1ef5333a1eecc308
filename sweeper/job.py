"""One job: claim the run in the store, train it (resuming), record it, mirror it.

:func:`run_job` is what the CLI calls for a single run and what a launcher ships to a
worker process (:class:`TrainJob`); it takes the typed :class:`~sweeper.schema.Config`,
never a DictConfig. The store is the source of truth; MLflow is a best-effort mirror fed
from a thread of its own; a search trial's metric goes to its Optuna study.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sweeper import provenance
from sweeper.describe import STATUS_FOR_MLFLOW, outcome_tags
from sweeper.identity import grid_columns, identity_of, preflight, resolved_config, run_dir_of
from sweeper.schema import Config
from sweeper.store import (
    HEARTBEAT_S,
    RunRecord,
    RunStatus,
    Store,
    default_tracking_uri,
    default_url,
)
from trainers.records import EpochMetrics, LayerFilterStats, TrainResult

if TYPE_CHECKING:
    from sweeper.search import TrialLink, TrialReporter
    from sweeper.tracking import BackgroundMirror
    from trainers.train import Trainer

log = logging.getLogger("gradsweep")
REQUEUED = "requeued (time-out or pre-emption)"


@dataclass
class JobOutcome:
    config_hash: str
    status: str  # done | diverged | pruned | failed | skipped (already done)
    run_id: int
    test_acc: float | None = None


def store_url(cfg: Config) -> str:
    return cfg.store.url or default_url(cfg.results_dir)


def tracking_uri(cfg: Config) -> str:
    return cfg.mlflow.tracking_uri or default_tracking_uri(cfg.results_dir)


def open_store(cfg: Config) -> Store:
    """The run's results store, created when missing (StoreError, one line, if unusable)."""
    return Store(store_url(cfg))


class Heartbeat:
    """A daemon thread writing ``runs.heartbeat_at`` every ``every`` seconds while a run
    trains, so a killed job is detectable (:mod:`sweeper.store.lease`). Epochs write it too;
    this covers long epochs. A failing write warns once and keeps trying. A fused job beats
    for each of its members still training (``run_ids``; :meth:`drop` one that ended)."""

    def __init__(self, store: Store, run_id: int | list[int], every: float = HEARTBEAT_S) -> None:
        self.store, self.every = store, every
        self.run_ids = list(run_id) if isinstance(run_id, list) else [run_id]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gradsweep-heartbeat", daemon=True)
        self._warned = False

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            for rid in list(self.run_ids):
                try:
                    self.store.heartbeat(rid)
                except Exception as e:  # a busy or briefly unreachable store: try again later
                    if not self._warned:
                        log.warning(f"heartbeat of run {rid} failed ({type(e).__name__}); retrying")
                        self._warned = True

    def drop(self, run_id: int) -> None:
        if run_id in self.run_ids:
            self.run_ids.remove(run_id)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class StoreSink:
    """Trainer -> results store (source of truth), MLflow mirror (best effort) and, for a
    search trial, the Optuna study (its intermediate values and pruning decisions)."""

    def __init__(
        self,
        store: Store,
        run: RunRecord,
        run_dir: Path,
        mirror: BackgroundMirror | None,
        reporter: TrialReporter | None = None,
        gpus: int = 0,
        sources: dict[str, str] | None = None,
    ) -> None:
        self.store, self.run, self.run_dir = store, run, run_dir
        self.mirror, self.reporter = mirror, reporter
        self.gpus = gpus  # for the run's GPU-hours
        # custom method pieces' source fingerprints (trainers.custom), kept with the versions
        self.sources = sources or {}

    def should_stop(self, m: EpochMetrics) -> bool:
        return self.reporter.report(m) if self.reporter is not None else False

    def on_start(self, resume_epoch: int, device: str, precision: str) -> None:
        self.store.start_run(
            self.run.id,
            {
                "host": provenance.host(),
                "device": device,
                "precision": precision,
                "versions": {**provenance.versions(), **self.sources},
                "git_sha": provenance.git_sha(),
                "gpus": self.gpus,
                "run_dir": str(self.run_dir),
            },
            resume_epoch,
        )

    def on_epoch(
        self, m: EpochMetrics, stats: list[LayerFilterStats], filter_file: Path | None
    ) -> None:
        self.store.record_epoch(self.run.id, m, stats)
        if self.mirror is not None:
            metrics = {
                k: v for k, v in asdict(m).items() if k not in ("epoch", "step") and v is not None
            }
            self.mirror.log_metrics(metrics, step=m.epoch)
            if filter_file is not None:
                self.mirror.log_artifact(filter_file, "filter_norms")


def run_job(
    cfg: Config, mlflow_tags: dict[str, str] | None = None, trial: TrialLink | None = None
) -> JobOutcome:
    """Train one configuration to completion (or resume it); record everything.

    ``mlflow_tags`` are added to the MLflow run (a sweep passes its id and parent run).
    ``trial``: the Optuna trial this run serves; each epoch's metric is reported to it and
    its pruner may stop the run early (status ``pruned``).
    """
    from trainers.train import Trainer

    preflight(cfg)
    ident, chash = identity_of(cfg)
    trainer = Trainer(cfg, run_dir_of(cfg, chash), log=log.info, config_hash=chash)
    trainer.setup()  # data/model errors (e.g. batch larger than the data) before any row
    store = open_store(cfg)
    try:
        if not trainer.dist.is_main:  # data-parallel worker: trains, records nothing
            row = store.get_run(chash)
            if row is not None and row.status == RunStatus.done:
                return JobOutcome(chash, "skipped", row.id, row.test_acc)
            result = trainer.fit()
            return JobOutcome(chash, result.status, row.id if row else -1)
        run = store.claim_run(chash, grid_columns(cfg), resolved_config(cfg, ident))
        if run.status == RunStatus.done:
            log.info(
                f"run {run.id} ({chash[:12]}) is already done "
                f"(test_acc {run.test_acc:.2f}%); not training it again"
            )
            return JobOutcome(chash, "skipped", run.id, run.test_acc)
        reporter = None
        if trial is not None:
            from sweeper.search import TrialReporter

            reporter = TrialReporter(trial, warn=log.warning)
        return _train(cfg, store, run, trainer, ident, mlflow_tags or {}, reporter)
    finally:
        store.dispose()


def _start_mirror(cfg: Config, store: Store, run: RunRecord, run_dir: Path, device_type: str,
                  tags: dict[str, str]) -> BackgroundMirror | None:  # fmt: skip
    """The run's MLflow run, opened (or resumed) from a thread of the job's own."""
    if not cfg.mlflow.enabled:
        return None
    from sweeper.tracking import BackgroundMirror, MlflowMirror

    def started(rid: str) -> None:
        if rid != run.mlflow_run_id:
            store.set_fields(run.id, mlflow_run_id=rid)

    mirror = BackgroundMirror(
        MlflowMirror(tracking_uri(cfg), cfg.mlflow.experiment,
                     Path(cfg.results_dir) / "mlartifacts", warn=log.warning),
        on_started=started,
    )  # fmt: skip
    mirror.open_run(run, run_dir, tags, cfg.mlflow.system_metrics_on(device_type))
    return mirror


def _train(
    cfg: Config,
    store: Store,
    run: RunRecord,
    trainer: Trainer,
    ident: dict,
    mlflow_tags: dict[str, str],
    reporter: TrialReporter | None = None,
) -> JobOutcome:
    mirror = _start_mirror(cfg, store, run, trainer.run_dir, trainer.device.type, mlflow_tags)
    if mirror is not None and not mirror.wait_started():
        log.warning("warning: MLflow has not answered in 120 s; training goes on, mirroring later")
    gpus = trainer.dist.world if trainer.device.type == "cuda" else 0
    from trainers.custom import fingerprints

    sources = fingerprints(cfg.method.spec)
    trainer.sink = StoreSink(store, run, trainer.run_dir, mirror, reporter, gpus, sources)
    log.info(
        f"run {run.id} ({run.config_hash[:12]}): {cfg.model.effective_name} / {cfg.method.spec.name}"
        + (f" alpha={cfg.alpha:g}" if cfg.uses_pgt() else "")
        + f" / {cfg.data.effective_name} / batch {cfg.batch_size} / lr {cfg.resolved_lr():.4g}"
        + f" / {cfg.epochs} epochs / seed {cfg.seed}"
    )
    try:
        with Heartbeat(store, run.id):
            result = trainer.fit()
    except SystemExit:
        # submitit's time-out / pre-emption handler requeues the job, then exits: the run
        # is not over, it resumes from its checkpoint when the requeued job starts (a
        # deliberate stop, so not counted as a kill)
        store.mark_cancelled([run.id], REQUEUED)
        if mirror is not None:
            mirror.set_tags(outcome_tags("interrupted", error=REQUEUED))
            mirror.end("KILLED")
        raise
    except BaseException as e:
        err = traceback.format_exc()
        status = RunStatus.failed
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or its sweep was cancelled
            status = RunStatus.interrupted  # not an outcome: a rerun resumes it
            err = (
                "interrupted (Ctrl-C or a cancelled sweep); a rerun resumes it from its last checkpoint\n"
                + err
            )
        store.finish_run(run.id, status, error=err)
        if mirror is not None:
            mirror.set_tags(outcome_tags(status.value, error=err))
            mirror.end(STATUS_FOR_MLFLOW[status.value])
        raise
    return _record(cfg, store, run, trainer.run_dir, result, mirror, gpus)


def _record(
    cfg: Config,
    store: Store,
    run: RunRecord,
    run_dir: Path,
    result: TrainResult,
    mirror: BackgroundMirror | None,
    gpus: int,
) -> JobOutcome:
    """The run's outcome: final metrics, feature norms, cost; the MLflow run closed."""
    final = result.final
    fields: dict = {"device": result.device, "precision": result.precision}
    if final is not None:
        fields.update(
            train_acc=final.train_acc,
            test_acc=final.test_acc,
            test_top5=final.test_top5,
            test_loss=final.test_loss,
            logit_norm=final.logit_norm,
        )
    if result.feature_norms:
        fields.update(n_features=len(result.feature_norms), zero_features=result.zero_features)
        fpath = run_dir / "feature_norms.json"
        tmp = fpath.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.feature_norms))
        os.replace(tmp, fpath)
        if mirror is not None:
            mirror.log_artifact(fpath)
    if result.status == "diverged":
        fields["diverged_step"] = result.diverged_step
    mirrored = False
    if mirror is not None:
        secs = sum(h.epoch_time for h in result.history)  # as the store's train_seconds
        mirror.log_metrics({"train_seconds": secs, "gpu_hours": secs * gpus / 3600}, step=0)
        mirror.set_tags(outcome_tags(result.status, diverged_step=result.diverged_step,
                                     epoch=len(result.history), epochs=cfg.epochs))  # fmt: skip
        mirrored = mirror.end(STATUS_FOR_MLFLOW[result.status])
        if mirror.run_id is not None:
            fields["mlflow_run_id"] = mirror.run_id
    fields["mlflow_mirrored"] = mirrored
    store.finish_run(run.id, RunStatus(result.status), **fields)
    if final is not None:
        log.info(
            f"run {run.id} {result.status}: train {final.train_acc:.2f}%  "
            f"test {final.test_acc:.2f}%  loss {final.test_loss:.4f}  "
            f"|z| {final.logit_norm:.3f}"
        )
    return JobOutcome(run.config_hash, result.status, run.id, final.test_acc if final else None)


def run_group(cfgs: list[Config], mlflow_tags: list[dict[str, str]],
              trials: list[TrialLink | None] | None = None) -> list[JobOutcome]:  # fmt: skip
    """Train a fused group (:mod:`sweeper.fuse` chose it; :mod:`trainers.fused` trains it):
    each member is claimed, recorded and mirrored exactly as :func:`run_job` does for one
    run -- its own row, epochs, checkpoint, MLflow run and outcome, recorded as soon as it
    ends. Members already ``done`` are skipped; the others resume from their checkpoints."""
    from trainers.fused import FusedTrainer
    from trainers.train import Trainer

    links = trials or [None] * len(cfgs)
    members = []
    for cfg in cfgs:
        preflight(cfg)
        ident, chash = identity_of(cfg)
        trainer = Trainer(cfg, run_dir_of(cfg, chash), log=log.info, config_hash=chash)
        members.append((cfg, ident, trainer))
    store = open_store(cfgs[0])
    outcomes: list[JobOutcome] = []
    try:
        todo = []
        for (cfg, ident, trainer), tags, link in zip(members, mlflow_tags, links, strict=True):
            run = store.claim_run(
                trainer.config_hash, grid_columns(cfg), resolved_config(cfg, ident)
            )
            if run.status == RunStatus.done:
                log.info(
                    f"run {run.id} ({run.config_hash[:12]}) is already done; not training it again"
                )
                outcomes.append(JobOutcome(run.config_hash, "skipped", run.id, run.test_acc))
                continue
            trainer.log = lambda s, r=run.id: log.info(f"[run {r}] {s}")  # type: ignore[misc]
            todo.append((cfg, ident, trainer, run, tags, link))
        if not todo:
            return outcomes
        fused = FusedTrainer([t[2] for t in todo], log=log.info)
        fused.setup()  # data/model errors before any row changes
        mode = "stacked" if fused.stacked else "interleaved"
        log.info(f"fused group of {len(todo)} runs ({mode}): "
                 + ", ".join(str(t[3].id) for t in todo))  # fmt: skip
        # in a sweep the sweeper mirrors the members (sweeper.mirror.SweepMirror): MLflow's
        # import and a run's set-up each would otherwise delay this job's first step
        mirrors = [None if tags.get("gradsweep.mirror") == "sweeper" else
                   _start_mirror(cfg, store, run, trainer.run_dir, trainer.device.type,
                                 {**tags, "fused_group": str(len(todo))})
                   for cfg, _, trainer, run, tags, _ in todo]  # fmt: skip
        cfg0, dev = todo[0][0], todo[0][2].device.type
        monitors = None  # the sweeper opens its members' MLflow runs: watch for their ids
        if (cfg0.mlflow.enabled and cfg0.mlflow.system_metrics_on(dev)
                and any(m is None for m in mirrors)):  # fmt: skip
            from sweeper.tracking import GroupSystemMetrics

            monitors = GroupSystemMetrics(tracking_uri(cfg0), store_url(cfg0),
                                          [t[3].id for t in todo], log.warning)  # fmt: skip
        for m in mirrors:
            if m is not None and not m.wait_started():
                log.warning("warning: MLflow has not answered in 120 s; training goes on")
        from trainers.custom import fingerprints

        for (cfg, _, trainer, run, _, link), mirror in zip(todo, mirrors, strict=True):
            gpus = 1 if trainer.device.type == "cuda" else 0
            reporter = None
            if link is not None:
                from sweeper.search import TrialReporter

                reporter = TrialReporter(link, warn=log.warning)
            trainer.sink = StoreSink(store, run, trainer.run_dir, mirror, reporter, gpus,
                                     fingerprints(cfg.method.spec))  # fmt: skip
            log.info(f"  run {run.id} ({run.config_hash[:12]}): {cfg.method.spec.name}"
                     + (f" alpha={cfg.alpha:g}" if cfg.uses_pgt() else "")
                     + f" / lr {cfg.resolved_lr():.4g} / seed {cfg.seed}")  # fmt: skip
        ended: set[int] = set()
        with Heartbeat(store, [t[3].id for t in todo]) as beat:

            def on_end(i: int, result: TrainResult) -> None:
                cfg, _, trainer, run, _, _ = todo[i]
                gpus = 1 if trainer.device.type == "cuda" else 0
                outcomes.append(_record(cfg, store, run, trainer.run_dir, result, mirrors[i], gpus))
                ended.add(i)
                beat.drop(run.id)

            try:
                fused.fit(on_end=on_end)
            except BaseException as e:
                left = [i for i in range(len(todo)) if i not in ended]
                err = traceback.format_exc()
                if isinstance(e, SystemExit):  # requeued (time-out, pre-emption): resumes
                    store.mark_cancelled([todo[i][3].id for i in left], REQUEUED)
                    err = REQUEUED
                    status = RunStatus.interrupted
                elif isinstance(e, KeyboardInterrupt):
                    status = RunStatus.interrupted
                    err = ("interrupted (Ctrl-C or a cancelled sweep); a rerun resumes it from "
                           "its last checkpoint\n" + err)  # fmt: skip
                else:
                    status = RunStatus.failed
                for i in left:
                    if not isinstance(e, SystemExit):
                        store.finish_run(todo[i][3].id, status, error=err)
                    if mirrors[i] is not None:
                        mirrors[i].set_tags(outcome_tags(status.value, error=err))  # type: ignore[union-attr]
                        mirrors[i].end(STATUS_FOR_MLFLOW[status.value])  # type: ignore[union-attr]
                raise
            finally:
                if monitors is not None:
                    monitors.stop()
        return outcomes
    finally:
        store.dispose()


class TrainJob:
    """What a worker process runs (pickled by submitit). On Slurm pre-emption or time-out
    submitit requeues the same call (:meth:`checkpoint`), and :func:`run_job` resumes from
    the run's checkpoint."""

    def __call__(
        self,
        cfg: Config | list[Config],
        mlflow_tags: dict[str, str] | list[dict[str, str]],
        threads: int | None,
        trial: TrialLink | None | list[TrialLink | None] = None,
    ) -> JobOutcome | list[JobOutcome]:
        import submitit

        if threading.current_thread() is threading.main_thread():
            # cancelling a local job sends SIGINT; a sweeper started with nohup or in the
            # background of a script hands its children SIGINT *ignored*, so restore Python's
            # handler: the job then stops and records its run ``interrupted``
            signal.signal(signal.SIGINT, signal.default_int_handler)
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # a multi-GPU job: one task per GPU; RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for
            # torch.distributed. Every task sees all the node's GPUs and takes cuda:LOCAL_RANK.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if threads:
            import torch

            torch.set_num_threads(threads)  # share the CPU cores between parallel jobs
        logging.basicConfig(
            level=logging.INFO,
            format="[%(asctime)s] %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stdout,
            force=True,
        )
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if isinstance(cfg, list):  # a fused group (sweeper.fuse)
            return run_group(cfg, mlflow_tags, trial)  # type: ignore[arg-type]
        return run_job(cfg, mlflow_tags, trial)  # type: ignore[arg-type]

    def checkpoint(self, *args: object, **kwargs: object) -> object:
        """submitit's requeue hook (time-out / pre-emption): the same call again."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
