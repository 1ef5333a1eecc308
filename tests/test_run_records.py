"""A real run lands in results.db and in the MLflow store, with numbers that check out."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, cli_env, sql, train

from trainers.data import DataConfig, build_data
from trainers.models import build_model

ARGS = ["method=agc_pgt", "alpha=0.3", "epochs=2", "filter_stats_every=22"]
STEPS_PER_EPOCH = 1437 // 64  # digits train split, drop_last


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Path:
    """One real run (a job in this process, as the CLI composes it), MLflow included (in a
    copy of the set-up MLflow DB: conftest's seed_mlflow, for a module-scoped results dir)."""
    res_dir = tmp_path_factory.mktemp("records")
    shutil.copyfile(mlflow_template, res_dir / "mlflow.db")
    assert train(*ARGS, f"results_dir={res_dir}").status == "done"
    return res_dir


@pytest.mark.slow
def test_run_row_has_grid_keys_and_provenance(finished: Path) -> None:
    rows = sql(
        finished / "results.db",
        "SELECT model, method, alpha, data, batch_size, epochs, lr, schedule, "
        "label_smoothing, seed, status, config_hash, host, device, precision, versions, "
        "git_sha, started_at, ended_at, error FROM runs",
    )
    assert len(rows) == 1
    (
        model,
        method,
        alpha,
        data,
        bs,
        epochs,
        lr,
        sched,
        ls,
        seed,
        status,
        chash,
        host,
        device,
        precision,
        versions,
        sha,
        started,
        ended,
        error,
    ) = rows[0]
    assert (model, method, alpha, data, bs, epochs, sched, ls, seed) == (
        "digits_cnn",
        "agc_pgt",
        0.3,
        "digits",
        64,
        2,
        "cosine",
        0.0,
        0,
    )
    assert lr == pytest.approx(0.1 * 64 / 256)
    assert status == "done" and error is None and started <= ended
    assert re.fullmatch(r"[0-9a-f]{64}", chash)
    assert host == socket.gethostname() and device == "cpu" and precision == "fp32"
    assert (
        json.loads(versions)["torch"] == torch.__version__.split("+")[0]
        or json.loads(versions)["torch"] == torch.__version__
    )
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert sha.startswith(head.stdout.strip())


def test_epoch_metrics_and_final_metrics_agree(finished: Path) -> None:
    db = finished / "results.db"
    ep = sql(
        db,
        "SELECT epoch, step, train_acc, test_acc, gap, test_loss, logit_norm, lr, "
        "images_per_s, grad_norm_before, grad_norm_after FROM epoch_metrics "
        "ORDER BY epoch",
    )
    assert [r[0] for r in ep] == [0, 1]
    assert [r[1] for r in ep] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for _, _, tr, te, gap, *_rest in ep:
        assert gap == pytest.approx(tr - te)
    final = sql(db, "SELECT train_acc, test_acc, test_loss, logit_norm FROM runs")[0]
    assert final == pytest.approx((ep[-1][2], ep[-1][3], ep[-1][5], ep[-1][6]))
    for row in ep:
        assert row[8] > 0 and row[9] > 0 and row[10] > 0
        # AGC only ever shrinks gradients
        assert row[10] <= row[9] * (1 + 1e-6)


def test_run_cost_is_recorded(finished: Path) -> None:
    """train_seconds = sum of epoch times, CPU: 0 GPUs, 0 GPU-hours, no GPU memory; the
    run's img/s = total images / total training seconds (harmonic mean of the epochs')."""
    db = finished / "results.db"
    ep = sql(db, "SELECT epoch_time, images_per_s, peak_mem_mb FROM epoch_metrics")
    gpus, secs, gpu_h, ips, mem = sql(
        db, "SELECT gpus, train_seconds, gpu_hours, images_per_s, peak_gpu_mem_mb FROM runs"
    )[0]
    assert gpus == 0 and gpu_h == 0.0 and mem is None
    assert all(r[2] is None for r in ep)
    assert secs == pytest.approx(sum(r[0] for r in ep)) and secs > 0
    images = STEPS_PER_EPOCH * 64
    assert ips == pytest.approx(len(ep) * images / sum(images / r[1] for r in ep))


def _final_model(finished: Path) -> torch.nn.Module:
    ckpt = next(finished.glob("runs/*/checkpoint.pt"))
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 2
    model = build_model("digits_cnn", 10, 1)
    model.load_state_dict(state["model"])
    return model.eval()


def test_test_metrics_recomputed_from_checkpoint(finished: Path) -> None:
    """Accuracy, loss and logit norm re-evaluated independently from the saved weights."""
    model = _final_model(finished)
    data = build_data(DataConfig(name="digits"), 64, 0)
    xs, ys = zip(*data.test.batches(0), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(y) == 360
    with torch.no_grad():
        z = model(x).double().numpy()
    zs = z - z.max(1, keepdims=True)
    logp = zs - np.log(np.exp(zs).sum(1, keepdims=True))
    acc = 100.0 * (z.argmax(1) == y.numpy()).mean()
    loss = -logp[np.arange(len(y)), y.numpy()].mean()
    lnorm = np.linalg.norm(z, axis=1).mean()
    test_acc, test_loss, logit_norm = sql(
        finished / "results.db", "SELECT test_acc, test_loss, logit_norm FROM runs"
    )[0]
    assert test_acc == pytest.approx(acc, abs=1e-9)
    assert test_loss == pytest.approx(loss, rel=1e-5)
    assert logit_norm == pytest.approx(lnorm, rel=1e-5)


def test_filter_stats_match_the_weights(finished: Path) -> None:
    db = finished / "results.db"
    steps = [r[0] for r in sql(db, "SELECT DISTINCT step FROM filter_stats ORDER BY step")]
    assert steps == [0, 22, 44]
    last = sql(
        db,
        "SELECT layer_index, layer_name, n_filters, n_zero, min_norm, median_norm, "
        "max_norm FROM filter_stats WHERE step = 44 ORDER BY layer_index",
    )
    model = _final_model(finished)
    weights = [
        (n, m.weight)
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    assert [r[1] for r in last] == [n for n, _ in weights]
    for i, ((idx, _, n, nz, lo, med, hi), (_, w)) in enumerate(
        zip(last, weights, strict=True), start=1
    ):
        assert idx == i
        norms = np.sqrt((w.detach().double().numpy().reshape(w.shape[0], -1) ** 2).sum(1))
        assert n == w.shape[0] and nz == int((norms < 1e-8).sum())
        assert (lo, hi) == pytest.approx((norms.min(), norms.max()), rel=1e-5)
        # torch.median takes the lower middle value for even counts
        assert med == pytest.approx(np.sort(norms)[(len(norms) - 1) // 2], rel=1e-5)
    # the full vectors are saved per epoch
    f = np.load(next(finished.glob("runs/*/filter_norms/epoch_0001.npz")))
    assert list(f["steps"]) == [44]
    np.testing.assert_allclose(
        f["L001"][0],
        np.sqrt(
            (weights[0][1].detach().double().numpy().reshape(weights[0][1].shape[0], -1) ** 2).sum(
                1
            )
        ),
        rtol=1e-5,
    )


def test_feature_norms_recorded(finished: Path) -> None:
    n_features, zero = sql(finished / "results.db", "SELECT n_features, zero_features FROM runs")[0]
    norms = json.loads(next(finished.glob("runs/*/feature_norms.json")).read_text())
    assert n_features == len(norms) == 128  # digits_cnn's pooled feature width
    assert zero == sum(1 for v in norms if v < 1e-8)


def test_mlflow_has_the_run(finished: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{finished / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gradsweep")
    assert exp is not None
    chash, mlflow_id, mirrored = sql(
        finished / "results.db", "SELECT config_hash, mlflow_run_id, mlflow_mirrored FROM runs"
    )[0]
    runs = client.search_runs([exp.experiment_id], f"tags.config_hash = '{chash}'")
    assert len(runs) == 1 and mirrored == 1
    run = runs[0]
    assert run.info.run_id == mlflow_id and run.info.status == "FINISHED"
    p = run.data.params
    assert p["method.name"] == "agc_pgt" and float(p["alpha"]) == 0.3
    assert float(p["method.agc_clip_factor"]) == 0.01 and p["model"] == "digits_cnn"
    hist = client.get_metric_history(run.info.run_id, "test_acc")
    store = sql(finished / "results.db", "SELECT epoch, test_acc FROM epoch_metrics ORDER BY epoch")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [e for e, _ in store]
    assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx(
        [v for _, v in store]
    )
    secs, gpu_h, started = sql(
        finished / "results.db", "SELECT train_seconds, gpu_hours, started_at FROM runs"
    )[0]
    assert run.data.metrics["train_seconds"] == pytest.approx(secs)
    # the MLflow run was open before training started: the job waits for it, so setting up
    # MLflow does not compete with the timed epochs (their train_seconds)
    started_ms = dt.datetime.fromisoformat(started).replace(tzinfo=dt.UTC).timestamp() * 1000
    assert run.info.start_time <= started_ms + 1
    assert run.data.metrics["gpu_hours"] == gpu_h == 0.0
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    arts |= {a.path for a in client.list_artifacts(run.info.run_id, "filter_norms")}
    assert {
        "feature_norms.json",
        "filter_norms/epoch_0000.npz",
        "filter_norms/epoch_0001.npz",
    } <= arts


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["unreachable", "read_only"])
def test_mlflow_failure_does_not_lose_the_run(outage: str, tmp_path: Path, caplog) -> None:
    back = tmp_path / "mlflow_back.db"
    if outage == "unreachable":
        blocker = tmp_path / "not_a_dir"
        blocker.write_text("x")  # the tracking DB would have to live below a regular file
        uri = f"sqlite:///{blocker}/mlflow.db"
    else:  # an existing MLflow DB opened read-only: reads work, every write is refused
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=f"sqlite:///{back}").search_experiments()
        uri = f"sqlite:///file:{back}?mode=ro&uri=true"
    with caplog.at_level("WARNING", logger="gradsweep"):
        out = train("epochs=2", "filter_stats_every=10", f"results_dir={tmp_path}",
                    f"mlflow.tracking_uri='{uri}'")  # fmt: skip
    assert out.status == "done"
    assert "warning: MLflow" in caplog.text
    assert sql(tmp_path / "results.db", "SELECT status, mlflow_mirrored, epoch FROM runs") == [
        ("done", 0, 2)
    ]
    assert len(sql(tmp_path / "results.db", "SELECT * FROM epoch_metrics")) == 2

    # MLflow is back (here: a reachable tracking DB): the documented command mirrors it, once
    good = f"sqlite:///{back}"
    mirror = [sys.executable, "-m", "sweeper", "mirror", f"results_dir={tmp_path}",
              f"mlflow.tracking_uri={good}"]  # fmt: skip
    first = subprocess.run(mirror, cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "mirrored 1 of 1 run(s)" in first.stdout
    if outage == "unreachable":  # (the second call and bad input once are enough)
        second = subprocess.run(mirror, cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
        assert second.returncode == 0 and "nothing to mirror" in second.stdout
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=good)
    exp = client.get_experiment_by_name("gradsweep")
    (chash, rid, mirrored), = sql(tmp_path / "results.db",
                                  "SELECT config_hash, mlflow_run_id, mlflow_mirrored FROM runs")  # fmt: skip
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [rid] and mirrored == 1  # one run, no duplicate
    assert runs[0].data.tags["config_hash"] == chash and runs[0].info.status == "FINISHED"
    hist = sorted(client.get_metric_history(rid, "test_acc"), key=lambda m: m.step)
    store = sql(tmp_path / "results.db", "SELECT epoch, test_acc FROM epoch_metrics ORDER BY epoch")
    assert [(m.step, m.value) for m in hist] == [(e, pytest.approx(v)) for e, v in store]
    arts = {a.path for a in client.list_artifacts(rid)}
    assert "feature_norms.json" in arts
    if outage == "read_only":
        return
    bad = subprocess.run([*mirror[:4], "colour=red"], cwd=tmp_path, env=cli_env(),
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "colour=red" in bad.stderr
