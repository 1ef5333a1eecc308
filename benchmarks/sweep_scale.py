"""Benchmark: the sweeper at scale, measured side by side in one run (no GPU, no MLflow).

* time to header: the real command ``python -m sweeper -m method=pgt,gc_pgt,agc_pgt,ls_pgt
  alpha=0.1,...,0.5 seed=range(0,S) epochs=1 mlflow.enabled=false`` (100, 1,000 and 10,000
  distinct points, a fresh results dir each, median of 3) from process start until it prints
  its header line ``sweep N '...': P points, ...`` -- composing, checking, hashing every
  point, recording the sweep and claiming every point in the store; the sweeper is then
  interrupted (SIGINT) before any job trains. Goal: 10,000 points <= 20 s, and the cost of
  each point beyond the previous size flat (linear growth past the start-up's fixed cost).
* a poll of the sweeper with 10,000 points in flight (what ``Dispatcher._loop`` does each
  poll besides asking the backend: the running jobs' submissions, the ended ones, and
  ``_follow`` over 10,000 followed runs whose trainers are alive), on the 10,000-point
  store; and a finished point's progress line (``GridSource.finished``). The backend's own
  answer (one ``squeue`` a poll on Slurm, submitit's ``done()`` per job locally) is not in
  it. For comparison: one query per followed run, as ``_follow`` read them before.
* ``python -m sweeper status`` on a store of 100,000 runs (10 sweeps of 10,000, every state,
  100 running; built by bulk INSERTs): the whole process, and the lines it prints. Goal <= 2 s.
* the MLflow parent summary's cost per update at 10,000 runs: what ``SweepTracker._summarize``
  computes before it logs (the state it compares, ``analysis.sweep.summarize_sweep`` with
  its report, the metrics, Markdown and CSV; the state also as ``Store.sweep_run_states``
  reads it, without the configs), on the 10,000-point store with every run done;
  and how many metrics one update logs (their logging is MLflow's cost, not measured here).

Usage: ``.venv/bin/python benchmarks/sweep_scale.py [--quick]`` (``--quick``: 100 and 1,000
points, a store of 10,000 runs for status). Figures: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = "method=pgt,gc_pgt,agc_pgt,ls_pgt"
ALPHAS = "alpha=0.1,0.2,0.3,0.4,0.5"  # 4 x 5 = 20 configurations a seed, all distinct
HEADER = re.compile(r"^sweep (\d+) '[^']*': (\d+) points, (\d+) to run")


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def time_to_header(n: int, results: Path) -> float:
    """Seconds from the sweep command's start to its header line (``n`` points)."""
    args = [sys.executable, "-m", "sweeper", "-m", METHODS, ALPHAS, f"seed=range(0,{n // 20})",
            "epochs=1", "mlflow.enabled=false", f"results_dir={results}",
            "hydra.launcher.fuse=off", f"hydra.sweep.dir={results}/multirun"]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.Popen(args, cwd=results.parent, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)  # fmt: skip
    took, seen = None, []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            seen.append(line)
            m = HEADER.match(line)
            if m:
                took = time.perf_counter() - t0
                if int(m.group(2)) != n or int(m.group(3)) != n:
                    sys.exit(f"expected {n} points to run; got: {line.strip()}")
                break
    finally:
        p.send_signal(signal.SIGINT)  # before a job trains: it cancels what it started
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if took is None:
        sys.exit(f"no header from the sweep of {n} points:\n" + "".join(seen[-20:]))
    return took


def following_store(src: Path, dst: Path) -> Path:
    """A copy of a store whose runs are all running, trained by this process (alive)."""
    from sqlalchemy import update

    from sweeper.store import RunStatus, Store, default_url
    from sweeper.store.lease import HOST
    from sweeper.store.models import Run

    dst.mkdir()
    shutil.copy(src / "results.db", dst / "results.db")
    store = Store(default_url(dst))
    try:
        with store.session() as s:
            s.execute(update(Run).values(status=RunStatus.running, host=HOST, pid=os.getpid(),
                                         heartbeat_at=dt.datetime.now(dt.UTC)
                                         .replace(tzinfo=None), owner=1))  # fmt: skip
    finally:
        store.dispose()
    return dst


