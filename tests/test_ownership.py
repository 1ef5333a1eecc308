"""One owner per run, with real processes: a job stopped and taken over writes nothing when
it continues; two sweepers on overlapping grids train each configuration once; a rerun
follows the jobs of a sweeper that was killed; a full disk ends a job with one line and the
same command resumes at once once there is space.

Every wait is on a state of the store or of a process, never on a guess of how long
something takes (except the lease itself, which is what is tested)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import cli_env, poll_sql, run_cli, sql

pytestmark = pytest.mark.slow
BEAT = {"GRADSWEEP_HEARTBEAT_S": "1"}  # a lease of 3 s


def _start(*args: str, cwd: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sweeper", *args], cwd=cwd,
                            env=cli_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for(db: Path, query: str, ok: object, procs: list[subprocess.Popen[str]],
              timeout: float = 300) -> list[tuple]:  # fmt: skip
    """Poll the store until ``ok(rows)``; fail at once if a process ends meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = poll_sql(db, query)
        if rows and ok(rows):  # type: ignore[operator]
            return rows
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a command ended early: {p.communicate()}")
        time.sleep(0.1)
    raise AssertionError(f"never reached: {query} -> {poll_sql(db, query)}")


def _snapshot(results: Path) -> dict[str, object]:
    """Everything of the run: its row, its epoch rows, filter stats and files (by content)."""
    files = {}
    for f in sorted((results / "runs").rglob("*")):
        if f.is_file():
            files[str(f.relative_to(results))] = hashlib.sha256(f.read_bytes()).hexdigest()
    db = results / "results.db"
    return {
        "run": sql(db, "SELECT * FROM runs"),
        "epochs": sql(db, "SELECT * FROM epoch_metrics ORDER BY run_id, epoch"),
        "filters": sql(db, "SELECT * FROM filter_stats ORDER BY id"),
        "files": files,
    }


# ---------------------------------------------------------------- stopped, taken over
def test_a_stopped_job_taken_over_writes_nothing_when_it_continues(tmp_path: Path) -> None:
    """SIGSTOP (what Slurm's suspend and gang scheduling do) after epoch 2; the same
    command, run after the lease, takes the run over and finishes it; on SIGCONT the old
    job finds it lost the run at its next write, writes nothing of the run, and reports the
    run's end (a checkpoint's temp file it was writing when stopped is finished and removed:
    the check comes right before the rename, so it never replaces its new owner's file)."""
    args = ("epochs=8", "batch_size=32", "mlflow.enabled=false", f"results_dir={tmp_path}")
    db = tmp_path / "results.db"
    old = _start(*args, cwd=tmp_path, **BEAT)
    try:
        _wait_for(db, "SELECT epoch FROM runs", lambda r: r[0][0] >= 2, [old])
        old.send_signal(signal.SIGSTOP)
        beat = sql(db, "SELECT heartbeat_at FROM runs")[0][0]
        time.sleep(4.5)  # past the 3 s lease: the stopped job shows no life
        assert sql(db, "SELECT heartbeat_at, status FROM runs")[0] == (beat, "running")
        new = run_cli(*args, cwd=tmp_path, **BEAT)
        assert new.returncode == 0, new.stdout[-3000:] + new.stderr[-3000:]
        assert re.search(r"resuming after epoch [1-8]/8", new.stdout), new.stdout[-3000:]
        done = _snapshot(tmp_path)
        status, epoch, error, killed, owner = sql(
            db, "SELECT status, epoch, error, killed_at_epoch, owner FROM runs"
        )[0]
        # ends done with no stale mark of the takeover; the token grew: fenced, then claimed
        assert (status, epoch, error, killed) == ("done", 8, None, None)
        assert owner >= 3
        assert len(done["epochs"]) == 8  # type: ignore[arg-type]
        old.send_signal(signal.SIGCONT)
        out, err = old.communicate(timeout=120)
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            if old.poll() is None:
                old.send_signal(sig)
    assert "no longer this job's" in out + err, out[-3000:] + err[-3000:]
    assert "taken over by another job" in out + err
    assert "ended done (trained by another job)" in out + err
    assert old.returncode == 0, err[-3000:]  # what it was asked for is done
    after = _snapshot(tmp_path)  # not one write of the old job after it woke:
    changed = {k for k in ("run", "epochs", "filters") if after[k] != done[k]}
    files_a, files_d = after["files"], done["files"]
    # the one file it may still finish: the temp file of a checkpoint it was writing when it
    # was stopped (its own scratch, named by its pid, never the run's state), then removed
    own_tmp = f".tmp{old.pid}"
    changed |= {f for f in set(files_a) | set(files_d)
                if files_a.get(f) != files_d.get(f) and not f.endswith(own_tmp)}  # type: ignore[union-attr]  # fmt: skip
    assert not changed, sorted(changed)
    assert not list(tmp_path.rglob("*.tmp*"))


