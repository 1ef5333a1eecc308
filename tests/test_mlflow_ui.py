"""MLflow shows a sweep the way researchers compare runs -- checked on real sweeps, through
MLflow's client, a real ``mlflow server`` (its REST API) and its UI in headless Chromium.

Two real sweeps share one results dir and MLflow store: a fused grid of 2 methods x 2 seeds
(its members tracked by the sweeper, ``sweeper.tracking.sweep.SweepTracker``) and an unfused
pair with one diverging point (each job tracks itself, ``sweeper.tracking.job.JobTracker``),
with MLflow's system metrics asked for on the CPU. The UI screenshots are saved under
``test-artifacts/mlflow_ui/`` in the checkout (or ``$GRADSWEEP_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import cli_env, compose, poll_sql, run_cli, sql, write_cifar10

from analysis.comparisons import sweep_verdicts
from analysis.configs import config_key
from sweeper.config.identity import grid_columns, identity_of, resolved_config
from sweeper.store import RunStatus, Store
from sweeper.tracking.describe import reason, run_params
from sweeper.tracking.sweep import verdict_value
from trainers.catalog import dataset_ref

pytestmark = pytest.mark.slow  # real jobs, servers or browsers

REPO = Path(__file__).resolve().parent.parent
FUSED = ["-m", "method=baseline,pgt", "alpha=0.25", "seed=0,1", "+experiment=smoke"]
UNFUSED = ["-m", "lr=1e6,0.1", "epochs=2", "hydra.launcher.fuse=off",
           "hydra.launcher.max_parallel=2", "mlflow.system_metrics=true"]  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Path:
    d = tmp_path_factory.mktemp("mlflow_ui")
    # the default tracking store (sqlite:///<results_dir>/mlflow.db), set up once per process
    shutil.copyfile(mlflow_template, d / "mlflow.db")
    env = {**cli_env(), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    for args in (FUSED, UNFUSED):
        res = subprocess.run([sys.executable, "-m", "sweeper", *args, f"results_dir={d}"],
                             cwd=d, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "warning" not in res.stdout.lower(), res.stdout[-3000:]
    return d


def _client(d: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{d / 'mlflow.db'}")


def _runs(d: Path, flt: str = "") -> list[Any]:
    c = _client(d)
    exp = c.get_experiment_by_name("gradsweep")
    return c.search_runs([exp.experiment_id], flt, max_results=1000)


def _store_runs(d: Path) -> dict[str, Any]:
    store = Store(f"sqlite:///{d / 'results.db'}", create=False)
    try:
        return {r.mlflow_run_id: r for r in store.runs()}
    finally:
        store.dispose()


def _key(identity: dict[str, Any]) -> str:
    """The seed-free configuration key, from its definition."""
    rest = {k: v for k, v in identity.items() if k != "seed"}
    blob = json.dumps(rest, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------ params and grouping
def test_params_describe_the_run_and_its_data(results: Path) -> None:
    rows = _store_runs(results)
    children = _runs(results, "tags.config_key LIKE '%'")
    assert len(children) == 6  # 4 fused members, 2 unfused runs
    for r in children:
        p = r.data.params
        row = rows[r.info.run_id]
        # the digits' own description, not the synthetic set's knobs
        assert (p["data.name"], p["data.images"], p["data.num_train"], p["data.num_test"],
                p["data.num_classes"]) == ("digits", "1x8x8", "1437", "360", "10")  # fmt: skip
        for other in ("data.image_size", "data.channels", "data.augment", "data.root"):
            assert other not in p
        assert p["data.data_seed"] == "0"
        # the method's own knobs only; alpha only with PGT; the cosine schedule's keys only
        assert not any(k.startswith(("method.gc", "method.agc", "method.znorm")) for k in p)
        assert ("alpha" in p) == (row.method == "pgt")
        assert "schedule.milestones" not in p and p["schedule.name"] == "cosine"
        assert float(p["lr"]) == pytest.approx(row.lr)
        assert p["results_run_id"] == str(row.id)
        # the full resolved config as an artifact, as the store records it
        # (read where MLflow stored it: its download API leaves threads behind in this
        # process, and tests/test_plots.py forks only a thread-free process)
        local = Path(r.info.artifact_uri.removeprefix("file://")) / "config.yaml"
        assert yaml.safe_load(Path(local).read_text()) == json.loads(json.dumps(row.config))


def test_seeds_of_one_configuration_share_a_key(results: Path) -> None:
    rows = _store_runs(results)
    by_key: dict[str, set[tuple[str, float, int]]] = {}
    for r in _runs(results, "tags.config_key LIKE '%'"):
        row = rows[r.info.run_id]
        key = _key(row.config["identity"])
        assert r.data.tags["config_key"] == r.data.params["config_key"] == key
        assert r.data.tags["sweep_id"] in ("1", "2")
        assert r.data.tags["seed"] == str(row.seed)
        by_key.setdefault(key, set()).add((row.method, row.lr, row.seed))
        # the configuration's name in its sweep: the point without its seed
        assert r.data.tags["config_label"] == " ".join(
            t for t in r.data.tags["point"].split() if not t.startswith("seed="))  # fmt: skip
    # baseline and PGT, 2 seeds each; the two learning rates of the unfused sweep
    assert sorted(len(v) for v in by_key.values()) == [1, 1, 2, 2]
    for v in by_key.values():
        assert len({(m, lr) for m, lr, _ in v}) == 1  # one configuration per key


# ------------------------------------------------------------------ the parent's summary
def test_the_parent_run_tells_the_result(results: Path) -> None:
    rows = _store_runs(results)
    c = _client(results)
    (parent,) = _runs(results, "tags.sweep = 'parent' AND tags.sweep_id = '1'")
    assert parent.info.status == "FINISHED"
    m, tags = parent.data.metrics, parent.data.tags
    kids = [rows[r.info.run_id] for r in _runs(results, "tags.sweep_id = '1'")
            if r.data.tags.get("sweep") != "parent"]  # fmt: skip
    assert len(kids) == 4 and all(k.status == RunStatus.done for k in kids)
    means = {}
    for method in ("baseline", "pgt"):
        test = [k.test_acc for k in kids if k.method == method]
        train = [k.train_acc for k in kids if k.method == method]
        name = f"method:{method}"
        assert m[f"test_acc.mean/{name}"] == pytest.approx(statistics.mean(test))
        assert m[f"test_acc.std/{name}"] == pytest.approx(statistics.stdev(test))
        assert m[f"train_acc.mean/{name}"] == pytest.approx(statistics.mean(train))
        assert m[f"train_acc.std/{name}"] == pytest.approx(statistics.stdev(train))
        assert m[f"test_acc.n/{name}"] == 2
        means[method] = statistics.mean(test)
    best = max(means, key=lambda k: means[k])
    assert tags["best_config"] == f"method={best}"
    assert m["best/test_acc.mean"] == pytest.approx(means[best])
    assert (m["runs/done"], m["runs/failed"], m["runs/total"]) == (4, 0, 4)
    assert tags["runs_ended"] == "4/4"
    # progress: runs/done was logged as runs ended, step = runs ended so far
    hist = c.get_metric_history(parent.info.run_id, "runs/done")
    assert hist[-1].step == 4 and hist[-1].value == 4
    note = tags["mlflow.note.content"]
    assert "**Best configuration**: `method=" + best in note
    assert f"{statistics.mean([k.test_acc for k in kids if k.method == 'pgt']):.2f}" in note
    assert "Table 1: baseline vs PGT" in note  # the report's tables
    # it opens with the verdicts, PGT's also a tag (2 seeds a side: judged, if loosely)
    sv = sweep_verdicts(kids)
    (judged,) = sv.by_config.values()
    assert note.startswith(f"## Verdicts\n\n- {sv.lines[0]}\n") and "pgt" in sv.lines[0]
    verdict = {k: v for k, v in tags.items() if k.startswith("verdict/")}
    assert verdict == {"verdict/method:pgt": verdict_value(judged.result)}
    assert verdict["verdict/method:pgt"].split(" (")[0] == judged.result.verdict
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.csv", "report.md"} <= arts


def test_the_unfused_sweep_counts_its_diverged_run(results: Path) -> None:
    (parent,) = _runs(results, "tags.sweep = 'parent' AND tags.sweep_id = '2'")
    m, tags = parent.data.metrics, parent.data.tags
    assert (m["runs/done"], m["runs/diverged"], m["runs/total"]) == (1, 1, 2)
    assert tags["best_config"] == "lr=0.1"
    # two learning rates of the baseline: nothing to compare, said in one line
    assert tags["mlflow.note.content"].startswith("## Verdicts\n\nNo comparison yet: ")
    assert not any(k.startswith("verdict/") for k in tags)
    assert "test_acc.mean/lr:1000000.0" not in m and m["test_acc.n/lr:1000000.0"] == 0


# ------------------------------------------------------------------ inputs and systems
def test_each_run_records_its_data_set_as_an_input(results: Path, tmp_path: Path) -> None:
    digests = set()
    for r in _runs(results, "tags.config_key LIKE '%'"):
        (inp,) = r.inputs.dataset_inputs
        ds = inp.dataset
        assert ds.name == "digits" and ds.source_type == "local"
        assert Path(ds.source.removeprefix("file://")).is_file()  # sklearn's digits.csv.gz
        assert json.loads(ds.profile)["num_train"] == 1437
        digests.add(ds.digest)
    assert len(digests) == 1  # one data set
    # other data never looks alike: another split, other synthetic knobs, changed files
    base = {"name": "digits", "data_seed": 0}
    assert dataset_ref({**base, "data_seed": 1}).digest not in digests
    syn = {"name": "synthetic", "image_size": 8, "num_classes": 10, "channels": 1,
           "num_train": 64, "num_test": 32, "data_seed": 0, "augment": True}  # fmt: skip
    assert dataset_ref(syn).digest != dataset_ref({**syn, "num_train": 65}).digest
    write_cifar10(tmp_path)
    cifar = {"name": "cifar10", "root": str(tmp_path), "augment": True}
    first = dataset_ref(cifar)
    assert first.profile["num_train"] == 50000 and first.source.endswith("cifar-10-batches-py")
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    blob = bytearray(batch.read_bytes())
    blob[-20] ^= 1
    batch.write_bytes(bytes(blob))
    os.utime(batch, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert dataset_ref(cifar).digest != first.digest


def test_system_metrics_when_asked(results: Path) -> None:
    (done,) = _runs(results, "tags.sweep_id = '2' AND tags.status = 'done'")
    assert "system/cpu_utilization_percentage" in done.data.metrics
    assert "system/system_memory_usage_megabytes" in done.data.metrics
    for r in _runs(results, "tags.sweep_id = '1' AND tags.config_key LIKE '%'"):
        assert not any(k.startswith("system/") for k in r.data.metrics)  # auto: GPU jobs only


# ------------------------------------------------------------------ outcomes
def test_outcomes_end_with_a_status_and_a_reason(results: Path) -> None:
    (div,) = _runs(results, "tags.status = 'diverged'")
    assert div.info.status == "FAILED"
    assert div.data.tags["reason"].startswith("diverged: non-finite loss at step ")
    for r in _runs(results, "tags.status = 'done'"):
        assert r.info.status == "FINISHED" and "reason" not in r.data.tags
    tb = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad data'
    assert reason("failed", error=tb) == "ValueError: bad data"
    assert reason("pruned", epoch=3, epochs=10).startswith(
        "pruned by the search's pruner after epoch 3/10"
    )


def test_a_run_the_sweeper_records_killed_is_closed_in_mlflow(
    tmp_path: Path,
    seed_mlflow,  # noqa: ANN001
) -> None:
    """A job SIGKILLed leaves its MLflow run RUNNING; the sweeper, which records the kill in
    the store, closes it KILLED with the store's reason."""
    from sweeper.tracking.client import MlflowRun
    from sweeper.tracking.sweep import SweepTracker

    seed_mlflow(tmp_path)

    cfg = compose(f"results_dir={tmp_path}", "epochs=1")
    ident, chash = identity_of(cfg)
    url, uri = f"sqlite:///{tmp_path / 'results.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = Store(url)
    sweep = store.create_sweep("s", "cmd", "local", 1)
    run = store.claim_run(chash, grid_columns(cfg), resolved_config(cfg, ident))
    store.link_run(sweep.id, run.id, "seed=0")
    token = store.claim(run.id, sweep.id)
    assert token is not None
    store.start_run(run.id, token, {}, 0)
    job_side = MlflowRun(uri, "gradsweep", tmp_path / "mlartifacts")
    rid = job_side.open_run(run, tmp_path / "run", {})
    assert rid is not None
    store.set_fields(run.id, mlflow_run_id=rid)
    warned: list[str] = []
    live = SweepTracker(
        url, uri, "gradsweep", tmp_path, "s", {}, sweep.id, warned.append, every=0.2
    )
    assert live.wait_parent() is not None
    assert (
        store.mark_killed([(run.id, token)], "its job 123 ended without recording an outcome") == 1
    )
    live.ended([run.id])
    live.close(failed=False)
    store.dispose()
    got = _client(tmp_path).get_run(rid)
    assert got.info.status == "KILLED", warned
    assert got.data.tags["status"] == "interrupted"
    assert got.data.tags["reason"].startswith("interrupted: its job 123 ended without recording")
    assert run_params(ident, run.id)["config_key"] == config_key(ident) == _key(ident)


