"""The results store: SQLAlchemy 2 models and the only functions that touch them.

Schema (accuracies in percent, like the paper; times in UTC):

* ``runs``: one row per configuration, unique ``config_hash``; the grid keys as columns;
  the resolved config as JSON; status; provenance (host, device, versions, git SHA);
  final metrics.
  Cost: ``train_seconds`` (wall seconds of the recorded epochs, training + evaluation),
  ``gpus`` (0 on CPU), ``gpu_hours`` (= train_seconds x gpus / 3600), ``images_per_s``
  (training throughput over all epochs), ``peak_gpu_mem_mb``; kept current after every
  epoch, so a running or failed run shows what it has cost so far.
* ``epoch_metrics``: one row per (run, epoch).
* ``filter_stats``: one row per (run, step, layer): per-layer summary of filter L2 norms.

Layout follows Optuna's RDB storage: declarative tables, natural-key unique constraints,
an enum status, and one session scope that commits or rolls back. Analysis reads through
the query functions here, never through ad-hoc SQL strings.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from sqlalchemy import (
    JSON,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from trainers.train import EpochMetrics, LayerFilterStats

# 2: RunStatus.pruned, sweep_runs.trial (Optuna searches); 3: cost columns, heartbeat,
# RunStatus.interrupted
SCHEMA_VERSION = 3

# A training job writes ``runs.heartbeat_at`` every HEARTBEAT_S seconds (and at every epoch).
# A ``running`` run whose heartbeat is older than LEASE_S was killed (SIGKILL, node lost,
# OOM killer): :meth:`Store.expire_leases` marks it ``interrupted``. Override for tests or
# very slow shared file systems with GRADSWEEP_HEARTBEAT_S.
HEARTBEAT_S = float(os.environ.get("GRADSWEEP_HEARTBEAT_S", "30"))
LEASE_S = 3 * HEARTBEAT_S


class RunStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    diverged = "diverged"
    # stopped early by an Optuna pruner; its checkpoint is kept, so a grid that later asks
    # for the same configuration resumes it to the end instead of starting over
    pruned = "pruned"
    # was running, then stopped without recording an outcome: its process was killed (no
    # heartbeat within the lease) or its sweep was interrupted. Not an outcome: a rerun of
    # the sweep resumes it from its last checkpoint.
    interrupted = "interrupted"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    config_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    # grid keys, as columns so that users can GROUP BY them in SQL
    model: Mapped[str] = mapped_column(String(64), index=True)
    method: Mapped[str] = mapped_column(String(32), index=True)
    alpha: Mapped[float | None] = mapped_column(Float)  # NULL for methods without PGT
    data: Mapped[str] = mapped_column(String(32))
    batch_size: Mapped[int] = mapped_column(Integer)
    epochs: Mapped[int] = mapped_column(Integer)
    lr: Mapped[float] = mapped_column(Float)  # resolved peak lr (after batch scaling)
    schedule: Mapped[str] = mapped_column(String(16))
    label_smoothing: Mapped[float] = mapped_column(Float)  # 0 for methods without LS
    seed: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict] = mapped_column(JSON)  # the resolved config
    status: Mapped[RunStatus] = mapped_column(Enum(RunStatus, name="run_status"), index=True)
    epoch: Mapped[int] = mapped_column(Integer, default=0)  # epochs finished
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    ended_at: Mapped[dt.datetime | None]
    host: Mapped[str | None] = mapped_column(String(255))
    device: Mapped[str | None] = mapped_column(String(255))
    precision: Mapped[str | None] = mapped_column(String(8))
    versions: Mapped[dict | None] = mapped_column(JSON)
    git_sha: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    diverged_step: Mapped[int | None] = mapped_column(Integer)
    train_acc: Mapped[float | None] = mapped_column(Float)
    test_acc: Mapped[float | None] = mapped_column(Float)
    test_top5: Mapped[float | None] = mapped_column(Float)
    test_loss: Mapped[float | None] = mapped_column(Float)
    logit_norm: Mapped[float | None] = mapped_column(Float)
    n_features: Mapped[int | None] = mapped_column(Integer)
    zero_features: Mapped[int | None] = mapped_column(Integer)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_mirrored: Mapped[bool] = mapped_column(default=False)
    # cost (v3), updated after every epoch from the run's epoch_metrics rows
    gpus: Mapped[int | None] = mapped_column(Integer)  # GPUs the run holds; 0 on CPU
    train_seconds: Mapped[float | None] = mapped_column(Float)
    gpu_hours: Mapped[float | None] = mapped_column(Float)
    images_per_s: Mapped[float | None] = mapped_column(Float)
    peak_gpu_mem_mb: Mapped[float | None] = mapped_column(Float)
    heartbeat_at: Mapped[dt.datetime | None]  # v3: last sign of life of its training job


class EpochMetric(Base):
    __tablename__ = "epoch_metrics"
    __table_args__ = (UniqueConstraint("run_id", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float] = mapped_column(Float)
    train_acc: Mapped[float] = mapped_column(Float)
    test_loss: Mapped[float] = mapped_column(Float)
    test_acc: Mapped[float] = mapped_column(Float)
    test_top5: Mapped[float] = mapped_column(Float)
    logit_norm: Mapped[float] = mapped_column(Float)
    gap: Mapped[float] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    epoch_time: Mapped[float] = mapped_column(Float)
    images_per_s: Mapped[float] = mapped_column(Float)
    grad_norm_before: Mapped[float] = mapped_column(Float)
    grad_norm_after: Mapped[float] = mapped_column(Float)
    peak_mem_mb: Mapped[float | None] = mapped_column(Float)  # v3; NULL on CPU


class FilterStat(Base):
    __tablename__ = "filter_stats"
    __table_args__ = (UniqueConstraint("run_id", "step", "layer_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    layer_index: Mapped[int] = mapped_column(Integer)
    layer_name: Mapped[str] = mapped_column(String(255))
    n_filters: Mapped[int] = mapped_column(Integer)
    n_zero: Mapped[int] = mapped_column(Integer)
    min_norm: Mapped[float] = mapped_column(Float)
    median_norm: Mapped[float] = mapped_column(Float)
    max_norm: Mapped[float] = mapped_column(Float)


class Sweep(Base):
    """One launch of a grid (or search). Runs are shared between sweeps: a point whose
    config hash already exists is linked, not duplicated."""

    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[dt.datetime | None]
    command: Mapped[str] = mapped_column(Text)  # the overrides as typed
    launcher: Mapped[str] = mapped_column(String(32))
    n_points: Mapped[int] = mapped_column(Integer)
    mlflow_parent_run_id: Mapped[str | None] = mapped_column(String(64))


class SweepRun(Base):
    __tablename__ = "sweep_runs"
    __table_args__ = (UniqueConstraint("sweep_id", "run_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    point: Mapped[str] = mapped_column(Text)  # the point's overrides, e.g. "method=pgt alpha=0.3"
    job_id: Mapped[str | None] = mapped_column(String(64))  # submitit / Slurm job id
    trial: Mapped[int | None] = mapped_column(Integer)  # Optuna trial number (searches)


class StoreInfo(Base):
    """One row: the schema version this database was created or upgraded to."""

    __tablename__ = "store_info"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schema_version: Mapped[int] = mapped_column(Integer)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL: readers (status, analysis, MLflow UI) never block the writer; busy_timeout:
    # concurrent writers wait for the lock instead of failing with "database is locked".
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _migrate_to_2(engine: Engine) -> None:
    """v2: ``sweep_runs.trial`` and the ``pruned`` run status."""
    from sqlalchemy import inspect, text
    from sqlalchemy.exc import DBAPIError

    if "trial" not in {c["name"] for c in inspect(engine).get_columns("sweep_runs")}:
        try:
            with engine.begin() as c:
                c.execute(text("ALTER TABLE sweep_runs ADD COLUMN trial INTEGER"))
        except DBAPIError:  # another process added it a moment ago
            if "trial" not in {c["name"] for c in inspect(engine).get_columns("sweep_runs")}:
                raise
    if engine.dialect.name == "postgresql":  # a native ENUM there; SQLite stores plain text
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("ALTER TYPE run_status ADD VALUE IF NOT EXISTS 'pruned'"))


def _add_columns(engine: Engine, table: str, columns: dict[str, str]) -> None:
    """ALTER TABLE ... ADD COLUMN for each column not there yet (idempotent, race-safe)."""
    from sqlalchemy import inspect, text
    from sqlalchemy.exc import DBAPIError

    for name, sql_type in columns.items():
        if name in {c["name"] for c in inspect(engine).get_columns(table)}:
            continue
        try:
            with engine.begin() as c:
                c.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}"))
        except DBAPIError:  # another process added it a moment ago
            if name not in {c["name"] for c in inspect(engine).get_columns(table)}:
                raise


def _migrate_to_3(engine: Engine) -> None:
    """v3: the cost of a run (GPU-hours, throughput, peak GPU memory)."""
    real = "DOUBLE PRECISION" if engine.dialect.name == "postgresql" else "FLOAT"
    _add_columns(
        engine,
        "runs",
        {"gpus": "INTEGER", "train_seconds": real, "gpu_hours": real, "images_per_s": real,
         "peak_gpu_mem_mb": real},
    )  # fmt: skip
    _add_columns(engine, "epoch_metrics", {"peak_mem_mb": real})
    stamp = "TIMESTAMP WITHOUT TIME ZONE" if engine.dialect.name == "postgresql" else "DATETIME"
    _add_columns(engine, "runs", {"heartbeat_at": stamp})
    if engine.dialect.name == "postgresql":
        from sqlalchemy import text

        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("ALTER TYPE run_status ADD VALUE IF NOT EXISTS 'interrupted'"))


MIGRATIONS: dict[int, Callable[[Engine], None]] = {2: _migrate_to_2, 3: _migrate_to_3}


def _update_cost(s: Session, run: Run) -> None:
    """The run's cost columns from all its recorded epochs (re-done epochs replace theirs).

    Every epoch trains the same number of images, so the run's throughput is the harmonic
    mean of the epochs' (total images / total training seconds)."""
    rows = s.execute(
        select(EpochMetric.epoch_time, EpochMetric.images_per_s, EpochMetric.peak_mem_mb).where(
            EpochMetric.run_id == run.id
        )
    ).all()
    run.train_seconds = sum(r.epoch_time for r in rows)
    run.gpu_hours = run.train_seconds * (run.gpus or 0) / 3600
    ips = [r.images_per_s for r in rows if r.images_per_s and r.images_per_s > 0]
    run.images_per_s = len(ips) / sum(1 / v for v in ips) if ips else None
    mems = [r.peak_mem_mb for r in rows if r.peak_mem_mb is not None]
    run.peak_gpu_mem_mb = max(mems) if mems else None


