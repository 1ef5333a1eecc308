"""SIGKILL during an epoch: the run is seen as interrupted (its heartbeat stops), and the
same command again resumes it and ends identically. Corrupt checkpoints fall back."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli_env, poll_sql, run_cli, sql, train

from trainers.config import RunConfig
from trainers.train import EpochMetrics, NullSink, Trainer

# batch 16 -> 89 steps an epoch on digits: long enough to be killed inside an epoch
ARGS = ["method=pgt", "epochs=5", "batch_size=16", "mlflow.enabled=false"]
COMPARED = (
    "epoch, step, train_loss, train_acc, test_loss, test_acc, test_top5, logit_norm, "
    "lr, grad_norm_before, grad_norm_after"
)


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_metrics(tmp_path: Path) -> None:
    ref_dir, cut_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    # the reference is the same command's run trained in this process (the same run_job, one
    # torch thread as in the CLI's process): what is tested is the killed process's resume
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train(*ARGS, f"results_dir={ref_dir}").status == "done"
    finally:
        torch.set_num_threads(threads)

    fast_beat = {**cli_env(), "GRADSWEEP_HEARTBEAT_S": "0.5"}  # lease 1.5 s
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeper", *ARGS, f"results_dir={cut_dir}"],
        cwd=tmp_path,
        env=fast_beat,
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
    assert sql(db, "SELECT status FROM runs") == [("running",)]  # killed: nobody recorded it
    _wait_past_lease(db, 1.5)  # > the lease: no heartbeat came
    st = subprocess.run([sys.executable, "-m", "sweeper", "status", f"results_dir={cut_dir}"],
                        cwd=tmp_path, env=fast_beat, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert st.returncode == 0, st.stderr
    assert "interrupted" in st.stdout
    ((status, error),) = sql(db, "SELECT status, error FROM runs")
    assert status == "interrupted" and "no heartbeat for over 1.5 s" in error
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


def _wait_past_lease(db: Path, lease_s: float) -> None:
    """Until the killed run's last heartbeat (UTC, written by its job) is older than the lease."""
    ((beat,),) = sql(db, "SELECT coalesce(heartbeat_at, started_at) FROM runs")
    last = dt.datetime.fromisoformat(beat)
    while (dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - last).total_seconds() <= (
        lease_s + 0.25
    ):
        time.sleep(0.05)


def test_finished_run_is_not_trained_again(tmp_path: Path, caplog) -> None:
    args = ("epochs=1", "mlflow.enabled=false", f"results_dir={tmp_path}")
    assert train(*args).status == "done"
    caplog.clear()
    with caplog.at_level("INFO", logger="gradsweep"):
        assert train(*args).status == "skipped"
    assert "already done" in caplog.text and "epoch   1/1" not in caplog.text
    assert sql(tmp_path / "results.db", "SELECT count(*) FROM runs") == [(1,)]


# ------------------------------------------------------------ corrupt checkpoints
def _digits_cfg(epochs: int) -> RunConfig:
    cfg = RunConfig(epochs=epochs, device="cpu", filter_stats_every=0)
    cfg.validate()
    return cfg


class _StopAfter(NullSink):
    """Raises after epoch ``n``'s checkpoint: a job killed between two epochs."""

    def __init__(self, n: int) -> None:
        self.n = n

    def should_stop(self, metrics: EpochMetrics) -> bool:
        if metrics.epoch + 1 == self.n:
            raise KeyboardInterrupt
        return False


def _history(t: Trainer) -> list[tuple[float, float]]:
    r = t.fit()
    assert r.status == "done"
    return [(m.train_loss, m.test_acc) for m in r.history]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[float, float]]:
    """The uninterrupted 3-epoch run every damaged one must end equal to."""
    return _history(Trainer(_digits_cfg(3), tmp_path_factory.mktemp("ref"), log=lambda _: None))


@pytest.fixture(scope="module")
def stopped_after_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a 3-epoch run stopped after epoch 2's checkpoint (trained once; each
    damage test damages a copy of it: the same files a fresh stopped run would leave)."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(_digits_cfg(3), run_dir, sink=_StopAfter(2), log=lambda _: None).fit()
    return run_dir


