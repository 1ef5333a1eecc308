"""Slurm specifics of the launcher: pre-flight checks and job liveness from squeue.

Why not submitit's watcher: it asks ``sacct``, which fails where Slurm accounting is
disabled (common on small clusters): it then warns at every poll and reports every job as
UNKNOWN, so a job that dies without a result is never seen to end. Here liveness comes
from ``squeue``, a job's outcome from the results store (each job records its own), and
submitit's result file is read only once it exists.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainers.registry import ConfigError

if TYPE_CHECKING:
    from sweeper.store import RunRecord, Store

SLURM_COMMANDS = ("sbatch", "srun", "squeue", "scancel", "sinfo")
# squeue states after which a job will not run again by itself. Anything else (PENDING,
# RUNNING, REQUEUED, REQUEUE_HOLD, CONFIGURING, COMPLETING, SUSPENDED, SPECIAL_EXIT, ...) is
# alive: a requeued job passes through REQUEUED and PENDING before it runs again. PREEMPTED
# is here because it ends a job under PreemptMode=CANCEL; under REQUEUE it is followed by
# PENDING, which the grace period of sweeper.launch.backends waits for.
SLURM_ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "REVOKED",
    "TIMEOUT",
}


def check_slurm(partition: str | None) -> None:
    """Slurm's commands are there, the controller answers and the partition exists:
    checked before anything is written (one line on error, like any bad input)."""
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        raise ConfigError(
            "hydra/launcher=slurm needs Slurm's client commands on PATH; "
            f"not found: {', '.join(missing)}"
        )
    try:
        q = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise ConfigError("hydra/launcher=slurm: sinfo did not answer within 60 s") from None
    if q.returncode != 0:
        why = (q.stderr.strip().splitlines() or [f"exit status {q.returncode}"])[0]
        raise ConfigError(f"hydra/launcher=slurm: Slurm cannot be reached ({why})")
    known = sorted({ln.strip().rstrip("*") for ln in q.stdout.splitlines() if ln.strip()})
    if partition is not None and partition not in known:
        raise ConfigError(
            f"hydra.launcher.partition={partition} is not allowed; "
            f"known partitions: {', '.join(known) or '(none)'}"
        )


class SlurmQueue:
    """The states of one submission's jobs, from ``squeue`` (no accounting needed).

    submitit's own watcher asks ``sacct``, which fails where accounting is disabled (it
    then logs a warning at every poll and reports every job as UNKNOWN, so ``job.done()``
    and ``job.wait()`` never see a dead job end). Nothing here calls it: a job's liveness
    comes from squeue, its outcome from the results store, and submitit's ``result_pickle``
    is only read once it exists.
    """

    def __init__(self, main_ids: list[str], warn: Callable[[str], None]) -> None:
        self.main_ids, self.warn = main_ids, warn  # one per submission (a job or an array)
        self.failing_since: float | None = None
        self.warned = False

    def states(self, main_ids: list[str] | None = None) -> dict[str, str] | None:
        """``{job_id: STATE}`` for the jobs squeue still lists (array tasks one by one);
        a job Slurm no longer knows is absent; None when squeue failed. One ``squeue`` per
        submission (a purged id would make squeue refuse a whole list)."""
        out: dict[str, str] = {}
        for main_id in self.main_ids if main_ids is None else main_ids:
            cmd = ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", main_id]
            try:
                q = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as e:
                return self._failed(f"{type(e).__name__}: {e}")
            if q.returncode != 0:
                if "Invalid job id" in q.stderr:  # purged from the controller: all ended
                    continue
                return self._failed(q.stderr.strip() or f"exit status {q.returncode}")
            for line in q.stdout.splitlines():
                jid, _, state = line.strip().partition("|")
                if jid:
                    out[jid] = state.strip().split()[0] if state.strip() else "UNKNOWN"
        if self.warned:
            self.warn("squeue answers again")
        self.failing_since, self.warned = None, False
        return out

    def _failed(self, why: str) -> None:
        now = time.monotonic()
        self.failing_since = self.failing_since or now
        if not self.warned and now - self.failing_since >= 60:
            self.warn(f"warning: squeue has been failing for a minute ({why}); still waiting")
            self.warned = True
        return None


def max_array_size() -> int:
    """The cluster's ``MaxArraySize`` (a job array holds at most this many tasks; 0: no
    arrays), from ``scontrol show config``; Slurm's default 1001 where it cannot be read."""
    try:
        q = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return 1001
    for line in q.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize" and value.strip().isdigit():
            return int(value.strip())
    return 1001


def listed(job_ids: list[str]) -> bool | None:
    """Whether Slurm still has one of these jobs (pending, running, suspended, requeued:
    anything but an ended state): its run's job is not dead, whatever its heartbeat says.
    None where there is no ``squeue`` or it does not answer."""
    if shutil.which("squeue") is None:
        return None
    states = SlurmQueue(sorted({j.split("_")[0] for j in job_ids}), lambda _m: None).states()
    if states is None:
        return None
    return any(states.get(j) not in (None, *SLURM_ENDED) for j in job_ids)


def job_alive_elsewhere(store: Store) -> Callable[[RunRecord], bool | None]:
    """What a backend knows of a run's job besides its heartbeat: a Slurm job that
    ``squeue`` still lists (suspended, requeued and pending, running) is not dead. Here,
    light to import, so that ``status`` asks it too."""

    def alive(run: RunRecord) -> bool | None:
        jobs = store.job_ids(run.id)
        return listed(jobs) if jobs else None

    return alive


def job_gone(job: Any, kind: str, states: dict[str, str] | None = None) -> bool:
    """Local: submitit's own answer. Slurm: the result file, else squeue's (never sacct)."""
    if kind == "local":
        # the result file is written (atomically) once the job's outcome is in the store;
        # the process then takes about a second more to exit (torch's teardown): the slot is
        # free for the next job as soon as the file is there
        return job.paths.result_pickle.exists() or job.done()
    if job.paths.result_pickle.exists():
        return True
    if states is None:
        return False
    state = states.get(str(job.job_id))
    return state is None or state in SLURM_ENDED


def job_error(job: Any, kind: str = "local", state: str | None = None) -> str:
    if kind == "local" and not job.paths.result_pickle.exists():
        # the job's process has ended (it is only asked then) and writes its result file
        # before it exits: no file means none will come. submitit's own answer would wait
        # 15 s for the file first, for each run of a fused job.
        tail = _tail(job.paths.stderr, 40)
        msg = f"job {job.job_id} ended without a result (state: {job.state})"
        return f"{msg}; stderr ({job.paths.stderr}):\n{tail}" if tail else f"{msg}; no stderr"
    if kind == "local" or job.paths.result_pickle.exists():
        try:  # with the result file present this neither waits nor asks sacct
            exc = job.exception()
            if exc is not None:
                return str(exc)
        except Exception as e:  # no result at all
            return f"job {job.job_id} ended without a result ({type(e).__name__}: {e})"
        return f"job {job.job_id} ended without recording an outcome; see {job.paths.stderr}"
    how = f"in state {state}" if state else "(no longer listed by squeue)"
    msg = f"Slurm job {job.job_id} ended {how} without recording an outcome"
    tail = _tail(job.paths.stderr, 40)
    return f"{msg}; stderr ({job.paths.stderr}):\n{tail}" if tail else f"{msg}; no stderr"


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).rstrip()
    except OSError:
        return ""
