"""Where jobs run: two backends of the dispatcher, local processes and a Slurm cluster.

Both submit :class:`~sweeper.launch.job.TrainJob` through submitit and answer the same questions:
how many jobs may be in flight, is this job's process gone for good, why did it end without
recording an outcome (and was it killed, or did it raise), and how to cancel the running
ones. A job's *outcome* is never read from here: each job records its own in the store.

Why not hydra-submitit-launcher: it blocks until every job of the array ends, reports a task
exception as a success, starts all local jobs at once and never requeues. Why not
submitit's Slurm watcher: it asks ``sacct``, which fails where accounting is disabled
(:mod:`sweeper.launch.slurm`).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sweeper.config.launcher import LauncherParams
from sweeper.launch.slurm import SlurmQueue, check_slurm, job_error, job_gone, max_array_size
from trainers.registry import ConfigError, first_line

# A Slurm job that looks gone (an ended state, or no longer listed) while its run has no
# outcome must look gone this long before it is taken for killed: a requeue after
# pre-emption and squeue itself lag a little. GRADSWEEP_SLURM_GRACE_S overrides it (tests).
SLURM_GONE_GRACE_S = float(os.environ.get("GRADSWEEP_SLURM_GRACE_S", "15"))


@dataclass(eq=False)  # compared by identity
class Submission:
    """One job to start: what it runs and where its handle goes."""

    args: tuple[Any, ...]  # TrainJob()(*args): cfg, mlflow tags, threads, trial link
    slot: int | None = None  # local: which slot (GPUs) it holds
    job: Any = None  # the submitit job, once submitted
    slurm_state: str | None = None  # last state squeue reported
    gone_since: float | None = None  # Slurm: when the job was first seen gone
    error: str | None = None  # why it ended without an outcome, once asked (Dispatcher)


class Backend(Protocol):
    kind: str
    capacity: float  # jobs in flight at once (inf: all at once, e.g. one Slurm job array)
    threads: int | None  # torch threads per job

    def submit(self, subs: Sequence[Submission]) -> None: ...

    def gone(self, subs: Sequence[Submission]) -> list[Submission]: ...

    def release(self, sub: Submission) -> None: ...

    def ended_without_result(self, sub: Submission) -> bool: ...

    def error(self, sub: Submission) -> str: ...

    def cancel(self, subs: Sequence[Submission]) -> None: ...


def gpu_count() -> int:
    from sweeper.config.identity import surely_no_cuda

    if surely_no_cuda():  # no torch import on a CPU machine (sweeper.config.identity)
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def threads_per_job(n_slots: int, tasks: int) -> int:
    """torch intra-op threads for each of ``n_slots`` local jobs of ``tasks`` processes.

    The cores are shared out evenly, on GPU machines too: each process would otherwise
    start one thread per core, and four packed jobs on a 16-core box would run 64 spinning
    threads for their CPU-side work (loss bookkeeping, checkpoints, evaluation sync). An
    ``OMP_NUM_THREADS`` set in the environment caps it (the machine is shared with other
    work: e.g. two test files running sweeps side by side on two cores)."""
    share = max(1, (os.cpu_count() or 1) // (n_slots * tasks))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(share, int(cap)) if cap.isdigit() and int(cap) > 0 else share


def local_slots(p: LauncherParams, gpus: int, cap: int | None = None) -> list[tuple[int, ...]]:
    """Local slots, each the GPUs one job gets (CUDA_VISIBLE_DEVICES), at most ``cap``.

    One GPU per job, ``jobs_per_gpu`` jobs sharing each GPU (small jobs leave most of a big
    GPU idle); or ``gpus_per_job`` GPUs per job for DDP; none on a CPU-only machine, where
    ``max_parallel`` jobs (default 1) share the cores.
    """
    limit = (
        min(x for x in (p.max_parallel, cap) if x is not None) if (p.max_parallel or cap) else None
    )
    if not gpus:
        return [()] * (limit or 1)
    k = max(1, p.gpus_per_job)
    if k > gpus:
        raise ConfigError(
            f"hydra.launcher.gpus_per_job={k} is not allowed; this machine has {gpus} GPU(s)"
        )
    if k == 1:
        slots = [(g,) for g in range(gpus) for _ in range(p.jobs_per_gpu)]
    else:
        slots = [tuple(range(i, i + k)) for i in range(0, gpus - k + 1, k)]
    return slots[:limit] if limit else slots


@contextlib.contextmanager
def interruptible_children() -> Iterator[None]:
    """Local jobs are cancelled with SIGINT. A sweeper started in the background of a
    script (or by a tool that ignores SIGINT) would hand its jobs SIGINT *ignored*, and
    cancelling would do nothing: while a job is being started, SIGINT gets Python's
    handler so the child starts with the default; the sweeper's own setting is restored."""
    ignored = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    )
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def controllers_in_own_session() -> Iterator[None]:
    """submitit's local job controllers started in a session (process group) of their own.

    Why: Ctrl-C in a terminal signals the whole foreground process group. A controller that
    gets SIGINT forwards it to its tasks and SIGKILLs them a second later -- often before a
    job has recorded its runs ``interrupted`` -- and prints its own KeyboardInterrupt
    traceback on the sweeper's stderr. In a session of their own, only the sweeper gets the
    signal, and it cancels each job the graceful way (:meth:`LocalBackend.cancel`).
    submitit starts the controller with ``subprocess.Popen`` and takes no option for it, so
    the Popen that its local module sees gets ``start_new_session=True`` while we submit."""
    import submitit.local.local as local

    real = local.subprocess

    class _Subprocess:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def Popen(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - subprocess's name
            return real.Popen(*args, start_new_session=True, **kwargs)

    local.subprocess = _Subprocess()  # type: ignore[assignment]
    try:
        yield
    finally:
        local.subprocess = real


def job_tasks(job: Any) -> list[Any]:
    """The task processes of a local submitit job (children of its controller running
    ``submitit.core._submit``), as psutil processes; [] when gone or not started yet."""
    import psutil

    try:
        kids = psutil.Process(int(job.job_id)).children(recursive=True)
    except (psutil.Error, ValueError):
        return []
    out = []
    for k in kids:
        try:
            if "submitit.core._submit" in " ".join(k.cmdline()):
                out.append(k)
        except psutil.Error:
            continue
    return out


class LocalBackend:
    """submitit's local executor: one process (group) per job on this machine, at most one
    job per slot; a slot is the GPUs the job sees (none on a CPU machine)."""

    kind = "local"

    def __init__(self, params: LauncherParams, folder: Path, cap: int | None = None) -> None:
        import submitit

        self.params = params
        self.slots = local_slots(params, gpu_count(), cap)
        self.free = list(range(len(self.slots)))
        self.capacity = float(len(self.slots))
        self.threads: int | None = threads_per_job(len(self.slots), params.tasks)
        self.ex = submitit.LocalExecutor(folder=folder)
        self.ex.update_parameters(timeout_min=params.timeout_min)

    def submit(self, subs: Sequence[Submission]) -> None:
        from sweeper.launch.job import TrainJob

        for sub in subs:
            sub.slot = self.free.pop(0)
            gpus = self.slots[sub.slot]
            self.ex.update_parameters(
                tasks_per_node=self.params.tasks, gpus_per_node=len(gpus), visible_gpus=gpus
            )
            with interruptible_children(), controllers_in_own_session():
                sub.job = self.ex.submit(TrainJob(), *sub.args)

    def gone(self, subs: Sequence[Submission]) -> list[Submission]:
        return [s for s in subs if job_gone(s.job, "local")]

    def release(self, sub: Submission) -> None:
        if sub.slot is not None:
            self.free.append(sub.slot)
            sub.slot = None

    def ended_without_result(self, sub: Submission) -> bool:
        """Killed (a signal, the OOM killer): submitit found no result file."""
        return not sub.job.paths.result_pickle.exists()

    def error(self, sub: Submission) -> str:
        return job_error(sub.job, "local")

    def cancel(self, subs: Sequence[Submission]) -> None:
        """SIGINT to each job's tasks (their controller would SIGKILL them a second after
        forwarding it); each records its runs ``interrupted`` and exits, and its controller
        ends with it. At most a minute, then submitit's own cancel (a job not started yet,
        or one that does not stop)."""
        for s in subs:
            tasks = job_tasks(s.job)
            for t in tasks:
                with contextlib.suppress(Exception):
                    t.send_signal(signal.SIGINT)
            if not tasks:
                s.job.cancel(check=False)
        deadline = time.monotonic() + 60.0
        for s in subs:
            while not s.job.done() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not s.job.done():
                s.job.cancel(check=False)


class SlurmBackend:
    """One job array per submission batch (a grid goes out as one array, or as several of
    at most the cluster's ``MaxArraySize`` tasks; a search's trials one job each). Liveness from ``squeue`` (never ``sacct``); a requeued job (time-out,
    pre-emption, ``scontrol requeue``) stays alive and resumes from its checkpoint."""

    kind = "slurm"

    def __init__(self, params: LauncherParams, folder: Path, name: str,
                 capacity: float = math.inf, out: Any = print) -> None:  # fmt: skip
        import submitit

        self.params, self.out, self.capacity = params, out, capacity
        self.threads: int | None = params.cpus_per_task  # else torch uses every core of the node
        # The job runs `<python> -u -m submitit.core._submit`; submitit's default python is
        # sys.executable, i.e. the interpreter of this sweep (the project's venv), and sbatch
        # exports this environment (PATH, PYTHONPATH, SLURM_CONF, ...) to the job.
        self.ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=params.max_requeues)
        opts: dict[str, Any] = dict(
            time=params.timeout_min,
            cpus_per_task=params.cpus_per_task,
            mem=f"{params.mem_gb}GB",
            ntasks_per_node=params.tasks,  # one process per GPU (DDP)
            array_parallelism=params.array_parallelism,
            # SIGUSR2 this long before the time limit: submitit checkpoints and requeues
            signal_delay_s=min(90, max(15, params.timeout_min * 60 // 4)),
            setup=list(params.setup),
            job_name=name,
        )
        if params.partition:
            opts["partition"] = params.partition
        if params.gpus_per_job:
            opts["gpus_per_node"] = params.gpus_per_job
        if params.additional:  # raw sbatch options: {"constraint": "a100", "account": "x"}
            opts["additional_parameters"] = dict(params.additional)
        try:
            self.ex.update_parameters(**opts)
        except ValueError as e:
            raise ConfigError(f"hydra/launcher=slurm: {first_line(e)}") from None
        self.queue = SlurmQueue([], out)
        self.live: dict[str, int] = {}  # submission id -> its jobs not yet released
        # sbatch refuses an array larger than this: a larger grid goes out as several
        self.array_max = max(1, max_array_size())

    def submit(self, subs: Sequence[Submission]) -> None:
        for i in range(0, len(subs), self.array_max):
            self._submit_array(subs[i : i + self.array_max])

    def _submit_array(self, subs: Sequence[Submission]) -> None:
        from sweeper.launch.job import TrainJob

        err = io.StringIO()
        try:  # one job array (a single job when alone)
            with contextlib.redirect_stderr(err), self.ex.batch():
                for s in subs:
                    s.job = self.ex.submit(TrainJob(), *s.args)
        except Exception as e:  # sbatch refused: submitit raises with sbatch's stderr
            text = (str(e) or err.getvalue()).strip()
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            why = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "")
            raise ConfigError(f"sbatch refused the jobs: {why or type(e).__name__}") from None
        main_id = str(subs[0].job.job_id).split("_")[0]
        self.queue.main_ids.append(main_id)
        self.live[main_id] = len(subs)
        what = f"job array {main_id} ({len(subs)} tasks)" if len(subs) > 1 else f"job {main_id}"
        self.out(f"submitted Slurm {what}")

    def gone(self, subs: Sequence[Submission]) -> list[Submission]:
        """Jobs over for good: their result file, else squeue's word, held for a grace
        period (a requeue after pre-emption and squeue itself lag a little)."""
        states = self.queue.states()
        out = []
        for s in subs:
            if s.job.paths.result_pickle.exists():  # submitit wrote the task's return/exception
                out.append(s)
                continue
            if states is None:  # squeue failed this time: ask again at the next poll
                continue
            state = states.get(str(s.job.job_id))  # None: no longer listed (purged)
            prev, s.slurm_state = s.slurm_state, state
            if not job_gone(s.job, "slurm", states):
                if prev in ("RUNNING", "COMPLETING") and state in ("PENDING", "REQUEUED"):
                    self.out(f"requeued  (Slurm job {s.job.job_id}; it resumes)")
                s.gone_since = None
                continue
            now = time.monotonic()
            s.gone_since = s.gone_since or now
            if now - s.gone_since >= max(SLURM_GONE_GRACE_S, 3 * self.params.poll_s):
                out.append(s)
        return out

    def release(self, sub: Submission) -> None:
        """Stop asking squeue about a submission once all its jobs are over."""
        main_id = str(sub.job.job_id).split("_")[0]
        self.live[main_id] = self.live.get(main_id, 1) - 1
        if self.live[main_id] <= 0 and main_id in self.queue.main_ids:
            self.queue.main_ids.remove(main_id)

    def ended_without_result(self, sub: Submission) -> bool:
        return not sub.job.paths.result_pickle.exists()

    def error(self, sub: Submission) -> str:
        return job_error(sub.job, "slurm", sub.slurm_state)

    def cancel(self, subs: Sequence[Submission]) -> None:
        """``scancel`` every submission with a job still running (a whole job array)."""
        for main_id in list(self.queue.main_ids):
            subprocess.run(["scancel", main_id], capture_output=True, timeout=60)


def check_launcher(params: LauncherParams) -> None:
    """The launcher's settings, and for Slurm that the cluster answers and has the
    partition: checked before anything is written (one line on error)."""
    params.validate()
    if params.kind == "slurm":
        check_slurm(params.partition)


def make_backend(params: LauncherParams, folder: Path, name: str, cap: int | None,
                 out: Any) -> Backend:  # fmt: skip
    """The launcher's backend; ``cap``: at most this many jobs in flight (a search's n_jobs)."""
    if params.kind == "local":
        return LocalBackend(params, folder, cap)
    return SlurmBackend(params, folder, name, math.inf if cap is None else cap, out)
