"""One job: validate, claim the run in the store, train (resuming), record, mirror.

:func:`run_job` is what the CLI calls for a single run and what a launcher ships to a
worker process; it takes the typed :class:`~sweeper.schema.Config`, never a DictConfig.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import submitit
from sqlalchemy.exc import SQLAlchemyError

from sweeper import provenance
from sweeper.schema import Config
from sweeper.search import TrialLink, TrialReporter
from sweeper.store import HEARTBEAT_S, Run, RunStatus, Store
from sweeper.tracking import MlflowMirror, run_name
from trainers.config import RunConfig
from trainers.data import check_data
from trainers.registry import ConfigError
from trainers.train import (
    EpochMetrics,
    LayerFilterStats,
    Trainer,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger("gradsweep")

STATUS_FOR_MLFLOW = {
    "done": "FINISHED",
    "diverged": "FAILED",
    "failed": "FAILED",
    "pruned": "KILLED",  # stopped by the search's pruner; the status tag says "pruned"
}


@dataclass
class JobOutcome:
    config_hash: str
    status: str  # done | diverged | pruned | failed | skipped (already done)
    run_id: int
    test_acc: float | None = None


def store_url(cfg: Config) -> str:
    return cfg.store.url or f"sqlite:///{Path(cfg.results_dir).resolve() / 'results.db'}"


def tracking_uri(cfg: Config) -> str:
    return cfg.mlflow.tracking_uri or f"sqlite:///{Path(cfg.results_dir).resolve() / 'mlflow.db'}"


def prepare_results_dir(results_dir: str) -> Path:
    """Create results_dir and prove it is writable, or raise a one-line ConfigError."""
    path = Path(results_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"results_dir={results_dir} cannot be written ({e.strerror or e})"
        ) from None
    return path


def open_store(cfg: Config) -> Store:
    url = store_url(cfg)
    try:
        return Store(url)
    except SQLAlchemyError as e:
        msg = str(e).strip().splitlines()[0]
        raise ConfigError(f"store.url={url} cannot be opened ({msg})") from None


def preflight(cfg: Config) -> None:
    """Every check that needs no training: run before any row is written."""
    cfg.validate()
    prepare_results_dir(cfg.results_dir)
    check_data(cfg.data)
    resolve_device(cfg.device)


def identity_of(cfg: RunConfig) -> tuple[dict, str]:
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    ident = cfg.identity(precision)
    return ident, provenance.config_hash(ident)


def grid_columns(cfg: RunConfig) -> dict:
    return {
        "model": cfg.model.name,
        "method": cfg.method.name,
        "alpha": cfg.effective_alpha(),
        "data": cfg.data.name,
        "batch_size": cfg.batch_size,
        "epochs": cfg.epochs,
        "lr": cfg.resolved_lr(),
        "schedule": cfg.schedule.name,
        "label_smoothing": cfg.effective_label_smoothing(),
        "seed": cfg.seed,
    }


class Heartbeat:
    """A daemon thread writing ``runs.heartbeat_at`` every ``every`` seconds while a run
    trains, so a killed job is detectable (:meth:`Store.expire_leases`). Epochs write it too;
    this covers long epochs. A failing write warns once and keeps trying."""

    def __init__(self, store: Store, run_id: int, every: float = HEARTBEAT_S) -> None:
        self.store, self.run_id, self.every = store, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gradsweep-heartbeat", daemon=True)
        self._warned = False

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.store.heartbeat(self.run_id)
            except Exception as e:  # a busy or briefly unreachable store: try again later
                if not self._warned:
                    log.warning(
                        f"heartbeat of run {self.run_id} failed ({type(e).__name__}); retrying"
                    )
                    self._warned = True

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
        run: Run,
        mirror: MlflowMirror | None,
        reporter: TrialReporter | None = None,
        gpus: int = 0,
    ) -> None:
        self.store, self.run, self.mirror, self.reporter = store, run, mirror, reporter
        self.gpus = gpus  # for the run's GPU-hours

    def should_stop(self, m: EpochMetrics) -> bool:
        return self.reporter.report(m) if self.reporter is not None else False

    def on_start(self, resume_epoch: int, device: str, precision: str) -> None:
        self.store.start_run(
            self.run.id,
            {
                "host": provenance.host(),
                "device": device,
                "precision": precision,
                "versions": provenance.versions(),
                "git_sha": provenance.git_sha(),
                "gpus": self.gpus,
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
    preflight(cfg)
    ident, chash = identity_of(cfg)
    run_dir = Path(cfg.results_dir) / "runs" / chash[:16]
    trainer = Trainer(cfg, run_dir, log=log.info, config_hash=chash)
    trainer.setup()  # data/model errors (e.g. batch larger than the data) before any row
    store = open_store(cfg)
    try:
        if not trainer.dist.is_main:  # data-parallel worker: trains, records nothing
            row = store.get_run(chash)
            if row is not None and row.status == RunStatus.done:
                return JobOutcome(chash, "skipped", row.id, row.test_acc)
            result = trainer.fit()
            return JobOutcome(chash, result.status, row.id if row else -1)
        resolved = {**asdict(cfg), "resolved_lr": cfg.resolved_lr(), "identity": ident}
        run = store.claim_run(chash, grid_columns(cfg), resolved)
        if run.status == RunStatus.done:
            log.info(
                f"run {run.id} ({chash[:12]}) is already done "
                f"(test_acc {run.test_acc:.2f}%); not training it again"
            )
            return JobOutcome(chash, "skipped", run.id, run.test_acc)
        reporter = TrialReporter(trial, warn=log.warning) if trial is not None else None
        return _train(cfg, store, run, trainer, ident, mlflow_tags or {}, reporter)
    finally:
        store.dispose()


def _train(
    cfg: Config,
    store: Store,
    run: Run,
    trainer: Trainer,
    ident: dict,
    mlflow_tags: dict[str, str],
    reporter: TrialReporter | None = None,
) -> JobOutcome:
    chash, run_dir = trainer.config_hash, trainer.run_dir
    mirror: MlflowMirror | None = None
    if cfg.mlflow.enabled:
        mirror = MlflowMirror(
            tracking_uri(cfg),
            cfg.mlflow.experiment,
            Path(cfg.results_dir) / "mlartifacts",
            warn=log.warning,
        )
        name = run_name(cfg.model.name, cfg.method.name, cfg.effective_alpha(), cfg.seed)
        mirror.start(
            run.mlflow_run_id,
            name,
            {**ident, "results_run_id": run.id},
            {
                "config_hash": chash,
                "method": cfg.method.name,
                "model": cfg.model.name,
                **mlflow_tags,
            },
        )
        if mirror.run_id and mirror.run_id != run.mlflow_run_id:
            store.set_fields(run.id, mlflow_run_id=mirror.run_id)
    gpus = trainer.dist.world if trainer.device.type == "cuda" else 0
    trainer.sink = StoreSink(store, run, mirror, reporter, gpus)
    log.info(
        f"run {run.id} ({chash[:12]}): {cfg.model.name} / {cfg.method.name}"
        + (f" alpha={cfg.alpha:g}" if cfg.uses_pgt() else "")
        + f" / {cfg.data.name} / batch {cfg.batch_size} / lr {cfg.resolved_lr():.4g}"
        + f" / {cfg.epochs} epochs / seed {cfg.seed}"
    )
    try:
        with Heartbeat(store, run.id):
            result = trainer.fit()
    except SystemExit:
        # submitit's time-out / pre-emption handler requeues the job, then exits: the run
        # is not over, it resumes from its checkpoint when the requeued job starts.
        store.set_fields(
            run.id, error="requeued (time-out or pre-emption); resumes from its last checkpoint"
        )
        raise
    except BaseException as e:
        err = traceback.format_exc()
        status = RunStatus.failed
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or its sweep was cancelled
            status = RunStatus.interrupted  # not an outcome: a rerun resumes it
            err = (
                "interrupted (KeyboardInterrupt); a rerun resumes it from its last checkpoint\n"
                + err
            )
        store.finish_run(run.id, status, error=err)
        if mirror is not None:
            mirror.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
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
        mirror.set_tags({"status": result.status})
        mirrored = mirror.end(STATUS_FOR_MLFLOW[result.status])
    fields["mlflow_mirrored"] = mirrored
    store.finish_run(run.id, RunStatus(result.status), **fields)
    if final is not None:
        log.info(
            f"run {run.id} {result.status}: train {final.train_acc:.2f}%  "
            f"test {final.test_acc:.2f}%  loss {final.test_loss:.4f}  "
            f"|z| {final.logit_norm:.3f}"
        )
    return JobOutcome(chash, result.status, run.id, final.test_acc if final else None)


class TrainJob(submitit.helpers.Checkpointable):
    """What a worker process runs. Checkpointable: on Slurm pre-emption or time-out,
    submitit requeues the same call, and :func:`run_job` resumes from the run's checkpoint."""

    def __call__(
        self,
        cfg: Config,
        mlflow_tags: dict[str, str],
        threads: int | None,
        trial: TrialLink | None = None,
    ) -> JobOutcome:
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
        import logging

        logging.basicConfig(
            level=logging.INFO,
            format="[%(asctime)s] %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stdout,
            force=True,
        )
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        return run_job(cfg, mlflow_tags, trial)
