"""A grid's claims in bulk (``Dispatcher.claim_many``: ``Store.claim_runs`` and
``Store.claim_many``) decide exactly what one ``Dispatcher.claim`` per point decides, on a
store holding every kind of run: the same decisions, tokens, links and rows."""

from __future__ import annotations

import datetime as dt
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from sweeper.config.identity import grid_columns, identity_of, resolved_config
from sweeper.config.launcher import LauncherParams
from sweeper.config.schema import Config
from sweeper.launch.dispatch import Decision, Dispatcher, Point
from sweeper.store import RunStatus, Store, default_url
from sweeper.store.lease import HOST
from sweeper.store.models import Run

# what each configuration (by seed) is in the store before the sweep claims it
STATES = {
    0: "done",
    1: "failed",
    2: "diverged",
    3: "interrupted",
    4: "pruned",
    5: "queued, claimed by a live sweep",
    6: "queued, claimed by a dead sweep",
    7: "running, its job alive",
    8: "running, its job dead",
    9: "running, its job dead, killed before at this epoch",  # becomes failed
    10: "queued, claimed by nobody",
    11: "queued, claimed by an ended sweep",
    # 12, 13: not in the store
}


def _dead_pid() -> int:
    """The id of a process that has ended (its parent waited for it)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _points(tmp: Path, order: int) -> list[Point]:
    cfgs = [Config(seed=s, epochs=1, results_dir=str(tmp)) for s in range(14)]
    points = []
    for i, cfg in enumerate([*cfgs, cfgs[3], cfgs[12], cfgs[0]]):  # three duplicates
        ident, chash = identity_of(cfg)
        points.append(Point(f"seed={cfg.seed} #{i}", cfg, chash, ident))
    random.Random(order).shuffle(points)
    return points


def _store_with_every_kind_of_run(tmp: Path, points: list[Point], dead: int) -> None:
    """The store before the sweep starts (the sweeper's own sweep is made after this)."""
    for old in tmp.glob("results.db*"):  # the other way's store
        old.unlink()
    store = Store(default_url(tmp))
    try:
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        live = store.create_sweep("live", "x", "local", 1)  # this process: alive
        gone = store.create_sweep("gone", "x", "local", 1)
        store.set_sweep_fields(gone.id, pid=dead)
        ended = store.create_sweep("ended", "x", "local", 1)
        store.set_sweep_fields(ended.id, ended_at=now, outcome="finished")
        for p in {p.config_hash: p for p in sorted(points, key=lambda p: p.label)}.values():
            seed = p.cfg.seed
            if seed not in STATES:
                continue
            run = store.claim_run(
                p.config_hash, grid_columns(p.cfg), resolved_config(p.cfg, p.identity)
            )
            # jobs that die once the sweeper has started: running from then on (_claimed)
            status = "queued" if seed in (8, 9) else STATES[seed].split(",")[0]
            fields: dict[str, Any] = {"status": RunStatus(status), "owner": 3, "epoch": 2}
            if seed == 5:
                fields["claimed_by"] = live.id
            if seed == 6:
                fields["claimed_by"] = gone.id
            if seed == 11:
                fields["claimed_by"] = ended.id
            if seed in (7, 8, 9):
                fields.update(host=HOST, pid=os.getpid() if seed == 7 else dead, heartbeat_at=now)
            if seed == 9:
                fields["killed_at_epoch"] = 2
            with store.session() as s:  # set as they are, tokens included
                s.execute(update(Run).where(Run.id == run.id).values(**fields))
    finally:
        store.dispose()


def _claimed(tmp: Path, order: int, retry: bool, bulk: bool) -> tuple[list, list, list]:
    points = _points(tmp, order)
    _store_with_every_kind_of_run(tmp, points, DEAD)
    store = Store(default_url(tmp))
    cfg0 = points[0].cfg
    d = Dispatcher(store, LauncherParams(), cfg0, "s", "cmd", "local", len(points), lambda s: None)
    try:
        # jobs that died after the sweeper's start-up look: its claims notice them
        for p in points:
            if p.cfg.seed in (8, 9):
                run = store.get_run(p.config_hash)
                assert run is not None
                with store.session() as s:
                    s.execute(update(Run).where(Run.id == run.id).values(status="running"))
        if bulk:
            decisions = d.claim_many(points, retry)
        else:  # what a grid did before: one claim per point
            twins: dict[str, Point] = {}
            decisions = []
            for p in points:
                decisions.append(d.claim(p, retry, twins))
                twins.setdefault(p.config_hash, p)
        seen = [(p.label, dec, p.owner, p.run.id if p.run else None,
                 p.run.status if p.run else None, p.twin.label if p.twin else None)
                for p, dec in zip(points, decisions, strict=True)]  # fmt: skip
        with store.engine.connect() as c:
            runs = c.exec_driver_sql(
                "SELECT id, config_hash, status, owner, claimed_by, error, killed_at_epoch, "
                "epoch, model, method, alpha, seed, config FROM runs ORDER BY config_hash"
            ).all()
            links = c.exec_driver_sql(
                "SELECT sweep_id, run_id, point, trial, job_id FROM sweep_runs ORDER BY id"
            ).all()
        return seen, [tuple(r) for r in runs], [tuple(r) for r in links]
    finally:
        d.close(failed=False)
        store.dispose()


DEAD = _dead_pid()


@pytest.mark.parametrize("retry", [False, True], ids=["no retry", "retry_failed"])
@pytest.mark.parametrize("order", [0, 1, 2])
def test_bulk_claims_decide_what_one_claim_per_point_decides(tmp_path: Path, order: int,
                                                             retry: bool) -> None:  # fmt: skip
    one = _claimed(tmp_path, order, retry, bulk=False)
    bulk = _claimed(tmp_path, order, retry, bulk=True)  # the same store, made again
    assert bulk[0] == one[0]  # decisions, tokens, records, twins
    assert bulk[1] == one[1]  # every run's row
    assert bulk[2] == one[2]  # the sweep's links (and no other)
    kinds = {d for _, d, *_ in one[0]}
    # every decision but RETRY (no retry) / FINISHED (retry) was taken
    want = set(Decision) - {Decision.RETRY if not retry else Decision.FINISHED}
    assert kinds == want, kinds
    by_seed = {label.split()[0]: (dec, owner) for label, dec, owner, *_ in one[0]}
    assert by_seed["seed=5"] == (Decision.FOLLOW, None)  # a live sweep's claim holds
    assert by_seed["seed=6"][0] == Decision.START and by_seed["seed=6"][1] == 4  # a dead one's not
    assert by_seed["seed=7"] == (Decision.FOLLOW, None)  # never trained twice
    assert by_seed["seed=13"] == (Decision.START, 1)


def test_a_grids_new_runs_are_recorded_as_the_store_reads_them_back(tmp_path: Path) -> None:
    """``Store.claim_runs`` hands out the records of the runs it creates without reading
    them back: they equal what the store reads back; asked again, nothing is added."""
    points = _points(tmp_path, 0)
    store = Store(default_url(tmp_path))
    try:
        sweep = store.create_sweep("s", "x", "local", len(points))
        memo: dict = {}
        want = [(p.config_hash, p.label,
                 lambda p=p: (grid_columns(p.cfg), resolved_config(p.cfg, p.identity, memo)))
                for p in points]  # fmt: skip
        made = store.claim_runs(sweep.id, want)
        assert len(made) == 14 and made == store.runs_by_hash(list(made))
        again = store.claim_runs(sweep.id, want)
        assert again == made and store.count_runs() == 14
        first: dict[str, str] = {}
        for h, label, _ in want:
            first.setdefault(h, label)
        # one link per run, under the first point that asked for it, in the grid's order
        links = [(lk.run_id, lk.point) for lk, _ in store.sweep_runs(sweep.id)]
        assert links == [(made[h].id, label) for h, label in first.items()]
        for p in points:  # the shared sub-configs are written as asdict writes them
            assert made[p.config_hash].config == resolved_config(p.cfg, p.identity)
    finally:
        store.dispose()


class _Recorded:
    """A backend (sweeper.launch.backends.Backend) that starts nothing: it records what it
    is asked to submit (the claims and follows are what is tested, not the jobs)."""

    kind, capacity, threads = "local", float("inf"), None

    def __init__(self) -> None:
        self.submitted: list[Any] = []

    def submit(self, subs: Any) -> None:
        self.submitted += subs

    def gone(self, subs: Any) -> list:
        return []


def test_followed_runs_end_or_are_taken_over_in_one_poll(tmp_path: Path) -> None:
    """One ``_follow`` over followed runs of every kind: ended ones finish their points,
    live trainers and live sweeps' claims keep them followed, a dead job's or a dead
    sweep's run is claimed (one point per run) and submitted."""
    from sweeper.launch.grid import GridSource

    points = list({p.config_hash: p for p in _points(tmp_path, 0)}.values())[:8]  # distinct
    kinds = ["done", "failed", "alive", "died", "live sweep", "dead sweep", "dead sweep",
             "pruned"]  # fmt: skip
    points[6].config_hash, points[6].cfg = points[5].config_hash, points[5].cfg  # one run
    store = Store(default_url(tmp_path))
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    live = store.create_sweep("live", "x", "local", 1)
    gone = store.create_sweep("gone", "x", "local", 1)
    store.set_sweep_fields(gone.id, pid=DEAD)
    d = Dispatcher(store, LauncherParams(), points[0].cfg, "s", "cmd", "local", 8, lambda s: None)
    try:
        for p, kind in zip(points, kinds, strict=True):
            p.run = store.claim_run(p.config_hash, grid_columns(p.cfg),
                                    resolved_config(p.cfg, p.identity))  # fmt: skip
            fields: dict[str, Any] = {"owner": 2, "status": RunStatus.queued}
            if kind in ("done", "failed", "pruned"):
                fields["status"] = RunStatus(kind)
            elif kind in ("alive", "died"):
                fields.update(status=RunStatus.running, host=HOST, heartbeat_at=now,
                              pid=os.getpid() if kind == "alive" else DEAD)  # fmt: skip
            else:
                fields["claimed_by"] = live.id if kind == "live sweep" else gone.id
            with store.session() as s:
                s.execute(update(Run).where(Run.id == p.run.id).values(**fields))
            p.status, p.followed = "following", True
        d.following = list(points)
        source, backend = GridSource(points, lambda s: None, None), _Recorded()
        d._follow(source, backend)  # type: ignore[arg-type]
        left = {p.label: p for p in d.following}
        assert [kinds[i] for i, p in enumerate(points) if p.label in left] == [
            "alive", "live sweep", "dead sweep"]  # fmt: skip
        assert [p.status for p in points[:2]] + [points[7].status] == ["done", "failed", "pruned"]
        taken = [p for p in points if p.sub is not None]
        assert [kinds[points.index(p)] for p in taken] == ["died", "dead sweep"]
        assert len(backend.submitted) == 2 and not any(p.followed for p in taken)
        assert [p.owner for p in taken] == [4, 3]  # the dead job's run was fenced first
        rows = dict(sql_rows(tmp_path, "SELECT id, status || ' ' || owner || ' ' || "
                                       "coalesce(claimed_by, '') FROM runs"))  # fmt: skip
        assert rows[points[3].run.id] == f"queued 4 {d.sweep.id}"  # interrupted, then ours
        assert rows[points[5].run.id] == f"queued 3 {d.sweep.id}"
        assert rows[points[4].run.id] == f"queued 2 {live.id}"  # a live sweep's claim holds
    finally:
        d.close(failed=False)
        store.dispose()


def sql_rows(tmp: Path, query: str) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(tmp / "results.db") as c:
        return c.execute(query).fetchall()
