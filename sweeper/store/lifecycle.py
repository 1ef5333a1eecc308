"""A run's life in the store: claimed (queued), started, one row per epoch, finished; and
the sweeps that ask for runs. Every write goes through one session scope (commit or roll
back); a config hash is never inserted twice."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sweeper.store.db import Database
from sweeper.store.lease import CLAIMABLE, HOST, LostRun
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

    def start_run(self, run_id: int, owner: int, provenance: dict[str, Any],
                  resume_epoch: int) -> None:  # fmt: skip
        """Running, under token ``owner`` (:meth:`Leases.claim`; LostRun when the run holds
        another); drop rows a killed attempt wrote past its last checkpoint.

        A run already ``running`` under this very token is the same job started again by
        its backend (a Slurm requeue: time limit, pre-emption, ``scontrol requeue``), which
        runs a job again only once its previous incarnation has ended: it resumes."""
        now = utcnow()
        with self.session() as s:
            startable = (*CLAIMABLE, RunStatus.running)
            res = s.execute(
                update(Run)
                .where(Run.id == run_id, Run.owner == owner, Run.status.in_(startable))
                .values(status=RunStatus.running, heartbeat_at=now, ended_at=None, error=None,
                        diverged_step=None, epoch=resume_epoch, **provenance)
                .execution_options(synchronize_session=False)
            )  # fmt: skip
            if res.rowcount != 1:
                raise LostRun(run_id, " to start")
            run = s.get_one(Run, run_id)
            run.started_at = run.started_at or now
            s.execute(delete(EpochMetric).where(EpochMetric.run_id == run_id,
                                                EpochMetric.epoch >= resume_epoch))  # fmt: skip
            s.execute(delete(FilterStat).where(FilterStat.run_id == run_id,
                                               FilterStat.epoch >= resume_epoch))  # fmt: skip

    def record_epoch(self, run_id: int, owner: int, m: EpochMetrics,
                     stats: Sequence[LayerFilterStats]) -> None:  # fmt: skip
        """One finished epoch: its metrics, its filter snapshots, the run's cost so far --
        only while the run holds ``owner`` (LostRun otherwise, and nothing is written)."""
        with self.session() as s:
            res = s.execute(
                update(Run)
                .where(Run.id == run_id, Run.owner == owner, Run.status == RunStatus.running)
                .values(epoch=m.epoch + 1, heartbeat_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            if res.rowcount != 1:
                raise LostRun(run_id)
            s.execute(delete(EpochMetric).where(EpochMetric.run_id == run_id,
                                                EpochMetric.epoch == m.epoch))  # fmt: skip
            s.execute(delete(FilterStat).where(FilterStat.run_id == run_id,
                                               FilterStat.epoch == m.epoch))  # fmt: skip
            s.add(EpochMetric(run_id=run_id, **asdict(m)))
            s.add_all(FilterStat(run_id=run_id, **asdict(st)) for st in stats)
            s.flush()
            _update_cost(s, s.get_one(Run, run_id))

    def finish_run(self, run_id: int, status: RunStatus, owner: int | None = None,
                   **fields: Any) -> None:  # fmt: skip
        """The run's outcome. With ``owner`` (a job's, or the sweeper's for its job), only
        while the run holds that token (LostRun otherwise); a run that ends ``done`` keeps
        no error or kill mark from an earlier attempt."""
        with self.session() as s:
            run = s.get_one(Run, run_id)
            if owner is not None and (run.owner or 0) != owner:
                raise LostRun(run_id)
            run.status = status
            run.ended_at = utcnow()
            if status == RunStatus.done:
                run.error, run.killed_at_epoch = None, None
            for k, v in fields.items():
                setattr(run, k, v)

    def set_fields(self, run_id: int, owner: int | None = None, **fields: Any) -> bool:
        """Set columns of a run (with ``owner``: only while the run holds that token);
        True when written."""
        with self.session() as s:
            run = s.get_one(Run, run_id)
            if owner is not None and (run.owner or 0) != owner:
                return False
            for k, v in fields.items():
                setattr(run, k, v)
            return True

    # ------------------------------------------------------------------- sweeps
    def create_sweep(self, name: str, command: str, launcher: str, n_points: int) -> SweepRecord:
        """A sweep's record, alive (its sweeper beats: :meth:`Leases.sweep_heartbeat`)."""
        with self.session() as s:
            sweep = Sweep(name=name, command=command, launcher=launcher, n_points=n_points,
                          heartbeat_at=utcnow(), host=HOST, pid=os.getpid())  # fmt: skip
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