def poll_cost(results: Path, repeats: int) -> dict[str, float]:
    """Seconds of one poll's work with every run of ``results`` in flight."""
    from sweeper.config.identity import identity_of
    from sweeper.config.launcher import LauncherParams
    from sweeper.config.schema import Config
    from sweeper.launch.backends import Submission
    from sweeper.launch.dispatch import Dispatcher, Point
    from sweeper.launch.grid import GridSource
    from sweeper.store import Store, default_url

    store = Store(default_url(results))
    cfg = Config(epochs=1, results_dir=str(results))
    ident, _ = identity_of(cfg)
    runs = store.runs()
    points = [Point(f"seed={r.seed} #{r.id}", cfg, r.config_hash, ident) for r in runs]
    for p, r in zip(points, runs, strict=True):
        p.run, p.owner = r, 1
    d = Dispatcher(store, LauncherParams(), cfg, "poll", "cmd", "local", len(points),
                   lambda s: None)  # fmt: skip
    source = GridSource(points, lambda s: None, None)
    out: dict[str, list[float]] = {"running": [], "following": [], "one query a run": [],
                                   "finished line": []}  # fmt: skip
    try:
        for _ in range(repeats):
            d.running = list(points)  # every point a job of its own
            for p in points:
                p.sub = Submission((p.cfg,))
            t0 = time.perf_counter()
            gone = {id(s) for s in d._subs()[:0]}  # the backend's answer: none ended
            _ended = [q for q in d.running if id(q.sub) in gone]
            out["running"].append(time.perf_counter() - t0)
            d.running, d.following = [], list(points)
            t0 = time.perf_counter()
            d._follow(source, None)  # type: ignore[arg-type]  # nothing is submitted
            out["following"].append(time.perf_counter() - t0)
            assert len(d.following) == len(points)
            t0 = time.perf_counter()
            for p in points:
                store.get_run_by_id(p.run.id)  # type: ignore[union-attr]
            out["one query a run"].append(time.perf_counter() - t0)
            p = points[0]
            p.status, p.started = "done", None
            t0 = time.perf_counter()
            source.finished(p)
            out["finished line"].append(time.perf_counter() - t0)
    finally:
        d.close(failed=False)
        store.dispose()
    return {k: statistics.median(v) for k, v in out.items()}


