"""A run's life in the store: claimed (queued), started, one row per epoch, finished; and
the sweeps that ask for runs. Every write goes through one session scope (commit or roll
back); a config hash is never inserted twice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sweeper.store.db import Database
from sweeper.store.models import EpochMetric, FilterStat, Run, RunStatus, Sweep, SweepRun, utcnow
from sweeper.store.records import RunRecord, SweepRecord, run_record, sweep_record
from trainers.records import EpochMetrics, LayerFilterStats


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


class Lifecycle(Database):
    def claim_run(self, config_hash: str, columns: dict[str, Any], config: dict) -> RunRecord:
        """Get the run with this hash, or create it ``queued``. Never duplicates a hash."""
        try:
            with self.session() as s:
                run = s.scalar(select(Run).where(Run.config_hash == config_hash))
                if run is None:
                    run = Run(config_hash=config_hash, config=config, status=RunStatus.queued,
                              epoch=0, **columns)  # fmt: skip
                    s.add(run)
                    s.flush()
                return run_record(run, self.db_dir)
        except IntegrityError:  # another process inserted the same hash first: use its row
            with self.session() as s:
                return run_record(
                    s.scalars(select(Run).where(Run.config_hash == config_hash)).one(), self.db_dir
                )

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
            s.execute(delete(EpochMetric).where(EpochMetric.run_id == run_id,
                                                EpochMetric.epoch >= resume_epoch))  # fmt: skip
            s.execute(delete(FilterStat).where(FilterStat.run_id == run_id,
                                               FilterStat.epoch >= resume_epoch))  # fmt: skip

    def record_epoch(self, run_id: int, m: EpochMetrics, stats: Sequence[LayerFilterStats]) -> None:
        """One finished epoch: its metrics, its filter snapshots, the run's cost so far."""
        with self.session() as s:
            s.execute(delete(EpochMetric).where(EpochMetric.run_id == run_id,
                                                EpochMetric.epoch == m.epoch))  # fmt: skip
            s.execute(delete(FilterStat).where(FilterStat.run_id == run_id,
                                               FilterStat.epoch == m.epoch))  # fmt: skip
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

    def set_fields(self, run_id: int, **fields: Any) -> None:
        with self.session() as s:
            run = s.get_one(Run, run_id)
            for k, v in fields.items():
                setattr(run, k, v)

    def requeue_run(self, run_id: int) -> None:
        """A failed / diverged run asked to be retried: back to queued, error and kill
        count cleared (a retry gets a fresh start)."""
        with self.session() as s:
            run = s.get_one(Run, run_id)
            run.status = RunStatus.queued
            run.error = None
            run.killed_at_epoch = None

    # ------------------------------------------------------------------- sweeps
    def create_sweep(self, name: str, command: str, launcher: str, n_points: int) -> SweepRecord:
        with self.session() as s:
            sweep = Sweep(name=name, command=command, launcher=launcher, n_points=n_points)
            s.add(sweep)
            s.flush()
            return sweep_record(sweep)

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
