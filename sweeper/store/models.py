"""The tables of the results store (SQLAlchemy 2 declarative models).

Accuracies in percent, like the paper; times in UTC. Only the store package touches these
classes; everything outside it reads plain records (:mod:`sweeper.store.records`).

* ``runs``: one row per configuration, unique ``config_hash``; the grid keys as columns
  (so users can GROUP BY them in SQL); the resolved config as JSON; status; provenance
  (host, device, versions, git SHA); final metrics; cost (kept current after every epoch);
  the heartbeat of its job; where its artifacts are (``run_dir``).
* ``epoch_metrics``: one row per (run, epoch).
* ``filter_stats``: one row per (run, step, layer): per-layer summary of filter L2 norms.
* ``sweeps`` / ``sweep_runs``: each launched grid or search, and which runs it asked for.
* ``store_info``: the schema version (numbered migrations, :mod:`sweeper.store.migrations`).
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import JSON, Enum, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class RunStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    diverged = "diverged"
    # stopped early by an Optuna pruner; its checkpoint is kept, so a grid that later asks
    # for the same configuration resumes it to the end instead of starting over
    pruned = "pruned"
    # was running, then stopped without finishing: its job was killed (a signal, a lost
    # node: its process vanished or its heartbeat stopped), cancelled, or requeued. Not an
    # outcome: the same command resumes it from its last checkpoint.
    interrupted = "interrupted"

    def __str__(self) -> str:  # "done", not "RunStatus.done", in f-strings and reports
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    config_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
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
    # v4: the absolute folder of its checkpoint and artifacts (set when a job starts it)
    run_dir: Mapped[str | None] = mapped_column(Text)
    # v4: ``epoch`` when its job was last killed; a second kill at the same epoch (no
    # progress in between) ends the run ``failed`` instead of resuming it forever
    killed_at_epoch: Mapped[int | None] = mapped_column(Integer)
    # v5: the fencing token. Every claim of the run for a new job (a sweep's or a single
    # run's) and every declaration that its job is dead increments it; a job writes only
    # while the run still holds the token it was given (lease.LostRun otherwise)
    owner: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # v5: the sweep whose claim the run is queued under (NULL: none, or a single run)
    claimed_by: Mapped[int | None] = mapped_column(Integer)
    # v5: the process id of the job training it (with ``host``): a dead one is seen at once
    pid: Mapped[int | None] = mapped_column(Integer)
    # v6: the last epoch's accuracy (percent) and loss on the validation split
    # (data.val_split); NULL for runs without one
    val_acc: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)


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
    val_acc: Mapped[float | None] = mapped_column(Float)  # v6; NULL without data.val_split
    val_loss: Mapped[float | None] = mapped_column(Float)  # v6


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
    # v5: the sweeper's liveness (its claims hold while it beats) and how the sweep ended
    heartbeat_at: Mapped[dt.datetime | None]
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str | None] = mapped_column(String(16))  # finished|failed|interrupted|abandoned
    # v7: the sweep whose unresolved comparisons this one adds seeds to (python -m sweeper
    # resolve); NULL for a grid or a search. No foreign key: ALTER TABLE cannot add one in
    # SQLite, and a parent is never deleted before its children
    parent_id: Mapped[int | None] = mapped_column(Integer)


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
