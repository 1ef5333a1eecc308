"""Fused groups (hydra.launcher.fuse, trainers.fused): a member's run *is* the separate run.

Every member of a group is compared with the same configuration trained alone, epoch row
by epoch row: exactly (interleaved, the CPU default: each member takes its own step in
turn) or within the stated tolerance (stacked, the CUDA default, also run here on the CPU:
one vmapped forward/backward for the group, whose grouped kernels sum in another order).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli_env, compose, main_in_process, poll_sql, run_cli, sql

from sweeper.config.launcher import LauncherParams
from sweeper.launch.fuse import SLURM_AUTO_GROUP, describe, fuse_key, plan_groups, why_alone
from trainers import fused as fused_mod
from trainers.config import DataConfig, MethodConf, ModelConf, RunConfig
from trainers.fused import FusedTrainer, footprint_bytes
from trainers.train import Trainer

ROW = ("train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "logit_norm",
       "grad_norm_before", "grad_norm_after", "lr", "step")  # fmt: skip

# stacked mode: after one epoch the losses agree to 1e-4 (relative); after three, rounding
# differences have grown as they do between two thread counts of the same run alone
# (measured, 2-core VM: 1 vs 2 threads moves the default's losses by 3e-3 after 3 epochs,
# ResNet-20's by 2.4e-3; stacked vs alone 1e-2 and 2.6e-2)
STACKED_EPOCH1 = 1e-4
STACKED_EPOCH3 = 5e-2


def _alone(cfgs: list[RunConfig], tmp: Path) -> list:
    return [Trainer(c, tmp / f"alone{i}", log=lambda s: None).fit() for i, c in enumerate(cfgs)]


@pytest.fixture(scope="module")
def alone_once(tmp_path_factory: pytest.TempPathFactory):  # -> Callable[[str, list], tuple]
    """``alone_once(name, cfgs)``: the separate runs of ``cfgs`` (and the folder holding their
    ``alone{i}`` run folders), trained once per module: the tests that compare several fused
    modes with the same configurations trained alone share that reference."""
    done: dict[str, tuple[list, list[RunConfig], Path]] = {}

    def get(name: str, cfgs: list[RunConfig]) -> tuple[list, Path]:
        if name not in done:
            d = tmp_path_factory.mktemp(f"alone_{name}")
            done[name] = (_alone(cfgs, d), cfgs, d)
        results, trained, d = done[name]
        assert trained == cfgs  # the reference is of exactly these configurations
        return results, d

    return get


def _fused(cfgs: list[RunConfig], tmp: Path, stacked: bool, **kw: object) -> list:
    members = [Trainer(c, tmp / f"fused{i}", log=lambda s: None) for i, c in enumerate(cfgs)]
    return FusedTrainer(members, stacked=stacked, log=lambda s: None, **kw).fit()  # type: ignore[arg-type]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


def _digits_group(val_split: float = 0.0) -> list[RunConfig]:
    """The digits default with what a member may change: seed, alpha, method pieces,
    lr, weight decay, momentum, label smoothing, GC / AGC / ZNorm (``val_split``: the
    members' shared validation split)."""
    data = DataConfig(name="digits", val_split=val_split)
    base = dict(epochs=3, filter_stats_every=10, data=data)
    return [
        RunConfig(seed=0, **base),  # the default
        RunConfig(seed=1, method=MethodConf.preset("pgt"), alpha=0.3, lr=0.05, **base),
        RunConfig(seed=2, method=MethodConf.preset("gc_pgt"), weight_decay=1e-3, **base),
        RunConfig(
            seed=3,
            method=MethodConf(grad=["agc", "znorm"], label_smoothing=0.1),
            momentum=0.8,
            **base,
        ),  # fmt: skip
    ]


@pytest.mark.slow
def test_an_interleaved_group_is_exactly_its_separate_runs(tmp_path: Path, alone_once) -> None:  # noqa: ANN001
    cfgs = _digits_group(val_split=0.2)  # each member evaluates the split, as alone
    alone, ref_dir = alone_once("digits", cfgs)
    fused = _fused(cfgs, tmp_path, stacked=False)
    row = (*ROW, "val_acc", "val_loss")
    for a, f in zip(alone, fused, strict=True):
        assert f.status == a.status == "done"
        assert len(f.history) == len(a.history) == 3
        for ea, ef in zip(a.history, f.history, strict=True):
            assert ef.val_acc is not None and ef.val_loss is not None
            assert {k: getattr(ef, k) for k in row} == {k: getattr(ea, k) for k in row}
        assert f.feature_norms == a.feature_norms
    # each member's own checkpoint and filter statistics, in its own folder
    for i in range(len(cfgs)):
        ck = torch.load(tmp_path / f"fused{i}" / "checkpoint.pt", weights_only=True)
        ref = torch.load(ref_dir / f"alone{i}" / "checkpoint.pt", weights_only=True)
        assert ck["epoch"] == 3
        for k, v in ref["model"].items():
            assert torch.equal(ck["model"][k], v), k
        assert sorted(p.name for p in (tmp_path / f"fused{i}" / "filter_norms").iterdir()) == \
            sorted(p.name for p in (ref_dir / f"alone{i}" / "filter_norms").iterdir())  # fmt: skip


@pytest.mark.slow
def test_a_stacked_group_matches_its_separate_runs(tmp_path: Path, alone_once) -> None:  # noqa: ANN001
    # no validation split: the tolerances below were measured on the default's data
    cfgs = _digits_group()
    alone, ref_dir = alone_once("digits_stacked", cfgs)
    fused = _fused(cfgs, tmp_path, stacked=True)
    for i, (a, f) in enumerate(zip(alone, fused, strict=True)):
        assert [h.epoch for h in f.history] == [0, 1, 2]
        # ZNorm (member 3) rescales every gradient tensor to unit spread (gradient norm ~300
        # here), which amplifies rounding differences within an epoch, as it does across
        # thread counts: its training loss is compared over the first epoch only
        for k in ("train_loss",) if i == 3 else ("train_loss", "test_loss"):
            assert _rel(getattr(a.history[0], k), getattr(f.history[0], k)) < STACKED_EPOCH1
            if i in (0, 2):  # three epochs: the default and GC
                assert _rel(getattr(a.history[2], k), getattr(f.history[2], k)) < STACKED_EPOCH3
    # each member kept its own BatchNorm running statistics (and a file holding only its own)
    ck = [torch.load(tmp_path / f"fused{i}" / "checkpoint.pt", weights_only=True) for i in range(4)]
    ref = torch.load(ref_dir / "alone0" / "checkpoint.pt", weights_only=True)
    bn = [k for k in ref["model"] if k.endswith("running_var")]
    assert bn and not torch.equal(ck[0]["model"][bn[0]], ck[1]["model"][bn[0]])
    assert torch.allclose(ck[0]["model"][bn[0]], ref["model"][bn[0]], rtol=5e-2)
    size = (tmp_path / "fused0" / "checkpoint.pt").stat().st_size
    assert size < 1.2 * (ref_dir / "alone0" / "checkpoint.pt").stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["interleaved", "stacked"])
