"""A run's life in the store: claimed (queued), started, one row per epoch, finished; and
the sweeps that ask for runs. Every write goes through one session scope (commit or roll
back); a config hash is never inserted twice."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sweeper.store.db import Database
from sweeper.store.lease import CLAIMABLE, HOST, Leases, LostRun
from sweeper.store.models import EpochMetric, FilterStat, Run, RunStatus, Sweep, SweepRun, utcnow
from sweeper.store.records import (
    RUN_COLUMNS,
    RunRecord,
    SweepRecord,
    artifact_dir,
    run_record,
    run_record_from_columns,
    sweep_record,
)
from trainers.records import EpochMetrics, LayerFilterStats

CHUNK = 500  # ids or hashes per IN (...): well under any database's limit on parameters
# what a new run's row needs besides its hash: its grid columns and resolved config, made
# only for the runs that do not exist yet
NewRow = Callable[[], tuple[dict[str, Any], dict]]


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

    def claim_runs(self, sweep_id: int,
                   points: Sequence[tuple[str, str, NewRow]]) -> dict[str, RunRecord]:  # fmt: skip
        """:meth:`claim_run` and :meth:`link_run` for a whole grid in a few transactions: the
        run of each ``(config_hash, point, new_row)`` -- created ``queued`` from
        ``new_row()`` where missing -- linked to the sweep under the first point that asks
        for it. Returns the runs by hash (a new run's record holds the config as given,
        not read back). Never duplicates a hash: a chunk that races another process's
        insert is redone run by run."""
        first: dict[str, tuple[str, NewRow]] = {}
        for config_hash, point, new_row in points:
            first.setdefault(config_hash, (point, new_row))
        hashes = list(first)
        made: dict[str, RunRecord] = {}
        returning = self.engine.dialect.insert_executemany_returning_sort_by_parameter_order
        for i in range(0, len(hashes), CHUNK):
            part = hashes[i : i + CHUNK]
            try:
                with self.session() as s:
                    have = set(s.scalars(select(Run.config_hash).where(Run.config_hash.in_(part))))
                    rows = []
                    for h in part:
                        if h not in have:
                            columns, config = first[h][1]()
                            rows.append({"config_hash": h, "config": config, "epoch": 0,
                                         "status": RunStatus.queued, "created_at": utcnow(),
                                         **columns})  # fmt: skip
                    if rows and returning:  # each new run's id, in the rows' order
                        q = insert(Run).returning(Run.id, sort_by_parameter_order=True)
                        ids = s.scalars(q, rows).all()
                    elif rows:
                        s.execute(insert(Run), rows)
                if rows and returning:
                    for row, rid in zip(rows, ids, strict=True):
                        h = row["config_hash"]
                        where = artifact_dir(None, h, row["config"], self.db_dir)
                        made[h] = RunRecord(id=rid, run_dir=where, **row)
            except IntegrityError:  # another process inserted one of them first: use its row
                for h in part:
                    self.claim_run(h, *first[h][1]())
        runs: dict[str, RunRecord] = {}
        rest = [h for h in hashes if h not in made]
        with self.session() as s:
            for i in range(0, len(rest), CHUNK):
                q = select(*RUN_COLUMNS).where(Run.config_hash.in_(rest[i : i + CHUNK]))
                for r in s.execute(q):
                    rec = run_record_from_columns(r, self.db_dir)
                    runs[rec.config_hash] = rec
            runs.update(made)
            linked = set(s.scalars(select(SweepRun.run_id).where(SweepRun.sweep_id == sweep_id)))
            links = [{"sweep_id": sweep_id, "run_id": runs[h].id, "point": first[h][0]}
                     for h in hashes if runs[h].id not in linked]  # fmt: skip
            if links:
                s.execute(insert(SweepRun), links)
        return runs

    def claim_many(self, run_ids: Sequence[int], sweep_id: int,
                   retry: bool = False) -> dict[int, int | None]:  # fmt: skip
        """:meth:`Leases.claim` for many runs at once: for each run its new token, or None
        when it is done, being trained, claimed by another live sweep, or failed and not
        ``retry`` -- the same decision, the same compare-and-set on ``runs.owner`` (one
        UPDATE per chunk and prior (status, token), its RETURNING saying which rows it
        took; run by run where the database has no UPDATE ... RETURNING)."""
        out: dict[int, int | None] = dict.fromkeys(run_ids)
        ids = list(out)
        retried = (RunStatus.failed, RunStatus.diverged)
        alive: dict[int, bool] = {}  # a holding sweep's liveness, asked once
        with self.session() as s:
            for i in range(0, len(ids), CHUNK):
                rows = s.execute(
                    select(Run.id, Run.status, Run.owner, Run.claimed_by)
                    .where(Run.id.in_(ids[i : i + CHUNK]))
                ).all()  # fmt: skip
                groups: dict[tuple[RunStatus, int], list[int]] = {}
                for rid, status, token, holder in rows:
                    ok = status in CLAIMABLE or (retry and status in retried)
                    if ok and status == RunStatus.queued and holder not in (None, sweep_id):
                        if holder not in alive:
                            alive[holder] = Leases._sweep_alive(s, holder)
                        ok = not alive[holder]
                    if ok:
                        groups.setdefault((status, token or 0), []).append(rid)
                for (status, token), rids in groups.items():
                    values: dict = {"owner": token + 1, "claimed_by": sweep_id,
                                    "status": RunStatus.queued}  # fmt: skip
                    if status in retried:  # a retry: a fresh start
                        values.update(error=None, killed_at_epoch=None, diverged_step=None)
                    cas = (
                        update(Run)
                        .where(Run.owner == token, Run.status == status)
                        .values(**values)
                        .execution_options(synchronize_session=False)
                    )
                    if self.engine.dialect.update_returning:
                        took = s.scalars(cas.where(Run.id.in_(rids)).returning(Run.id)).all()
                    else:
                        took = [r for r in rids if s.execute(cas.where(Run.id == r)).rowcount == 1]
                    for rid in took:
                        out[rid] = token + 1
        return out

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
                now_at = s.execute(select(Run.owner, Run.status).where(Run.id == run_id)).first()
                held = (f" (it is {RunStatus(now_at[1]).value} under token {now_at[0]}, this "
                        f"job holds {owner})" if now_at else " (it no longer exists)")  # fmt: skip
                raise LostRun(run_id, " to start" + held)
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
    def create_sweep(self, name: str, command: str, launcher: str, n_points: int,
                     parent_id: int | None = None) -> SweepRecord:  # fmt: skip
        """A sweep's record, alive (its sweeper beats: :meth:`Leases.sweep_heartbeat`);
        ``parent_id``: the sweep a resolve sweep adds seeds to."""
        with self.session() as s:
            sweep = Sweep(name=name, command=command, launcher=launcher, n_points=n_points,
                          heartbeat_at=utcnow(), host=HOST, pid=os.getpid(),
                          parent_id=parent_id)  # fmt: skip
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
