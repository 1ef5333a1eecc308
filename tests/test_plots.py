"""``analysis.plots``: figures from a hand-made store and artifacts, checked against SQL/numpy."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from analysis.plots import (
    Figure,
    alpha_series,
    logit_norm_regression,
    make_figures,
    zeroed_filters_table,
)
from analysis.queries import RunFilter, load_runs, open_store
from sweeper.store import FilterStatRecord, RunRecord, RunStatus, Store
from sweeper.store.models import FilterStat, Run

ALPHAS = (0.1, 0.25, 0.5)
SEEDS = (0, 1)
LAYERS = [("conv1", 4), ("layer1.conv", 6), ("fc", 3)]


def _run(i: int, method: str, alpha: float | None, seed: int, status: RunStatus, **kw) -> Run:
    return Run(
        config_hash=f"{i:04d}" + "ab" * 30,
        model="resnet20",
        method=method,
        alpha=alpha,
        data="cifar10",
        batch_size=128,
        epochs=2,
        lr=0.05,
        schedule="cosine",
        label_smoothing=0.0,
        seed=seed,
        config={"i": i},
        status=status,
        epoch=2,
        **kw,
    )


def _artifacts(run_dir: Path, rng: np.random.Generator, n_dead: int) -> list[dict]:
    """Two epoch files in the trainer's layout; returns the filter_stats rows they imply."""
    fdir = run_dir / "filter_norms"
    fdir.mkdir(parents=True)
    stats = []
    for epoch in range(2):
        steps = np.array([epoch * 10 + 5, epoch * 10 + 10])
        arrays = {}
        for li, (_, nf) in enumerate(LAYERS, start=1):
            a = rng.uniform(0.5, 2.0, size=(len(steps), nf))
            if li == 2 and epoch == 1:
                a[-1, :n_dead] = 0.0
            arrays[f"L{li:03d}"] = a
            for si, st in enumerate(steps):
                v = a[si]
                stats.append(
                    dict(step=int(st), epoch=epoch, layer_index=li, layer_name=LAYERS[li - 1][0],
                         n_filters=nf, n_zero=int((v < 1e-8).sum()), min_norm=float(v.min()),
                         median_norm=float(np.median(v)), max_norm=float(v.max()))
                )  # fmt: skip
        np.savez_compressed(
            fdir / f"epoch_{epoch:04d}.npz",
            steps=steps,
            names=np.asarray([n for n, _ in LAYERS]),
            **arrays,
        )
    feats = list(rng.uniform(0.1, 1.0, size=8))
    feats[:n_dead] = [0.0] * n_dead
    (run_dir / "feature_norms.json").write_text(json.dumps(feats))
    return stats


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(1)
    store = Store(f"sqlite:///{d / 'results.db'}")
    specs: list[tuple[str, float | None, int, RunStatus]] = [
        ("baseline", None, s, RunStatus.done) for s in SEEDS
    ]
    specs += [("pgt", a, s, RunStatus.done) for a in ALPHAS for s in SEEDS]
    specs.append(("pgt", 0.25, 7, RunStatus.failed))  # must not enter any figure
    runs = []
    for i, (method, alpha, seed, status) in enumerate(specs):
        ln = 40.0 + 30.0 * (alpha or 1.0) + rng.normal(0, 1)
        kw = dict(
            train_acc=95.0 + rng.normal(0, 0.5),
            test_acc=90.0 + 4 * (alpha or 0.0) + rng.normal(0, 0.3),
            logit_norm=ln,
            test_loss=0.0107 * ln + 0.26 + rng.normal(0, 0.01),
        )
        if status is RunStatus.failed:
            kw = dict(train_acc=1.0, test_acc=99.9, logit_norm=500.0, test_loss=50.0)
        runs.append(_run(i, method, alpha, seed, status, error=None, **kw))
    with store.session() as s:
        s.add_all(runs)
    stats_rows = []
    for r in runs:
        n_dead = 2 if r.method == "pgt" else 0
        for st in _artifacts(d / "runs" / r.config_hash[:16], rng, n_dead):
            stats_rows.append(FilterStat(run_id=r.id, **st))
    with store.session() as s:
        s.add_all(stats_rows)
    store.dispose()
    return d