def test_resnet20_on_cifar_shaped_data_fuses(tmp_path: Path, stacked: bool, alone_once) -> None:  # noqa: ANN001
    data = DataConfig(name="synthetic", num_train=64, num_test=32)
    cfgs = [RunConfig(model=ModelConf(name="resnet20"), data=data, batch_size=32, epochs=3,
                      seed=s, method=MethodConf.preset(m), filter_stats_every=0)
            for s, m in ((0, "baseline"), (1, "ls_pgt"))]  # fmt: skip
    alone, _ = alone_once("resnet20", cfgs)  # one reference for both modes
    fused = _fused(cfgs, tmp_path, stacked=stacked)
    for a, f in zip(alone, fused, strict=True):
        for e, (ea, ef) in enumerate(zip(a.history, f.history, strict=True)):
            for k in ("train_loss", "test_loss"):
                x, y = getattr(ea, k), getattr(ef, k)
                if not stacked:
                    assert x == y
                else:
                    assert _rel(x, y) < (STACKED_EPOCH1 if e == 0 else STACKED_EPOCH3)


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["interleaved", "stacked"])
def test_a_diverging_member_leaves_the_group_at_its_step(
    tmp_path: Path,
    stacked: bool,
    alone_once,  # noqa: ANN001
) -> None:
    base = dict(epochs=1, filter_stats_every=0, check_every=5)
    cfgs = [RunConfig(seed=0, **base), RunConfig(seed=1, lr=1e7, **base),
            RunConfig(seed=2, **base)]  # fmt: skip
    alone, _ = alone_once("diverging", cfgs)  # one reference for both modes
    fused = _fused(cfgs, tmp_path, stacked=stacked)
    assert alone[1].status == fused[1].status == "diverged"
    if not stacked:  # the exact step (stacked: rounding moves a chaotic run's step)
        assert fused[1].diverged_step == alone[1].diverged_step
    assert fused[1].diverged_step < 22 and not fused[1].history  # in its first epoch
    for i in (0, 2):
        assert fused[i].status == "done" and len(fused[i].history) == 1
        x, y = alone[i].history[-1].train_loss, fused[i].history[-1].train_loss
        assert x == y if not stacked else _rel(x, y) < STACKED_EPOCH3