class _Payload:
    """What a hostile checkpoint would carry: unpickling it runs code (writes a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.parametrize(
    "damage", ["truncated", "garbage", "both_bad", "lost_in_rename", "hostile_pickle"]
)
@pytest.mark.slow
def test_corrupt_checkpoint_falls_back_with_a_warning(
    damage: str, reference: list[tuple[float, float]], stopped_after_two: Path, tmp_path: Path
) -> None:
    ref = reference
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_after_two, run_dir)  # this test's own copy of the stopped run
    ckpt, prev = run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    assert torch.load(prev, weights_only=True)["epoch"] == 1
    if damage == "truncated":  # a full disk / a killed copy
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all")
    elif damage == "both_bad":
        ckpt.write_bytes(b"x")
        prev.write_bytes(prev.read_bytes()[:100])
    elif damage == "hostile_pickle":  # loaded with weights_only=True: refused, never run
        torch.save({"model": _Payload(tmp_path / "pwned")}, ckpt)
    else:  # killed between the two renames of a save: only the previous one is there
        ckpt.unlink()
    lines: list[str] = []
    again = _history(Trainer(_digits_cfg(3), run_dir, log=lines.append))
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    if damage == "lost_in_rename":
        assert warnings == [] and "resuming after epoch 1/3" in "\n".join(lines)
    elif damage == "both_bad":
        assert len(warnings) == 2
        assert str(ckpt) in warnings[0] and str(prev) in warnings[1]
        assert "starting the run from scratch" in warnings[1]
        assert not any("resuming" in ln for ln in lines)
    else:
        assert len(warnings) == 1 and str(ckpt) in warnings[0]
        assert f"falling back to {prev}" in warnings[0]
        assert "resuming after epoch 1/3" in "\n".join(lines)
    assert again == ref  # whichever way it resumed, the run ends exactly as uninterrupted
    if damage in ("truncated", "garbage", "hostile_pickle"):  # kept aside, not rotated in
        assert (run_dir / "checkpoint.bad.pt").exists()
        assert torch.load(prev, weights_only=True)["epoch"] == 2  # a good one
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------ a job killed while its sweeper is alive
KILL_GRID = ["-m", "seed=0", "method=pgt", "epochs=5", "batch_size=32", "mlflow.enabled=false"]


def _wait(db: Path, query: str, ok, what: str, timeout: float = 180) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = poll_sql(db, query)
        if rows and ok(rows):
            return rows
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat: the parent's pid
            out.append(int(stat.parent.name))
    return out


def _sweep_and_kill(cwd: Path, results: Path, when: str) -> subprocess.CompletedProcess[str]:
    """Start the one-point sweep, SIGKILL its job (not the sweeper) ``when`` it has finished
    an epoch ("epoch") or as soon as it has started training ("start"); the sweeper goes on
    and reports."""
    db = results / "results.db"
    sweeps_before = len(poll_sql(db, "SELECT id FROM sweeps"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeper", *KILL_GRID, f"results_dir={results}"], cwd=cwd,
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        sweep = sweeps_before + 1
        q = ("SELECT l.job_id, r.status, r.epoch, r.started_at FROM sweep_runs l "
             f"JOIN runs r ON r.id = l.run_id WHERE l.sweep_id = {sweep}")  # fmt: skip
        # the job has a process and has (re)started its run in this sweep
        first = _wait(db, q, lambda r: r[0][0] is not None and r[0][1] == "running", "a job")
        if when == "epoch":  # two: the row of an epoch is written just before its checkpoint
            epoch0 = first[0][2]
            first = _wait(db, q, lambda r: r[0][2] >= epoch0 + 2, "two epochs")
        # a local job's id is the pid of submitit's controller; the training process is its
        # child (what the OOM killer or a `kill -9` of the job hits)
        (task,) = _children(int(first[0][0]))
        os.kill(task, signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_a_killed_job_is_interrupted_resumed_and_failed_when_killed_twice(tmp_path: Path) -> None:
    """Real SIGKILLs of the training process while its sweeper is alive: the first kill (after
    two epochs) leaves the run ``interrupted``, and the sweep exits 1 naming it; killed again
    before it finishes another epoch, it is ``failed`` (so an out-of-memory job does not
    loop; a failed point is then skipped, as tests/test_sweep.py shows), and
    ``retry_failed=true`` resumes it from its checkpoint to the end."""
    results = tmp_path / "res"
    db = results / "results.db"
    first = _sweep_and_kill(tmp_path, results, "epoch")
    assert first.returncode == 1, first.stdout[-2000:] + first.stderr[-2000:]
    assert "interrupted" in first.stdout  # its progress line
    (err,) = [ln for ln in first.stderr.splitlines() if ln.startswith("error:")]
    assert "interrupted points" in err and "the same command resumes them" in err
    ((status, epoch, error),) = sql(db, "SELECT status, epoch, error FROM runs")
    assert status == "interrupted" and epoch >= 2, error  # not failed: it was killed
    assert "ended without recording an outcome" in error

    second = _sweep_and_kill(tmp_path, results, "start")  # killed again before an epoch ends
    ((status, epoch2, error),) = sql(db, "SELECT status, epoch, error FROM runs")
    if epoch2 > epoch:  # the resumed job was fast enough to finish an epoch: try once more
        second = _sweep_and_kill(tmp_path, results, "start")
        ((status, epoch2, error),) = sql(db, "SELECT status, epoch, error FROM runs")
    assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
    assert status == "failed" and "killed twice without progress" in error, error
    (err,) = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert "failed points" in err

    retry = run_cli(*KILL_GRID, "hydra.launcher.retry_failed=true", f"results_dir={results}",
                    cwd=tmp_path, timeout=600)  # fmt: skip
    assert retry.returncode == 0, retry.stderr[-2000:]
    log = "".join(p.read_text() for p in (results / "logs" / "jobs").rglob("*_log.out"))
    # from its last checkpoint: the killed epoch's or, killed between the epoch's row and its
    # checkpoint, the one before
    assert (
        f"resuming after epoch {epoch2}/5" in log or f"resuming after epoch {epoch2 - 1}/5" in log
    )
    assert sql(db, "SELECT status, epoch FROM runs") == [("done", 5)]