@pytest.fixture(scope="module")
def records(results: Path) -> list[RunRecord]:
    store = open_store(f"sqlite:///{results / 'results.db'}")
    try:
        return load_runs(store, RunFilter())
    finally:
        store.dispose()


@pytest.fixture(scope="module")
def last_stats(results: Path, records: list[RunRecord]) -> list[FilterStatRecord]:
    store = open_store(f"sqlite:///{results / 'results.db'}")
    try:
        return store.last_filter_stats([r.id for r in records])
    finally:
        store.dispose()


def _sql(db: Path, q: str, *params: object) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(q, params).fetchall()
    finally:
        con.close()


def test_regression_equals_polyfit() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(20, 80, size=25)
    y = 0.01074 * x + 0.25816 + rng.normal(0, 0.02, size=25)
    reg = logit_norm_regression(list(x), list(y))
    slope, intercept = np.polyfit(x, y, 1)
    assert abs(reg.slope - slope) < 1e-12
    assert abs(reg.intercept - intercept) < 1e-12
    assert abs(reg.r - np.corrcoef(x, y)[0, 1]) < 1e-12
    assert reg.n == 25
    with pytest.raises(ValueError):
        logit_norm_regression([1.0, 1.0], [2.0, 3.0])


def test_alpha_series_matches_sql(results: Path, records: list[RunRecord]) -> None:
    (s,) = alpha_series(records)
    assert s.alphas == list(ALPHAS)
    db = results / "results.db"
    for a, n, m, sd, tm in zip(s.alphas, s.n, s.test_mean, s.test_std, s.train_mean, strict=True):
        rows = _sql(db, "SELECT test_acc, train_acc FROM runs WHERE method='pgt' AND status='done' "
                        "AND abs(alpha - ?) < 1e-12", a)  # fmt: skip
        test = np.array([r[0] for r in rows])
        assert n == len(rows) == len(SEEDS)  # the failed run (alpha 0.25) is left out
        assert m == pytest.approx(test.mean(), abs=1e-12)
        assert sd == pytest.approx(test.std(ddof=1), abs=1e-12)
        assert tm == pytest.approx(np.mean([r[1] for r in rows]), abs=1e-12)
    base = _sql(db, "SELECT avg(test_acc), avg(train_acc), count(*) FROM runs "
                    "WHERE method='baseline' AND status='done'")[0]  # fmt: skip
    assert s.baseline_test == pytest.approx(base[0], abs=1e-12)
    assert s.baseline_train == pytest.approx(base[1], abs=1e-12)
    assert s.baseline_n == base[2]
    assert s.best_alpha == s.alphas[int(np.argmax(s.test_mean))]


def _check_png(f: Figure) -> None:
    assert f.path.is_file() and f.path.suffix == ".png"
    img = mpimg.imread(f.path)
    assert img.shape[0] > 0 and img.shape[1] > 0
    assert f.title and f.caption


@pytest.mark.slow
def test_make_figures(results: Path, records: list[RunRecord], tmp_path: Path) -> None:
    out = tmp_path / "figs"
    figs = make_figures(records, out)
    names = [f.path.name for f in figs]
    for f in figs:
        _check_png(f)
        assert f.path.parent == out
    assert sum(n.startswith("alpha_grid_") for n in names) == 1
    assert sum(n.startswith("fig8_alpha_") for n in names) == 1
    assert sum(n.startswith("fig8_regression_") for n in names) == 1
    # one run per method (baseline, pgt): single-layer profile + all-layer grid each
    assert sum(n.startswith("filter_norms_grid_") for n in names) == 2
    assert sum(n.startswith("filter_norms_run") for n in names) == 2
    assert "feature_norms.png" in names
    # PGT runs zero 2 filters of layer 2 at the end: that layer is the one shown
    assert any(n.startswith("filter_norms_run") and n.endswith("pgt_L002.png") for n in names)
    # Fig. 8 regression over done baseline + pgt runs only (failed run excluded)
    rows = _sql(results / "results.db", "SELECT logit_norm, test_loss FROM runs "
                "WHERE status='done' AND method IN ('baseline','pgt')")  # fmt: skip
    x, y = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    slope, intercept = np.polyfit(x, y, 1)
    (reg,) = [f for f in figs if f.path.name.startswith("fig8_regression_")]
    assert f"(n {len(rows)})" in reg.caption
    assert f"slope {slope:.4g}" in reg.caption and f"intercept {intercept:.4g}" in reg.caption
    (grid,) = [f for f in figs if f.path.name.startswith("alpha_grid_")]
    assert "n per α: 2, 2, 2" in grid.caption


