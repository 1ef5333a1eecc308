"""Benchmark: the full ``python -m analysis`` report from a store of 10,000 runs x 100 epochs.

Generates a SQLite results store (schema created by ``sweeper.store.Store``; runs inserted
with SQLAlchemy core, the 1 M ``epoch_metrics`` rows with ``sqlite3.executemany``) for a
realistic grid: models x schedules x batch sizes x methods (PGT variants at 5 alphas) x
seeds, mostly ``done`` with a few failed / diverged / running runs and some runs whose
final metrics are only in ``epoch_metrics``. Then times, in-process, only the report build
(queries, Tables 1-3, paper columns, Markdown / CSV / LaTeX / HTML and the figures; the
results dir has no run artifacts). Goal (issue 4): <= 10 s. Usage:

    .venv/bin/python benchmarks/analysis_report.py [--runs 10000] [--epochs 100] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import itertools
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import insert

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from analysis.queries import RunFilter  # noqa: E402
from analysis.report import FORMATS, ReportRequest, make_report  # noqa: E402
from sweeper.store import RunStatus, Store  # noqa: E402
from sweeper.store.models import Run  # noqa: E402

GOAL_S = 10.0
MODELS = ["resnet18", "resnet50", "resnet101", "seresnet18", "seresnet50"]
SCHEDULES = ["cosine", "step"]
BATCHES = [128, 256, 512, 1024]
ALPHAS = [0.05, 0.1, 0.25, 0.3, 0.5]
# (method, alphas, label smoothing, accuracy bump)
ARMS = [("baseline", [None], 0.0, 0.0), ("gc", [None], 0.0, 0.2), ("agc", [None], 0.0, 0.1),
        ("ls", [None], 0.1, 0.15), ("znorm", [None], 0.0, -0.1), ("pgt", ALPHAS, 0.0, 0.4),
        ("ls_pgt", ALPHAS, 0.1, 0.45), ("gc_pgt", ALPHAS, 0.0, 0.3),
        ("agc_pgt", ALPHAS, 0.0, 0.35)]  # fmt: skip


def grid(n_runs: int) -> list[tuple]:
    """(model, schedule, batch, method, alpha, ls, bump, seed) for ``n_runs`` runs."""
    cells = [
        (m, sch, bs, meth, a, ls, bump)
        for m, sch, bs in itertools.product(MODELS, SCHEDULES, BATCHES)
        for meth, alphas, ls, bump in ARMS
        for a in alphas
    ]
    seeds = -(-n_runs // len(cells))
    return [(*c, s) for s in range(seeds) for c in cells][:n_runs]


def generate(db: Path, n_runs: int, n_epochs: int, seed: int = 0) -> None:
    """Write the store: ``n_runs`` runs, each with ``n_epochs`` epoch rows."""
    rng = np.random.default_rng(seed)
    url = f"sqlite:///{db}"
    store = Store(url)
    now = dt.datetime(2026, 1, 1)
    points = grid(n_runs)
    u = rng.random(len(points))
    status = np.where(u < 0.02, "failed", np.where(u < 0.03, "diverged",
                      np.where(u < 0.035, "running", "done")))  # fmt: skip
    base = {"resnet18": 70.0, "resnet50": 76.5, "resnet101": 77.8, "seresnet18": 71.0,
            "seresnet50": 77.2}  # fmt: skip
    finals = []
    runs = []
    for i, (model, sch, bs, meth, a, ls, bump, s) in enumerate(points):
        st = RunStatus(status[i])
        test = base[model] + bump - 0.4 * abs((a or 0.25) - 0.25) + rng.normal(0, 0.15)
        train = test + 2.5 + rng.normal(0, 0.2)
        finals.append((train, test))
        # 1% of done runs lack final metrics in `runs`: read from the last epoch row
        keep = st is RunStatus.done and rng.random() > 0.01
        runs.append({
            "id": i + 1, "config_hash": f"{i:064x}", "model": model, "method": meth,
            "alpha": a, "data": "imagenet", "batch_size": bs, "epochs": n_epochs,
            "lr": 0.1 * bs / 256, "schedule": sch, "label_smoothing": ls, "seed": s,
            "config": {"model": model, "method": meth, "alpha": a, "batch_size": bs,
                       "schedule": sch, "label_smoothing": ls, "seed": s},
            "status": st, "epoch": n_epochs, "created_at": now,
            "error": "RuntimeError: CUDA out of memory" if st is RunStatus.failed
            else ("loss is nan at step 1234" if st is RunStatus.diverged else None),
            "train_acc": train if keep else None, "test_acc": test if keep else None,
            "test_loss": 1.9 - test / 100 + rng.normal(0, 0.01) if keep else None,
            "logit_norm": 20 + 12 * (a or 0.0) + rng.normal(0, 0.3) if keep else None,
            "mlflow_mirrored": False,
        })  # fmt: skip
    with store.engine.begin() as conn:
        conn.execute(insert(Run.__table__), runs)
    store.dispose()

    ep = np.arange(1, n_epochs + 1, dtype=float)
    frac = ep / n_epochs
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA synchronous=OFF")
        con.execute("PRAGMA journal_mode=MEMORY")
        sql = ("INSERT INTO epoch_metrics (run_id, epoch, step, train_loss, train_acc, test_loss,"
               " test_acc, test_top5, logit_norm, gap, lr, epoch_time, images_per_s,"
               " grad_norm_before, grad_norm_after) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")  # fmt: skip
        chunk = 500
        for lo in range(0, n_runs, chunk):
            hi = min(lo + chunk, n_runs)
            k = hi - lo
            fin = np.array(finals[lo:hi])
            shape = 1 - np.exp(-5 * frac)  # (E,)
            train = fin[:, :1] * shape + rng.normal(0, 0.2, (k, n_epochs))
            test = fin[:, 1:] * shape + rng.normal(0, 0.2, (k, n_epochs))
            train[:, -1], test[:, -1] = fin[:, 0], fin[:, 1]
            cols = [
                np.repeat(np.arange(lo + 1, hi + 1), n_epochs),
                np.tile(ep.astype(int), k),
                np.tile((ep * 1000).astype(int), k),
                np.tile(4 * np.exp(-3 * frac), k),
                train.ravel(),
                np.tile(4.2 * np.exp(-2.5 * frac), k),
                test.ravel(),
                (test + 20).ravel(),
                np.tile(20 + 5 * frac, k),
                (train - test).ravel(),
                np.tile(0.1 * np.cos(np.pi * frac / 2), k),
                rng.normal(300, 5, k * n_epochs),
                rng.normal(4000, 50, k * n_epochs),
                rng.normal(2, 0.1, k * n_epochs),
                rng.normal(1.5, 0.1, k * n_epochs),
            ]
            rows = zip(*(c.tolist() for c in cols), strict=True)
            con.executemany(sql, rows)
        con.commit()
    finally:
        con.close()


def build_report(results_dir: Path) -> list[Path]:
    """``python -m analysis --results-dir DIR`` (all formats), in-process, stdout captured."""
    req = ReportRequest(
        store_url=f"sqlite:///{results_dir / 'results.db'}",
        out=results_dir / "report",
        formats=list(FORMATS),
        flt=RunFilter(),
        alpha="best",
    )
    with contextlib.redirect_stdout(io.StringIO()):
        return make_report(req)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--keep", type=Path, help="generate into this dir and keep it")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-analysis-") as tmp:
        d = args.keep or Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        db = d / "results.db"
        if db.exists():
            db.unlink()
        t0 = time.perf_counter()
        generate(db, args.runs, args.epochs)
        gen_s = time.perf_counter() - t0
        con = sqlite3.connect(db)
        n_runs, n_ep = (con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                        for t in ("runs", "epoch_metrics"))  # fmt: skip
        con.close()
        t0 = time.perf_counter()
        files = build_report(d)
        report_s = time.perf_counter() - t0
        html = d / "report" / "report.html"
        n_img = html.read_text(encoding="utf-8").count("<img") if html.exists() else 0
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
          f"Python {platform.python_version()}")  # fmt: skip
    print(f"store: {n_runs:,} runs, {n_ep:,} epoch rows; generated in {gen_s:.2f} s")
    print(f"report: {len(files)} files, report.html with {n_img} figure(s)")
    print(f"report build: {report_s:.2f} s (goal <= {GOAL_S:g} s) "
          f"{'OK' if report_s <= GOAL_S else 'TOO SLOW'}")  # fmt: skip
    return 0 if report_s <= GOAL_S else 1


if __name__ == "__main__":
    sys.exit(main())
