"""``python -m analysis``: tables rebuilt from a hand-made store, checked against SQL."""

from __future__ import annotations

import contextlib
import csv
import io
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, cli_env
from scipy import stats as sps

from analysis.__main__ import main
from analysis.stats import t_quantile
from sweeper.store import RunStatus, Store
from sweeper.store.models import Run, SweepRun

TOL = 1e-9

# (model, method, alpha, batch_size, schedule, label_smoothing, seeds)
GRID = [
    ("resnet18", "baseline", None, 128, "cosine", 0.0, [0, 1, 2]),
    ("resnet18", "pgt", 0.3, 128, "cosine", 0.0, [0, 1, 2]),  # paired vs baseline
    ("resnet18", "pgt", 0.5, 128, "cosine", 0.0, [0, 1]),
    ("resnet18", "ls", None, 128, "cosine", 0.1, [0, 1]),
    ("resnet18", "ls_pgt", 0.3, 128, "cosine", 0.1, [0]),
    ("resnet18", "baseline", None, 256, "cosine", 0.0, [0, 1, 2]),
    ("resnet18", "pgt", 0.3, 256, "cosine", 0.0, [0, 1, 2]),
    ("resnet18", "gc", None, 256, "cosine", 0.0, [3, 4]),  # other seeds: Welch
    ("resnet18", "agc", None, 256, "cosine", 0.0, [0]),  # n = 1: no CI
    ("resnet18", "baseline", None, 128, "step", 0.0, [0]),
    ("resnet18", "pgt", 0.3, 128, "step", 0.0, [0]),
    ("resnet50", "baseline", None, 128, "cosine", 0.0, [0, 1]),  # no PGT: missing cell
]
# (model, method, alpha, batch_size, seed, status, error)
BAD = [
    ("resnet18", "pgt", 0.3, 128, 3, RunStatus.failed, "RuntimeError: boom\nTraceback ..."),
    ("resnet18", "baseline", None, 128, 4, RunStatus.diverged, "loss is nan at step 7"),
    ("resnet18", "gc", None, 256, 5, RunStatus.queued, None),
]


def _run(i: int, model, method, alpha, bs, schedule, ls, seed, status, **kw) -> Run:
    return Run(
        config_hash=f"hash{i:04d}",
        model=model,
        method=method,
        alpha=alpha,
        data="cifar10",
        batch_size=bs,
        epochs=10,
        lr=0.1 * bs / 128,
        schedule=schedule,
        label_smoothing=ls,
        seed=seed,
        config={"i": i, "model": model, "method": method},
        status=status,
        epoch=10,
        **kw,
    )


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    store = Store(f"sqlite:///{d / 'results.db'}")
    runs: list[Run] = []
    for model, method, alpha, bs, schedule, ls, seeds in GRID:
        bump = {"pgt": 0.8 if alpha == 0.3 else -0.5, "gc": 0.3, "agc": -0.2}.get(method, 0.0)
        for seed in seeds:
            test = 70.0 + bump + rng.normal(0, 0.4)
            train = test + 3.0 + rng.normal(0, 0.3)
            # cost: batch 256 ran on 2 GPUs, the rest on CPU (a cell mixes both at seed 2)
            gpus = 2 if bs == 256 or seed == 2 else 0
            secs = float(rng.uniform(100, 5000))
            cost = {
                "gpus": gpus,
                "train_seconds": secs,
                "gpu_hours": secs * gpus / 3600,
                "images_per_s": float(rng.uniform(500, 9000)),
                "peak_gpu_mem_mb": float(rng.uniform(1e3, 4e4)) if gpus else None,
            }
            runs.append(_run(len(runs), model, method, alpha, bs, schedule, ls, seed,
                             RunStatus.done, train_acc=train, test_acc=test, **cost))  # fmt: skip
    for model, method, alpha, bs, seed, status, error in BAD:
        runs.append(_run(len(runs), model, method, alpha, bs, "cosine", 0.0, seed, status,
                         train_acc=1.0, test_acc=1.0, error=error))  # fmt: skip
    with store.session() as s:
        s.add_all(runs)
    sweep = store.create_sweep("t", "method=baseline,pgt", "basic", 2)
    for r in runs[:2]:
        store.link_run(sweep.id, r.id, "p")
    store.dispose()
    return d


