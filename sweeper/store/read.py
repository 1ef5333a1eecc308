"""The store's read API: every query anyone outside the store needs, returning plain
records (status, the sweeper, the MLflow mirror and the analysis all read through here)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from sqlalchemy import case, func, literal, select

from sweeper.store.db import Database
from sweeper.store.models import EpochMetric, FilterStat, Run, RunStatus, Sweep, SweepRun
from sweeper.store.records import (
    RUN_COLUMNS,
    EpochRecord,
    FilterStatRecord,
    RunRecord,
    SweepRecord,
    SweepRunRecord,
    epoch_record,
    filter_record,
    run_record,
    run_record_from_columns,
    sweep_record,
    sweep_run_record,
)


@dataclass(frozen=True)
class RunQuery:
    """Which runs: equality filters, an empty list means no filter on that key."""

    sweeps: Sequence[int] = field(default_factory=list)
    models: Sequence[str] = field(default_factory=list)
    methods: Sequence[str] = field(default_factory=list)
    datas: Sequence[str] = field(default_factory=list)
    statuses: Sequence[str] = field(default_factory=list)


class LeaseState(NamedTuple):
    """A run's status and signs of life: all :meth:`Leases.job_alive` reads of a record."""

    id: int
    status: RunStatus
    owner: int
    host: str | None
    pid: int | None
    heartbeat_at: dt.datetime | None
    started_at: dt.datetime | None
    created_at: dt.datetime | None


class CostBasis(NamedTuple):
    """What done runs of one kind (model, data set, batch size, epochs) cost, for a
    prediction: how many, how many held GPUs, and their GPU-hours and CPU-hours (the
    training wall time of runs that held no GPU)."""

    runs: int
    gpu_runs: int
    gpu_hours: float
    cpu_hours: float


CostKey = tuple[str, str, int, int]  # model, data, batch_size, epochs

LEASE_COLUMNS = (Run.id, Run.status, Run.owner, Run.host, Run.pid, Run.heartbeat_at,
                 Run.started_at, Run.created_at)  # fmt: skip


