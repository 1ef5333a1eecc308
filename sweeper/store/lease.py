"""One owner per run: claims, fencing tokens, heartbeats, and what a dead job's run becomes.

**Claims and tokens.** A run is trained only by the job that holds its *token*
(``runs.owner``, the fencing token of Kleppmann's "How to do distributed locking"). Taking
a run for a new job -- a sweep's point, a search's trial, a single run -- is one
compare-and-set (:meth:`Leases.claim`): it increments the token and returns it, or returns
None when someone else holds the run (a live job trains it, or a live sweep has claimed it
for a job of its own). The job then writes only while the run still holds its token: its
start, every epoch row, its outcome and its heartbeat are conditional updates
(``... WHERE id = :run AND owner = :token``), and one that touches no row raises
:class:`LostRun` -- the job stops there and writes nothing more. A run whose job is declared
dead gets a new token too, so a job that was only paused (``SIGSTOP``, a suspended Slurm
job, a long stall) and wakes up cannot write over the run's new owner.

**Liveness.** A training job writes ``runs.heartbeat_at`` every :data:`HEARTBEAT_S` seconds
(and at every epoch), and records its host and process id. A ``running`` run whose job is
gone -- its process is dead on this host, or its heartbeat is older than :data:`LEASE_S`
and the caller has no better knowledge (``alive``: a Slurm job ``squeue`` still lists, e.g.
SUSPENDED, is not dead) -- is recorded killed by whoever notices (:meth:`expire_leases`,
:meth:`mark_killed`): ``interrupted``, resumed by the same command; killed again before it
got past the epoch where it was last killed, ``failed`` ("killed twice without progress"),
so a job that dies the same way every time does not loop. A deliberate stop (Ctrl-C, a
cancelled sweep, a Slurm requeue) is :meth:`mark_cancelled`: ``interrupted``, never a kill.
A sweep's claims hold while its sweeper beats (``sweeps.heartbeat_at``); a sweep whose
sweeper died is recorded ``abandoned`` by the next command that looks
(:meth:`close_abandoned`).

``GRADSWEEP_HEARTBEAT_S`` overrides the interval (tests, very slow shared file systems).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Callable, Sequence

from sqlalchemy import String, and_, case, cast, func, literal, or_, select, update

from sweeper.store.db import Database
from sweeper.store.models import Run, RunStatus, Sweep, utcnow
from sweeper.store.records import RunRecord

HEARTBEAT_S = float(os.environ.get("GRADSWEEP_HEARTBEAT_S", "30"))
LEASE_S = 3 * HEARTBEAT_S
KILLED_TWICE = "killed twice without progress"
HOST = socket.gethostname()
# a run a new job may take: waiting for one, or stopped and resumable
CLAIMABLE = (RunStatus.queued, RunStatus.interrupted, RunStatus.pruned)


class LostRun(Exception):
    """This job no longer owns its run: another job took it over, or the run was declared
    dead while this job was paused. The job stops and writes nothing more."""

    def __init__(self, run_id: int, what: str = "") -> None:
        super().__init__(f"run {run_id} is no longer this job's{what}")
        self.run_id = run_id


def pid_alive(host: str | None, pid: int | None, since: dt.datetime | None = None) -> bool | None:
    """Whether process ``pid`` of ``host`` is alive and running: True or False on this host,
    None (not known: judge it by its heartbeat) elsewhere, when none is recorded, or when
    the process is stopped (``SIGSTOP``, Ctrl-Z: it may never continue, and if it does, its
    token tells it that it lost its run). ``since``: a time that process wrote (its heartbeat,
    UTC): a process of that id started later is another one (the id was reused): dead."""
    if host != HOST or not pid:
        return None
    import psutil

    try:
        proc = psutil.Process(pid)
        if since is not None:
            started = since.replace(tzinfo=dt.timezone.utc).timestamp()
            if proc.create_time() > started + 2.0:  # clock granularity
                return False
        state = proc.status()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # someone else's process we may not inspect: alive
        return True
    if state in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        return False
    if state in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
        return None
    return True


class Leases(Database):
    # ------------------------------------------------------------------- claims
    def claim(self, run_id: int, sweep_id: int | None, retry: bool = False) -> int | None:
        """Take the run for a new job (compare-and-set): its new token, or None when it is
        done, being trained, claimed by another live sweep, or failed and not ``retry``."""
        with self.session() as s:
            row = s.get(Run, run_id)
            if row is None:
                return None
            status, token, holder = row.status, row.owner or 0, row.claimed_by
            ok = status in CLAIMABLE or (retry and status in (RunStatus.failed,
                                                              RunStatus.diverged))  # fmt: skip
            if ok and status == RunStatus.queued and holder not in (None, sweep_id):
                ok = not self._sweep_alive(s, holder)
            if not ok:
                return None
            values: dict = {"owner": token + 1, "claimed_by": sweep_id,
                            "status": RunStatus.queued}  # fmt: skip
            if status in (RunStatus.failed, RunStatus.diverged):  # a retry: a fresh start
                values.update(error=None, killed_at_epoch=None, diverged_step=None)
            res = s.execute(
                update(Run)
                .where(Run.id == run_id, Run.owner == token, Run.status == status)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            return token + 1 if res.rowcount == 1 else None

    @staticmethod
    def _sweep_alive(s: object, sweep_id: int) -> bool:
        sw = s.get(Sweep, sweep_id)  # type: ignore[attr-defined]
        if sw is None or sw.ended_at is not None:
            return False
        seen = pid_alive(sw.host, sw.pid, sw.heartbeat_at)
        if seen is not None:
            return seen
        beat = sw.heartbeat_at or sw.created_at
        return beat is not None and (utcnow() - beat).total_seconds() < LEASE_S

    def owns(self, run_id: int, owner: int) -> bool:
        """Whether the run still holds ``owner`` (and is running)."""
        with self.session() as s:
            got = s.execute(select(Run.owner, Run.status).where(Run.id == run_id)).first()
        return got is not None and got[0] == owner and got[1] == RunStatus.running

    # ---------------------------------------------------------------- heartbeats
    def heartbeat(self, run_id: int, owner: int) -> bool:
        """The run's job is alive; False when it no longer owns the run (then it stops)."""
        with self.session() as s:
            res = s.execute(
                update(Run)
                .where(Run.id == run_id, Run.owner == owner, Run.status == RunStatus.running)
                .values(heartbeat_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            return res.rowcount == 1

    def job_alive(self, run: RunRecord, lease_s: float | None = None) -> bool:
        """Whether a ``running`` run's job shows life: its process on this host, else its
        heartbeat within the lease (so it is really being trained and must not be started
        twice)."""
        if run.status != RunStatus.running:
            return False
        seen = pid_alive(run.host, run.pid, run.heartbeat_at)
        if seen is not None:
            return seen
        lease = LEASE_S if lease_s is None else lease_s
        beat = run.heartbeat_at or run.started_at or run.created_at
        return beat is not None and (utcnow() - beat).total_seconds() < lease

    lease_alive = job_alive  # the name earlier versions used

    # -------------------------------------------------------------------- kills
    def expire_leases(self, lease_s: float | None = None,
                      alive: Callable[[RunRecord], bool | None] | None = None) -> int:  # fmt: skip
        """Every ``running`` run whose job is gone -- its process dead on this host, or no
        heartbeat for ``lease_s`` (default LEASE_S) where ``alive`` does not vouch for it --
        recorded as killed (:meth:`mark_killed`). Returns how many."""
        lease = LEASE_S if lease_s is None else lease_s
        old = utcnow() - dt.timedelta(seconds=lease)
        last = func.coalesce(Run.heartbeat_at, Run.started_at, Run.created_at)
        with self.session() as s:
            rows = s.execute(
                select(Run.id, Run.owner, Run.host, Run.pid, Run.heartbeat_at, Run.started_at,
                       Run.created_at)
                .where(Run.status == RunStatus.running,
                       or_(last < old, and_(Run.host == HOST, Run.pid.is_not(None))))
            ).all()  # fmt: skip
        dead = []
        for rid, owner, host, pid, beat, started, created in rows:
            seen = pid_alive(host, pid, beat)
            if seen is None:
                stamp = beat or started or created
                stale = stamp is not None and stamp < old
                if not stale:
                    continue
                if alive is not None:
                    rec = RunRecord(id=rid, owner=owner, host=host, pid=pid)
                    if alive(rec):
                        continue
            elif seen:
                continue
            dead.append((rid, owner or 0))
        why = (f"no heartbeat for over {lease:g} s and no process (the job was killed or "
               "lost)")  # fmt: skip
        return self.mark_killed(dead, why)

    def mark_killed(self, runs: Sequence[tuple[int, int]], why: str, detail: str = "") -> int:
        """Runs still ``running`` under these (run id, token) pairs whose job is gone: each
        ``interrupted``, or ``failed`` when killed again without progress, and fenced (a new
        token: the job, should it only have been paused, cannot write any more). ``detail``
        (the job's state, the tail of its stderr) follows in ``error``."""
        again = and_(Run.killed_at_epoch.is_not(None), Run.epoch <= Run.killed_at_epoch)
        more = f"\n{detail}" if detail else ""
        resume = f"interrupted: {why}; the same command resumes it from its last checkpoint{more}"
        failed = (f"failed: {KILLED_TWICE} (its job was killed again before it got past the "
                  f"epoch where it was last killed: {why}); not resumed again, retry with "
                  f"hydra.launcher.retry_failed=true{more}")  # fmt: skip
        status_type = Run.__table__.c.status.type  # PostgreSQL's native enum: bind it as one
        n = 0
        with self.session() as s:
            for rid, owner in runs:
                res = s.execute(
                    update(Run)
                    .where(Run.id == rid, Run.owner == owner, Run.status == RunStatus.running)
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
                        owner=Run.owner + 1,
                    )
                    .execution_options(synchronize_session=False)
                )
                n += int(res.rowcount or 0)
        return n

    def mark_cancelled(self, runs: Sequence[tuple[int, int]], why: str) -> None:
        """Runs still ``running`` under these (run id, token) pairs after their jobs were
        deliberately stopped (a cancelled sweep, a requeue): ``interrupted``, not a kill;
        the token is kept (a requeued job starts again with it)."""
        with self.session() as s:
            for rid, owner in runs:
                s.execute(
                    update(Run)
                    .where(Run.id == rid, Run.owner == owner, Run.status == RunStatus.running)
                    .values(
                        status=RunStatus.interrupted,
                        ended_at=utcnow(),
                        error=f"interrupted: {why}; the same command resumes it from its "
                        "last checkpoint",
                    )
                    .execution_options(synchronize_session=False)
                )

    # ------------------------------------------------------------ sweeps' lives
    def sweep_heartbeat(self, sweep_id: int) -> None:
        with self.session() as s:
            s.execute(update(Sweep).where(Sweep.id == sweep_id).values(heartbeat_at=utcnow()))

    def close_abandoned(self) -> list[int]:
        """Sweeps whose sweeper died (no heartbeat within the lease, or its process dead on
        this host) without recording their end: ended ``abandoned`` at their last beat."""
        out = []
        with self.session() as s:
            for sw in s.scalars(select(Sweep).where(Sweep.ended_at.is_(None))):
                if sw.heartbeat_at is None and sw.outcome is None and sw.pid is None:
                    continue  # made by a version without heartbeats: not ours to judge
                if not self._sweep_alive(s, sw.id):
                    sw.ended_at = sw.heartbeat_at or sw.created_at
                    sw.outcome = "abandoned"
                    out.append(sw.id)
        return out
