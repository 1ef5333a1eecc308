"""PostgreSQL as the results store, the Optuna storage and the MLflow backend.

A real server (``tests/pg_server.py``: initdb + pg_ctl on 127.0.0.1, a throw-away data
dir), real concurrent jobs through the CLI and submitit's local executor. Under CI a
missing PostgreSQL is installed (or the tests fail); elsewhere they skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from pg_server import PgServer, ensure_installed
from sqlalchemy import create_engine, text

from sweeper.store import SCHEMA_VERSION, Store, engine_url

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
