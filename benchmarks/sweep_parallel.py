"""Benchmark: a 2 methods x 2 alpha x 2 batch-size grid with max_parallel=2 vs 1.

Runs the same 8-point grid twice through the real CLI and submitit's local executor, each
into a fresh results dir, and prints both wall times and their ratio (issue 3 expects
<= 0.65 on a 2-core machine). Usage:

    .venv/bin/python benchmarks/sweep_parallel.py [--epochs 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GRID = [
    "-m",
    "method=pgt,ls_pgt",
    "alpha=0.25,0.3",
    "batch_size=32,64",
    "mlflow.enabled=false",
    "hydra.launcher.fuse=off",
]  # one job per point: what max_parallel shares out


def run_grid(max_parallel: int, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        t0 = time.perf_counter()
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "sweeper",
                *GRID,
                f"epochs={epochs}",
                f"hydra.launcher.max_parallel={max_parallel}",
                f"results_dir={d}",
            ],
            cwd=d,
            env=env,
            capture_output=True,
            text=True,
        )
        took = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"grid failed (max_parallel={max_parallel}):\n{res.stderr[-3000:]}")
        con = sqlite3.connect(Path(d) / "results.db")
        done = con.execute("SELECT count(*) FROM runs WHERE status='done'").fetchone()[0]
        con.close()
        if done != 8:
            sys.exit(f"expected 8 runs done, found {done}")
        return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"grid: {' '.join(GRID[1:])} epochs={args.epochs} (8 runs, digits, CPU)")
    serial = run_grid(1, args.epochs)
    print(f"max_parallel=1: {serial:7.1f} s")
    parallel = run_grid(2, args.epochs)
    print(f"max_parallel=2: {parallel:7.1f} s")
    print(f"ratio parallel/serial: {parallel / serial:.3f}  (goal <= 0.65)")


if __name__ == "__main__":
    main()