# ------------------------------------------------------------ two sweepers, one grid
def test_two_sweepers_on_overlapping_grids_train_each_configuration_once(tmp_path: Path) -> None:
    common = ("-m", "method=pgt", "epochs=2", "batch_size=32", "mlflow.enabled=false",
              f"results_dir={tmp_path}")  # fmt: skip
    first = _start(*common, "alpha=0.05,0.25,0.3", cwd=tmp_path)
    time.sleep(0.5)
    second = _start(*common, "alpha=0.25,0.3,0.5", cwd=tmp_path)
    outs = [p.communicate(timeout=600) for p in (first, second)]
    for p, (out, err) in zip((first, second), outs, strict=True):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
        assert "Traceback" not in err
    db = tmp_path / "results.db"
    assert sql(db, "SELECT alpha, status, epoch FROM runs ORDER BY alpha") == [
        (0.05, "done", 2), (0.25, "done", 2), (0.3, "done", 2), (0.5, "done", 2)
    ]  # fmt: skip
    # every job says which runs it trains (one line per run): each run was started once
    logs = "".join(f.read_text() for f in (tmp_path / "logs" / "jobs").rglob("*_log.out"))
    starts = Counter(re.findall(r"run (\d+) \([0-9a-f]{12}\): ", logs))
    assert sorted(starts.values()) == [1, 1, 1, 1], (starts, logs[-3000:])
    # the two headers split the work: four runs to run in all, two followed
    to_run = [int(re.search(r"(\d+) to run", out).group(1)) for out, _ in outs]  # type: ignore[union-attr]
    assert sum(to_run) == 4, [o[-2000:] for o, _ in outs]
    assert sum(out.count("following it to its outcome") for out, _ in outs) == 2
    assert sql(
        db, "SELECT COUNT(*), COUNT(DISTINCT run_id || '-' || epoch) FROM epoch_metrics"
    ) == [(8, 8)]


# ------------------------------------------------------- the sweeper killed, jobs alive
def test_a_rerun_follows_the_jobs_of_a_killed_sweeper(tmp_path: Path) -> None:
    """SIGKILL on the sweeper alone: its local jobs run on (their own sessions); the same
    command follows them to their end instead of saying "finished" or starting them twice,
    and records the killed sweep's end.

    The jobs are stopped (SIGSTOP) from before the kill until the rerun has said it follows
    them, so they are certainly mid-run when it looks, however fast or slow this machine: a
    stopped job is judged by its heartbeat, fresh here (the default 90 s lease)."""
    args = ("-m", "method=baseline,pgt", "alpha=0.3", "epochs=5", "batch_size=32",
            "hydra.launcher.max_parallel=2", "hydra.launcher.fuse=off", "mlflow.enabled=false",
            f"results_dir={tmp_path}")  # fmt: skip
    db = tmp_path / "results.db"
    sweeper = _start(*args, cwd=tmp_path)
    jobs: list[int] = []
    again: subprocess.Popen[str] | None = None
    lines: list[str] = []
    try:
        rows = _wait_for(db, "SELECT epoch, pid FROM runs", lambda r: len(r) == 2
                         and all((e or 0) >= 1 and pid for e, pid in r), [sweeper])  # fmt: skip
        jobs = [pid for _, pid in rows]
        _stop_between_writes(jobs, db)
        assert sql(db, "SELECT status FROM runs WHERE epoch < 5") == [("running",)] * 2
        sweeper.kill()
        sweeper.wait(timeout=60)  # not its pipes: its jobs, still running, hold them open
        again = subprocess.Popen([sys.executable, "-m", "sweeper", *args], cwd=tmp_path,
                                 env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)  # fmt: skip
        lines, reader = _lines_of(again)
        deadline = time.monotonic() + 300
        while sum("following it to its outcome" in ln for ln in lines) < 2:
            assert again.poll() is None and time.monotonic() < deadline, lines[-20:]
            time.sleep(0.1)
        for pid in jobs:
            os.kill(pid, signal.SIGCONT)
        again.wait(timeout=600)
        reader.join(timeout=60)
    finally:
        for pid in jobs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for p in (sweeper, again):
            if p is not None and p.poll() is None:
                p.kill()
    out = "\n".join(lines)  # its stdout and stderr
    assert again is not None and again.returncode == 0, out[-3000:]
    assert "lost their sweeper; recorded abandoned" in out
    assert out.count("following it to its outcome") == 2, out[-3000:]
    assert "2 points, 0 to run, 0 already finished, 2 trained by another live job" in out
    assert sql(db, "SELECT status, epoch FROM runs ORDER BY id") == [("done", 5), ("done", 5)]
    assert sql(db, "SELECT id, outcome FROM sweeps ORDER BY id") == [
        (1, "abandoned"),
        (2, "finished"),
    ]
    logs = "".join(f.read_text() for f in (tmp_path / "logs" / "jobs").rglob("*_log.out"))
    assert len(re.findall(r"run \d+ \([0-9a-f]{12}\): ", logs)) == 2  # no second job
    assert "resuming" not in logs