@pytest.mark.slow
def test_figures_drawn_in_worker_processes_equal_serial(
    records: list[RunRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report draws figures in forked workers where it can: same figures, same order,
    same pixels as drawing them one by one in this process."""
    import analysis.plots as plots

    seen: list[int] = []
    # the report forks only where no other thread runs; an earlier test in this process may
    # have left tqdm's monitor thread (MLflow's progress bars): stop it
    for t in threading.enumerate():
        if type(t).__name__ == "TMonitor":
            t.exit()  # type: ignore[attr-defined]  # sets its event and joins it
    real = plots.ProcessPoolExecutor

    def pool(workers: int, **kw):  # noqa: ANN202
        seen.append(workers)
        return real(workers, **kw)

    monkeypatch.setattr(plots, "ProcessPoolExecutor", pool)
    monkeypatch.setattr(plots.os, "cpu_count", lambda: 2)
    forked = make_figures(records, tmp_path / "forked")
    assert seen == [2], (
        threading.enumerate()
    )  # 5 tasks: 1 α grid, 1 Fig. 8 group, 2 runs' norms, the features
    monkeypatch.setattr(plots.os, "cpu_count", lambda: 1)
    serial = make_figures(records, tmp_path / "serial")
    assert seen == [2]
    assert [(f.path.name, f.title, f.caption) for f in forked] == [
        (f.path.name, f.title, f.caption) for f in serial
    ]
    for a, b in zip(forked, serial, strict=True):
        assert np.array_equal(mpimg.imread(a.path), mpimg.imread(b.path)), a.path.name


def test_runs_find_their_artifacts_without_a_results_dir(
    records: list[RunRecord], tmp_path: Path
) -> None:
    """Each run's folder comes from the store (where its job wrote it); runs whose folder is
    gone keep every figure but the norm profiles."""
    assert all(r.run_dir and Path(r.run_dir).is_dir() for r in records)
    moved = [dataclasses.replace(r, run_dir=str(tmp_path / "gone")) for r in records]
    figs = make_figures(moved, tmp_path / "o")
    # records carry logit norm and loss (Fig. 8); only the norm profiles need the artifacts
    assert [f.path.name.split("_")[0] for f in figs] == ["alpha", "fig8", "fig8"]


def test_empty(tmp_path: Path) -> None:
    assert make_figures([], tmp_path / "e") == []
    assert zeroed_filters_table([], []) == []


def test_zeroed_filters_table(
    results: Path, records: list[RunRecord], last_stats: list[FilterStatRecord]
) -> None:
    rows = zeroed_filters_table(records, last_stats)
    want = _sql(
        results / "results.db",
        "SELECT r.method, r.model, f.layer_index, f.layer_name, f.n_filters, f.n_zero, r.id "
        "FROM filter_stats f JOIN runs r ON r.id = f.run_id "
        "WHERE r.status = 'done' AND f.step = (SELECT max(step) FROM filter_stats g "
        "WHERE g.run_id = f.run_id) ORDER BY r.id, f.layer_index",
    )
    got = sorted(
        (d["method"], d["model"], d["layer_index"], d["layer_name"], d["n_filters"],
         d["n_zero"], d["run_id"])
        for d in rows
    )  # fmt: skip
    assert got == sorted(want)
    assert len(rows) == 8 * len(LAYERS)
    assert {d["n_zero"] for d in rows if d["method"] == "pgt" and d["layer_index"] == 2} == {2}
