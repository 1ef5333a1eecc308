"""``hydra/launcher=slurm`` end to end through a real single-node Slurm (no accounting).

The cluster comes from tests/slurm_cluster.py (real munged, slurmctld and slurmd); the
sweeps are the real CLI in subprocesses; the jobs are real Slurm jobs running the venv's
python. Nothing is mocked.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import cli_env, poll_sql, run_cli, sql
from slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow

METRIC_COLUMNS = (
    "epoch, step, train_loss, train_acc, test_loss, test_acc, test_top5, logit_norm, lr, "
    "grad_norm_before, grad_norm_after"
)


def slurm_args(cluster: SlurmCluster, results: Path, cpus: int = 1) -> list[str]:
    return [
        "hydra/launcher=slurm",
        f"hydra.launcher.partition={cluster.partition}",
        f"hydra.launcher.cpus_per_task={cpus}",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.poll_s=1",
        f"results_dir={results}",
    ]


def test_small_sweep_through_slurm(
    slurm_cluster: SlurmCluster, tmp_path: Path, seed_mlflow
) -> None:
    """Five points, fuse=2: two fused jobs of two members and one alone; the cluster's
    MaxArraySize is 2, so they go out as an array of two tasks and a job."""
    seed_mlflow(tmp_path)  # the default MLflow store, set up once per test process
    res = run_cli(
        "-m",
        "method=baseline,pgt,ls,gc,znorm",
        "+experiment=smoke",
        "hydra.launcher.fuse=2",
        *slurm_args(slurm_cluster, tmp_path),
        cwd=tmp_path,
        timeout=300,
    )
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:] + slurm_cluster.logs()
    db = tmp_path / "results.db"
    methods = ["baseline", "gc", "ls", "pgt", "znorm"]
    assert sql(db, "SELECT method, status, epoch FROM runs ORDER BY method") == [
        (m, "done", 3) for m in methods
    ]
    assert "5 points → 3 jobs: 2 fused (2, 2 members), 1 alone" in out
    (launcher,) = sql(db, "SELECT launcher FROM sweeps WHERE id = 1")[0]
    assert launcher == "slurm"
    job_ids = sorted(r[0] for r in sql(db, "SELECT job_id FROM sweep_runs"))
    array = job_ids[0].split("_")[0]
    alone = next(j for j in job_ids if "_" not in j)  # the second sbatch: a plain job
    # one array of two tasks (two members each), then the job that did not fit in it
    assert sorted(job_ids) == sorted([f"{array}_0"] * 2 + [f"{array}_1"] * 2 + [alone])
    assert f"submitted Slurm job array {array} (2 tasks)" in out
    assert f"submitted Slurm job {alone}" in out
    assert "[  5/5]" in out and "done 5 · failed 0" in out and "sweep summary" in out
    # no accounting on this cluster: the launcher must not lean on sacct (nor spam about it)
    assert "sacct" not in out + res.stderr
    logs = sorted((tmp_path / "logs" / "jobs" / "sweep1").glob("*_log.out"))
    assert [p.name for p in logs] == sorted(
        [f"{array}_0_0_log.out", f"{array}_1_0_log.out", f"{alone}_0_log.out"]
    )
    assert sum(p.read_text().count("epoch   3/3") for p in logs) == 5

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gradsweep")
    runs = client.search_runs([exp.experiment_id], "tags.sweep_id = '1'")
    kids = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    assert sorted(r.data.tags["method"] for r in kids) == methods
    assert all(r.info.status == "FINISHED" for r in kids)
    assert sql(db, "SELECT count(*) FROM runs WHERE mlflow_mirrored = 1") == [(5,)]


def test_optuna_search_through_slurm(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """Trials go out as single Slurm jobs (no array: each is asked for when one ends) and
    report to the study in the store from the compute node."""
    res = run_cli(
        "-m",
        "hydra/sweeper=optuna",
        "alpha=interval(0.05,1)",
        "method=pgt",
        "+experiment=smoke",
        "epochs=2",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.seed=0",
        # MLflow is not what this test is about (test_search.py checks trials in MLflow):
        # off, the sweeper and each trial's job skip importing and setting it up
        "mlflow.enabled=false",
        *slurm_args(slurm_cluster, tmp_path),
        cwd=tmp_path,
        timeout=300,
    )
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:] + slurm_cluster.logs()
    db = tmp_path / "results.db"
    assert sql(db, "SELECT number, state FROM trials ORDER BY number") == [
        (0, "COMPLETE"),
        (1, "COMPLETE"),
        (2, "COMPLETE"),
    ]
    assert sql(db, "SELECT COUNT(*) FROM trial_intermediate_values") == [(6,)]  # 3 x 2 epochs
    assert sql(db, "SELECT launcher FROM sweeps") == [("optuna/slurm",)]
    jobs = [r[0] for r in sql(db, "SELECT job_id FROM sweep_runs ORDER BY trial")]
    assert len(jobs) == 3 and all(j.isdigit() for j in jobs)  # plain jobs, not array tasks
    assert sql(db, "SELECT status, epoch FROM runs") == [("done", 2)] * 3
    assert "best trial" in out


def test_requeued_job_resumes_from_checkpoint(
    slurm_cluster: SlurmCluster, tmp_path: Path, seed_mlflow
) -> None:
    """``scontrol requeue`` mid-run: Slurm kills the job and runs it again; it resumes from
    its checkpoint and ends with exactly the metrics of an uninterrupted run."""
    # 12 epochs: after the requeue (at epoch >= 2) the job lives KillWait (2 s) more with
    # SIGTERM bypassed, and must still be mid-run when SIGKILL comes, on a fast machine too
    job = ["epochs=12", "batch_size=16"]
    res_dir, ref_dir = tmp_path / "slurm", tmp_path / "ref"
    seed_mlflow(res_dir)  # the default MLflow store, set up once per test process
    ref = None
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeper", "-m", *job, *slurm_args(slurm_cluster, res_dir, 1)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    db = res_dir / "results.db"
    try:
        deadline, epoch, job_id = time.monotonic() + 120, 0, None
        while time.monotonic() < deadline and proc.poll() is None:
            rows = poll_sql(
                db, "SELECT r.epoch, s.job_id FROM runs r JOIN sweep_runs s ON s.run_id = r.id"
            )
            if rows and rows[0][1] and rows[0][0] >= 2:
                epoch, job_id = rows[0]
                break
            time.sleep(0.1)
        assert job_id is not None, f"job never reached epoch 2 (sweep exit {proc.poll()})"
        slurm_cluster.run("scontrol", "requeue", job_id)
        # the uninterrupted reference: the same job, as its own process (bit-equality needs
        # the same process set-up), trained while the requeued job waits out its credential
        # expiry (cred_expire) in the queue and starts again, instead of after the sweep
        ref = subprocess.Popen(
            [sys.executable, "-m", "sweeper", *job, "mlflow.enabled=false",
             f"results_dir={ref_dir}"],
            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        out, err = proc.communicate(timeout=240)
        _, ref_err = ref.communicate(timeout=300)
    finally:
        for p in (proc, ref):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    assert proc.returncode == 0, out[-3000:] + err[-3000:] + slurm_cluster.logs()
    assert sql(db, "SELECT status, epoch FROM runs") == [("done", 12)]
    assert "requeued" in out  # the launcher saw the job go back to the queue
    assert slurm_cluster.job_field(job_id, "Restarts") == "1"
    log = (res_dir / "logs" / "jobs" / "sweep1" / f"{job_id}_0_log.out").read_text()
    resumed = [ln for ln in log.splitlines() if "resuming after epoch" in ln]
    assert len(resumed) == 1, log[-3000:]
    k = int(resumed[0].split("resuming after epoch ")[1].split("/")[0])
    assert max(1, epoch - 1) <= k < 12, (epoch, resumed)  # DB row precedes the checkpoint
    print(f"requeued at epoch {epoch}; resumed after epoch {k}; Restarts=1")
    assert ref.returncode == 0, ref_err[-3000:]
    query = f"SELECT {METRIC_COLUMNS} FROM epoch_metrics ORDER BY epoch"
    got, want = sql(db, query), sql(ref_dir / "results.db", query)
    assert len(want) == 12 and got == want  # exact float equality, every epoch
    final = "SELECT train_acc, test_acc, test_top5, test_loss, logit_norm FROM runs"
    assert sql(db, final) == sql(ref_dir / "results.db", final)
    # the requeued job reopened the run's MLflow record and added only what it lacked
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{res_dir / 'mlflow.db'}")
    ((mlflow_id,),) = sql(db, "SELECT mlflow_run_id FROM runs")
    for key in ("test_acc", "train_loss", "lr"):
        steps = [m.step for m in client.get_metric_history(mlflow_id, key)]
        assert sorted(steps) == list(range(12)), (key, steps)


def test_unknown_partition_refused_before_anything(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    res = run_cli(
        "-m",
        "seed=0,1",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=nope",
        f"results_dir={tmp_path / 'res'}",
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]
    assert slurm_cluster.partition in lines[0]  # names what is known
    assert not (tmp_path / "res" / "results.db").exists()


def test_job_dying_without_an_outcome_is_interrupted_with_its_stderr(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """A job killed outside Python (here: scancel) leaves its run `running`; the launcher
    sees it gone from squeue and records it killed (`interrupted`: the same command resumes
    it), naming the job, its Slurm state and its log."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sweeper",
            "-m",
            "epochs=50",  # scancel comes at epoch 1: it never ends by itself
            "batch_size=64",  # epoch 1 in 22 steps (the kill needs a running job, no more)
            "mlflow.enabled=false",
            *slurm_args(slurm_cluster, tmp_path),
        ],
        cwd=tmp_path,
        env=cli_env(GRADSWEEP_SLURM_GRACE_S="3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    db = tmp_path / "results.db"
    try:
        deadline, job_id = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            rows = poll_sql(
                db, "SELECT r.epoch, s.job_id FROM runs r JOIN sweep_runs s ON s.run_id = r.id"
            )
            if rows and rows[0][1] and rows[0][0] >= 1:
                job_id = rows[0][1]
                break
            time.sleep(0.2)
        assert job_id is not None, f"job never reached epoch 1 (sweep exit {proc.poll()})"
        slurm_cluster.run("scancel", job_id)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    ((status, error),) = sql(db, "SELECT status, error FROM runs")
    assert status == "interrupted"  # killed, not failed: the same command resumes it
    assert f"Slurm job {job_id} ended" in error and "without recording an outcome" in error
    assert "CANCELLED" in error
    assert "interrupted 1" in out and "error: interrupted points" in err


class _Lines:
    """A child's stdout or stderr read as it comes (a thread drains the pipe), so that a test
    can wait for a line while the process still runs."""

    def __init__(self, stream) -> None:  # noqa: ANN001 (a text pipe)
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream) -> None:  # noqa: ANN001
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def join(self) -> str:
        self._thread.join(timeout=60)
        return self.text()