def engine_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` without a driver -> psycopg 3 (a dependency).

    SQLAlchemy's default driver for ``postgresql://`` is psycopg2, which gradsweep does not
    install; every component (results store, Optuna storage, MLflow, analysis) opens its
    URL through this, so users can paste the plain URL their database admin gives them."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


class Store:
    """A results store at any SQLAlchemy URL (default: SQLite file under results_dir)."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 60}
        self.engine: Engine = create_engine(engine_url(url), **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        Base.metadata.create_all(self.engine)
        self._upgrade()

    def _upgrade(self) -> None:
        """Bring a store created by an older gradsweep up to :data:`SCHEMA_VERSION`.

        Migrations are numbered and idempotent (each checks before it alters), so jobs that
        open an old store at the same moment cannot break it: one alters, the others see
        the change and only record the version.
        """
        with self.session() as s:
            info = s.get(StoreInfo, 1)
            if info is None:  # a new store: create_all made the current schema
                s.add(StoreInfo(id=1, schema_version=SCHEMA_VERSION))
                return
            version = info.schema_version
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the results store {self.url} has schema version {version}, newer than this "
                f"gradsweep's {SCHEMA_VERSION}; upgrade gradsweep"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[target](self.engine)
            with self.session() as s:
                s.get_one(StoreInfo, 1).schema_version = target

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One unit of work: commits on success, rolls back on any exception."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def dispose(self) -> None:
        self.engine.dispose()

    # --------------------------------------------------------------------- writing
    def claim_run(self, config_hash: str, columns: dict[str, Any], config: dict) -> Run:
        """Get the run with this hash, or create it ``queued``. Never duplicates a hash."""
        try:
            with self.session() as s:
                run = s.scalar(select(Run).where(Run.config_hash == config_hash))
                if run is None:
                    run = Run(
                        config_hash=config_hash,
                        config=config,
                        status=RunStatus.queued,
                        epoch=0,
                        **columns,
                    )
                    s.add(run)
            return run
        except IntegrityError:  # another process inserted the same hash first: use its row
            existing = self.get_run(config_hash)
            assert existing is not None
            return existing

    def start_run(self, run_id: int, provenance: dict[str, Any], resume_epoch: int) -> None:
        """Mark running; drop rows a killed attempt wrote past its last checkpoint."""
        with self.session() as s:
            run = s.get_one(Run, run_id)
            run.status = RunStatus.running
            run.started_at = run.started_at or utcnow()
            run.heartbeat_at = utcnow()
            run.ended_at = None
            run.error = None
            run.diverged_step = None
            run.epoch = resume_epoch
            for k, v in provenance.items():
                setattr(run, k, v)
            s.execute(
                delete(EpochMetric).where(
                    EpochMetric.run_id == run_id, EpochMetric.epoch >= resume_epoch
                )
            )
            s.execute(
                delete(FilterStat).where(
                    FilterStat.run_id == run_id, FilterStat.epoch >= resume_epoch
                )
            )

    def record_epoch(self, run_id: int, m: EpochMetrics, stats: Sequence[LayerFilterStats]) -> None:
        with self.session() as s:
            s.execute(
                delete(EpochMetric).where(
                    EpochMetric.run_id == run_id, EpochMetric.epoch == m.epoch
                )
            )
            s.execute(
                delete(FilterStat).where(FilterStat.run_id == run_id, FilterStat.epoch == m.epoch)
            )
            s.add(EpochMetric(run_id=run_id, **asdict(m)))
            s.add_all(FilterStat(run_id=run_id, **asdict(st)) for st in stats)
            run = s.get_one(Run, run_id)
            run.epoch = m.epoch + 1
            run.heartbeat_at = utcnow()
            s.flush()
            _update_cost(s, run)

    def finish_run(self, run_id: int, status: RunStatus, **fields: Any) -> None:
        with self.session() as s:
            run = s.get_one(Run, run_id)
            run.status = status
            run.ended_at = utcnow()
            for k, v in fields.items():
                setattr(run, k, v)

    def heartbeat(self, run_id: int) -> None:
        """The run's job is alive (called every HEARTBEAT_S by a thread of the job)."""
        with self.session() as s:  # alive: a lease wrongly expired (a stall) is taken back
            s.execute(
                update(Run)
                .where(Run.id == run_id, Run.status.in_([RunStatus.running, RunStatus.interrupted]))
                .values(heartbeat_at=utcnow(), status=RunStatus.running, ended_at=None)
                .execution_options(synchronize_session=False)
            )

    def expire_leases(self, lease_s: float | None = None) -> int:
        """Mark ``interrupted`` every ``running`` run without a heartbeat for ``lease_s``
        (default LEASE_S) seconds; returns how many. One conditional UPDATE, so a run that
        records its outcome at the same moment keeps it. Its checkpoint is kept: a rerun
        resumes it. (A job that was only stalled, not dead, takes ``running`` back with its
        next heartbeat.)"""
        lease = LEASE_S if lease_s is None else lease_s
        now = utcnow()
        last = func.coalesce(Run.heartbeat_at, Run.started_at, Run.created_at)
        with self.session() as s:
            res = s.execute(
                update(Run)
                .where(Run.status == RunStatus.running, last < now - dt.timedelta(seconds=lease))
                .values(
                    status=RunStatus.interrupted,
                    ended_at=now,
                    error=f"interrupted: no heartbeat for over {lease:g} s (the job was killed "
                    "or lost); a rerun resumes it from its last checkpoint",
                )
                .execution_options(synchronize_session=False)
            )
            return int(res.rowcount or 0)

    def mark_interrupted(self, run_ids: list[int], why: str) -> None:
        """Runs still ``running`` after their jobs were cancelled: ``interrupted`` now."""
        if not run_ids:
            return
        with self.session() as s:
            s.execute(
                update(Run)
                .where(Run.id.in_(run_ids), Run.status == RunStatus.running)
                .values(
                    status=RunStatus.interrupted,
                    ended_at=utcnow(),
                    error=f"interrupted: {why}; a rerun resumes it from its last checkpoint",
                )
                .execution_options(synchronize_session=False)
            )

    def lease_alive(self, run: Run, lease_s: float | None = None) -> bool:
        """Whether a ``running`` run's job showed life within the lease (so it is really
        being trained somewhere and must not be started twice)."""
        lease = LEASE_S if lease_s is None else lease_s
        seen = run.heartbeat_at or run.started_at or run.created_at
        return run.status == RunStatus.running and (utcnow() - seen).total_seconds() < lease

    def set_fields(self, run_id: int, **fields: Any) -> None:
        with self.session() as s:
            run = s.get_one(Run, run_id)
            for k, v in fields.items():
                setattr(run, k, v)

    def create_sweep(self, name: str, command: str, launcher: str, n_points: int) -> Sweep:
        with self.session() as s:
            sweep = Sweep(name=name, command=command, launcher=launcher, n_points=n_points)
            s.add(sweep)
        return sweep

    def link_run(self, sweep_id: int, run_id: int, point: str, trial: int | None = None) -> None:
        with self.session() as s:
            exists = s.scalar(
                select(SweepRun).where(SweepRun.sweep_id == sweep_id, SweepRun.run_id == run_id)
            )
            if exists is None:
                s.add(SweepRun(sweep_id=sweep_id, run_id=run_id, point=point, trial=trial))

    def set_job_id(self, sweep_id: int, run_id: int, job_id: str) -> None:
        with self.session() as s:
            link = s.scalar(
                select(SweepRun).where(SweepRun.sweep_id == sweep_id, SweepRun.run_id == run_id)
            )
            if link is not None:
                link.job_id = job_id

    def set_sweep_fields(self, sweep_id: int, **fields: Any) -> None:
        with self.session() as s:
            sweep = s.get_one(Sweep, sweep_id)
            for k, v in fields.items():
                setattr(sweep, k, v)

    def requeue_run(self, run_id: int) -> None:
        """A failed / diverged run asked to be retried: back to queued, error cleared."""
        with self.session() as s:
            run = s.get_one(Run, run_id)
            run.status = RunStatus.queued
            run.error = None

    # --------------------------------------------------------------------- queries
    def sweeps(self) -> list[Sweep]:
        with self.session() as s:
            return list(s.scalars(select(Sweep).order_by(Sweep.id)))

    def sweep_runs(self, sweep_id: int) -> list[tuple[SweepRun, Run]]:
        with self.session() as s:
            q = (
                select(SweepRun, Run)
                .join(Run, Run.id == SweepRun.run_id)
                .where(SweepRun.sweep_id == sweep_id)
                .order_by(SweepRun.id)
            )
            return [(a, b) for a, b in s.execute(q).all()]

    def get_run_by_id(self, run_id: int) -> Run | None:
        with self.session() as s:
            return s.get(Run, run_id)

    def get_run(self, config_hash: str) -> Run | None:
        with self.session() as s:
            return s.scalar(select(Run).where(Run.config_hash == config_hash))

    def runs(self, **filters: Any) -> list[Run]:
        """Runs, optionally filtered by column equality (e.g. ``method="pgt"``)."""
        with self.session() as s:
            q = select(Run).order_by(Run.id)
            for k, v in filters.items():
                q = q.where(getattr(Run, k) == v)
            return list(s.scalars(q))

    def epoch_metrics(self, run_id: int) -> list[EpochMetric]:
        with self.session() as s:
            q = select(EpochMetric).where(EpochMetric.run_id == run_id).order_by(EpochMetric.epoch)
            return list(s.scalars(q))

    def filter_stats(self, run_id: int) -> list[FilterStat]:
        with self.session() as s:
            q = (
                select(FilterStat)
                .where(FilterStat.run_id == run_id)
                .order_by(FilterStat.step, FilterStat.layer_index)
            )
            return list(s.scalars(q))
