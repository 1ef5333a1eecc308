"""Leases: how the store tells a live job from a dead one, and what a dead one becomes.

A training job writes ``runs.heartbeat_at`` every :data:`HEARTBEAT_S` seconds (and at every
epoch). A ``running`` run whose heartbeat is older than :data:`LEASE_S` has lost its job (a
signal, the OOM killer, a lost node). Whoever notices -- the sweeper that sees the process
gone, or any later ``status`` or sweep through :meth:`Leases.expire_leases` -- records the
same thing through :meth:`Leases.mark_killed`: the run is ``interrupted`` and the same
command resumes it from its checkpoint. A run killed twice in a row without finishing an
epoch in between ends ``failed`` ("killed twice without progress"), so a job that dies the
same way every time (out of memory, say) does not loop. A deliberate stop (Ctrl-C, a
cancelled sweep, a Slurm requeue) is recorded by :meth:`Leases.mark_cancelled` and never
counts as a kill.

Override the interval for tests or very slow shared file systems with
``GRADSWEEP_HEARTBEAT_S``.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence

from sqlalchemy import String, and_, case, cast, func, literal, update

from sweeper.store.db import Database
from sweeper.store.models import Run, RunStatus, utcnow
from sweeper.store.records import RunRecord

HEARTBEAT_S = float(os.environ.get("GRADSWEEP_HEARTBEAT_S", "30"))
LEASE_S = 3 * HEARTBEAT_S
KILLED_TWICE = "killed twice without progress"


class Leases(Database):
    def heartbeat(self, run_id: int) -> None:
        """The run's job is alive (called every HEARTBEAT_S by a thread of the job). A run
        whose lease was wrongly expired (a stall, not a death) is taken back."""
        with self.session() as s:
            s.execute(
                update(Run)
                .where(Run.id == run_id, Run.status.in_([RunStatus.running, RunStatus.interrupted]))
                .values(heartbeat_at=utcnow(), status=RunStatus.running, ended_at=None)
                .execution_options(synchronize_session=False)
            )

    def lease_alive(self, run: RunRecord, lease_s: float | None = None) -> bool:
        """Whether a ``running`` run's job showed life within the lease (so it is really
        being trained somewhere and must not be started twice)."""
        lease = LEASE_S if lease_s is None else lease_s
        seen = run.heartbeat_at or run.started_at or run.created_at
        if run.status != RunStatus.running or seen is None:
            return False
        return (utcnow() - seen).total_seconds() < lease

    def expire_leases(self, lease_s: float | None = None) -> int:
        """Every ``running`` run without a heartbeat for ``lease_s`` (default LEASE_S)
        seconds lost its job: recorded as killed (:meth:`mark_killed`). Returns how many."""
        lease = LEASE_S if lease_s is None else lease_s
        last = func.coalesce(Run.heartbeat_at, Run.started_at, Run.created_at)
        cond = and_(Run.status == RunStatus.running,
                    last < utcnow() - dt.timedelta(seconds=lease))  # fmt: skip
        return self._killed(cond, f"no heartbeat for over {lease:g} s (the job was killed or lost)")

    def mark_killed(self, run_ids: Sequence[int], why: str, detail: str = "") -> int:
        """Runs still ``running`` whose job is gone (its process ended without recording an
        outcome): ``interrupted``, or ``failed`` when killed twice without progress.
        ``detail`` (e.g. the job's state and the tail of its stderr) follows in ``error``."""
        if not run_ids:
            return 0
        cond = and_(Run.id.in_(list(run_ids)), Run.status == RunStatus.running)
        return self._killed(cond, why, detail)

    def _killed(self, cond: object, why: str, detail: str = "") -> int:
        """One conditional UPDATE, so a run that records its outcome at the same moment keeps
        it; its checkpoint is kept, so a rerun resumes it."""
        # no progress: not past the epoch where it was last killed (a job resumed from an
        # earlier checkpoint that dies again before getting further is looping too)
        again = and_(Run.killed_at_epoch.is_not(None), Run.epoch <= Run.killed_at_epoch)
        more = f"\n{detail}" if detail else ""
        resume = f"interrupted: {why}; the same command resumes it from its last checkpoint{more}"
        failed = (f"failed: {KILLED_TWICE} (its job was killed again before it finished an "
                  f"epoch: {why}); not resumed again, retry with hydra.launcher.retry_failed=true"
                  f"{more}")  # fmt: skip
        status_type = Run.__table__.c.status.type  # PostgreSQL's native enum: bind it as one
        with self.session() as s:
            res = s.execute(
                update(Run)
                .where(cond)  # type: ignore[arg-type]
                .values(
                    status=cast(
                        case(
                            (again, literal(RunStatus.failed.value, String)),
                            else_=literal(RunStatus.interrupted.value, String),
                        ),
                        status_type,
                    ),
                    error=case((again, failed), else_=resume),
                    killed_at_epoch=Run.epoch,
                    ended_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )
            return int(res.rowcount or 0)

    def mark_cancelled(self, run_ids: Sequence[int], why: str) -> None:
        """Runs still ``running`` after their jobs were deliberately stopped (a cancelled
        sweep, a requeue): ``interrupted``, not counted as a kill."""
        if not run_ids:
            return
        with self.session() as s:
            s.execute(
                update(Run)
                .where(Run.id.in_(list(run_ids)), Run.status == RunStatus.running)
                .values(
                    status=RunStatus.interrupted,
                    ended_at=utcnow(),
                    error=f"interrupted: {why}; the same command resumes it from its last checkpoint",
                )
                .execution_options(synchronize_session=False)
            )