def _stop_between_writes(pids: list[int], db: Path) -> None:
    """SIGSTOP these jobs at a moment none of them holds the store's write lock (a job
    stopped inside a write would block every other writer until it continues)."""
    for _ in range(100):
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        con = sqlite3.connect(db, timeout=0)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.rollback()
            return
        except sqlite3.OperationalError:  # locked: let them finish that write, try again
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
        finally:
            con.close()
    raise AssertionError("the jobs never left the store's write lock")


def _lines_of(proc: subprocess.Popen[str]) -> tuple[list[str], threading.Thread]:
    """Its output's lines as they come: a list the returned thread appends to."""
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for ln in proc.stdout:
            lines.append(ln.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, reader


# --------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs (CI runs as root; elsewhere the test cannot make one)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); CI runs as root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` (a file written until ENOSPC)."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_interrupts_with_one_line_and_the_rerun_resumes_at_once(
    small_disk: Path,
) -> None:
    results = small_disk / "results"
    # 12 epochs (about 0.3 s each): filled after both recorded epoch 2, each still has
    # epochs to write (and fails on the next one); the rerun trains what is left of both
    args = ("-m", "seed=0,1", "epochs=12", "batch_size=32", "mlflow.enabled=false",
            "hydra.launcher.fuse=off", "hydra.launcher.max_parallel=2",
            f"results_dir={results}")  # fmt: skip
    db = results / "results.db"
    sweeper = _start(*args, cwd=small_disk.parent)
    try:
        _wait_for(db, "SELECT epoch FROM runs", lambda r: len(r) == 2 and min(r)[0] >= 2,
                  [sweeper])  # fmt: skip
        filler = _fill(small_disk)
        out, err = sweeper.communicate(timeout=300)
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
    assert sweeper.returncode == 1, out[-3000:] + err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "interrupted points (the same command resumes them)" in lines[0]
    assert re.search(r"no space left on device|disk is full", out + err, re.I), out[-3000:]
    assert not list(results.rglob("*.tmp*")), list(results.rglob("*.tmp*"))
    cut = sql(db, "SELECT epoch FROM runs ORDER BY id")
    assert all(e < 12 for (e,) in cut)
    filler.unlink()
    again = run_cli(*args, cwd=small_disk.parent, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # at once: their jobs' processes are gone, so no lease (90 s here) is waited for
    assert "2 points, 2 to run" in again.stdout, again.stdout[-3000:]
    assert "following" not in again.stdout
    assert sql(db, "SELECT status, epoch FROM runs ORDER BY id") == [("done", 12), ("done", 12)]
    rows = sql(db, "SELECT run_id, epoch FROM epoch_metrics ORDER BY run_id, epoch")
    assert rows == [(r, e) for r in (1, 2) for e in range(12)]
    assert not list(results.rglob("*.tmp*"))
    shutil.rmtree(results, ignore_errors=True)
    assert os.path.ismount(small_disk)
