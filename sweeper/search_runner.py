"""Run an Optuna study's trials through our launchers (local or Slurm), asynchronously.

The parent process owns the study (ask / tell); each trial is an ordinary run: composed
like a grid point, claimed in the results store (a configuration already done is reused,
not trained again), dispatched as a submitit job that reports each epoch to its trial, and
told to the study when its job ends. Up to ``n_jobs`` trials run at once, and a new one is
asked for whenever one ends (never in lock-step batches).

Trial states: run ``done`` -> COMPLETE with the metric of its last epoch; ``pruned`` ->
PRUNED; ``diverged`` -> PRUNED too (a hopeless region of the space: samplers should move
away from it, which they ignore for FAIL); ``failed`` -> FAIL. Failed trials count towards
``n_trials`` and are not retried (``hydra.launcher.retry_failed`` does not apply here).

Resuming: the study is loaded by name; trials left RUNNING by an interrupted search are
started again first (their runs resume from checkpoints), then new trials are asked for
until the study holds ``n_trials`` finished ones. Finished trials are never repeated.
One search process per study at a time.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper.job import TrainJob, grid_columns, identity_of, open_store, preflight, store_url
from sweeper.launch import (
    LauncherParams,
    Point,
    SweepRunner,
    _gpu_count,
    format_command,
    interruptible_children,
    local_slots,
    threads_per_job,
    wait_cancelled,
)
from sweeper.schema import Config
from sweeper.search import (
    Dimension,
    SearchParams,
    TrialLink,
    build_sampler,
    quiet_optuna,
    rdb_storage,
)
from sweeper.slurm import SlurmQueue
from sweeper.store import RunStatus, Store
from trainers.registry import ConfigError, first_line


@dataclass
class TrialPoint(Point):
    number: int = -1
    trial_id: int = -1
    params: dict[str, Any] = field(default_factory=dict)
    waiters: list[tuple[int, int, str]] = field(default_factory=list)  # (number, id, label)
    queue: SlurmQueue | None = None


@dataclass
class TrialOutcome:
    number: int
    label: str
    state: str  # COMPLETE | PRUNED | FAIL
    value: float | None
    run_id: int | None
    status: str  # the run's status (done, pruned, diverged, failed, reused)


class SearchRunner(SweepRunner):
    """The ask / dispatch / tell loop of one study."""

    def __init__(
        self,
        dims: list[Dimension],
        fixed: list[str],
        compose: Callable[[list[str]], Config],
        search: SearchParams,
        launcher: LauncherParams,
        study_name: str,
        command: str,
        out: Callable[[str], None] | None = None,
    ) -> None:
        launcher.validate()
        search.validate()
        self.dims, self.fixed, self.compose, self.search = dims, fixed, compose, search
        self.params, self.command, self.name = launcher, command, study_name
        self.out = out or (lambda s: print(s, flush=True))
        self.counts: Counter[str] = Counter()
        self.outcomes: list[TrialOutcome] = []
        self.cfg0 = self.check_space()
        self.points: list[Point] = [Point("", self.cfg0, "")]  # n_points for the MLflow parent
        self.storage_url = search.storage or store_url(self.cfg0)

    # --------------------------------------------------------------- validation
    def overrides(self, params: dict[str, Any]) -> tuple[list[str], str]:
        ov = [d.override(params[d.key]) for d in self.dims if d.key in params]
        return [*self.fixed, *ov], " ".join(ov)

    def check_space(self) -> Config:
        """Compose and pre-flight the corners of the space before any trial starts, so a
        value out of range (``alpha=interval(0.5,2)``) is one line, not N failed trials."""
        corners: list[dict[str, Any]] = []
        for d in self.dims:
            if d.values is not None:
                ends = list(d.values)
            else:
                dist = d.distribution
                ends = [dist.low, dist.high]
            for v in ends:
                corners.append({d.key: v})
        base = {d.key: (d.values[0] if d.values else d.distribution.low) for d in self.dims}
        first: Config | None = None
        for corner in corners:
            point = {**base, **corner}
            ov, label = self.overrides(point)
            try:
                cfg = self.compose(ov)
                preflight(cfg)
                identity_of(cfg)
            except ConfigError as e:
                raise ConfigError(f"search point [{label}]: {e}") from None
            first = first or cfg
        assert first is not None
        if self.search.sampler == "grid":
            from sweeper.search import grid_of

            grid_of(self.dims)
        return first

    # --------------------------------------------------------------------- run
    def _run(self) -> list[Point]:  # type: ignore[override]  # run() handles SIGTERM
        import optuna

        quiet_optuna()
        search = self.search
        try:
            storage = rdb_storage(self.storage_url)
            study = optuna.create_study(
                storage=storage,
                study_name=self.name,
                sampler=build_sampler(search, self.dims),
                pruner=search.pruner_params().build(),
                direction=search.resolved_direction(),
                load_if_exists=True,
            )
        except Exception as e:
            msg = first_line(e)
            raise ConfigError(
                f"the study storage {self.storage_url} cannot be used ({msg})"
            ) from None
        want = search.resolved_direction()
        if study.direction.name.lower() != want:
            raise ConfigError(
                f"study {self.name!r} exists with direction {study.direction.name.lower()}; "
                f"this search asks for {want}: pass hydra.sweeper.study_name=NEW"
            )
        self.study = study
        study.set_user_attr("metric", search.metric)  # for the report (analysis.studies)
        study.set_user_attr("space", [d.text for d in self.dims])
        space = {d.key: d.distribution for d in self.dims}
        trials = study.get_trials(deepcopy=False)
        if trials:  # continued: a sampler that does not replay the first suggestions
            study.sampler = build_sampler(search, self.dims, n_existing=len(trials))
        finished = [t for t in trials if t.state.is_finished()]
        stale = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        total = search.n_trials
        if search.sampler == "grid":
            size = math.prod(len(d.values or []) for d in self.dims)
            if total > size:
                self.out(f"note: the grid has {size} points; n_trials {total} -> {size}")
                total = size
        budget = total - len(finished)
        self.total, self.budget = total, budget
        self.points = self.points[:1] * total  # the MLflow parent's n_points param
        self.out(
            f"study '{self.name}' ({search.sampler} sampler, pruner {search.pruner}, "
            f"{want} {search.metric}) in {self.storage_url}: {len(finished)} finished trials, "
            f"{min(len(stale), max(budget, 0))} to resume, "
            f"{max(budget - len(stale), 0)} to start (n_trials={total})"
        )
        if budget <= 0:
            self.out("nothing to start: the study already has n_trials finished trials")
            self._print_best()
            return []
        store = open_store(self.cfg0)
        try:
            store.expire_leases()  # runs of killed jobs: interrupted, resumed when asked again
            self.sweep = store.create_sweep(
                self.name, self.command, f"optuna/{self.params.kind}", total
            )
            tags = self._mlflow_parent(store)
            folder = Path(self.cfg0.results_dir) / "logs" / "jobs" / f"sweep{self.sweep.id}"
            folder.mkdir(parents=True, exist_ok=True)
            self.out(f"job logs: {folder}")
            resumed = [(t.number, t._trial_id, dict(t.params)) for t in stale[:budget]]
            self._loop(store, study, space, budget, resumed, tags, folder)
            import datetime as dt

            store.set_sweep_fields(
                self.sweep.id, ended_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
            )
            if getattr(self, "_parent", None) is not None:
                best = self.best()
                if best is not None:
                    self._parent.log_metrics({f"best_{search.metric}": best.value}, step=0)
                self._parent.end("FINISHED" if best is not None else "FAILED")
        finally:
            store.dispose()
        self._print_best()
        return []

    def _loop(
        self,
        store: Store,
        study: Any,
        space: dict[str, Any],
        budget: int,
        resumed: list[tuple[int, int, dict[str, Any]]],
        tags: dict[str, str],
        folder: Path,
    ) -> None:
        n_jobs = self.search.n_jobs
        ex = self._executor(folder)
        local = self.params.kind == "local"
        if local:
            cap = min(self.params.max_parallel or n_jobs, n_jobs)
            slots = local_slots(dataclasses.replace(self.params, max_parallel=cap), _gpu_count())
        else:
            slots = [()] * n_jobs
        free = list(range(len(slots)))
        tasks = self.params.tasks
        threads = threads_per_job(len(slots), tasks) if local else self.params.cpus_per_task
        started = 0
        running: list[TrialPoint] = []
        self._started_at = time.monotonic()
        try:
            while True:
                while free and started < budget:
                    if resumed:
                        number, trial_id, params = resumed.pop(0)
                        verb = "resumed"
                    else:
                        trial = study.ask(space)
                        number, trial_id, params = trial.number, trial._trial_id, trial.params
                        verb = "started"
                    started += 1
                    p = self._start(store, number, trial_id, params, running, verb)
                    if p is None:
                        continue
                    p.slot = free.pop(0)
                    gpus = slots[p.slot]
                    if local:
                        ex.update_parameters(
                            tasks_per_node=tasks, gpus_per_node=len(gpus), visible_gpus=gpus
                        )
                    link = TrialLink(
                        self.storage_url,
                        self.name,
                        trial_id,
                        number,
                        self.search.metric,
                        self.search.pruner_params(),
                    )
                    trial_tags = {
                        **tags,
                        "optuna_study": self.name,
                        "optuna_trial": str(number),
                    }
                    with interruptible_children():
                        p.job = ex.submit(TrainJob(), p.cfg, trial_tags, threads, link)
                    running.append(p)  # first: a signal from here on cancels it too
                    self.counts["running"] += 1
                    p.started = time.monotonic()
                    if not local:
                        p.queue = SlurmQueue(str(p.job.job_id), self.out)
                    store.set_job_id(self.sweep.id, p.run.id, str(p.job.job_id))
                if not running:
                    break
                time.sleep(self.params.poll_s)
                for p in list(running):
                    if local:
                        over = self._finished(store, p)
                    else:
                        assert p.queue is not None
                        states = p.queue.states()
                        over = self._finished(store, p, self._slurm_gone(store, p, states))
                    if over:
                        running.remove(p)
                        free.append(p.slot)
                        self.counts["running"] -= 1
                        self._tell_point(store, p)
        except KeyboardInterrupt:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one: finish cleaning up
            for p in running:
                p.job.cancel(check=False)
            wait_cancelled([p.job for p in running if p.job is not None])
            store.mark_interrupted([p.run.id for p in running], "its search was interrupted")
            self.out(
                "interrupted: running trials cancelled and left RUNNING in the study; run "
                "the same command again to resume them (their runs resume from checkpoints)"
            )
            raise

    # ----------------------------------------------------------------- one trial
    def _start(
        self,
        store: Store,
        number: int,
        trial_id: int,
        params: dict[str, Any],
        running: list[TrialPoint],
        verb: str,
    ) -> TrialPoint | None:
        """Compose the trial's run; returns the point to dispatch, or None when the trial
        was settled without a job (invalid, already done, or waiting on a twin)."""
        ov, label = self.overrides(params)
        try:
            cfg = self.compose(ov)
            preflight(cfg)
            ident, chash = identity_of(cfg)
        except ConfigError as e:
            self._tell(number, trial_id, label, "FAIL", None, None, f"invalid ({e})")
            return None
        resolved = {**dataclasses.asdict(cfg), "resolved_lr": cfg.resolved_lr(), "identity": ident}
        run = store.claim_run(chash, grid_columns(cfg), resolved)
        store.link_run(self.sweep.id, run.id, label, trial=number)
        if run.status == RunStatus.done:  # this configuration was trained before: reuse it
            value = self._metric(store, run.id)
            state = "COMPLETE" if value is not None else "FAIL"
            self._tell(number, trial_id, label, state, value, run.id, "reused")
            return None
        twin = next((p for p in running if p.config_hash == chash), None)
        if twin is not None:  # e.g. a grid sampler or choice() asking again: wait for it
            twin.waiters.append((number, trial_id, label))
            return None
        if run.status == RunStatus.running and store.lease_alive(run):
            # another sweep's live job trains it: two jobs would race on its checkpoint
            why = f"run {run.id} is being trained by another live job; not started twice"
            self._tell(number, trial_id, label, "FAIL", None, run.id, why)
            return None
        if run.status in (RunStatus.failed, RunStatus.diverged):
            store.requeue_run(run.id)
        self.out(f"{verb:>7} trial {number}: {label}  (run {run.id})")
        return TrialPoint(
            label,
            cfg,
            chash,
            run=run,
            number=number,
            trial_id=trial_id,
            params=dict(params),
        )

    def _metric(self, store: Store, run_id: int) -> float | None:
        rows = store.epoch_metrics(run_id)
        if not rows:
            return None
        value = float(getattr(rows[-1], self.search.metric))
        return value if math.isfinite(value) else None

    def _tell_point(self, store: Store, p: TrialPoint) -> None:
        status = p.status  # the run's recorded outcome (see _finished)
        value = None
        if status == "done":
            value = self._metric(store, p.run.id)
            state = "COMPLETE" if value is not None else "FAIL"
        elif status in ("pruned", "diverged"):
            state = "PRUNED"
        else:
            state = "FAIL"
        elapsed = time.monotonic() - p.started
        self._tell(p.number, p.trial_id, p.label, state, value, p.run.id, status, elapsed)
        for number, trial_id, label in p.waiters:
            self._tell(number, trial_id, label, state, value, p.run.id, f"{status} (same run)")

    def _tell(
        self,
        number: int,
        trial_id: int,
        label: str,
        state: str,
        value: float | None,
        run_id: int | None,
        status: str,
        elapsed: float | None = None,
    ) -> None:
        import optuna

        ts = optuna.trial.TrialState
        study = self.study
        try:
            trial = optuna.trial.Trial(study, trial_id)
            trial.set_user_attr("status", status)
            if run_id is not None:
                trial.set_user_attr("run_id", run_id)
            if state == "COMPLETE":
                study.tell(number, value)
            else:
                study.tell(number, state=ts.PRUNED if state == "PRUNED" else ts.FAIL)
        except Exception as e:  # e.g. already finished by another process
            self.out(f"warning: trial {number} could not be told ({e})")
        self.outcomes.append(TrialOutcome(number, label, state, value, run_id, status))
        self.counts[state] += 1
        done = sum(self.counts[k] for k in ("COMPLETE", "PRUNED", "FAIL"))
        best = self.best()
        metric = self.search.metric
        shown = f"{metric} {value:.4g}" if value is not None else ""
        took = f"({elapsed:.1f}s)" if elapsed is not None else ""
        bests = f"best {best.value:.4g} (trial {best.number})" if best is not None else "best —"
        c = self.counts
        self.out(
            f"[{done:>3}/{self.budget}] {state.lower():<8} "
            f"trial {number}: {label}  {status}  {shown}  {took}  {bests}  ·  "
            f"complete {c['COMPLETE']} · pruned {c['PRUNED']} · failed {c['FAIL']} · "
            f"running {c['running']}"
        )

    def best(self) -> Any:
        try:
            return self.study.best_trial
        except ValueError:  # no COMPLETE trial yet
            return None

    def _print_best(self) -> None:
        best = self.best()
        if best is None:
            self.out(f"no trial of study '{self.name}' completed")
            return
        params = " ".join(f"{k}={_short(v)}" for k, v in best.params.items())
        run = best.user_attrs.get("run_id")
        self.out(
            f"best trial {best.number}: {params}  {self.search.metric} {best.value:.4f}"
            + (f"  (run {run})" if run is not None else "")
        )


def _short(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def run_search(
    dims: list[Dimension],
    fixed: list[str],
    compose: Callable[[list[str]], Config],
    search: SearchParams,
    launcher: LauncherParams,
    study_name: str,
    argv: list[str],
) -> SearchRunner:
    """Run (or continue) the study; the runner holds this invocation's outcomes and the
    study."""
    runner = SearchRunner(dims, fixed, compose, search, launcher, study_name, format_command(argv))
    runner.run()
    return runner
