"""``python -m sweeper status`` on a store of a few thousand runs: the sweeps' counts (the
database's GROUP BY) equal the rows, each sweep's outcome is told, only the latest runs are
listed (running ones first) with a line saying how many more there are, and ``all=true``
lists every one."""

from __future__ import annotations

import datetime as dt
import io
import os
import random
import subprocess
from collections import Counter
from pathlib import Path

from helpers import sql
from rich.console import Console
from sqlalchemy import insert, update

from sweeper.status import LATEST, STATES, status
from sweeper.store import RunStatus, Store, default_url
from sweeper.store.lease import HOST
from sweeper.store.models import Run, Sweep, SweepRun

SWEEPS = 4  # 1: finished, 2: its sweeper died (abandoned), 3: interrupted, 4: running (us)


def _store(tmp: Path, n: int = 3000) -> Path:
    """Sweeps 1-4 sharing ``n`` runs of every state (some runs in two sweeps), fused jobs in
    sweep 1, made by bulk inserts."""
    rng = random.Random(23)
    store = Store(default_url(tmp))
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        for i, (outcome, pid) in enumerate([("finished", None), (None, dead.pid),
                                            ("interrupted", None), (None, os.getpid())]):  # fmt: skip
            sw = store.create_sweep(f"s{i + 1}", "cmd", "local", n // 2)
            ended = now if outcome else None
            store.set_sweep_fields(sw.id, outcome=outcome, ended_at=ended, pid=pid)
        states = [st for st in RunStatus if st != RunStatus.running]
        rows = []
        for i in range(n):
            st = rng.choice(states) if i % 200 else RunStatus.running
            rows.append({"config_hash": f"{i:064x}", "model": "resnet20", "method": "pgt",
                         "alpha": 0.1, "data": "cifar10", "batch_size": 128, "epochs": 3,
                         "lr": 0.1, "schedule": "cosine", "label_smoothing": 0.0, "seed": i,
                         "config": {}, "status": st, "epoch": 1,
                         "created_at": now - dt.timedelta(seconds=n - i),
                         # running: this process's job, alive (status leaves it running)
                         "host": HOST if st == RunStatus.running else None,
                         "pid": os.getpid() if st == RunStatus.running else None})  # fmt: skip
        links = []
        for rid in range(1, n + 1):
            for sid in {1 + rid % SWEEPS, 1 + rid * 7 % SWEEPS}:
                job = f"j{rid // 12}" if sid == 1 else f"j{rid}"  # sweep 1: fused by threes
                links.append({"sweep_id": sid, "run_id": rid, "point": f"seed={rid - 1}",
                              "job_id": job})  # fmt: skip
        with store.session() as s:
            s.execute(insert(Run), rows)
            s.execute(insert(SweepRun), links)
    finally:
        store.dispose()
    return tmp / "results.db"


def _status(tmp: Path, *args: str) -> str:
    buf = io.StringIO()
    status([f"results_dir={tmp}", *args], console=Console(width=250, file=buf))
    return buf.getvalue()


def _table_rows(text: str, first: str) -> list[list[str]]:
    """The cells of a rich table's rows whose first cell is a number, from ``first``'s
    table on."""
    out = []
    for line in text[text.index(first) :].splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) > 3 and cells[0].isdigit():
            out.append(cells)
    return out


def test_status_counts_each_sweeps_runs_and_lists_the_latest(tmp_path: Path) -> None:
    db = _store(tmp_path)
    text = _status(tmp_path)
    # the sweeps' table: the counts equal the rows, the outcome is each sweep's
    want = Counter(sql(db, "SELECT l.sweep_id, r.status FROM sweep_runs l "
                           "JOIN runs r ON r.id = l.run_id"))  # fmt: skip
    jobs = sql(db, "SELECT sweep_id, count(DISTINCT job_id) FROM sweep_runs GROUP BY sweep_id")
    sweeps = _table_rows(text, "sweeps in")[:SWEEPS]
    assert [r[0] for r in sweeps] == ["1", "2", "3", "4"]
    for cells in sweeps:
        sid = int(cells[0])
        assert cells[6 : 6 + len(STATES)] == [str(want[(sid, st.value)]) for st in STATES]
        assert cells[5].split()[0] == str(dict(jobs)[sid])
    assert "fused" in sweeps[0][5] and "fused" not in sweeps[1][5]
    assert [r[6 + len(STATES)] for r in sweeps] == ["finished", "abandoned", "interrupted",
                                                    "running"]  # fmt: skip
    # the latest sweep's latest runs: running ones first, then the newest; how many more
    runs = _table_rows(text, "runs of the latest sweep (4)")
    n4 = sum(n for (sid, _), n in want.items() if sid == 4)
    assert len(runs) == LATEST and f"the {LATEST} latest of {n4}" in text
    assert f"{n4 - LATEST} more run(s) not listed; sweep=4 all=true lists them all" in text
    in4 = sql(db, "SELECT r.id, r.status FROM sweep_runs l JOIN runs r ON r.id = l.run_id "
                  "WHERE l.sweep_id = 4 ORDER BY r.status != 'running', r.created_at DESC")  # fmt: skip
    assert [int(r[0]) for r in runs] == [rid for rid, _ in in4[:LATEST]]
    assert [r[7] for r in runs] == [st for _, st in in4[:LATEST]]
    assert runs[0][7] == "running" and runs[-1][7] != "running"


def test_status_records_dead_jobs_and_abandoned_sweeps_first(tmp_path: Path) -> None:
    db = _store(tmp_path, n=200)
    store = Store(default_url(tmp_path))
    try:  # a job that died on this host, and a sweep alive by its recent heartbeat
        with store.session() as s:
            s.execute(update(Run).where(Run.id == 50).values(status=RunStatus.running, host=HOST,
                                                            pid=_gone_pid()))  # fmt: skip
            s.execute(update(Sweep).where(Sweep.id == 4).values(pid=None, host="elsewhere"))
    finally:
        store.dispose()
    text = _status(tmp_path)
    assert sql(db, "SELECT status FROM runs WHERE id = 50") == [("interrupted",)]
    assert sql(db, "SELECT outcome FROM sweeps ORDER BY id") == [
        ("finished",), ("abandoned",), ("interrupted",), (None,)]  # fmt: skip
    assert "abandoned" in text
    store = Store(default_url(tmp_path))
    try:  # the cheap form of a sweep's state (the MLflow parent's "anything changed?")
        want = tuple((lk.run_id, r.status.value) for lk, r in store.sweep_runs(2))
        assert store.sweep_run_states(2) == want and len(want) > 50
    finally:
        store.dispose()
    # all=true: every run of a sweep, in its order; of the store without sweep=
    every = _table_rows(_status(tmp_path, "sweep=2", "all=true"), "runs of sweep 2")
    assert [int(r[0]) for r in every] == [
        rid for (rid,) in sql(db, "SELECT run_id FROM sweep_runs WHERE sweep_id = 2 ORDER BY id")
    ]
    every = _table_rows(_status(tmp_path, "all=true"), "all runs")
    assert [int(r[0]) for r in every] == list(range(1, 201))


def _gone_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid
