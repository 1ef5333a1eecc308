"""The results store: what a store written by an older gradsweep keeps, the pinned config
hashes, the read API, kills and leases, and what importing the store costs."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, cli_env, compose, run_cli, sql

from sweeper.config.identity import identity_of
from sweeper.store import (
    KILLED_TWICE,
    SCHEMA_VERSION,
    LostRun,
    RunQuery,
    RunRecord,
    RunStatus,
    Store,
    StoreError,
    default_url,
)
from trainers.records import EpochMetrics, LayerFilterStats

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HASHES = json.loads((FIXTURES / "config_hashes.json").read_text())


@pytest.mark.parametrize("case", list(HASHES), ids=lambda c: c or "(defaults)")
def test_config_hash_is_what_older_versions_computed(case: str) -> None:
    """Every hash pinned by tests/fixtures/make_fixtures.py at the commit before the store
    and trainer were restructured: a store written then finds its runs done now."""
    cfg = compose(*case.split(), "device=cpu")
    assert identity_of(cfg)[1] == HASHES[case]


# each preset spelled with its pieces, from another preset (and the same knobs)
SPELLINGS = {
    "method=baseline": "method=gc method.grad=none",
    "method=gc_pgt": "method=gc method.pgt=true",
    "method=agc_pgt": "method=pgt method.grad=agc",
    "method=ls_pgt": "method=pgt method.label_smoothing=0.1",
    "method=ls method.label_smoothing=0.2": "method.label_smoothing=0.2",
    "method=gc_pgt method.gc_max_norm=0.5 alpha=0.05":
        "method=pgt method.grad=[gc] method.gc_max_norm=0.5 alpha=0.05",
    "method=znorm method.znorm_eps=1e-6": "method.grad=znorm method.znorm_eps=1e-6",
}  # fmt: skip


@pytest.mark.parametrize("case", list(SPELLINGS))
def test_a_preset_spelled_with_its_pieces_is_the_same_run(case: str) -> None:
    cfg = compose(*SPELLINGS[case].split(), "device=cpu")
    assert identity_of(cfg)[1] == HASHES[case]
    assert cfg.method.spec.name == case.split()[0].removeprefix("method=")


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    """A copy of the schema-3 store (3 done digits runs) written by the older version."""
    d = tmp_path / "results"
    shutil.copytree(FIXTURES / "store_v3", d)
    return d


def test_an_older_store_opens_upgraded_with_its_runs_done(old_store: Path) -> None:
    assert sql(old_store / "results.db", "SELECT schema_version FROM store_info") == [(3,)]
    store = Store(default_url(old_store), create=False)
    try:
        assert store.schema_version == SCHEMA_VERSION
        runs = store.runs()
        assert [(r.method, r.status) for r in runs] == [
            ("baseline", "done"), ("pgt", "done"), ("agc_pgt", "done")
        ]  # fmt: skip
        # their artifacts are found where their job wrote them: beside the SQLite store
        for r in runs:
            assert r.run_dir == str(old_store / "runs" / r.config_hash[:16])
            assert (Path(r.run_dir) / "feature_norms.json").is_file()
        assert len(store.epoch_metrics(runs[0].id)) == 1
        assert {f.run_id for f in store.last_filter_stats([r.id for r in runs])} == {1, 2, 3}
    finally:
        store.dispose()


def test_the_same_sweep_over_an_older_store_trains_nothing(old_store: Path) -> None:
    """The promise across versions (docs/store.md), through the real CLI."""
    command = (old_store / "command.txt").read_text().split()
    res = run_cli(*command, f"results_dir={old_store}", cwd=old_store)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "0 to run, 3 already finished" in res.stdout and "nothing to start" in res.stdout
    assert sql(old_store / "results.db", "SELECT count(*), sum(status='done') FROM runs") == [
        (3, 3)
    ]
    assert not (old_store / "logs" / "jobs").exists()  # no job was started


COLUMNS = dict(model="m", method="baseline", alpha=None, data="digits", batch_size=8,
               epochs=3, lr=0.1, schedule="cosine", label_smoothing=0.0, seed=0)  # fmt: skip


def _epoch(e: int) -> EpochMetrics:
    return EpochMetrics(e, 10 * (e + 1), 1.0, 50.0, 1.0, 40.0, 90.0, 2.0, 10.0, 0.1, 1.0,
                        100.0, 1.0, 1.0)  # fmt: skip


def _stats(e: int) -> list[LayerFilterStats]:
    return [LayerFilterStats(10 * (e + 1), e, i, f"l{i}", 4, 0, 0.1, 0.2, 0.3) for i in (1, 2)]


def test_read_api_hands_out_frozen_records(tmp_path: Path) -> None:
    store = Store(default_url(tmp_path))
    try:
        run = store.claim_run("h" * 64, COLUMNS, {"results_dir": str(tmp_path)})
        assert isinstance(run, RunRecord) and run.status == RunStatus.queued
        assert store.claim_run("h" * 64, COLUMNS, {}).id == run.id  # never a second row
        token = store.claim(run.id, None)
        assert token == 1
        store.start_run(run.id, token, {"host": "x", "run_dir": str(tmp_path / "r")}, 0)
        for e in range(2):
            store.record_epoch(run.id, token, _epoch(e), _stats(e))
        got = store.get_run_by_id(run.id)
        assert got is not None and got.epoch == 2 and got.run_dir == str(tmp_path / "r")
        assert got.train_seconds == pytest.approx(2.0)
        with pytest.raises(dataclasses.FrozenInstanceError):
            got.status = RunStatus.done  # type: ignore[misc]
        assert [m.epoch for m in store.epoch_metrics(run.id)] == [0, 1]
        assert {(f.step, f.layer_index) for f in store.last_filter_stats([run.id])} == {
            (20, 1), (20, 2)
        }  # fmt: skip
        assert store.runs(RunQuery(methods=["pgt"])) == []
        assert [r.id for r in store.runs(RunQuery(methods=["baseline"]))] == [run.id]
        assert f"{got.status}" == "running"  # records print their status as the word
    finally:
        store.dispose()


def test_a_job_killed_twice_without_progress_ends_failed(tmp_path: Path) -> None:
    store = Store(default_url(tmp_path))
    try:
        run = store.claim_run("k" * 64, COLUMNS, {})
        t = store.claim(run.id, None)
        store.start_run(run.id, t, {}, 0)
        store.record_epoch(run.id, t, _epoch(0), [])
        assert store.mark_killed([(run.id, t)], "signal 9") == 1  # first kill, after epoch 1
        r = store.get_run_by_id(run.id)
        assert r is not None and r.status == RunStatus.interrupted and "signal 9" in (r.error or "")
        t = store.claim(run.id, None)  # resumed ...
        store.start_run(run.id, t, {}, 1)
        store.record_epoch(run.id, t, _epoch(1), [])  # ... and made progress
        store.mark_killed([(run.id, t)], "signal 9")
        assert store.get_run_by_id(run.id).status == RunStatus.interrupted  # type: ignore[union-attr]
        t = store.claim(run.id, None)
        store.start_run(run.id, t, {}, 2)  # resumed, killed again before finishing an epoch
        store.mark_killed([(run.id, t)], "signal 9")
        r = store.get_run_by_id(run.id)
        assert r is not None and r.status == RunStatus.failed and KILLED_TWICE in (r.error or "")
        assert store.mark_killed([(run.id, r.owner)], "again") == 0  # only running runs
        assert store.claim(run.id, None) is None  # failed: not claimed again unless retried
        t = store.claim(run.id, None, retry=True)  # a retry starts with a clean slate
        assert t is not None and store.get_run_by_id(run.id).killed_at_epoch is None  # type: ignore[union-attr]
        # a deliberate stop is never counted as a kill
        store.start_run(run.id, t, {}, 2)
        store.mark_cancelled([(run.id, t)], "its sweep was interrupted")
        t = store.claim(run.id, None)
        store.start_run(run.id, t, {}, 2)
        store.mark_cancelled([(run.id, t)], "its sweep was interrupted")
        assert store.get_run_by_id(run.id).status == RunStatus.interrupted  # type: ignore[union-attr]
    finally:
        store.dispose()


def test_a_lapsed_lease_is_a_kill_and_fences_the_old_job(tmp_path: Path) -> None:
    store = Store(default_url(tmp_path))
    try:
        run = store.claim_run("l" * 64, COLUMNS, {})
        t = store.claim(run.id, None)
        store.start_run(run.id, t, {"host": "elsewhere"}, 0)
        assert store.job_alive(store.get_run_by_id(run.id))  # type: ignore[arg-type]
        assert store.expire_leases(lease_s=60) == 0
        assert store.expire_leases(lease_s=0) == 1
        r = store.get_run_by_id(run.id)
        assert r is not None and r.status == RunStatus.interrupted and r.killed_at_epoch == 0
        assert "no heartbeat" in (r.error or "") and r.owner == t + 1
        # only stalled, not dead: its job wakes up and finds the run is no longer its own
        assert store.heartbeat(run.id, t) is False
        with pytest.raises(LostRun):
            store.record_epoch(run.id, t, _epoch(0), [])
        with pytest.raises(LostRun):
            store.finish_run(run.id, RunStatus.done, owner=t)
        assert store.get_run_by_id(run.id).status == RunStatus.interrupted  # type: ignore[union-attr]
        assert store.epoch_metrics(run.id) == []
        # a Slurm job squeue still lists (suspended) is not declared dead
        t2 = store.claim(run.id, None)
        store.start_run(run.id, t2, {"host": "elsewhere"}, 0)
        assert store.expire_leases(lease_s=0, alive=lambda r: True) == 0
    finally:
        store.dispose()


def test_a_claim_is_one_compare_and_set(tmp_path: Path) -> None:
    """Two sweeps asking for one run: one gets it, the other's claim is refused while the
    first sweep lives, and a done run is nobody's."""
    store = Store(default_url(tmp_path))
    try:
        a = store.create_sweep("a", "x", "local", 1)
        b = store.create_sweep("b", "x", "local", 1)
        run = store.claim_run("c" * 64, COLUMNS, {})
        ta = store.claim(run.id, a.id)
        assert ta is not None and store.claim(run.id, b.id) is None
        store.set_sweep_fields(a.id, ended_at=store.get_run_by_id(run.id).created_at)  # type: ignore[union-attr]
        tb = store.claim(run.id, b.id)  # a ended without starting it: b may take it
        assert tb == ta + 1
        with pytest.raises(LostRun):  # a's job, late, cannot start it any more
            store.start_run(run.id, ta, {}, 0)
        store.start_run(run.id, tb, {}, 0)
        store.finish_run(run.id, RunStatus.done, owner=tb)
        assert store.claim(run.id, a.id) is None and store.claim(run.id, b.id) is None
    finally:
        store.dispose()


