"""Run a grid: validate every point, record the sweep, dispatch jobs with submitit, report.

Why not hydra-submitit-launcher: it blocks until every job of the array ends, reports a
task exception as a success, starts all local jobs at once and never requeues
(design.md §4). Here the parent keeps at most ``max_parallel`` local jobs in flight,
starts the next as soon as one ends, reads each job's outcome from the results store (the
job's own record, so it works without Slurm accounting), and prints progress as jobs end.

Slurm (``hydra/launcher=slurm``): the points go out as one job array (``sbatch --array``
through submitit, ``%array_parallelism`` at a time). Each task is a
:class:`~sweeper.job.TrainJob`, a submitit ``Checkpointable``: on time-out submitit requeues
it (at most ``max_requeues`` times), and on pre-emption or ``scontrol requeue`` Slurm runs the
same task again; either way :func:`~sweeper.job.run_job` resumes from the run's checkpoint.
Whether a task still exists is asked of ``squeue`` (never ``sacct``: many clusters run
without accounting), and what it did is read from its row in the results store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import shlex
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from sweeper.job import (
    TrainJob,
    identity_of,
    open_store,
    preflight,
    store_url,
    tracking_uri,
)
from sweeper.schema import Config
from sweeper.slurm import SlurmQueue, check_slurm, job_error, job_gone
from sweeper.store import LEASE_S, Run, RunStatus, Store
from trainers.registry import ConfigError

TERMINAL = {RunStatus.done, RunStatus.failed, RunStatus.diverged}
# what a job may record as its outcome; a pruned run is not terminal for a grid (asked
# for again, it resumes from its checkpoint to the last epoch)
OUTCOMES = TERMINAL | {RunStatus.pruned}

SLURM_GONE_GRACE_S = 15.0


@dataclass
class LauncherParams:
    """``hydra/launcher`` settings (see conf/hydra/launcher/*.yaml and the README)."""

    kind: str = "local"  # local | slurm
    max_parallel: int | None = None  # local: None -> (GPUs x jobs_per_gpu) or 1 on CPU
    jobs_per_gpu: int = 1  # local: pack several small jobs on one GPU
    retry_failed: bool = False  # re-run points whose run ended failed / diverged
    timeout_min: int = 60 * 24 * 3  # per job (local and Slurm time limit)
    poll_s: float = 0.5
    # Slurm
    partition: str | None = None
    gpus_per_job: int = 0  # GPUs per job (DDP over them when > 1); local and Slurm
    tasks_per_job: int | None = None  # processes per job (DDP); None -> max(1, gpus_per_job)
    cpus_per_task: int = 2
    mem_gb: int = 8
    array_parallelism: int = 64
    max_requeues: int = 3  # pre-emption / time-out requeues per job (submitit checkpointing)
    setup: list[str] = field(default_factory=list)  # shell lines run before each Slurm job
    additional: dict[str, Any] = field(default_factory=dict)  # extra sbatch parameters

    def validate(self) -> None:
        if self.kind not in ("local", "slurm"):
            raise ConfigError(
                f"hydra.launcher.kind={self.kind} is not allowed; expected local or slurm"
            )
        if self.max_parallel is not None and self.max_parallel < 1:
            raise ConfigError(
                f"hydra.launcher.max_parallel={self.max_parallel} is not allowed; expected >= 1"
            )
        if self.jobs_per_gpu < 1:
            raise ConfigError(
                f"hydra.launcher.jobs_per_gpu={self.jobs_per_gpu} is not allowed; expected >= 1"
            )
        for key, low in (
            ("timeout_min", 1),
            ("cpus_per_task", 1),
            ("mem_gb", 1),
            ("gpus_per_job", 0),
            ("array_parallelism", 1),
            ("max_requeues", 0),
            ("tasks", 1),
        ):
            if getattr(self, key) < low:
                raise ConfigError(
                    f"hydra.launcher.{key}={getattr(self, key)} is not allowed; expected >= {low}"
                )
        if not self.poll_s > 0:
            raise ConfigError(
                f"hydra.launcher.poll_s={self.poll_s} is not allowed; expected a number > 0"
            )
        if self.kind == "slurm":
            check_slurm(self.partition)

    @property
    def tasks(self) -> int:
        """Processes per job: one per GPU for DDP, or tasks_per_job (e.g. gloo on CPUs)."""
        return self.tasks_per_job if self.tasks_per_job is not None else max(1, self.gpus_per_job)


@dataclass
class Point:
    label: str  # the point's overrides, as typed
    cfg: Config
    config_hash: str
    run: Run | None = None
    job: Any = None
    started: float = 0.0
    status: str = "queued"
    slot: int | None = None
    slurm_state: str | None = None  # last state squeue reported for this point's job
    gone_since: float | None = None  # Slurm: when the job was first seen gone


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM on the sweeper (``kill``, a closing login session, a batch system ending
    the allocation the sweeper runs in) is handled like Ctrl-C: running jobs are
    cancelled, record themselves ``interrupted``, and the same command resumes the sweep.
    Without this, SIGTERM would kill the sweeper alone and leave its local jobs orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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


def wait_cancelled(jobs: list, timeout_s: float = 60.0) -> None:
    """After cancelling (SIGINT to local jobs), give them time to record ``interrupted``
    before the sweeper exits, so the store is true when the command returns."""
    deadline = time.monotonic() + timeout_s
    for job in jobs:
        while not job.done() and time.monotonic() < deadline:
            time.sleep(0.2)


def threads_per_job(n_slots: int, tasks: int) -> int:
    """torch intra-op threads for each of ``n_slots`` local jobs of ``tasks`` processes.

    The cores are shared out evenly, on GPU machines too: each process would otherwise
    start one thread per core, and four packed jobs on a 16-core box would run 64 spinning
    threads for their CPU-side work (loss bookkeeping, checkpoints, evaluation sync)."""
    return max(1, (os.cpu_count() or 1) // (n_slots * tasks))


def local_slots(p: LauncherParams, gpus: int) -> list[tuple[int, ...]]:
    """Local slots, each the GPUs one job gets (CUDA_VISIBLE_DEVICES).

    One GPU per job, ``jobs_per_gpu`` jobs sharing each GPU (small jobs leave most of a
    big GPU idle, design.md §5); or ``gpus_per_job`` GPUs per job for DDP; none on a
    CPU-only machine, where ``max_parallel`` jobs (default 1) share the cores.
    """
    if not gpus:
        return [()] * (p.max_parallel or 1)
    k = max(1, p.gpus_per_job)
    if k > gpus:
        raise ConfigError(
            f"hydra.launcher.gpus_per_job={k} is not allowed; this machine has {gpus} GPU(s)"
        )
    if k == 1:
        slots = [(g,) for g in range(gpus) for _ in range(p.jobs_per_gpu)]
    else:
        slots = [tuple(range(i, i + k)) for i in range(0, gpus - k + 1, k)]
    return slots[: p.max_parallel] if p.max_parallel else slots


def validate_points(points: list[tuple[str, Config]]) -> list[Point]:
    """Every point checked before anything is dispatched or written (one line on error)."""
    if not points:
        raise ConfigError("the grid is empty: no point to run")
    out: list[Point] = []
    urls = set()
    for label, cfg in points:
        try:
            preflight(cfg)
            _, chash = identity_of(cfg)
        except ConfigError as e:
            raise ConfigError(f"point [{label}]: {e}") from None
        urls.add(store_url(cfg))
        out.append(Point(label, cfg, chash))
    if len(urls) > 1:
        raise ConfigError(f"all points of a sweep must share one results store; got {sorted(urls)}")
    return out


class SweepRunner:
    """Dispatch validated points; report progress; return the per-point outcome."""

    def __init__(
        self,
        points: list[Point],
        params: LauncherParams,
        command: str,
        sweep_name: str | None = None,
        out: Callable[[str], None] | None = None,
    ) -> None:
        params.validate()
        self.points, self.params, self.command = points, params, command
        self.cfg0 = points[0].cfg
        self.name = sweep_name or "sweep-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out = out or (lambda s: print(s, flush=True))
        self.counts: Counter[str] = Counter()

    # ----------------------------------------------------------------- bookkeeping
    def _prepare(self, store: Store) -> list[Point]:
        """Record the sweep and one queued row per point; return the points to start."""
        self.sweep = store.create_sweep(self.name, self.command, self.params.kind, len(self.points))
        from sweeper.job import grid_columns

        lost = store.expire_leases()  # killed jobs of earlier sweeps: resumed below
        if lost:
            self.out(f"{lost} run(s) whose job was killed marked interrupted; resuming them")

        todo, seen = [], {}
        for p in self.points:
            if p.config_hash in seen:  # e.g. baseline x alpha: one run serves both points
                p.status, p.run = "duplicate", seen[p.config_hash].run
                continue
            seen[p.config_hash] = p
            import dataclasses

            resolved = {
                **dataclasses.asdict(p.cfg),
                "resolved_lr": p.cfg.resolved_lr(),
                "identity": identity_of(p.cfg)[0],
            }
            p.run = store.claim_run(p.config_hash, grid_columns(p.cfg), resolved)
            store.link_run(self.sweep.id, p.run.id, p.label)
            st = p.run.status
            if st == RunStatus.running and store.lease_alive(p.run):
                # its job is alive (another sweep, or a job that outlived a killed sweeper):
                # starting it twice would race on its checkpoint and rows
                p.status = "skipped"
                self.counts["skipped"] += 1
                self.out(f"point [{p.label}]: run {p.run.id} is being trained by a live job "
                         f"(heartbeat within {LEASE_S:g} s); not starting it twice")  # fmt: skip
                continue
            if st == RunStatus.done or (st in TERMINAL and not self.params.retry_failed):
                p.status = "skipped"
                self.counts["skipped"] += 1
                continue
            if st in (RunStatus.failed, RunStatus.diverged):
                store.requeue_run(p.run.id)
            todo.append(p)
        return todo

    def _mlflow_parent(self, store: Store) -> dict[str, str]:
        tags = {"sweep_id": str(self.sweep.id), "sweep_name": self.name}
        if not self.cfg0.mlflow.enabled:
            return tags
        from sweeper.tracking import MlflowMirror, init_tracking_store

        uri = tracking_uri(self.cfg0)
        try:  # once, in the parent: concurrent first-time migrations race (design.md §4)
            init_tracking_store(uri)
        except Exception as e:
            self.out(
                f"warning: MLflow store {uri} cannot be initialised ({type(e).__name__}); "
                "runs are recorded in the results store only"
            )
            return tags
        parent = MlflowMirror(
            uri,
            self.cfg0.mlflow.experiment,
            Path(self.cfg0.results_dir) / "mlartifacts",
            warn=self.out,
        )
        pid = parent.start(
            None,
            self.name,
            {"sweep_command": self.command, "n_points": len(self.points)},
            {"sweep_id": str(self.sweep.id), "sweep": "parent"},
        )
        if pid:
            store.set_sweep_fields(self.sweep.id, mlflow_parent_run_id=pid)
            tags["mlflow.parentRunId"] = pid
        self._parent = parent
        return tags

    # ------------------------------------------------------------------ executors
    def _executor(self, folder: Path) -> Any:
        p = self.params
        if p.kind == "local":
            ex = submitit.LocalExecutor(folder=folder)
            ex.update_parameters(timeout_min=p.timeout_min)
            return ex
        # The job runs `<python> -u -m submitit.core._submit`; submitit's default python is
        # sys.executable, i.e. the interpreter of this sweep (the project's venv), and sbatch
        # exports this environment (PATH, PYTHONPATH, SLURM_CONF, ...) to the job.
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=p.max_requeues)
        params: dict[str, Any] = dict(
            time=p.timeout_min,
            cpus_per_task=p.cpus_per_task,
            mem=f"{p.mem_gb}GB",
            ntasks_per_node=p.tasks,  # one process per GPU (DDP)
            array_parallelism=p.array_parallelism,
            # SIGUSR2 this long before the time limit: submitit checkpoints and requeues
            signal_delay_s=min(90, max(15, p.timeout_min * 60 // 4)),
            setup=list(p.setup),
            job_name=self.name,
        )
        if p.partition:
            params["partition"] = p.partition
        if p.gpus_per_job:
            params["gpus_per_node"] = p.gpus_per_job
        if p.additional:  # raw sbatch options: {"constraint": "a100", "account": "x"}
            params["additional_parameters"] = dict(p.additional)
        try:
            ex.update_parameters(**params)
        except ValueError as e:
            raise ConfigError(f"hydra/launcher=slurm: {str(e).splitlines()[0]}") from None
        return ex

    def _slots(self) -> list[tuple[int, ...]]:
        return local_slots(self.params, _gpu_count())

    # ------------------------------------------------------------------------ run
    def run(self) -> list[Point]:
        with terminate_as_interrupt():
            return self._run()

    def _run(self) -> list[Point]:
        store = open_store(self.cfg0)
        try:
            todo = self._prepare(store)
            n = len(self.points)
            self.out(
                f"sweep {self.sweep.id} '{self.name}': {n} points, {len(todo)} to run, "
                f"{self.counts['skipped']} already finished"
                + (
                    f", {sum(p.status == 'duplicate' for p in self.points)} duplicates"
                    if any(p.status == "duplicate" for p in self.points)
                    else ""
                )
            )
            if not todo:
                store.set_sweep_fields(self.sweep.id, ended_at=self.sweep.created_at)
                self.out(
                    "nothing to start: every point is already finished "
                    "(use hydra.launcher.retry_failed=true to retry failed ones)"
                )
                return self.points
            tags = self._mlflow_parent(store)
            folder = Path(self.cfg0.results_dir) / "logs" / "jobs" / f"sweep{self.sweep.id}"
            folder.mkdir(parents=True, exist_ok=True)
            self.out(f"job logs: {folder}")
            if self.params.kind == "local":
                self._run_local(store, todo, tags, folder)
            else:
                self._run_slurm(store, todo, tags, folder)
            store.set_sweep_fields(
                self.sweep.id, ended_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
            )
            if getattr(self, "_parent", None) is not None:
                bad = any(p.status == "failed" for p in self.points)
                self._parent.end("FAILED" if bad else "FINISHED")
            return self.points
        finally:
            store.dispose()

    def _run_local(
        self, store: Store, todo: list[Point], tags: dict[str, str], folder: Path
    ) -> None:
        ex = self._executor(folder)
        slots = self._slots()
        free = list(range(len(slots)))
        tasks = self.params.tasks
        threads = threads_per_job(len(slots), tasks)
        pending: list[Point] = list(todo)
        running: list[Point] = []
        try:
            while pending or running:
                while pending and free:
                    p = pending.pop(0)
                    p.slot = free.pop(0)
                    gpus = slots[p.slot]
                    ex.update_parameters(
                        tasks_per_node=tasks, gpus_per_node=len(gpus), visible_gpus=gpus
                    )
                    with interruptible_children():
                        p.job = ex.submit(TrainJob(), p.cfg, tags, threads)
                    running.append(p)  # first: a signal from here on cancels it too
                    p.started, p.status = time.monotonic(), "running"
                    self.counts["running"] += 1
                    store.set_job_id(self.sweep.id, p.run.id, str(p.job.job_id))
                time.sleep(self.params.poll_s)
                for p in list(running):
                    if self._finished(store, p):
                        running.remove(p)
                        free.append(p.slot)
                        self._report(p)
        except KeyboardInterrupt:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one: finish cleaning up
            for p in running:
                p.job.cancel(check=False)
            wait_cancelled([p.job for p in running])
            # a job SIGKILLed by submitit's controller before it could record: say it here,
            # so a rerun resumes it at once instead of waiting for its lease to run out
            store.mark_interrupted([p.run.id for p in running], "its sweep was interrupted")
            self.out(
                "interrupted: running jobs cancelled (their runs are marked interrupted); run "
                "the same command again to resume (finished points are skipped, interrupted "
                "ones resume from their checkpoints)"
            )
            raise

    def _run_slurm(
        self, store: Store, todo: list[Point], tags: dict[str, str], folder: Path
    ) -> None:
        ex = self._executor(folder)
        threads = self.params.cpus_per_task  # torch would otherwise use every core of the node
        err = io.StringIO()
        try:  # one job array (a single point is a plain job)
            with contextlib.redirect_stderr(err), ex.batch():
                for p in todo:
                    p.job = ex.submit(TrainJob(), p.cfg, tags, threads)
        except Exception as e:  # sbatch refused: submitit raises with sbatch's stderr
            store.set_sweep_fields(self.sweep.id, ended_at=self.sweep.created_at)
            if getattr(self, "_parent", None) is not None:
                self._parent.end("FAILED")
            text = (str(e) or err.getvalue()).strip()
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            why = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "")
            raise ConfigError(
                f"sbatch refused the sweep's jobs: {why or type(e).__name__}"
            ) from None
        for p in todo:
            p.started, p.status = time.monotonic(), "running"
            self.counts["running"] += 1
            store.set_job_id(self.sweep.id, p.run.id, str(p.job.job_id))
        main_id = str(todo[0].job.job_id).split("_")[0]
        what = f"job array {main_id} ({len(todo)} tasks)" if len(todo) > 1 else f"job {main_id}"
        self.out(f"submitted Slurm {what}")
        queue = SlurmQueue(main_id, self.out)
        running = list(todo)
        try:
            while running:
                time.sleep(self.params.poll_s)
                states = queue.states()
                for p in list(running):
                    if self._finished(store, p, self._slurm_gone(store, p, states)):
                        running.remove(p)
                        self._report(p)
        except KeyboardInterrupt:
            subprocess.run(["scancel", main_id], capture_output=True, timeout=60)
            store.mark_interrupted([p.run.id for p in running], "its sweep was interrupted")
            self.out(
                f"interrupted: Slurm job {main_id} cancelled; run the same command again to "
                "resume (finished points are skipped, interrupted ones resume)"
            )
            raise

    def _slurm_gone(self, store: Store, p: Point, states: dict[str, str] | None) -> bool:
        """Is this point's Slurm job over for good? Never guessed from a failed squeue."""
        if p.job.paths.result_pickle.exists():  # submitit wrote the task's return/exception
            return True
        if states is None:  # squeue failed this time: ask again at the next poll
            return False
        state = states.get(str(p.job.job_id))  # None: no longer listed (purged after MinJobAge)
        prev, p.slurm_state = p.slurm_state, state
        if not job_gone(p.job, "slurm", states):
            if prev in ("RUNNING", "COMPLETING") and state in ("PENDING", "REQUEUED"):
                self.out(f"requeued  {p.label}  (Slurm job {p.job.job_id}; it resumes)")
            p.gone_since = None
            return False
        run = store.get_run_by_id(p.run.id)
        if run is not None and run.status in OUTCOMES:
            return True
        now = time.monotonic()
        if p.gone_since is None:
            p.gone_since = now
        return now - p.gone_since >= max(SLURM_GONE_GRACE_S, 3 * self.params.poll_s)

    def _finished(self, store: Store, p: Point, gone: bool | None = None) -> bool:
        """A job is finished when its process is gone; its outcome is the run's row."""
        if gone is None:
            gone = job_gone(p.job, self.params.kind)
        if not gone:
            return False
        run = store.get_run_by_id(p.run.id)
        assert run is not None
        p.run = run
        if run.status in OUTCOMES:
            p.status = run.status.value
        elif run.status == RunStatus.interrupted:  # the job was cancelled (Ctrl-C on it)
            p.status = "failed"  # for this sweep's tally; the run stays resumable
        else:  # the process died without recording an outcome (killed, OOM, node lost)
            err = job_error(p.job, self.params.kind, p.slurm_state)
            store.finish_run(run.id, RunStatus.failed, error=err)
            p.run = store.get_run_by_id(run.id)
            p.status = "failed"
        return True

    def _report(self, p: Point) -> None:
        self.counts["running"] -= 1
        self.counts[p.status] += 1
        done = sum(self.counts[k] for k in ("done", "failed", "diverged", "skipped"))
        acc = f"test {p.run.test_acc:6.2f}%" if p.run and p.run.test_acc is not None else ""
        c = self.counts
        self.out(
            f"[{done:>3}/{sum(1 for q in self.points if q.status != 'duplicate')}] "
            f"{p.status:<8} {p.label}  {acc}  ({time.monotonic() - p.started:.1f}s)   "
            f"done {c['done']} · failed {c['failed']} · diverged {c['diverged']} · "
            f"skipped {c['skipped']} · running {c['running']}"
        )


def summary_table(points: list[Point]) -> str:
    """Plain-text summary, one line per point (rich renders it when on a terminal)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="sweep summary")
    for col in ("point", "status", "run", "epochs", "train %", "test %"):
        t.add_column(col)
    for p in points:
        r = p.run
        t.add_row(
            p.label or "(defaults)",
            p.status,
            str(r.id) if r else "—",
            f"{r.epoch}/{r.epochs}" if r else "—",
            f"{r.train_acc:.2f}" if r and r.train_acc is not None else "—",
            f"{r.test_acc:.2f}" if r and r.test_acc is not None else "—",
        )
    console = Console(width=160, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(t)
    return console.export_text()


def format_command(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
