"""SIGKILL during an epoch, run the same command again: it resumes and ends identically."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import cli_env, poll_sql, run_cli, sql

# batch 16 -> 89 steps an epoch on digits: long enough to be killed inside an epoch
ARGS = ["method=pgt", "epochs=5", "batch_size=16", "mlflow.enabled=false"]
COMPARED = (
    "epoch, step, train_loss, train_acc, test_loss, test_acc, test_top5, logit_norm, "
    "lr, grad_norm_before, grad_norm_after"
)


def test_sigkill_then_resume_gives_identical_metrics(tmp_path: Path) -> None:
    ref_dir, cut_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = run_cli(*ARGS, f"results_dir={ref_dir}", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeper", *ARGS, f"results_dir={cut_dir}"],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = cut_dir / "results.db"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            rows = poll_sql(db, "SELECT epoch FROM runs")
            if rows and rows[0][0] >= 2:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the run never finished two epochs")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert sql(db, "SELECT status FROM runs") == [("running",)]  # killed, not finished
    ckpt = torch.load(next(cut_dir.glob("runs/*/checkpoint.pt")), weights_only=True)
    k = int(ckpt["epoch"])
    assert 1 <= k < 5, k

    again = run_cli(*ARGS, f"results_dir={cut_dir}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert f"resuming after epoch {k}/5" in out
    assert f"epoch {k:>3}/5" not in out  # epochs before k are not trained again
    assert sql(db, "SELECT status, epoch FROM runs") == [("done", 5)]

    q = f"SELECT {COMPARED} FROM epoch_metrics ORDER BY epoch"
    assert sql(db, q) == sql(ref_dir / "results.db", q)  # bit-identical on CPU
    fq = "SELECT step, layer_index, n_zero, min_norm, median_norm, max_norm FROM filter_stats ORDER BY step, layer_index"
    assert sql(db, fq) == sql(ref_dir / "results.db", fq)
    final = "SELECT train_acc, test_acc, test_loss, logit_norm, zero_features FROM runs"
    assert sql(db, final) == sql(ref_dir / "results.db", final)


def test_finished_run_is_not_trained_again(tmp_path: Path) -> None:
    first = run_cli("epochs=1", "mlflow.enabled=false", f"results_dir={tmp_path}", cwd=tmp_path)
    assert first.returncode == 0
    again = run_cli("epochs=1", "mlflow.enabled=false", f"results_dir={tmp_path}", cwd=tmp_path)
    assert again.returncode == 0
    assert "already done" in again.stdout + again.stderr
    assert "epoch   1/1" not in again.stdout + again.stderr
    assert sql(tmp_path / "results.db", "SELECT count(*) FROM runs") == [(1,)]
