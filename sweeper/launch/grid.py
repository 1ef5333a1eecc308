"""A grid as a source of points: every point composed and checked before anything is
written, claimed up front (so the header can say what will run), then dispatched.

Progress is printed as jobs end (``[ 3/8] done  method=pgt alpha=0.3  test 94.17% ...  done 3
· failed 0 · diverged 0 · skipped 0 · running 2``), then a summary table.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import shlex
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sweeper.config.checks import check_before_writing
from sweeper.config.identity import grid_columns, identity_of, preflight
from sweeper.config.launcher import LauncherParams
from sweeper.config.schema import Config
from sweeper.errors import Failed
from sweeper.launch.backends import check_launcher
from sweeper.launch.dispatch import Decision, Dispatcher, Point, open_sweep
from sweeper.launch.fuse import describe, plan_groups
from sweeper.store import CostKey
from trainers.registry import ConfigError


def format_command(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def validate_points(points: list[tuple[str, Config]]) -> list[Point]:
    """Every point checked before anything is dispatched or written (one line on error)."""
    if not points:
        raise ConfigError("the grid is empty: no point to run")
    out: list[Point] = []
    urls: dict[tuple[str | None, str], str] = {}  # (store.url, results_dir) -> the store
    for label, cfg in points:
        try:
            preflight(cfg)
            ident, chash = identity_of(cfg)
        except ConfigError as e:
            raise ConfigError(f"point [{label}]: {e}") from None
        where = (cfg.store.url, cfg.results_dir)
        if where not in urls:
            urls[where] = cfg.store_url()
        out.append(Point(label, cfg, chash, ident))
    if len(set(urls.values())) > 1:
        raise ConfigError(
            f"all points of a sweep must share one results store; got {sorted(set(urls.values()))}"
        )
    check_before_writing([(p.label, p.cfg) for p in out])  # custom builds, the store
    return out


class GridSource:
    """The grid's points to dispatch, in order; progress lines as they end."""

    def __init__(
        self, points: list[Point], out: Callable[[str], None], params: LauncherParams | None = None
    ) -> None:
        self.points, self.out, self.params = points, out, params
        self.todo: list[Point] = []
        self.jobs: list[list[Point]] | None = None
        self.counts: Counter[str] = Counter()

    def claim_all(self, d: Dispatcher, retry_failed: bool) -> None:
        for p, decision in zip(self.points, d.claim_many(self.points, retry_failed), strict=True):
            if decision == Decision.SHARED:  # e.g. baseline x alpha: one run serves both
                p.status = "shared"
            elif decision.dispatch:
                self.todo.append(p)
            elif decision == Decision.FOLLOW:  # another live job trains it: its outcome
                p.status, p.followed = "following", True
                d.following.append(p)
                self.out(d.follow_message(p))
            elif decision == Decision.FINISHED:  # ended failed / diverged before: reported
                assert p.run is not None
                p.status = p.run.status.value
                self.counts["ended"] += 1
                self.counts[p.status] += 1
            else:
                p.status = "skipped"
                self.counts["ended"] += 1
                self.counts["skipped"] += 1

    def plan(self, slots: float) -> list[list[Point]]:
        """The jobs to run: the points to dispatch, fused where they can be
        (:mod:`sweeper.launch.fuse`), with the header's line about it."""
        if self.jobs is None:
            p = self.params
            limit = p.fuse_limit() if p is not None else 1
            ddp = p is not None and p.tasks > 1
            self.jobs = plan_groups(self.todo, limit, slots, ddp)
            if any(len(j) > 1 for j in self.jobs):
                self.out(describe(len(self.todo), self.jobs))
        return self.jobs

    def next_job(self, slots: float) -> list[Point] | None:
        jobs = self.plan(slots)
        if not jobs:
            return None
        return jobs.pop(0)

    def finished(self, p: Point) -> None:
        c = self.counts
        c["ended"] += 1
        c[p.status] += 1
        total = sum(1 for q in self.points if q.status != "shared")
        acc = f"test {p.run.test_acc:6.2f}%" if p.run and p.run.test_acc is not None else ""
        took = f"({time.monotonic() - p.started:.1f}s)" if p.started else "(another job)"
        live = Counter(q.status for q in self.points)  # queued, running, following now
        self.out(f"[{c['ended']:>3}/{total}] {p.status:<8} {p.label}  {acc}  {took}   "
                 + progress(c + Counter({k: live[k] for k in ("queued", "running",
                                                              "following")})))  # fmt: skip


def progress(c: Counter[str]) -> str:
    """``queued 2 · running 1 · done 3 · failed 0 · diverged 0 · skipped 1`` (following and
    interrupted only when there are some)."""
    keys = ["queued", "running", "following", "done", "failed", "diverged", "interrupted",
            "skipped"]  # fmt: skip
    always = {"queued", "running", "done", "failed", "diverged", "skipped"}
    return " · ".join(f"{k} {c[k]}" for k in keys if k in always or c[k])


INTERRUPTED = (
    "interrupted: running jobs cancelled (their runs are marked interrupted); run the "
    "same command again to resume (finished points are skipped, interrupted ones "
    "resume from their checkpoints)"
)


