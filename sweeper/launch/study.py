"""An Optuna study as a source of points: trials asked for as slots free up, told as their
jobs end.

The sweeper process owns the study (ask / tell, Optuna's RDB storage on the results store's
database unless ``hydra.sweeper.storage`` says otherwise); each trial is an ordinary run:
composed like a grid point, claimed in the results store (a configuration already done is
reused, not trained again), dispatched as a job that reports each epoch to its trial, and
told to the study when its job ends. Up to ``n_jobs`` trials run at once, and a new one is
asked for whenever one ends (never in lock-step batches).

Trial states: run ``done`` -> COMPLETE with the metric of its last epoch; ``pruned`` ->
PRUNED; ``diverged`` -> PRUNED too (a hopeless region of the space: samplers should move
away from it, which they ignore for FAIL); ``failed`` -> FAIL. A trial whose job was killed
stays RUNNING: the same command resumes it first. Failed trials count towards ``n_trials``
and are not retried. One search process per study at a time.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sweeper.config.checks import check_before_writing
from sweeper.config.identity import identity_of, preflight
from sweeper.config.launcher import LauncherParams
from sweeper.config.schema import Config
from sweeper.config.search import SearchParams
from sweeper.errors import Failed
from sweeper.launch.backends import check_launcher
from sweeper.launch.dispatch import Decision, Dispatcher, Point, open_sweep
from sweeper.launch.fuse import plan_groups
from sweeper.launch.trials import (
    Dimension,
    TrialLink,
    build_sampler,
    grid_of,
    quiet_optuna,
    rdb_storage,
)
from trainers.registry import ConfigError, first_line


@dataclass
class Trial:
    number: int
    trial_id: int
    params: dict[str, Any]
    waiters: list[Point] = field(default_factory=list)  # trials asking for the same run


@dataclass
class TrialOutcome:
    number: int
    label: str
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING (its job was killed: resumed next time)
    value: float | None
    run_id: int | None
    status: str  # the run's status (done, pruned, diverged, failed, reused, ...)


class StudySource:
    """The ask / tell side of one study; the dispatcher runs the trials' jobs."""

    def __init__(
        self,
        dims: list[Dimension],
        fixed: list[str],
        compose: Callable[[list[str]], Config],
        search: SearchParams,
        study_name: str,
        storage_url: str,
        out: Callable[[str], None],
    ) -> None:
        self.dims, self.fixed, self.compose, self.search = dims, fixed, compose, search
        self.name, self.storage_url, self.out = study_name, storage_url, out
        self.counts: Counter[str] = Counter()
        self.pending: list[list[Point]] = []
        self._asking: list[Point] = []
        self.fuse_limit: int | None = None  # hydra.launcher.fuse when a number
        self.outcomes: list[TrialOutcome] = []
        self.study: Any = None
        self.dispatcher: Dispatcher | None = None
        self.started = 0
        self.budget = self.total = 0
        self.resumed: list[tuple[int, int, dict[str, Any]]] = []
        self.space: dict[str, Any] = {}
        self.corners: list[tuple[str, Config]] = []  # (label, config), by check_space

    # --------------------------------------------------------------- validation
    def overrides(self, params: dict[str, Any]) -> tuple[list[str], str]:
        """A trial's overrides (exact: floats round-trip) and its label (what progress lines,
        ``status`` and MLflow show: floats to 6 significant digits)."""
        ov = [d.override(params[d.key]) for d in self.dims if d.key in params]
        label = " ".join(f"{d.key}={_short(params[d.key])}" for d in self.dims if d.key in params)
        return [*self.fixed, *ov], label

    def check_space(self) -> Config:
        """Compose and pre-flight the corners of the space before any trial starts, so a
        value out of range (``alpha=interval(0.5,2)``) is one line, not N failed trials."""
        base = {d.key: (d.values[0] if d.values else d.distribution.low) for d in self.dims}
        first: Config | None = None
        for d in self.dims:
            ends = list(d.values) if d.values is not None else [d.distribution.low,
                                                                 d.distribution.high]  # fmt: skip
            for v in ends:
                ov, label = self.overrides({**base, d.key: v})
                try:
                    cfg = self.compose(ov)
                    preflight(cfg)
                    identity_of(cfg)
                except ConfigError as e:
                    raise ConfigError(f"search point [{label}]: {e}") from None
                first = first or cfg
                self.corners.append((label, cfg))
        assert first is not None
        if self.search.sampler == "grid":
            grid_of(self.dims)
        return first

    # ------------------------------------------------------------------ the study
    def open(self) -> None:
        """Create or load the study; how many trials to resume and to start."""
        import optuna

        quiet_optuna()
        search = self.search
        try:
            study = optuna.create_study(
                storage=rdb_storage(self.storage_url),
                study_name=self.name,
                sampler=build_sampler(search, self.dims),
                pruner=search.pruner_params().build(),
                direction=search.resolved_direction(),
                load_if_exists=True,
            )
        except Exception as e:
            raise ConfigError(
                f"the study storage {self.storage_url} cannot be used ({first_line(e)})"
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
        self.space = {d.key: d.distribution for d in self.dims}
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
        self.total, self.budget = total, total - len(finished)
        self.resumed = [
            (t.number, t._trial_id, dict(t.params)) for t in stale[: max(self.budget, 0)]
        ]
        self.out(
            f"study '{self.name}' ({search.sampler} sampler, pruner {search.pruner}, "
            f"{want} {search.metric}) in {self.storage_url}: {len(finished)} finished trials, "
            f"{len(self.resumed)} to resume, "
            f"{max(self.budget - len(stale), 0)} to start (n_trials={total})"
        )

    # -------------------------------------------------------------- the source
    def next_job(self, slots: float) -> list[Point] | None:
        """One trial per job; with ``hydra.launcher.fuse=N`` (a number), up to N trials are
        asked at once and the compatible ones train as one fused job (``auto`` keeps one
        trial per job: Optuna's samplers learn from each result before the next ask)."""
        if not self.pending:
            limit = self.fuse_limit or 1
            asked: list[Point] = []
            self._asking = asked
            while len(asked) < limit:
                p = self._next_point()
                if p is None:
                    break
                asked.append(p)
            self.pending = plan_groups(asked, limit, 1, False)
        return self.pending.pop(0) if self.pending else None

    def _next_point(self) -> Point | None:
        """Ask for trials (resumed ones first) until one needs a job, or the budget is
        spent; trials settled without a job (invalid, already done, a live job elsewhere,
        waiting on a twin) are told here."""
        d = self.dispatcher
        assert d is not None
        while self.started < self.budget:
            if self.resumed:
                number, trial_id, params = self.resumed.pop(0)
                verb = "resumed"
            else:
                t = self.study.ask(self.space)
                number, trial_id, params, verb = t.number, t._trial_id, t.params, "started"
            self.started += 1
            ov, label = self.overrides(params)
            try:
                cfg = self.compose(ov)
                preflight(cfg)
                ident, chash = identity_of(cfg)
            except ConfigError as e:
                self._tell(number, trial_id, label, "FAIL", None, None, f"invalid ({e})")
                continue
            p = Point(label, cfg, chash, ident, trial=Trial(number, trial_id, dict(params)))
            # trials asked for the same fused job count as running: one run is never twice
            twins = {q.config_hash: q for q in [*d.running, *self._asking]}
            decision = d.claim(p, retry_failed=True, twins=twins, trial=number)
            assert p.run is not None or decision == Decision.SHARED
            if decision == Decision.DONE:  # this configuration was trained before: reuse it
                value = self._metric(p.run.id)  # type: ignore[union-attr]
                state = "COMPLETE" if value is not None else "FAIL"
                self._tell(number, trial_id, label, state, value, p.run.id, "reused")  # type: ignore[union-attr]
                continue
            if decision == Decision.SHARED:  # e.g. a grid sampler asking again: wait for it
                assert p.twin is not None and p.twin.trial is not None
                p.twin.trial.waiters.append(p)
                continue
            if decision == Decision.FOLLOW:  # another live job trains it: its outcome, told
                self.out(d.follow_message(p))
                p.status, p.followed = "following", True
                d.following.append(p)
                self.counts["running"] += 1
                continue
            self.out(f"{verb:>7} trial {number}: {label}  (run {p.run.id})")  # type: ignore[union-attr]
            p.trial_link = TrialLink(self.storage_url, self.name, trial_id, number,
                                     self.search.metric, self.search.pruner_params())  # fmt: skip
            p.mlflow_tags = {"optuna_study": self.name, "optuna_trial": str(number)}
            self.counts["running"] += 1
            return p
        return None

    def finished(self, p: Point) -> None:
        self.counts["running"] -= 1
        assert p.trial is not None and p.run is not None
        status, value = p.status, None
        if status == "done":
            value = self._metric(p.run.id)
            state = "COMPLETE" if value is not None else "FAIL"
        elif status in ("pruned", "diverged"):
            state = "PRUNED"
        elif status == "interrupted":  # killed: left RUNNING, the same command resumes it
            state = "RUNNING"
        else:
            state = "FAIL"
        elapsed = time.monotonic() - p.started if p.started else None
        tr = p.trial
        self._tell(tr.number, tr.trial_id, p.label, state, value, p.run.id, status, elapsed)
        for w in tr.waiters:
            assert w.trial is not None
            self._tell(w.trial.number, w.trial.trial_id, w.label, state, value, p.run.id,
                       f"{status} (same run)")  # fmt: skip

    # ---------------------------------------------------------------- telling
    def _metric(self, run_id: int) -> float | None:
        assert self.dispatcher is not None
        rows = self.dispatcher.store.epoch_metrics(run_id)
        if not rows:
            return None
        value = float(getattr(rows[-1], self.search.metric))
        return value if math.isfinite(value) else None

    def _tell(self, number: int, trial_id: int, label: str, state: str, value: float | None,
              run_id: int | None, status: str, elapsed: float | None = None) -> None:  # fmt: skip
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
            elif state in ("PRUNED", "FAIL"):
                study.tell(number, state=ts.PRUNED if state == "PRUNED" else ts.FAIL)
        except Exception as e:  # e.g. already finished by another process
            self.out(f"warning: trial {number} could not be told ({e})")
        self.outcomes.append(TrialOutcome(number, label, state, value, run_id, status))
        self.counts[state] += 1
        c = self.counts
        done = sum(c[k] for k in ("COMPLETE", "PRUNED", "FAIL", "RUNNING"))
        best = self.best()
        shown = f"{self.search.metric} {value:.4g}" if value is not None else ""
        took = f"({elapsed:.1f}s)" if elapsed is not None else ""
        bests = f"best {best.value:.4g} (trial {best.number})" if best is not None else "best —"
        left = f" · interrupted {c['RUNNING']}" if c["RUNNING"] else ""
        verb = "interrupted" if state == "RUNNING" else state.lower()
        self.out(
            f"[{done:>3}/{self.budget}] {verb:<8} trial {number}: {label}  {status}  {shown}  "
            f"{took}  {bests}  ·  complete {c['COMPLETE']} · pruned {c['PRUNED']} · "
            f"failed {c['FAIL']}{left} · running {c['running']}"
        )

    def best(self) -> Any:
        try:
            return self.study.best_trial
        except ValueError:  # no COMPLETE trial yet
            return None

    def print_best(self) -> None:
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


INTERRUPTED = (
    "interrupted: running trials cancelled and left RUNNING in the study; run the "
    "same command again to resume them (their runs resume from checkpoints)"
)


def run_search(
    dims: list[Dimension],
    fixed: list[str],
    compose: Callable[[list[str]], Config],
    search: SearchParams,
    launcher: LauncherParams,
    study_name: str,
    command: str,
    out: Callable[[str], None] | None = None,
) -> StudySource:
    """Run (or continue) the study. Raises :class:`~sweeper.errors.Failed` when no trial
    of the study completed."""
    say = out or (lambda s: print(s, flush=True))
    check_launcher(launcher)
    search.validate()
    source = StudySource(dims, fixed, compose, search, study_name, "", say)
    source.fuse_limit = launcher.fuse_limit() if launcher.tasks == 1 else 1
    cfg0 = source.check_space()
    search.check_data([c.data.val_split for _, c in source.corners])
    check_before_writing(source.corners)  # custom builds, the store: nothing written
    source.storage_url = search.storage or cfg0.store_url()
    if launcher.dry_run:  # the space and its corners are checked; nothing is opened or written
        space = ", ".join(d.text for d in dims)
        say(f"dry run of study '{study_name}': {search.n_trials} trials over {space} "
            f"({search.sampler} sampler, pruner {search.pruner}, {search.resolved_direction()} "
            f"{search.metric}), {search.n_jobs} at a time; nothing is started or written")  # fmt: skip
        return source
    cfg0.make_results_dir()  # the study lives in the results store's database by default
    source.open()
    if source.budget <= 0:
        say("nothing to start: the study already has n_trials finished trials")
    else:
        with open_sweep(cfg0, launcher, study_name, command, f"optuna/{launcher.kind}",
                        source.total, say) as d:  # fmt: skip
            source.dispatcher = d
            d.dispatch(source, source.total, INTERRUPTED, (search.metric,
                       search.resolved_direction()), cap=search.n_jobs, batch=False)  # fmt: skip
            d.close(failed=source.best() is None)  # the parent's summary names the best
    source.print_best()
    if source.best() is None:
        raise Failed(f"no trial of study {study_name!r} completed")
    return source