class Reads(Database):
    def get_run(self, config_hash: str) -> RunRecord | None:
        with self.session() as s:
            row = s.scalar(select(Run).where(Run.config_hash == config_hash))
            return run_record(row, self.db_dir) if row is not None else None

    def runs_by_hash(self, config_hashes: Sequence[str]) -> dict[str, RunRecord]:
        """The runs with these config hashes (those that exist), in chunks of 500."""
        out: dict[str, RunRecord] = {}
        hashes = list(dict.fromkeys(config_hashes))
        with self.session() as s:
            for i in range(0, len(hashes), 500):
                rows = s.execute(
                    select(*RUN_COLUMNS).where(Run.config_hash.in_(hashes[i : i + 500]))
                )
                for r in rows:
                    rec = run_record_from_columns(r, self.db_dir)
                    out[rec.config_hash] = rec
        return out

    def job_ids(self, run_id: int, launcher: str = "slurm") -> list[str]:
        """The ids of the jobs sweeps with this ``launcher`` (``slurm``, ``optuna/slurm``)
        dispatched for the run, newest first."""
        with self.session() as s:
            rows = s.execute(
                select(SweepRun.job_id)
                .join(Sweep, Sweep.id == SweepRun.sweep_id)
                .where(SweepRun.run_id == run_id, SweepRun.job_id.is_not(None),
                       Sweep.launcher.like(f"%{launcher}"))
                .order_by(SweepRun.id.desc())
            ).all()  # fmt: skip
        return [str(j) for (j,) in rows]

    def get_run_by_id(self, run_id: int) -> RunRecord | None:
        with self.session() as s:
            row = s.get(Run, run_id)
            return run_record(row, self.db_dir) if row is not None else None

    def runs(self, query: RunQuery | None = None) -> list[RunRecord]:
        """Runs matching ``query`` (any status by default), ordered by id."""
        q = select(*RUN_COLUMNS).order_by(Run.id)
        if query is not None:
            if query.sweeps:
                in_sweep = select(SweepRun.run_id).where(SweepRun.sweep_id.in_(list(query.sweeps)))
                q = q.where(Run.id.in_(in_sweep))
            for col, values in ((Run.model, query.models), (Run.method, query.methods),
                                (Run.data, query.datas), (Run.status, query.statuses)):  # fmt: skip
                if values:
                    q = q.where(col.in_(list(values)))
        with self.session() as s:
            return [run_record_from_columns(r, self.db_dir) for r in s.execute(q)]

    def count_runs(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(Run)) or 0)

    def epoch_metrics(self, run_id: int) -> list[EpochRecord]:
        with self.session() as s:
            q = select(EpochMetric).where(EpochMetric.run_id == run_id).order_by(EpochMetric.epoch)
            return [epoch_record(r) for r in s.scalars(q)]

    def last_epochs(self, run_ids: Sequence[int]) -> dict[int, EpochRecord]:
        """Each run's last recorded epoch (for runs whose final columns are empty)."""
        if not run_ids:
            return {}
        with self.session() as s:
            last = (
                select(EpochMetric.run_id, func.max(EpochMetric.epoch).label("ep"))
                .where(EpochMetric.run_id.in_(list(run_ids)))
                .group_by(EpochMetric.run_id)
                .subquery()
            )
            q = select(EpochMetric).join(
                last, (EpochMetric.run_id == last.c.run_id) & (EpochMetric.epoch == last.c.ep)
            )
            return {r.run_id: epoch_record(r) for r in s.scalars(q)}

    def filter_stats(self, run_id: int) -> list[FilterStatRecord]:
        with self.session() as s:
            q = (
                select(FilterStat)
                .where(FilterStat.run_id == run_id)
                .order_by(FilterStat.step, FilterStat.layer_index)
            )
            return [filter_record(r) for r in s.scalars(q)]

    def last_filter_stats(self, run_ids: Sequence[int]) -> list[FilterStatRecord]:
        """Each run's last filter snapshot (every layer at its highest step)."""
        if not run_ids:
            return []
        with self.session() as s:
            last = (
                select(FilterStat.run_id, func.max(FilterStat.step).label("last_step"))
                .where(FilterStat.run_id.in_(list(run_ids)))
                .group_by(FilterStat.run_id)
                .subquery()
            )
            q = (
                select(FilterStat)
                .join(
                    last,
                    (FilterStat.run_id == last.c.run_id) & (FilterStat.step == last.c.last_step),
                )  # fmt: skip
                .order_by(FilterStat.run_id, FilterStat.layer_index)
            )
            return [filter_record(r) for r in s.scalars(q)]

    def sweeps(self, ids: Sequence[int] | None = None) -> list[SweepRecord]:
        q = select(Sweep).order_by(Sweep.id)
        if ids is not None:
            q = q.where(Sweep.id.in_(list(ids)))
        with self.session() as s:
            return [sweep_record(r) for r in s.scalars(q)]

    def sweep_runs(self, sweep_id: int) -> list[tuple[SweepRunRecord, RunRecord]]:
        with self.session() as s:
            q = (
                select(SweepRun, Run)
                .join(Run, Run.id == SweepRun.run_id)
                .where(SweepRun.sweep_id == sweep_id)
                .order_by(SweepRun.id)
            )
            return [
                (sweep_run_record(a), run_record(b, self.db_dir)) for a, b in s.execute(q).all()
            ]

    # ------------------------------------------------------- aggregates (status at scale)
    def runs_by_id(self, run_ids: Sequence[int]) -> dict[int, RunRecord]:
        """The runs with these ids (those that exist), in chunks of 500: one query per
        chunk, not one per run (a sweeper following thousands of runs reads them each poll)."""
        out: dict[int, RunRecord] = {}
        ids = list(dict.fromkeys(run_ids))
        with self.session() as s:
            for i in range(0, len(ids), 500):
                for r in s.execute(select(*RUN_COLUMNS).where(Run.id.in_(ids[i : i + 500]))):
                    rec = run_record_from_columns(r, self.db_dir)
                    out[rec.id] = rec
        return out

    def lease_states(self, run_ids: Sequence[int]) -> dict[int, LeaseState]:
        """What :meth:`Leases.job_alive` reads of these runs, their configs not read: a
        cheap look at thousands of followed runs each poll."""
        out: dict[int, LeaseState] = {}
        ids = list(dict.fromkeys(run_ids))
        with self.session() as s:
            for i in range(0, len(ids), 500):
                q = select(*LEASE_COLUMNS).where(Run.id.in_(ids[i : i + 500]))
                for r in s.execute(q):
                    out[r[0]] = LeaseState(*r)
        return out

    def sweep_run_states(self, sweep_id: int) -> tuple[tuple[int, str], ...]:
        """``(run id, status)`` of each run a sweep links, in link order: whether anything
        changed, without reading the runs (:meth:`sweep_runs` decodes every config)."""
        q = (
            select(SweepRun.run_id, Run.status)
            .join(Run, Run.id == SweepRun.run_id)
            .where(SweepRun.sweep_id == sweep_id)
            .order_by(SweepRun.id)
        )
        with self.session() as s:
            return tuple((rid, RunStatus(st).value) for rid, st in s.execute(q))

    def sweep_counts(self) -> dict[int, dict[RunStatus, int]]:
        """Each sweep's runs by status, counted by the database (GROUP BY)."""
        q = (
            select(SweepRun.sweep_id, Run.status, func.count())
            .join(Run, Run.id == SweepRun.run_id)
            .group_by(SweepRun.sweep_id, Run.status)
        )
        out: dict[int, dict[RunStatus, int]] = {}
        with self.session() as s:
            for sid, status, n in s.execute(q):
                out.setdefault(sid, {})[RunStatus(status)] = int(n)
        return out

    def cost_basis(self, keys: Sequence[CostKey]) -> dict[CostKey, CostBasis]:
        """For each (model, data, batch size, epochs) of ``keys``, what the store's done
        runs of that kind cost (:class:`CostBasis`); kinds without a done run are left out.
        One GROUP BY over the done runs of the keys' models: the header of a 10,000-point
        grid asks once."""
        want = set(keys)
        if not want:
            return {}
        on_gpu = func.coalesce(Run.gpus, 0) > 0
        q = (
            select(Run.model, Run.data, Run.batch_size, Run.epochs, func.count(),
                   func.sum(case((on_gpu, 1), else_=0)),
                   func.sum(case((on_gpu, func.coalesce(Run.gpu_hours, 0.0)), else_=0.0)),
                   func.sum(case((on_gpu, 0.0), else_=func.coalesce(Run.train_seconds, 0.0))))
            .where(Run.status == RunStatus.done, Run.model.in_(sorted({k[0] for k in want})))
            .group_by(Run.model, Run.data, Run.batch_size, Run.epochs)
        )  # fmt: skip
        out: dict[CostKey, CostBasis] = {}
        with self.session() as s:
            for model, data, batch, epochs, n, g, gh, cs in s.execute(q):
                key = (model, data, int(batch), int(epochs))
                if key in want:
                    out[key] = CostBasis(int(n), int(g or 0), float(gh or 0.0),
                                         float(cs or 0.0) / 3600)  # fmt: skip
        return out

    def sweep_jobs(self) -> dict[int, tuple[int, int]]:
        """Each sweep's (jobs, fused jobs): distinct job ids of its links, and those that
        several of its runs share (the members of a fused job share their job's id)."""
        per_job = (
            select(SweepRun.sweep_id, func.count().label("n"))
            .where(SweepRun.job_id.is_not(None))
            .group_by(SweepRun.sweep_id, SweepRun.job_id)
            .subquery()
        )
        fused = func.sum(case((per_job.c.n > 1, 1), else_=0))
        q = select(per_job.c.sweep_id, func.count(), fused).group_by(per_job.c.sweep_id)
        with self.session() as s:
            return {sid: (int(n), int(f or 0)) for sid, n, f in s.execute(q)}

    def latest_sweep_runs(self, sweep_id: int | None,
                          limit: int | None) -> list[tuple[str, RunRecord]]:  # fmt: skip
        """``(point, run)`` of a sweep (``sweep_id`` None: every run of the store, point
        ""): at most ``limit``, running ones first, then the most recently active (ended,
        else started, else created); ``limit`` None: all of them, in the order they were
        asked for."""
        active = func.coalesce(Run.ended_at, Run.started_at, Run.created_at)
        order = (case((Run.status == RunStatus.running, 0), else_=1), active.desc(), Run.id.desc())
        if sweep_id is None:
            q = select(literal(""), *RUN_COLUMNS)
        else:
            q = (
                select(SweepRun.point, *RUN_COLUMNS)
                .join(Run, Run.id == SweepRun.run_id)
                .where(SweepRun.sweep_id == sweep_id)
            )
        if limit is None:
            q = q.order_by(Run.id if sweep_id is None else SweepRun.id)
        else:
            q = q.order_by(*order).limit(limit)
        with self.session() as s:
            return [(r[0], run_record_from_columns(r[1:], self.db_dir)) for r in s.execute(q)]
