"""PostgreSQL as the results store, the Optuna storage and the MLflow backend.

A real server (``tests/pg_server.py``: initdb + pg_ctl on 127.0.0.1, a throw-away data
dir), real concurrent jobs through the CLI and submitit's local executor. Under CI a
missing PostgreSQL is installed (or the tests fail); elsewhere they skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import cli_env, run_cli
from pg_server import PgServer, ensure_installed
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from sweeper.store import SCHEMA_VERSION, RunStatus, Store, engine_url

pytestmark = pytest.mark.slow  # real jobs, servers or browsers

if ensure_installed() is None and not os.environ.get("CI"):
    pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    # not under pytest's tmp dir: that is private to root, and the server runs as postgres
    base = Path(tempfile.mkdtemp(prefix="gradsweep-pg-"))
    server = PgServer(base).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _rows(url: str, q: str) -> list[tuple]:
    engine = create_engine(engine_url(url))
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(text(q)).all()]
    finally:
        engine.dispose()


def test_four_concurrent_jobs_write_one_postgres_store(pg: PgServer, tmp_path: Path) -> None:
    """Every row present, nothing duplicated; MLflow's backend on PostgreSQL too."""
    store, tracking = pg.create_db("sweep4"), pg.create_db("mlflow4")
    res = run_cli(
        "-m", "method=baseline,pgt", "seed=0,1", "alpha=0.3", "epochs=2",
        "filter_stats_every=10", "hydra.launcher.max_parallel=4",
        f"store.url={store}", f"mlflow.tracking_uri={tracking}", f"results_dir={tmp_path}",
        cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not (tmp_path / "results.db").exists()  # nothing went to the SQLite default
    runs = _rows(store, "SELECT config_hash, status, epoch, train_seconds FROM runs")
    assert len(runs) == 4 and len({r[0] for r in runs}) == 4
    assert all(r[1] == "done" and r[2] == 2 and r[3] > 0 for r in runs), runs
    assert _rows(store, "SELECT COUNT(*), COUNT(DISTINCT (run_id, epoch)) FROM epoch_metrics") == [
        (8, 8)
    ]
    # digits, batch 64: 2 x 22 steps, snapshots at steps 0, 10, 20, 30, 40; 4 weight layers
    assert _rows(store, "SELECT COUNT(*) FROM filter_stats") == [(4 * 5 * 4,)]
    assert _rows(store, "SELECT COUNT(*), COUNT(DISTINCT run_id) FROM sweep_runs") == [(4, 4)]
    assert _rows(store, "SELECT schema_version FROM store_info") == [(SCHEMA_VERSION,)]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=engine_url(tracking))
    exp = client.get_experiment_by_name("gradsweep")
    mirrored = client.search_runs([exp.experiment_id], "tags.config_hash != ''")
    assert sorted(r.data.tags["config_hash"] for r in mirrored) == sorted(r[0] for r in runs)
    assert _rows(store, "SELECT COUNT(*) FROM runs WHERE mlflow_mirrored") == [(4,)]