@pytest.fixture(scope="module")
def report(store_dir: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``python -m analysis --results-dir STORE --out OUT`` through its entry in this process
    (:func:`analysis.__main__.main`, which the process's ``sys.exit`` calls, with its error
    boundary): its exit status, stdout and stderr. The report's content is tested here; the
    real process is in test_error_store_missing_cli and tests/test_docs.py."""
    out = store_dir / "rep"
    argv = ["--results-dir", str(store_dir), "--out", str(out)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    proc = subprocess.CompletedProcess(
        [sys.executable, "-m", "analysis", *argv], code, stdout.getvalue(), stderr.getvalue()
    )
    return proc, out


def _sql(db: Path, q: str, *params: object) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(q, params).fetchall()
    finally:
        con.close()


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(s: str) -> float | None:
    return None if s == "" else float(s)


def _where(row: dict[str, str], cols: list[str]) -> tuple[str, list[object]]:
    """SQL conditions matching a CSV row's key columns (``IS`` also matches NULL alpha)."""
    conds, params = ["status = 'done'", "data = ?", "model = ?", "epochs = ?"], [
        row["data"], row["model"], int(row["epochs"])]  # fmt: skip
    for c in cols:
        v = row[c]
        if c in ("alpha", "label_smoothing"):
            conds.append(f"{c} IS ?")
            params.append(None if v == "" else float(v))
        elif c == "batch_size":
            conds.append("batch_size = ?")
            params.append(int(v))
        else:
            conds.append(f"{c} = ?")
            params.append(v)
    return " AND ".join(conds), params


def _expr(metric: str) -> str:
    return "train_acc - test_acc" if metric == "gap" else metric


def _check_cells(db: Path, rows: list[dict[str, str]], cols: list[str], extra: str) -> int:
    """Every mean / std / n in the CSV equals an independent SQL aggregate (+ numpy std)."""
    checked = 0
    for row in rows:
        where, params = _where(row, cols)
        e = _expr(row["metric"])
        avg, n = _sql(db, f"SELECT AVG({e}), COUNT({e}) FROM runs WHERE {where}{extra}", *params)[0]
        vals = [v for (v,) in _sql(db, f"SELECT {e} FROM runs WHERE {where}{extra}", *params)]
        assert int(row["n"]) == n, row
        if n == 0:
            assert row["mean"] == "" and row["std"] == ""
            continue
        assert abs(float(row["mean"]) - avg) < TOL, row
        if n == 1:
            assert row["std"] == ""
        else:
            assert abs(float(row["std"]) - float(np.std(vals, ddof=1))) < TOL, row
        checked += 1
    return checked


def _seed_values(db: Path, row: dict[str, str], cols: list[str]) -> dict[int, float]:
    where, params = _where(row, cols)
    e = _expr(row["metric"])
    q = f"SELECT seed, {e} FROM runs WHERE {where} AND label_smoothing = 0"
    return dict(_sql(db, q, *params))


def _check_diffs(db: Path, rows: list[dict[str, str]], cols: list[str]) -> set[str]:
    """Each diff / CI equals scipy's paired or Welch t-interval on the SQL values."""
    kinds = set()
    for row in rows:
        if row["method"] == "baseline" or row["n"] == "0":
            continue
        base_row = {**row, "method": "baseline", "alpha": ""}
        t = _seed_values(db, row, cols)
        b = _seed_values(db, base_row, cols)
        if not b:
            assert row["diff"] == ""
            continue
        kinds.add(row["ci_method"])
        if set(t) == set(b) and len(t) >= 2:
            seeds = sorted(t)
            res = sps.ttest_rel([t[s] for s in seeds], [b[s] for s in seeds])
            lo, hi = res.confidence_interval(0.95)
            diff = np.mean([t[s] - b[s] for s in seeds])
            assert row["ci_method"] == "paired"
        elif len(t) >= 2 and len(b) >= 2:
            res = sps.ttest_ind(list(t.values()), list(b.values()), equal_var=False)
            lo, hi = res.confidence_interval(0.95)
            diff = np.mean(list(t.values())) - np.mean(list(b.values()))
            assert row["ci_method"] == "welch"
        else:
            diff = np.mean(list(t.values())) - np.mean(list(b.values()))
            assert row["ci_method"] == "none" and row["ci_low"] == row["ci_high"] == ""
            assert abs(float(row["diff"]) - diff) < TOL
            continue
        assert abs(float(row["diff"]) - diff) < TOL, row
        assert abs(float(row["ci_low"]) - lo) < TOL, row
        assert abs(float(row["ci_high"]) - hi) < TOL, row
    return kinds


@pytest.mark.slow
def test_report_files_and_markdown(report: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = report
    assert proc.returncode == 0, proc.stderr
    assert "# gradsweep report" in proc.stdout and "Table 1" in proc.stdout
    for name in ("table1_baseline_vs_pgt", "table2_batch_size", "table3_ablation", "excluded_runs"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.tex").is_file()
        assert "\\toprule" in (out / f"{name}.tex").read_text()
        assert "\\bottomrule" in (out / f"{name}.tex").read_text()
    md = (out / "report.md").read_text()
    assert md in proc.stdout
    # resnet50 has a baseline but no PGT run: the PGT cell is missing, rendered "—"
    line = next(x for x in md.splitlines() if "| resnet50 |" in x and "| pgt |" in x)
    assert line.count("| — |") >= 3


def test_table1_cells_and_best_alpha(store_dir: Path, report) -> None:
    db, out = store_dir / "results.db", report[1]
    rows = _csv(out / "table1_baseline_vs_pgt.csv")
    cols = ["batch_size", "schedule", "method", "alpha"]
    assert len(rows) == 16  # 4 settings x (baseline, pgt) x 2 metrics
    assert _check_cells(db, rows, cols, " AND label_smoothing = 0") == 14  # resnet50: no pgt
    kinds = _check_diffs(db, rows, cols)
    assert "paired" in kinds
    # the best alpha by mean test accuracy (SQL) is the one shown
    best = _sql(db, "SELECT alpha FROM runs WHERE status='done' AND method='pgt' AND "
                "batch_size=128 AND schedule='cosine' AND model='resnet18' "
                "GROUP BY alpha ORDER BY AVG(test_acc) DESC LIMIT 1")[0][0]  # fmt: skip
    shown = {r["alpha"] for r in rows if r["method"] == "pgt" and r["batch_size"] == "128"
             and r["schedule"] == "cosine" and r["model"] == "resnet18"}  # fmt: skip
    assert shown == {repr(best)}


def test_table2_cells_and_cis(store_dir: Path, report) -> None:
    db, out = store_dir / "results.db", report[1]
    rows = _csv(out / "table2_batch_size.csv")
    cols = ["schedule", "batch_size", "method", "alpha"]
    _check_cells(db, rows, cols, " AND label_smoothing = 0")
    assert _check_diffs(db, rows, cols) == {"paired", "welch", "none"}
    # every (batch, method) group of done runs appears
    groups = _sql(db, "SELECT DISTINCT model, schedule, batch_size, method FROM runs "
                  "WHERE status='done' AND label_smoothing = 0")  # fmt: skip
    shown = {(r["model"], r["schedule"], int(r["batch_size"]), r["method"]) for r in rows}
    assert set(groups) <= shown


def test_cost_columns_are_sums_over_the_cells_runs(store_dir: Path, report) -> None:
    """gpu_hours / cpu_hours / img/s / peak memory per cell against SQL aggregates."""
    db, out = store_dir / "results.db", report[1]
    rows = _csv(out / "table2_batch_size.csv")
    cols = ["schedule", "batch_size", "method", "alpha"]
    seen_gpu = seen_cpu = 0
    for row in rows:
        where, params = _where(row, cols)
        where += " AND label_smoothing = 0"
        gpu_h, cpu_s, ips, mem, n_gpu, n_cpu = _sql(
            db, "SELECT SUM(CASE WHEN gpus > 0 THEN gpu_hours END), "
            "SUM(CASE WHEN gpus = 0 THEN train_seconds END), AVG(images_per_s), "
            "MAX(peak_gpu_mem_mb), SUM(gpus > 0), SUM(gpus = 0) FROM runs WHERE " + where,
            *params)[0]  # fmt: skip
        for field, want in (("gpu_hours", gpu_h), ("cpu_hours", cpu_s and cpu_s / 3600),
                            ("images_per_s", ips), ("peak_gpu_mem_mb", mem)):  # fmt: skip
            got = _num(row[field])
            assert (got is None) == (want is None), (field, row)
            if want is not None:
                assert got == pytest.approx(want, rel=1e-9), (field, row)
        seen_gpu += bool(n_gpu)
        seen_cpu += bool(n_cpu)
    assert seen_gpu and seen_cpu
    md = (out / "report.md").read_text()
    total_gpu = _sql(db, "SELECT SUM(gpu_hours) FROM runs WHERE gpus > 0")[0][0]
    total_cpu = _sql(db, "SELECT SUM(train_seconds) / 3600 FROM runs WHERE gpus = 0")[0][0]
    n = _sql(db, "SELECT COUNT(*) FROM runs WHERE train_seconds IS NOT NULL")[0][0]
    assert (
        f"Cost of the {n} run(s) in this report: {total_gpu:.3g} GPU-h + {total_cpu:.3g} CPU-h"
        in md
    )
    line = next(x for x in md.splitlines() if "| resnet18 |" in x and "| 256 |" in x)
    assert "GPU-h" in line and "CPU-h" not in line


def test_table3_cells(store_dir: Path, report) -> None:
    db, out = store_dir / "results.db", report[1]
    rows = _csv(out / "table3_ablation.csv")
    cols = ["batch_size", "schedule", "label_smoothing", "alpha"]
    extra = " AND method IN ('baseline', 'pgt', 'ls', 'ls_pgt')"
    n_groups = _sql(db, "SELECT COUNT(*) FROM (SELECT DISTINCT model, batch_size, schedule, "
                    "label_smoothing, alpha FROM runs WHERE status='done'" + extra + ")")[0][0]  # fmt: skip
    assert _check_cells(db, rows, cols, extra) == 3 * n_groups == len(rows)


def test_failed_and_diverged_are_excluded(store_dir: Path, report) -> None:
    db, out = store_dir / "results.db", report[1]
    ex = _csv(out / "excluded_runs.csv")
    want = _sql(db, "SELECT id, status FROM runs WHERE status IN ('failed', 'diverged') "
                "ORDER BY id")  # fmt: skip
    assert [(int(r["id"]), r["status"]) for r in ex] == want
    assert ex[0]["error"] == "RuntimeError: boom"
    # the failed / diverged runs (accuracy 1.0) are not in any mean: all means are ~70
    for name in ("table1_baseline_vs_pgt", "table2_batch_size", "table3_ablation"):
        for r in _csv(out / f"{name}.csv"):
            if r["mean"] and r["metric"] != "gap":
                assert float(r["mean"]) > 60
    assert "Excluded runs (2 failed, diverged or pruned)" in report[0].stdout
    assert "1 run(s) queued, running or interrupted" in report[0].stdout


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_error_store_missing_cli(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", "--results-dir", str(tmp_path / "nope")],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no results store at")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nope").exists()  # analysis never creates a store


def test_error_cases(store_dir: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    Store(f"sqlite:///{empty / 'results.db'}").dispose()
    assert "no runs" in _error(capsys, "--results-dir", str(empty))
    line = _error(capsys, "--results-dir", str(store_dir), "--sweep", "99", "--out",
                  str(tmp_path / "o"))  # fmt: skip
    assert "99" in line and "known: 1" in line
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "not writable" in _error(
        capsys, "--results-dir", str(store_dir), "--out", str(blocker / "sub")
    )
    assert "no results store at" in _error(
        capsys, "--store-url", f"sqlite:///{tmp_path / 'missing.db'}"
    )


def test_filters_and_formats(store_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    url = f"sqlite:///{store_dir / 'results.db'}"
    assert main(["--store-url", url, "--sweep", "1", "--method", "baseline,pgt",
                 "--model", "resnet18", "--formats", "csv", "--out", str(out)]) == 0  # fmt: skip
    assert "# gradsweep report" in capsys.readouterr().out
    assert not (out / "report.md").exists() and not (out / "table1_baseline_vs_pgt.tex").exists()
    rows = _csv(out / "table1_baseline_vs_pgt.csv")
    # sweep 1 links the first two runs: baseline seed 0 and seed 1 of resnet18/128/cosine
    n = {(r["method"], r["metric"]): r["n"] for r in rows}
    assert n[("baseline", "test_acc")] == "2" and n[("pgt", "test_acc")] == "0"
    links = _sql(store_dir / "results.db", "SELECT COUNT(*) FROM sweep_runs")[0][0]
    assert links == 2 and SweepRun.__tablename__ == "sweep_runs"


@pytest.mark.parametrize("df", [1, 1.4, 2, 3.5, 7.3, 12, 29.9, 30, 31, 45.2, 200, 10_000])
def test_t_quantile(df: float) -> None:
    assert t_quantile(df) == pytest.approx(sps.t.ppf(0.975, df), abs=1e-12)


def test_alpha_option(store_dir: Path, tmp_path: Path, capsys) -> None:
    url = f"sqlite:///{store_dir / 'results.db'}"
    for alpha, want in (("0.5", {"0.5"}), ("all", {"0.3", "0.5"})):
        out = tmp_path / alpha
        assert main(["--store-url", url, "--alpha", alpha, "--formats", "csv",
                     "--out", str(out)]) == 0  # fmt: skip
        rows = [r for r in _csv(out / "table1_baseline_vs_pgt.csv") if r["method"] == "pgt"]
        cos128 = {r["alpha"] for r in rows if r["model"] == "resnet18"
                  and r["batch_size"] == "128" and r["schedule"] == "cosine"}  # fmt: skip
        assert cos128 == want
        if alpha == "0.5":  # batch 256 has no alpha 0.5 run: a missing cell
            assert {r["n"] for r in rows if r["batch_size"] == "256"} == {"0"}
    capsys.readouterr()
    assert "--alpha" in _error(capsys, "--store-url", url, "--alpha", "big")