def big_store(dst: Path, n: int, sweeps: int = 10) -> Path:
    """A store of ``n`` runs in ``sweeps`` sweeps, every state, one in 1,000 running (alive:
    this process), by bulk INSERTs through SQLAlchemy."""
    from sqlalchemy import insert

    from sweeper.store import RunStatus, Store, default_url
    from sweeper.store.lease import HOST
    from sweeper.store.models import Run, SweepRun

    dst.mkdir()
    rng = random.Random(23)
    store = Store(default_url(dst))
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    states = [RunStatus.done] * 6 + [RunStatus.failed, RunStatus.diverged, RunStatus.queued,
                                     RunStatus.interrupted, RunStatus.pruned]  # fmt: skip
    try:
        for i in range(sweeps):
            sw = store.create_sweep(f"sweep{i}", "cmd", "local", n // sweeps)
            store.set_sweep_fields(sw.id, ended_at=now if i < sweeps - 1 else None,
                                   outcome="finished" if i < sweeps - 1 else None)  # fmt: skip
        for start in range(0, n, 20_000):
            rows, links = [], []
            for i in range(start, min(n, start + 20_000)):
                st = RunStatus.running if i % 1000 == 999 else rng.choice(states)
                done = st == RunStatus.done
                rows.append({"config_hash": f"{i:064x}", "model": "resnet20",
                             "method": ("pgt", "gc_pgt", "agc_pgt", "ls_pgt")[i % 4],
                             "alpha": 0.1 * (1 + i % 5), "data": "cifar10", "batch_size": 128,
                             "epochs": 100, "lr": 0.1, "schedule": "cosine",
                             "label_smoothing": 0.0, "seed": i // 20,
                             "config": {"identity": {"seed": i // 20}}, "status": st,
                             "epoch": 100 if done else 7,
                             "created_at": now - dt.timedelta(seconds=n - i),
                             "started_at": now - dt.timedelta(seconds=n - i),
                             "ended_at": now if st != RunStatus.running else None,
                             "test_acc": 60 + rng.random() * 30 if done else None,
                             "host": HOST if st == RunStatus.running else None,
                             "pid": os.getpid() if st == RunStatus.running else None,
                             "heartbeat_at": now})  # fmt: skip
                links.append({"sweep_id": 1 + i * sweeps // n, "run_id": i + 1,
                              "point": f"method=pgt seed={i}", "job_id": f"{i}"})  # fmt: skip
            with store.session() as s:
                s.execute(insert(Run), rows)
                s.execute(insert(SweepRun), links)
    finally:
        store.dispose()
    return dst


def status_cost(results: Path, repeats: int) -> tuple[float, int]:
    """Median seconds of the whole ``python -m sweeper status`` process, and its lines."""
    took, lines = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "sweeper", "status", f"results_dir={results}"],
                           env=env(), capture_output=True, text=True, timeout=600)  # fmt: skip
        took.append(time.perf_counter() - t0)
        if r.returncode != 0:
            sys.exit(f"status failed: {r.stderr[-2000:]}")
        lines = len(r.stdout.splitlines())
    return statistics.median(took), lines


def summary_cost(results: Path, repeats: int) -> tuple[float, float, float, int, int]:
    """Median seconds per parent-summary update at every run of ``results`` done: the state
    compared (every update; also as ``Store.sweep_run_states`` reads it), the summary built
    (when it changed); the metrics it logs, and its rows."""
    from sqlalchemy import update

    from analysis.sweep import summarize_sweep
    from sweeper.store import RunStatus, Store, default_url
    from sweeper.store.models import Run
    from sweeper.tracking.sweep import (
        summary_csv,
        summary_markdown,
        summary_metrics,
        summary_tags,
    )

    store = Store(default_url(results))
    try:
        with store.session() as s:
            s.execute(update(Run).values(status=RunStatus.done, epoch=1,
                                         test_acc=60 + Run.id % 97 / 4,
                                         train_acc=70 + Run.id % 89 / 4))  # fmt: skip
        sid = store.sweeps()[-1].id
        state, light, build = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            tuple((link.run_id, run.status.value) for link, run in store.sweep_runs(sid))
            state.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            store.sweep_run_states(sid)
            light.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s = summarize_sweep(store, sid, None)
            metrics = summary_metrics(s)
            summary_tags(s), summary_markdown(s), summary_csv(s)
            build.append(time.perf_counter() - t0)
        return (statistics.median(state), statistics.median(light), statistics.median(build),
                len(metrics), len(s.rows))  # fmt: skip
    finally:
        store.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 and 1,000 points; 10,000 runs")
    ap.add_argument("--repeats", type=int, default=3, help="sweeps to the header per size")
    a = ap.parse_args()
    sizes = [100, 1000] if a.quick else [100, 1000, 10_000]
    print(f"date {dt.date.today()} | python {sys.version.split()[0]} | {os.cpu_count()} cores"
          f" | load {os.getloadavg()[0]:.1f}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sweep_scale-") as tmp:
        root = Path(tmp)
        print(f"\ntime to header (the real command, a fresh results dir each, median of "
              f"{a.repeats}):")  # fmt: skip
        prev: tuple[int, float] | None = None
        for n in sizes:
            took = []
            for _ in range(a.repeats):  # the last one's store is kept for what follows
                results = root / f"h{n}" / "results"
                shutil.rmtree(results.parent, ignore_errors=True)
                results.parent.mkdir()
                took.append(time_to_header(n, results))
            t = statistics.median(took)
            goal = "  (goal <= 20 s)" if n == 10_000 else ""
            more = (f"   {1000 * (t - prev[1]) / (n - prev[0]):5.2f} ms a point beyond "
                    f"{prev[0]:,}" if prev else "")  # fmt: skip
            print(f"  {n:>6,} points: {t:6.2f} s{more}{goal}")
            prev = (n, t)
        largest = root / f"h{sizes[-1]}" / "results"

        n = sizes[-1]
        poll = poll_cost(following_store(largest, root / "poll"), repeats=3)
        print(f"\na poll with {n:,} points in flight (median of 3):")
        print(f"  {n:,} running jobs (submissions, ended ones):   {1000 * poll['running']:8.1f} ms")
        print(
            f"  {n:,} followed runs (_follow, bulk):            {1000 * poll['following']:8.1f} ms"
        )
        print(f"    for comparison, one query a followed run:    "
              f"{1000 * poll['one query a run']:8.1f} ms")  # fmt: skip
        print(f"  a finished point's progress line:               "
              f"{1000 * poll['finished line']:8.1f} ms")  # fmt: skip

        runs = 10_000 if a.quick else 100_000
        t0 = time.perf_counter()
        st_store = big_store(root / "big", runs)
        built = time.perf_counter() - t0
        took, lines = status_cost(st_store, repeats=3)
        print(
            f"\nstatus on {runs:,} runs in 10 sweeps (store built in {built:.1f} s): "
            f"{took:.2f} s the whole process (median of 3; goal <= 2 s), {lines} lines"
        )

        state, light, build, metrics, rows = summary_cost(largest, repeats=3)
        print(f"\nthe MLflow parent summary at {n:,} runs, per update (median of 3):")
        print(f"  the state compared (every update):  {1000 * state:8.1f} ms")
        print(f"    the same by Store.sweep_run_states: {1000 * light:6.1f} ms")
        print(f"  the summary built (when it changed): {1000 * build:8.1f} ms "
              f"({rows} configurations, {metrics} metrics logged an update)")  # fmt: skip


if __name__ == "__main__":
    main()