def _utc(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp)  # the store's naive UTC times


def test_a_suspended_fused_job_is_not_dead(
    slurm_cluster: SlurmCluster, tmp_path: Path, seed_mlflow
) -> None:
    """``scontrol suspend`` of a fused job for longer than its lease: squeue says SUSPENDED,
    so ``status`` and the same command started meanwhile leave its runs alone (the second
    command follows them, it starts no job); after ``scontrol resume`` the job finishes them
    ``done`` with no stale error or kill mark, no epoch billed the suspension, and each
    run's MLflow record has one point per epoch."""
    from mlflow.tracking import MlflowClient

    # batch 64: half the steps an epoch of batch 32 takes, so that an epoch stays well under
    # the 3 s bound below on a loaded machine too; 6 epochs: suspended once all three runs
    # are past epoch 1, it is suspended mid-run and trains on after the resume
    epochs = 6
    grid = ["-m", "method=pgt", "alpha=0.05,0.25,0.3", f"epochs={epochs}", "batch_size=64",
            "hydra.launcher.fuse=3", *slurm_args(slurm_cluster, tmp_path)]  # fmt: skip
    lease_s = 3.0  # GRADSWEEP_HEARTBEAT_S=1: a lease of 3 heartbeats
    env = cli_env(GRADSWEEP_HEARTBEAT_S="1")
    cmd = [sys.executable, "-m", "sweeper", *grid]
    seed_mlflow(tmp_path)  # the default MLflow store, set up once per test process
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    second = None
    db = tmp_path / "results.db"
    try:
        deadline, job_id = time.monotonic() + 180, None
        while time.monotonic() < deadline and first.poll() is None:
            rows = poll_sql(db, "SELECT r.epoch, s.job_id FROM runs r "
                                "JOIN sweep_runs s ON s.run_id = r.id")  # fmt: skip
            if len(rows) == 3 and all(e >= 1 and j for e, j in rows):
                job_id = rows[0][1]
                break
            time.sleep(0.1)
        assert job_id is not None, f"the job never trained (sweep exit {first.poll()})"
        slurm_cluster.run("scontrol", "suspend", job_id)
        state = slurm_cluster.run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip()
        assert state == "SUSPENDED", state
        # suspended for longer than the lease: wait until the runs' last heartbeat is older
        # than it (with a margin), instead of a fixed 6 s
        deadline = time.monotonic() + 60
        while True:
            beats = sql(db, "SELECT MAX(heartbeat_at) FROM runs")[0][0]
            age = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - _utc(beats)
            if age.total_seconds() > lease_s + 1.0:
                break
            assert time.monotonic() < deadline, f"the suspended job still beats ({beats})"
            time.sleep(0.2)
        # the same command, started meanwhile; `status` runs while it plans
        second = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        out2_lines, err2_lines = _Lines(second.stdout), _Lines(second.stderr)
        status = run_cli(
            "status", f"results_dir={tmp_path}", cwd=tmp_path, GRADSWEEP_HEARTBEAT_S="1"
        )
        assert status.returncode == 0, status.stderr
        # the second command has planned (it follows all three runs) ...
        deadline = time.monotonic() + 120
        while out2_lines.text().count("following it to its outcome") < 3:
            assert second.poll() is None, out2_lines.join()[-3000:] + err2_lines.join()[-3000:]
            assert time.monotonic() < deadline, out2_lines.text()[-3000:]
            time.sleep(0.1)
        time.sleep(3)  # ... and polls them (poll_s=1) while the job is still suspended
        held = sql(db, "SELECT status, error, killed_at_epoch FROM runs ORDER BY id")
        assert held == [("running", None, None)] * 3, held
        assert sql(db, "SELECT DISTINCT job_id FROM sweep_runs WHERE job_id IS NOT NULL") == [
            (job_id,)
        ]
        assert slurm_cluster.run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip() == (
            "SUSPENDED"
        )  # all of the above happened during the suspension
        slurm_cluster.run("scontrol", "resume", job_id)
        out1, err1 = first.communicate(timeout=240)
        second.wait(timeout=240)
        out2, err2 = out2_lines.join(), err2_lines.join()
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert first.returncode == 0, out1[-3000:] + err1[-3000:] + slurm_cluster.logs()
    assert second.returncode == 0, out2[-3000:] + err2[-3000:]
    assert "Traceback" not in err1 + err2
    assert "3 points, 0 to run, 0 already finished, 3 trained by another live job" in out2
    assert out2.count("following it to its outcome") == 3, out2[-3000:]
    assert "submitted" not in out2, out2[-3000:]
    runs = sql(db, "SELECT id, status, epoch, error, killed_at_epoch, mlflow_run_id FROM runs")
    assert [r[1:5] for r in runs] == [("done", epochs, None, None)] * 3, runs
    (slowest,) = sql(db, "SELECT MAX(epoch_time) FROM epoch_metrics")[0]
    assert slowest < 3.0, slowest  # the suspension (over the lease) is not training time
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for run in runs:
        for key in ("test_acc", "train_loss"):
            steps = [m.step for m in client.get_metric_history(run[5], key)]
            assert sorted(steps) == list(range(epochs)), (key, steps)  # one per epoch row