@pytest.mark.slow
def test_a_group_larger_than_memory_trains_in_chunks(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    cfgs = [RunConfig(seed=s, epochs=1, filter_stats_every=0) for s in range(3)]
    member = Trainer(cfgs[0], tmp_path / "probe", log=lambda s: None)
    member.setup()
    need = footprint_bytes(member)
    params = sum(p.numel() * 4 for p in member.model.parameters())
    assert need > 3 * params  # weights, gradients, momentum, and the activations
    # a device with room for two members (at the planning share) trains 2 + 1
    monkeypatch.setattr(
        fused_mod, "free_memory_bytes", lambda dev: int(2.5 * need / fused_mod.MEMORY_SHARE)
    )
    lines: list[str] = []
    members = [Trainer(c, tmp_path / f"m{i}", log=lambda s: None) for i, c in enumerate(cfgs)]
    ft = FusedTrainer(members, stacked=True, log=lines.append)
    assert ft.capacity() == 2
    results = ft.fit()
    assert any("2 member(s) fit in memory at once; training 2 chunks" in ln for ln in lines)
    alone = _alone(cfgs, tmp_path)
    for a, f in zip(alone, results, strict=True):
        assert _rel(a.history[0].train_loss, f.history[0].train_loss) < STACKED_EPOCH1


@pytest.mark.slow
def test_a_killed_group_resumes_each_member_from_its_checkpoint(tmp_path: Path) -> None:
    cfgs = [RunConfig(seed=s, epochs=3, filter_stats_every=0) for s in range(2)]

    class Stop:  # a sink that stops the job after two epochs of each member
        def __init__(self) -> None:
            self.n = 0

        def on_start(self, *a: object) -> None: ...

        def on_epoch(self, *a: object) -> None:
            self.n += 1
            if self.n == 2:
                raise KeyboardInterrupt

        def should_stop(self, m: object) -> bool:
            return False

    members = [Trainer(c, tmp_path / f"m{i}", log=lambda s: None) for i, c in enumerate(cfgs)]
    for m in members:
        m.sink = Stop()  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        FusedTrainer(members, stacked=False, log=lambda s: None).fit()
    again = [Trainer(c, tmp_path / f"m{i}", log=lambda s: None) for i, c in enumerate(cfgs)]
    resumed = FusedTrainer(again, stacked=False, log=lambda s: None).fit()
    alone = _alone(cfgs, tmp_path)
    for a, r in zip(alone, resumed, strict=True):
        assert [h.train_loss for h in r.history] == [h.train_loss for h in a.history]


# ------------------------------------------------------------------------ the grouping
def test_which_points_fuse() -> None:
    class P:
        def __init__(self, cfg: object) -> None:
            self.cfg = cfg

    pts = [P(compose(f"alpha={a}", f"seed={s}", "method=pgt")) for a in (0.1, 0.3) for s in (0, 1)]
    pts.append(P(compose("model=resnet20", "data=synthetic")))  # another architecture
    pts.append(P(compose("method.grad={_target_: math.sqrt}")))  # custom piece: alone
    pts.append(P(compose("lr=0.05", "weight_decay=0", "momentum=0.5", "method=ls")))
    assert fuse_key(pts[0].cfg) == fuse_key(pts[3].cfg) == fuse_key(pts[6].cfg)
    assert fuse_key(pts[4].cfg) != fuse_key(pts[0].cfg)
    assert why_alone(pts[5].cfg) == "a custom method piece"
    assert fuse_key(compose("epochs=3")) != fuse_key(compose("epochs=4"))
    assert fuse_key(compose("batch_size=32")) != fuse_key(compose())
    jobs = plan_groups(pts, None, 1, ddp=False)  # auto, one slot
    assert [len(j) for j in jobs] == [5, 1, 1]
    assert [len(j) for j in plan_groups(pts, None, 2, ddp=False)] == [3, 2, 1, 1]
    assert [len(j) for j in plan_groups(pts, 2, 1, ddp=False)] == [2, 2, 1, 1, 1]
    assert [len(j) for j in plan_groups(pts, 1, 1, ddp=False)] == [1] * 7  # off
    assert [len(j) for j in plan_groups(pts, None, 1, ddp=True)] == [1] * 7
    assert [len(j) for j in plan_groups(pts * 10, None, math.inf, ddp=False)][0] == SLURM_AUTO_GROUP
    assert describe(7, jobs) == "7 points → 3 jobs: 1 fused (5 members), 2 alone"
    assert describe(4, [pts[:2], pts[2:4]]) == "4 points → 2 fused jobs (2, 2 members)"
    assert LauncherParams(fuse="off").fuse_limit() == 1
    assert LauncherParams(fuse=4).fuse_limit() == 4
    assert LauncherParams().fuse_limit() is None


@pytest.mark.parametrize("bad", ["-1", "0", "banana", "2.5"])
def test_a_bad_fuse_value_is_refused(bad: str, tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    code, err = main_in_process(
        ["-m", f"hydra.launcher.fuse={bad}", "seed=0,1"], capsys, monkeypatch
    )
    assert code == 2
    assert err == [
        f"error: hydra.launcher.fuse={bad} is not allowed; expected auto, off or a group size >= 1"
    ]
    assert not (tmp_path / "results" / "results.db").exists()


# -------------------------------------------------------------- a sweep, end to end
@pytest.mark.slow
def test_a_fused_sweep_records_every_member_as_its_own_run(
    tmp_path: Path,
    seed_mlflow,
    capsys,
    monkeypatch,  # noqa: ANN001
) -> None:
    grid = ["-m", "method=pgt", "alpha=0.05,0.3", "seed=0,1", "epochs=2"]
    seed_mlflow(tmp_path / "results")  # the default store, sqlite:///./results/mlflow.db
    res = run_cli(*grid, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "4 points → 1 fused job (4 members)" in res.stdout
    db = tmp_path / "results" / "results.db"
    rows = sql(db, "SELECT id, status, epoch, mlflow_mirrored, run_dir, train_seconds FROM runs")
    assert len(rows) == 4 and all(r[1] == "done" and r[2] == 2 and r[3] == 1 for r in rows)
    for r in rows:  # its own checkpoint, in its own run folder
        assert (Path(r[4]) / "checkpoint.pt").exists()
    jobs = sql(db, "SELECT DISTINCT job_id FROM sweep_runs")
    assert len(jobs) == 1  # one job trained the four
    # the job's time shared out: the members' times add up to no more than the job's
    assert sum(r[5] for r in rows) <= sum(
        sql(
            db,
            "SELECT (julianday(max(ended_at)) - julianday(min(started_at))) * 86400 FROM runs",
        )[0]
    )
    # each member its own MLflow run, child of the sweep's parent, with every epoch
    ml = tmp_path / "results" / "mlflow.db"
    children = sql(ml, "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                   "WHERE t.key = 'mlflow.parentRunId'")  # fmt: skip
    assert len(children) == 4 and {s for _, s in children} == {"FINISHED"}
    for rid, _ in children:
        steps = sql(ml, "SELECT step FROM metrics WHERE run_uuid = ? AND key = 'test_acc'", rid)
        assert sorted(s for (s,) in steps) == [0, 1]
    # status shows how the sweep's points were run (in this process: it only reads the store)
    monkeypatch.chdir(tmp_path)
    out: list[str] = []
    code, err = main_in_process(["status"], capsys, monkeypatch, out)
    assert code == 0 and "fused" in "\n".join(out), err
    # the same points unfused are the same runs: nothing is trained again (in this process:
    # no job is started)
    out.clear()
    code, err = main_in_process([*grid, "hydra.launcher.fuse=off"], capsys, monkeypatch, out)
    assert code == 0, err
    assert "4 points, 0 to run, 4 already finished" in "\n".join(out)
    assert len(sql(db, "SELECT id FROM runs")) == 4
    assert not (tmp_path / "results" / "logs" / "jobs" / "sweep2").exists()  # no job started


@pytest.mark.slow
def test_a_killed_fused_job_resumes_its_members(tmp_path: Path) -> None:
    """SIGKILL the fused job's process mid-way: the sweeper records its members
    interrupted; the same command resumes each from its checkpoint, a member already done
    is not trained again."""
    # killed after two epochs, two are left to resume (four: as long as needed to be killed
    # mid-way, the resumed job trains the rest)
    grid = ["-m", "seed=0,1", "epochs=4", "mlflow.enabled=false"]
    p = subprocess.Popen([sys.executable, "-m", "sweeper", *grid], cwd=tmp_path, env=cli_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    db = tmp_path / "results" / "results.db"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if poll_sql(db, "SELECT 1 FROM runs WHERE epoch >= 2"):
            break
        time.sleep(0.2)
    # only this test's job (the other test worker may be running jobs of its own)
    mine = f"submitit.core._submit {tmp_path}"
    pids = subprocess.run(["pgrep", "-f", mine], capture_output=True, text=True)
    for pid in pids.stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 1, out
    st = sql(db, "SELECT status FROM runs")
    assert {s for (s,) in st} == {"interrupted"}, out
    res = run_cli(*grid, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "resuming after epoch" in "".join(
        f.read_text() for f in (tmp_path / "results" / "logs" / "jobs").rglob("*_log.out")
    )
    rows = sql(db, "SELECT status, epoch FROM runs")
    assert rows == [("done", 4), ("done", 4)]


@pytest.mark.slow
def test_a_search_with_fuse_n_trains_its_trials_together(tmp_path: Path) -> None:
    """``fuse=2``: the study asks two trials at once and one job trains both; each trial's
    metric reaches the study and each trial is its own run."""
    # one epoch a trial: its metric reaches the study all the same
    res = run_cli("-m", "hydra/sweeper=optuna", "alpha=interval(0.01,1)", "method=pgt",
                  "epochs=1", "mlflow.enabled=false", "hydra.sweeper.n_trials=4",
                  "hydra.sweeper.n_jobs=1", "hydra.launcher.fuse=2", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    db = tmp_path / "results" / "results.db"
    runs = sql(db, "SELECT status FROM runs")
    assert len(runs) == 4 and {s for (s,) in runs} <= {"done", "pruned"}
    jobs = sql(db, "SELECT job_id, count(*) FROM sweep_runs GROUP BY job_id")
    assert sorted(n for _, n in jobs) == [2, 2]  # two fused jobs of two trials
    assert "best trial" in res.stdout
