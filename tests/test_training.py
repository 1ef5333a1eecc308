"""Trainer behaviour: real datasets through a job, divergence, schedules, run identity.

Runs here go through :func:`sweeper.launch.job.run_job` in this process (composed like the CLI
does): the process itself is not what these tests are about."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import sql, train, write_cifar10, write_imagefolder

from sweeper.config.identity import identity_of
from trainers.config import MethodConf, ModelConf, RunConfig, ScheduleConf
from trainers.data import DataConfig
from trainers.schedule import lr_at
from trainers.train import Trainer


def test_cifar10_files_train_through_a_job(tmp_path: Path) -> None:
    write_cifar10(tmp_path)  # the real python-pickle format, 100 train / 10 test images
    out = train(
        "data=cifar10",
        f"data.root={tmp_path}",
        "model=resnet20",
        "epochs=1",
        "batch_size=16",
        "method=ls_pgt",
        "mlflow.enabled=false",
        f"results_dir={tmp_path / 'res'}",
    )
    assert out.status == "done"
    assert sql(
        tmp_path / "res" / "results.db", "SELECT data, model, status, n_features FROM runs"
    ) == [("cifar10", "resnet20", "done", 64)]


def test_imagefolder_trains_through_a_job(tmp_path: Path) -> None:
    write_imagefolder(
        tmp_path, {"train": {"ant": 4, "bee": 4, "cat": 4}, "val": {"ant": 2, "bee": 2, "cat": 2}}
    )
    out = train(
        "data=imagenet",
        f"data.root={tmp_path}",
        "data.image_size=32",
        "data.num_workers=0",
        "model=resnet18_nobn",
        "epochs=1",
        "batch_size=4",
        "mlflow.enabled=false",
        f"results_dir={tmp_path / 'res'}",
    )
    assert out.status == "done"
    assert sql(tmp_path / "res" / "results.db", "SELECT status, n_features FROM runs") == [
        ("done", 512)
    ]


def test_divergence_is_recorded_not_a_crash(tmp_path: Path, caplog) -> None:
    with caplog.at_level("INFO", logger="gradsweep"):
        out = train("lr=1e6", "epochs=3", "mlflow.enabled=false", f"results_dir={tmp_path}")
    assert out.status == "diverged"
    assert "non-finite" in caplog.text
    ((status, step, error),) = sql(
        tmp_path / "results.db", "SELECT status, diverged_step, error FROM runs"
    )
    assert status == "diverged" and error is None
    assert 0 <= step < 3 * (1437 // 64)


def _cfg(**kw: object) -> RunConfig:
    base = dict(
        model=ModelConf("digits_cnn"),
        data=DataConfig(name="digits"),
        epochs=2,
        filter_stats_every=0,
    )
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


def test_diverged_step_is_exact_whatever_the_sync_interval(tmp_path: Path) -> None:
    steps = set()
    for every in (1, 7, 50):
        t = Trainer(_cfg(lr=1e6, check_every=every), tmp_path / f"c{every}")
        result = t.fit()
        assert result.status == "diverged"
        steps.add(result.diverged_step)
    assert len(steps) == 1


def test_warmup_then_cosine_and_step() -> None:
    s = ScheduleConf(name="cosine", warmup_epochs=5, warmup_start_factor=1e-3, min_lr=0.0)
    spe, peak = 10, 0.4
    assert lr_at(0, spe, 100, peak, s) == pytest.approx(4e-4)  # paper: 4e-4 -> 0.4
    assert lr_at(25, spe, 100, peak, s) == pytest.approx(4e-4 + (0.4 - 4e-4) * 0.5)
    assert lr_at(50, spe, 100, peak, s) == pytest.approx(0.4)
    mid = 50 + (1000 - 50) // 2
    assert lr_at(mid, spe, 100, peak, s) == pytest.approx(0.2, rel=1e-2)
    assert lr_at(999, spe, 100, peak, s) < 1e-5
    st = ScheduleConf(name="step", warmup_epochs=5, milestones=[30, 60, 90], gamma=0.1)
    assert [lr_at(e * spe, spe, 100, peak, st) for e in (10, 30, 59, 60, 95)] == pytest.approx(
        [0.4, 0.04, 0.04, 0.004, 0.0004]
    )


def test_run_identity() -> None:
    base = _cfg(method=MethodConf.preset("baseline"))
    h = identity_of(base)[1]
    assert (
        identity_of(_cfg(method=MethodConf.preset("baseline"), alpha=0.05))[1] == h
    )  # alpha unused
    pgt = identity_of(_cfg(method=MethodConf.preset("pgt"), alpha=0.05))[1]
    assert pgt != h and pgt != identity_of(_cfg(method=MethodConf.preset("pgt"), alpha=0.3))[1]
    assert identity_of(_cfg(seed=1))[1] != h
    assert identity_of(_cfg(check_every=3, compile=False))[1] == h  # speed-only switches
    # resolved lr: linear scaling by batch size is what defines the run
    assert identity_of(_cfg(batch_size=128, lr=0.05))[0]["lr"] == pytest.approx(
        identity_of(_cfg(batch_size=64, lr=0.1))[0]["lr"]
    )
    assert math.isclose(_cfg(batch_size=1024, lr=0.1).resolved_lr(), 0.4)  # the paper's peak