def test_a_sweep_survives_postgres_stopped_for_ten_seconds_and_restarted(tmp_path: Path) -> None:
    """Four points, two jobs at a time, on a server of its own: stopped for 10 s while both
    jobs train, then ``pg_ctl restart`` while the other two train. Jobs keep training and
    write their rows when the server is back; every run ends done, none failed, no row
    twice, no traceback anywhere. The first two points train 25 epochs (about 0.5 s each:
    they outlive the 10 s stop), the other two 12 (they only need to outlive the restart)."""
    base = Path(tempfile.mkdtemp(prefix="gradsweep-pg-outage-"))
    server = PgServer(base).start()
    try:
        store = server.create_db("outage")
        proc = subprocess.Popen(
            [sys.executable, "-m", "sweeper", "-m", "epochs=25,12", "seed=0,1",
             "batch_size=32", "hydra.launcher.max_parallel=2", "hydra.launcher.fuse=off",
             "mlflow.enabled=false", f"store.url={store}", f"results_dir={tmp_path}"],
            cwd=tmp_path, env=cli_env(GRADSWEEP_HEARTBEAT_S="1"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        # one engine for the polls below (a new connection each, no pool: the server goes
        # down and up); an engine per poll costs the test process ~3x the CPU
        poller = create_engine(engine_url(store), poolclass=NullPool)
        try:

            def epochs() -> list[int]:
                try:
                    with poller.connect() as c:
                        return [r[0] for r in c.execute(text("SELECT epoch FROM runs ORDER BY id"))]
                except Exception:  # not created yet
                    return []

            def until(ok: object, what: str) -> None:
                deadline = time.monotonic() + 300
                while not ok():  # type: ignore[operator]
                    assert proc.poll() is None, (what, proc.communicate())
                    assert time.monotonic() < deadline, (what, epochs())
                    time.sleep(0.25)

            until(lambda: sum(e >= 2 for e in epochs()) >= 2, "two jobs past epoch 2")
            server.pause()
            time.sleep(10)
            server.resume()
            until(lambda: len(epochs()) == 4 and max(epochs()[2:]) >= 2, "the last two started")
            server.restart()
            out, err = proc.communicate(timeout=900)
        finally:
            poller.dispose()
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
        assert "Traceback" not in out + err and not err.strip(), err[-3000:]
        # progress counts the points waiting for a slot: two jobs at a time, so when the
        # first point ends at least one is still queued (another may have ended in the same
        # poll, its line next)
        first = next(ln for ln in out.splitlines() if ln.startswith("[  1/4]"))
        counts = dict(kv.rsplit(" ", 1) for kv in first.split("   ")[-1].split(" · "))
        queued, running = int(counts["queued"]), int(counts["running"])
        assert queued >= 1 and 2 <= queued + running <= 3, first
        runs = _rows(store, "SELECT status, epoch, error FROM runs ORDER BY id")
        assert runs == [("done", 25, None)] * 2 + [("done", 12, None)] * 2, runs
        assert _rows(
            store, "SELECT COUNT(*), COUNT(DISTINCT (run_id, epoch)) FROM epoch_metrics"
        ) == [(74, 74)]
        logs = "".join(f.read_text() for f in (tmp_path / "logs" / "jobs").rglob("*_log.*"))
        assert "Traceback" not in logs, logs[-3000:]
        # the jobs saw the outage and went on (the store's retries, the rows kept meanwhile)
        assert "not answering" in logs, logs[-3000:]
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_optuna_search_keeps_its_study_in_postgres(pg: PgServer, tmp_path: Path) -> None:
    store = pg.create_db("search")
    res = run_cli(
        "-m", "hydra/sweeper=optuna", "method=pgt", "alpha=interval(0.05,1)", "epochs=1",
        "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler=random",
        "mlflow.enabled=false", f"store.url={store}", f"results_dir={tmp_path}",
        cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import optuna

    (summary,) = optuna.get_all_study_summaries(engine_url(store))
    study = optuna.load_study(study_name=summary.study_name, storage=engine_url(store))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    alphas = sorted(t.params["alpha"] for t in study.trials)
    stored = sorted(a for (a,) in _rows(store, "SELECT alpha FROM runs WHERE status = 'done'"))
    assert stored == pytest.approx(alphas, rel=1e-12)
    assert _rows(store, "SELECT COUNT(*) FROM sweep_runs WHERE trial IS NOT NULL") == [(3,)]


def test_an_old_postgres_store_is_upgraded(pg: PgServer) -> None:
    """A store at schema 1 (before searches and cost columns) gains them, data kept."""
    url = pg.create_db("old")
    Store(url).dispose()
    engine = create_engine(engine_url(url))
    with engine.begin() as c:
        c.execute(text("ALTER TABLE sweep_runs DROP COLUMN trial"))
        for col in ("gpus", "train_seconds", "gpu_hours", "images_per_s", "peak_gpu_mem_mb"):
            c.execute(text(f"ALTER TABLE runs DROP COLUMN {col}"))
        c.execute(text("ALTER TABLE epoch_metrics DROP COLUMN peak_mem_mb"))
        c.execute(text("UPDATE store_info SET schema_version = 1"))
        c.execute(text("INSERT INTO sweeps (name, created_at, command, launcher, n_points) "
                       "VALUES ('old', now(), 'x', 'local', 1)"))  # fmt: skip
    engine.dispose()
    Store(url).dispose()
    cols = {r[0] for r in _rows(url, "SELECT column_name FROM information_schema.columns "
                                     "WHERE table_name IN ('runs', 'sweep_runs', 'epoch_metrics')")}  # fmt: skip
    assert {"trial", "gpus", "gpu_hours", "peak_mem_mb", "images_per_s"} <= cols
    assert _rows(url, "SELECT schema_version FROM store_info") == [(SCHEMA_VERSION,)]
    assert _rows(url, "SELECT name FROM sweeps") == [("old",)]
    labels = {r[0] for r in _rows(url, "SELECT unnest(enum_range(NULL::run_status))::text")}
    assert "pruned" in labels


def test_kills_and_leases_on_postgres(pg: PgServer) -> None:
    """The conditional UPDATEs of the lease logic (a CASE on PostgreSQL's native enum)."""
    store = Store(pg.create_db("leases"))
    try:
        cols = dict(model="m", method="pgt", alpha=0.3, data="digits", batch_size=8, epochs=3,
                    lr=0.1, schedule="cosine", label_smoothing=0.0, seed=0)  # fmt: skip
        run = store.claim_run("p" * 64, cols, {})
        t = store.claim(run.id, None)
        assert t is not None
        store.start_run(run.id, t, {}, 0)
        assert store.mark_killed([(run.id, t)], "signal 9") == 1
        assert store.get_run_by_id(run.id).status == "interrupted"  # type: ignore[union-attr]
        t = store.claim(run.id, None)
        assert t is not None
        store.start_run(run.id, t, {"host": "elsewhere"}, 0)
        assert store.expire_leases(lease_s=0) == 1  # the second kill, no epoch in between
        r = store.get_run_by_id(run.id)
        assert r is not None and r.status == "failed" and "killed twice" in (r.error or "")
    finally:
        store.dispose()


def _populate(url: str, artifacts: Path) -> None:
    """The same runs, through the store's own write API, into any store: a grid of baseline
    and PGT at three α and two seeds, plus a failed run; every done run with epoch rows,
    filter snapshots (a PGT run zeroes filters) and its norm artifacts in its own folder."""
    import json

    import numpy as np

    from trainers.records import EpochMetrics, LayerFilterStats

    rng = np.random.default_rng(7)
    store = Store(url)
    try:
        sweep = store.create_sweep("grid", "-m method=baseline,pgt", "local", 14)
        layers = [("conv1", 4), ("layer1.conv", 6), ("fc", 3)]
        specs = [("baseline", None, s, 0.05) for s in (0, 1)]
        specs += [("pgt", a, s, 0.05) for a in (0.1, 0.25, 0.5) for s in (0, 1)]
        # another configuration of the same columns but lr: a row of its own
        specs += [("baseline", None, s, 0.01) for s in (0, 1)]
        for i, (method, alpha, seed, lr) in enumerate([*specs, ("pgt", 0.25, 9, 0.05)]):
            cols = dict(model="resnet20", method=method, alpha=alpha, data="cifar10",
                        batch_size=128, epochs=2, lr=lr, schedule="cosine",
                        label_smoothing=0.0, seed=seed)  # fmt: skip
            run = store.claim_run(f"{i:04d}" + "cd" * 30, cols, {"i": i})
            store.link_run(sweep.id, run.id, f"method={method} alpha={alpha} seed={seed}")
            run_dir = artifacts / run.config_hash[:16]
            t = store.claim(run.id, sweep.id)
            assert t is not None
            store.start_run(run.id, t, {"host": "h", "gpus": 0, "run_dir": str(run_dir)}, 0)
            if seed == 9:
                store.finish_run(run.id, RunStatus.failed, error="Traceback: boom")
                continue
            base = 90.0 + 4 * (alpha or 0.0)
            for e in range(2):
                acc = base - 5 * (1 - e) + float(rng.normal(0, 0.3))
                m = EpochMetrics(e, 10 * (e + 1), 0.5, acc + 5, 0.4, acc, 99.0, 40 + 30 * (alpha or 1),
                                 5.0, 0.05, 2.0, 500.0, 1.0, 0.9)  # fmt: skip
                dead = 2 if (method == "pgt" and e == 1) else 0
                stats = [LayerFilterStats(10 * (e + 1), e, li, name, nf, dead if li == 2 else 0,
                                          0.0 if dead and li == 2 else 0.1, 0.5, 1.0)
                         for li, (name, nf) in enumerate(layers, start=1)]  # fmt: skip
                store.record_epoch(run.id, t, m, stats)
            (run_dir / "filter_norms").mkdir(parents=True, exist_ok=True)
            arrays = {f"L{li:03d}": rng.uniform(0.5, 2, (1, nf)) for li, (_, nf) in
                      enumerate(layers, start=1)}  # fmt: skip
            np.savez_compressed(run_dir / "filter_norms" / "epoch_0001.npz", steps=np.array([20]),
                                names=np.asarray([n for n, _ in layers]), **arrays)  # fmt: skip
            (run_dir / "feature_norms.json").write_text(json.dumps(list(rng.uniform(0, 1, 8))))
            store.finish_run(run.id, RunStatus.done, train_acc=m.train_acc, test_acc=m.test_acc,
                             test_loss=0.0107 * m.logit_norm + 0.26, logit_norm=m.logit_norm)  # fmt: skip
    finally:
        store.dispose()


def test_a_report_over_postgres_equals_the_report_over_sqlite(pg: PgServer, tmp_path: Path) -> None:
    """`python -m analysis --store-url URL` alone: every table, the zeroed filters and the norm
    figures, found where each run wrote its artifacts, whichever store holds the runs."""
    artifacts = tmp_path / "artifacts"  # where the runs' jobs wrote them: no results dir
    urls = {"sqlite": f"sqlite:///{tmp_path / 'elsewhere' / 'results.db'}",
            "postgres": pg.create_db("report")}  # fmt: skip
    (tmp_path / "elsewhere").mkdir()
    reports = {}
    for kind, url in urls.items():
        _populate(url, artifacts)  # the same folders: each run points at its own
        out = tmp_path / f"report_{kind}"
        res = run_cli("--store-url", url, "--out", str(out), cwd=tmp_path, module="analysis")
        assert res.returncode == 0, res.stderr[-3000:]
        reports[kind] = out
    sq, pq = reports["sqlite"], reports["postgres"]
    names = sorted(p.name for p in sq.iterdir())
    assert names == sorted(p.name for p in pq.iterdir())
    assert "zeroed_filters.csv" in names
    for name in names:
        if name.endswith((".csv", ".tex", ".md")):
            assert (sq / name).read_text() == (pq / name).read_text(), name
    md = (sq / "report.md").read_text()
    assert "Zeroed filters per layer x method" in md
    figures = sorted(p.name for p in (sq / "figures").iterdir())
    assert figures == sorted(p.name for p in (pq / "figures").iterdir())
    assert sum(f.startswith("filter_norms_grid_") for f in figures) == 2  # baseline, pgt
    assert "feature_norms.png" in figures and any(f.startswith("alpha_grid_") for f in figures)
    zeroed = (sq / "zeroed_filters.csv").read_text().splitlines()
    assert zeroed[0].startswith("model,method,α,lr,layer,")
    for a in (0.1, 0.25, 0.5):  # one configuration each: its two seeds
        assert f"resnet20,pgt,{a:g},0.05,2,layer1.conv,6,2.00,2,2" in zeroed, zeroed
    assert "| lr |" in md  # two baseline configurations: lr 0.05 and 0.01