# ------------------------------------------------------------------ as a person would
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(results: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    port = _free_port()
    log = tmp_path_factory.mktemp("mlflow_server") / "server.log"
    # the tracking server and its UI, without MLflow's job runner (huey consumers for
    # GenAI jobs and periodic tasks, processes of their own that outlive a SIGTERM):
    # nothing here runs a job, and it cost about 4 times the server's own CPU
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{results / 'mlflow.db'}"],
            stdout=out, stderr=subprocess.STDOUT, cwd=results, env=env,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("mlflow server did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_rest_api_serves_the_sweep(server: str) -> None:
    exp = _get(f"{server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=gradsweep")
    exp_id = exp["experiment"]["experiment_id"]
    tags = {t["key"]: t["value"] for t in exp["experiment"].get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    found = _get(f"{server}/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [exp_id], "filter": "tags.sweep_id = '1'"})["runs"]  # fmt: skip
    assert len(found) == 5
    parent = next(r for r in found if any(t["key"] == "sweep" for t in r["data"]["tags"]))
    kids = [r for r in found if r is not parent]
    for r in kids:
        params = {p["key"]: p["value"] for p in r["data"]["params"]}
        assert params["data.num_train"] == "1437" and "data.image_size" not in params
        rtags = {t["key"]: t["value"] for t in r["data"]["tags"]}
        assert rtags["mlflow.parentRunId"] == parent["info"]["run_id"]
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert metrics["runs/done"] == 4 and "test_acc.mean/method:pgt" in metrics


def _artifacts_dir() -> Path:
    d = Path(os.environ.get("GRADSWEEP_TEST_ARTIFACTS", REPO / "test-artifacts")) / "mlflow_ui"
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_the_ui_lists_the_runs_and_shows_the_summary(
    server: str, chromium: str, results: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    (parent,) = _runs(results, "tags.sweep = 'parent' AND tags.sweep_id = '1'")
    exp_id, pid = parent.info.experiment_id, parent.info.run_id
    shots = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(90_000)
            # the experiment's runs: both sweeps' parents; a parent opens onto its runs
            page.goto(f"{server}/#/experiments/{exp_id}/runs")
            page.get_by_text(parent.info.run_name, exact=True).first.wait_for()
            assert page.get_by_text("Training runs").count() >= 1  # the model-training view
            row = page.locator(".ag-row", has_text=parent.info.run_name)
            row.locator('button[data-component-id*="runnamecellrenderer"]').click()  # expand
            page.get_by_text("digits_cnn-pgt-a0.25-s1").first.wait_for()
            for name in ("digits_cnn-pgt-a0.25-s0", "digits_cnn-baseline-s0",
                         "digits_cnn-baseline-s1"):  # fmt: skip
                assert page.get_by_text(name, exact=True).count() == 1, name
            page.get_by_text("digits (").first.wait_for()  # the dataset column
            shots.append(tmp_path / "experiment_runs.png")
            page.screenshot(path=str(shots[-1]))
            # the parent run's page: the sweep's summary as its description
            page.goto(f"{server}/#/experiments/{exp_id}/runs/{pid}")
            page.get_by_text("Best configuration").first.wait_for()
            body = page.inner_text("body")
            assert "4 of 4 runs ended" in body
            assert "method=baseline" in body and "method=pgt" in body
            assert "Table 1: baseline vs PGT" in body
            more = page.get_by_text("Show more", exact=True)
            if more.count():  # the description is folded after a few lines
                more.first.click()
                page.get_by_text("Table 1: baseline vs PGT").first.wait_for()
            shots.append(tmp_path / "parent_run.png")
            page.screenshot(path=str(shots[-1]), full_page=True)
        finally:
            browser.close()
    out = _artifacts_dir()
    for s in shots:
        assert s.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and s.stat().st_size > 20_000
        shutil.copy(s, out / s.name)


def test_run_params_of_a_store_run_need_no_mlflow(tmp_path: Path) -> None:
    """The description comes from the run's identity alone (what the store records)."""
    cfg = compose(f"results_dir={tmp_path}", "method=agc_pgt", "data=synthetic")
    ident, _ = identity_of(cfg)
    p = run_params(ident, 7)
    assert p["method.name"] == "agc_pgt" and "method.agc_clip_factor" in p
    assert "method.gc_max_norm" not in p and "alpha" in p
    assert p["data.image_size"] == 32 and p["data.images"] == "3x32x32"
    assert "data.root" not in p


def test_a_single_run_is_described_too(tmp_path: Path, seed_mlflow) -> None:  # noqa: ANN001
    seed_mlflow(tmp_path)  # the default tracking store, set up (its migrations done once)
    res = run_cli("epochs=1", f"results_dir={tmp_path}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (r,) = _runs(tmp_path)
    assert r.data.params["data.num_train"] == "1437"
    assert r.data.tags["config_key"] == r.data.params["config_key"]
    assert r.inputs.dataset_inputs[0].dataset.name == "digits"
    assert "config.yaml" in {a.path for a in _client(tmp_path).list_artifacts(r.info.run_id)}


def test_an_interrupted_run_resumes_its_own_mlflow_run(
    tmp_path: Path,
    seed_mlflow,  # noqa: ANN001
) -> None:
    """SIGTERM (handled as Ctrl-C) after epoch 2 of 8: exit 130 with one line, the run
    ``interrupted`` and its MLflow run KILLED with its reason; the same command resumes it
    into the same MLflow run (no second run), which ends FINISHED without the old reason."""
    seed_mlflow(tmp_path)  # the default tracking store, set up (its migrations done once)
    # stopped after epoch 2, 5 or more epochs still to go (about 0.3 s each here): stopped
    # mid-run, and the rerun resumes it with most of its epochs still to train
    run = ["epochs=8", "batch_size=32", f"results_dir={tmp_path}"]
    args = [sys.executable, "-m", "sweeper", *run]
    # a shell running this suite in the background hands its children SIGINT ignored; give
    # the run Python's own Ctrl-C handling back, as a terminal would
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not poll_sql(tmp_path / "results.db", "SELECT epoch FROM runs WHERE epoch >= 2"):
            assert time.monotonic() < deadline and proc.poll() is None, "no epoch recorded"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, out[-2000:] + err[-2000:]  # stopped, not finished
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err[-2000:]
    assert sql(tmp_path / "results.db", "SELECT status FROM runs") == [("interrupted",)]
    (first,) = _runs(tmp_path)
    assert first.info.status == "KILLED", first.data.tags
    assert first.data.tags["status"] == "interrupted"
    assert first.data.tags["reason"].startswith(
        "interrupted (Ctrl-C, SIGTERM or a cancelled sweep)"
    )
    again = run_cli(*run, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    (run,) = _runs(tmp_path)  # one MLflow run for the one configuration
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["status"] == "done" and "reason" not in run.data.tags
    steps = {m.step for m in _client(tmp_path).get_metric_history(run.info.run_id, "test_acc")}
    assert steps == set(range(8))