def test_readers_never_create_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no results store at"):
        Store(default_url(tmp_path / "nowhere"), create=False)
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(StoreError, match="not a gradsweep results store"):
        Store(f"sqlite:///{tmp_path / 'empty.db'}", create=False)
    with pytest.raises(StoreError, match="cannot be opened"):
        Store("postgresql://nobody:secret@127.0.0.1:1/none")
    try:
        Store("postgresql://nobody:secret@127.0.0.1:1/none")
    except StoreError as e:
        assert "secret" not in str(e)  # a password is never printed


LIGHT = """
import sys
import {modules}
heavy = sorted(m for m in ("torch", "torchvision", "submitit", "mlflow", "optuna", "sklearn")
               if m in sys.modules)
print(",".join(heavy))
"""


@pytest.mark.parametrize(
    "modules",
    [
        "sweeper.store",  # the store: tables, migrations, leases, writes, reads
        "sweeper.status",  # python -m sweeper status
        "sweeper.cli",  # python -m sweeper --help / --cfg job
        "analysis.__main__",  # python -m analysis --help
        "hydra_plugins.gradsweep_plugins, hydra_plugins.gradsweep_plugins.launcher, "
        "hydra_plugins.gradsweep_plugins.sweeper, hydra_plugins.gradsweep_plugins.optuna_sweeper",
        # what MLflow shows of a run and of a sweep: computed without MLflow or torch
        "sweeper.tracking.describe, analysis.sweep, trainers.catalog, sweeper.config.compose",
    ],
    ids=["store", "status", "cli", "analysis", "plugins", "describe"],
)
def test_light_modules_import_no_heavy_library(modules: str) -> None:
    """Start-up is part of the interface: these answer at once, and Hydra's plugin discovery
    (which imports our plugins for every Hydra app in the environment) stays light."""
    res = subprocess.run([sys.executable, "-c", LIGHT.format(modules=modules)], cwd=REPO,
                         env=cli_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"{modules} imported {res.stdout.strip()}"


def test_a_bare_hydra_app_discovers_our_plugins_without_heavy_imports(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(
        "import sys\nimport hydra\nfrom hydra.core.plugins import Plugins\n"
        "from hydra.plugins.launcher import Launcher\n"
        "names = [p.__name__ for p in Plugins.instance().discover(Launcher)]\n"
        "assert 'GradsweepLauncher' in names, names\n" + LIGHT.format(modules="sys")
    )
    res = subprocess.run([sys.executable, str(app)], cwd=tmp_path, env=cli_env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "sweeper", "--help"],
        ["-m", "sweeper", "--cfg", "job"],
        ["-m", "analysis", "--help"],
    ],  # fmt: skip
    ids=["sweeper --help", "sweeper --cfg job", "analysis --help"],
)
def test_the_cli_answers_without_heavy_imports(args: list[str], tmp_path: Path) -> None:
    """What `python -X importtime` says these commands import: no torch, submitit, MLflow or
    Optuna (their times are in benchmarks/startup.py)."""
    res = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=tmp_path,
                         env=cli_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[1].strip() for ln in res.stderr.splitlines() if "|" in ln}
    assert imported, res.stderr[-500:]
    heavy = sorted(imported & {"torch", "torchvision", "submitit", "mlflow", "optuna", "sklearn"})
    assert heavy == [], heavy