def run_grid(
    points: list[Point],
    params: LauncherParams,
    command: str,
    sweep_name: str | None = None,
    out: Callable[[str], None] | None = None,
    parent_id: int | None = None,
) -> list[Point]:
    """Record the sweep, claim every point, dispatch what is left, report. Raises
    :class:`~sweeper.errors.Failed` naming the points that failed or were killed.
    ``parent_id``: the sweep this one adds seeds to (``python -m sweeper resolve``)."""
    check_launcher(params)
    say = out or (lambda s: print(s, flush=True))
    name = sweep_name or "sweep-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg0 = points[0].cfg
    if params.dry_run:
        dry_run(points, params, name, say)
        return points
    with open_sweep(cfg0, params, name, command, params.kind, len(points), say,
                    parent_id=parent_id) as d:  # fmt: skip
        grid = GridSource(points, say, params)
        grid.claim_all(d, params.retry_failed)
        c = grid.counts
        shared = sum(p.status == "shared" for p in points)
        following = sum(p.status == "following" for p in points)
        say(
            f"sweep {d.sweep.id} '{name}': {len(points)} points, {len(grid.todo)} to run, "
            f"{c['ended']} already finished"
            + (f" ({c['failed']} failed)" if c["failed"] else "")
            + (f", {following} trained by another live job" if following else "")
            + (f", {shared} duplicates" if shared else "")
        )
        _say_prediction(d.store, [_kind(p.run) for p in grid.todo if p.run is not None], say)
        if not grid.todo and not d.following:
            d.close(failed=bool(c["failed"]))
            say("nothing to start: every point has ended"
                + (" (hydra.launcher.retry_failed=true retries the failed ones)"
                   if c["failed"] else ""))  # fmt: skip
        else:
            d.dispatch(grid, len(points), INTERRUPTED)
            d.close(failed=any(p.status == "failed" for p in points))
    say(summary_table(points))
    bad = [p for p in points if p.status in ("failed", "interrupted")]
    if bad:
        failed = [p for p in bad if p.status == "failed"]
        killed = [p for p in bad if p.status == "interrupted"]
        parts = []
        if failed:
            again = (
                "" if params.retry_failed else " (hydra.launcher.retry_failed=true retries them)"
            )
            parts.append(f"failed points{again}: " + "; ".join(_named(p) for p in failed))
        if killed:
            parts.append("interrupted points (the same command resumes them): "
                         + "; ".join(_named(p) for p in killed))  # fmt: skip
        raise Failed(" | ".join(parts))
    return points


def dry_run(points: list[Point], params: LauncherParams, name: str,
            say: Callable[[str], None]) -> None:  # fmt: skip
    """``hydra.launcher.dry_run=true``: what the sweep would do -- its header and its jobs --
    from the store as it is, read only (a store that does not exist yet is no store): no
    sweep recorded, no run claimed, no job started, no file written."""
    from sweeper.launch.backends import gpu_count, local_slots
    from sweeper.store import Store, StoreError

    try:
        store: Store | None = Store(points[0].cfg.store_url(), create=False)
    except StoreError:
        store = None
    try:
        known = store.runs_by_hash([p.config_hash for p in points]) if store else {}
        todo, seen, finished, shared = [], set(), 0, 0
        for p in points:
            run = known.get(p.config_hash)
            if p.config_hash in seen:
                shared += 1
                continue
            seen.add(p.config_hash)
            ended = run is not None and (run.status == "done" or (
                run.status in ("failed", "diverged") and not params.retry_failed))  # fmt: skip
            if ended:
                finished += 1
            else:
                todo.append(p)
        say(f"dry run of '{name}': {len(points)} points, {len(todo)} to run, {finished} already "
            f"finished" + (f", {shared} duplicates" if shared else "")
            + "; nothing is started or written")  # fmt: skip
        if store is not None:  # what similar done runs cost
            _say_prediction(store, [_kind(grid_columns(p.cfg)) for p in todo], say)
    finally:
        if store is not None:
            store.dispose()
    slots = float(len(local_slots(params, gpu_count()))) if params.kind == "local" else float("inf")
    jobs = plan_groups(todo, params.fuse_limit(), slots, params.tasks > 1)
    if jobs:
        say(describe(len(todo), jobs))
    for i, job in enumerate(jobs, 1):
        say(f"  job {i}: " + " | ".join(p.label or "(defaults)" for p in job))


def _kind(r: Any) -> CostKey:
    """(model, data, batch size, epochs) of a run record or of a grid-columns dict."""
    get = r.get if isinstance(r, dict) else functools.partial(getattr, r)
    return (str(get("model")), str(get("data")), int(get("batch_size")), int(get("epochs")))


def _say_prediction(store: Any, kinds: list[CostKey], say: Callable[[str], None]) -> None:
    """The header's predicted cost of the runs to train, where the store has done runs of
    their kind; nothing where it has none."""
    from sweeper.launch.cost import predict_kinds

    if kinds and (pred := predict_kinds(store, kinds)) is not None:
        say(pred.header_line())


def _named(p: Point) -> str:
    why = f": {p.why}" if p.why else ""
    return f"[{p.label}] (run {p.run.id}{why})" if p.run else f"[{p.label}]{why}"


def summary_table(points: list[Point]) -> str:
    """Plain-text summary, one line per point (rich renders it)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="sweep summary")
    for col in ("point", "status", "run", "epochs", "train %", "test %"):
        t.add_column(col)
    for p in points:
        r = p.twin.run if p.twin is not None else p.run
        t.add_row(
            p.label or "(defaults)",
            "duplicate" if p.status == "shared" else p.status,
            str(r.id) if r else "—",
            f"{r.epoch}/{r.epochs}" if r else "—",
            f"{r.train_acc:.2f}" if r and r.train_acc is not None else "—",
            f"{r.test_acc:.2f}" if r and r.test_acc is not None else "—",
        )
    console = Console(width=160, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(t)
    return console.export_text()
