"""MLflow tells what the results store holds (issue 23): no metric point twice, every run
under its sweep's parent whatever its outcome, a failed run's reason is its exception,
labels with only the keys that matter, ``mirror`` for runs made without MLflow and for
records that fall short, and two processes setting one tracking store up at once.

Real SQLite results stores and real SQLite MLflow tracking stores in tmp dirs, through the
real classes (the store's own writes stand in for a job's; the slow tests at the end run
real sweeps).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import cli_env, compose, poll_sql, sql
from report_stores import add_run, make_config

from analysis.comparisons import SweepVerdicts, sweep_verdicts
from analysis.configs import config_key, point_label
from analysis.sweep import summarize_sweep
from sweeper.config.identity import grid_columns, identity_of, resolved_config
from sweeper.launch.dispatch import tracks_itself
from sweeper.store import RunRecord, RunStatus, Store
from sweeper.tracking.catch_up import catch_up
from sweeper.tracking.client import MlflowRun, open_parent
from sweeper.tracking.describe import point_tags, reason
from sweeper.tracking.record import METRICS, logged_of, sync_run
from sweeper.tracking.sweep import (
    SweepTracker,
    summary_metrics,
    verdicts_markdown,
    write_summary,
)
from trainers.records import EpochMetrics

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ helpers
def _epoch(e: int, acc: float = 40.0) -> EpochMetrics:
    return EpochMetrics(e, 10 * (e + 1), 1.0, 50.0, 1.0, acc + e, 90.0, 2.0, 10.0, 0.1, 1.0,
                        100.0, 1.0, 1.0)  # fmt: skip


def _urls(d: Path) -> tuple[str, str]:
    return f"sqlite:///{d / 'results.db'}", f"sqlite:///{d / 'mlflow.db'}"


def _client(d: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{d / 'mlflow.db'}")


def _new_run(store: Store, d: Path, *overrides: str) -> RunRecord:
    cfg = compose(f"results_dir={d}", "epochs=8", *overrides)
    ident, chash = identity_of(cfg)
    return store.claim_run(chash, grid_columns(cfg), resolved_config(cfg, ident))


def _record(store: Store, run_id: int, token: int, epochs: range) -> None:
    for e in epochs:
        store.record_epoch(run_id, token, _epoch(e), [])


def _steps(d: Path, mlflow_id: str) -> dict[str, list[int]]:
    """Every per-epoch metric's steps, as MLflow holds them (a step twice shows twice)."""
    c = _client(d)
    # None on the CPU (peak memory) or without data.val_split (val_*): never logged
    return {k: sorted(m.step for m in c.get_metric_history(mlflow_id, k)) for k in METRICS
            if k not in ("peak_mem_mb", "val_acc", "val_loss")}  # fmt: skip


def _once_each(d: Path, mlflow_id: str, n: int) -> None:
    steps = _steps(d, mlflow_id)
    assert steps == {k: list(range(n)) for k in steps}, {
        k: [s for s, c in Counter(v).items() if c > 1] or v for k, v in steps.items()
    }


def _tracker(d: Path, sweep_id: int, name: str, warned: list[str],
             every: float = 0.1) -> SweepTracker:  # fmt: skip
    url, uri = _urls(d)
    t = SweepTracker(url, uri, "gradsweep", d, name, {"sweep_command": "x", "n_points": 1},
                     sweep_id, warned.append, every=every)  # fmt: skip
    assert t.wait_parent() is not None, warned
    return t


def _children(d: Path, parent_id: str) -> list[Any]:
    c = _client(d)
    exp = c.get_experiment_by_name("gradsweep")
    return c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.fixture
def results(tmp_path: Path, seed_mlflow) -> Path:  # noqa: ANN001
    """A results dir whose MLflow tracking DB (``mlflow.db``) is a fresh, set-up copy."""
    return seed_mlflow(tmp_path)


# ------------------------------------------------------------------ no point twice
def test_a_run_synced_resumed_and_synced_again_logs_each_step_once(results: Path) -> None:
    """A job's record (sync_run), interrupted after epoch 3 with epoch 3 past its last
    checkpoint, resumed into the same MLflow run: epochs 0-7 once each, for every key."""
    url, uri = _urls(results)
    store = Store(url)
    run = _new_run(store, results)
    t1 = store.claim(run.id, None)
    assert t1 is not None
    store.start_run(run.id, t1, {}, 0)
    _record(store, run.id, t1, range(4))
    first = MlflowRun(uri, "gradsweep", results / "mlartifacts")
    rid = first.open_run(run, None, {}, describe=False)
    assert rid is not None
    logged = logged_of(first)
    assert not sync_run(store, store.get_run_by_id(run.id), first, logged, t1)
    assert not sync_run(store, store.get_run_by_id(run.id), first, logged, t1)  # nothing new
    store.mark_cancelled([(run.id, t1)], "Ctrl-C")
    assert sync_run(store, store.get_run_by_id(run.id), first, logged, t1)
    assert _client(results).get_run(rid).info.status == "KILLED"

    t2 = store.claim(run.id, None)  # resumed from the checkpoint of epoch 2: epoch 3 again
    assert t2 is not None and t2 != t1
    store.start_run(run.id, t2, {}, 3)
    _record(store, run.id, t2, range(3, 8))
    store.finish_run(run.id, RunStatus.done, owner=t2, train_seconds=12.0, gpu_hours=0.0)
    again = MlflowRun(uri, "gradsweep", results / "mlartifacts")
    cur = store.get_run_by_id(run.id)
    assert again.open_run(cur, None, {}, cur.mlflow_run_id, describe=False) == rid
    assert sync_run(store, store.get_run_by_id(run.id), again, logged_of(again), t2)
    _once_each(results, rid, 8)
    got = _client(results).get_run(rid)
    assert got.info.status == "FINISHED" and got.data.tags["status"] == "done"
    assert "reason" not in got.data.tags
    assert len(_client(results).get_metric_history(rid, "train_seconds")) == 1
    # the end time is the store's, not the time the record was completed
    ended = store.get_run_by_id(run.id).ended_at
    assert abs(got.info.end_time - ended.timestamp() * 1000 - _utc_offset_ms(ended)) < 1000
    assert sql(results / "results.db", "SELECT mlflow_mirrored FROM runs") == [(1,)]
    store.dispose()


def _utc_offset_ms(naive_utc: Any) -> float:
    """naive.timestamp() reads local time; the store's times are UTC."""
    import datetime as dt

    return naive_utc.replace(tzinfo=dt.UTC).timestamp() * 1000 - naive_utc.timestamp() * 1000


def test_a_job_that_lost_its_run_writes_nothing_to_mlflow(results: Path) -> None:
    """Taken over (another job claimed the run): the old job's syncs write nothing, the new
    job's reopen reads what MLflow holds, so no step is logged twice."""
    url, uri = _urls(results)
    store = Store(url)
    run = _new_run(store, results)
    old = store.claim(run.id, None)
    store.start_run(run.id, old, {}, 0)
    _record(store, run.id, old, range(2))
    a = MlflowRun(uri, "gradsweep", results / "mlartifacts")
    rid = a.open_run(run, None, {}, describe=False)
    store.set_fields(run.id, mlflow_run_id=rid)
    a_logged = logged_of(a)
    sync_run(store, store.get_run_by_id(run.id), a, a_logged, old)
    # its job is declared dead and the run claimed again; the new job resumes at epoch 2
    assert store.mark_killed([(run.id, old)], "its job 9 ended without recording an outcome")
    new = store.claim(run.id, None)
    store.start_run(run.id, new, {}, 2)
    b = MlflowRun(uri, "gradsweep", results / "mlartifacts")
    cur = store.get_run_by_id(run.id)
    assert b.open_run(cur, None, {}, cur.mlflow_run_id, describe=False) == rid
    b_logged = logged_of(b)
    _record(store, run.id, new, range(2, 5))
    # the old job, not dead after all, syncs: the run is no longer its own
    assert sync_run(store, store.get_run_by_id(run.id), a, a_logged, old)
    assert _steps(results, rid)["test_acc"] == [0, 1]
    assert not sync_run(store, store.get_run_by_id(run.id), b, b_logged, new)
    _once_each(results, rid, 5)
    store.dispose()


def test_the_sweepers_thread_leaves_a_run_another_job_took_over(results: Path) -> None:
    """A fused member whose job was declared dead and whose run another job trains now:
    the first sweep's thread, still running, writes none of the new job's epochs (the new
    job's own record has them, once each). The thread's passes are made here, one at a
    time (its own timer is an hour), so that one falls between the take-over and the new
    job's first sync."""
    url, uri = _urls(results)
    store = Store(url)
    run = _new_run(store, results)
    s1 = store.create_sweep("s1", "-m ...", "local", 2)
    store.link_run(s1.id, run.id, "seed=0")
    t1 = store.claim(run.id, s1.id)
    warned: list[str] = []
    tracker = _tracker(results, s1.id, "s1", warned, every=3600)
    tracker.watch([run.id], [{"sweep_id": str(s1.id), "sweep_name": "s1"}])
    store.start_run(run.id, t1, {}, 0)
    _record(store, run.id, t1, range(2))
    tracker._sync(store)  # the member trains: its record so far
    rid = store.get_run_by_id(run.id).mlflow_run_id
    assert rid and _steps(results, rid)["test_acc"] == [0, 1], warned
    # taken over: declared dead, claimed by another job, which opens the same MLflow run
    assert store.mark_killed([(run.id, t1)], "no heartbeat") == 1
    t2 = store.claim(run.id, None)
    assert t2 is not None
    store.start_run(run.id, t2, {}, 2)
    job = MlflowRun(uri, "gradsweep", results / "mlartifacts")
    cur = store.get_run_by_id(run.id)
    assert job.open_run(cur, None, {}, cur.mlflow_run_id, describe=False) == rid
    logged = logged_of(job)
    _record(store, run.id, t2, range(2, 5))
    tracker._sync(store)  # the first sweep's thread: the run is not its job's any more
    assert _steps(results, rid)["test_acc"] == [0, 1], warned
    store.finish_run(run.id, RunStatus.done, owner=t2, train_seconds=1.0, gpu_hours=0.0)
    assert sync_run(store, store.get_run_by_id(run.id), job, logged, t2)
    tracker.close(failed=True)
    _once_each(results, rid, 5)
    assert _client(results).get_run(rid).info.status == "FINISHED"
    store.dispose()


def test_a_fused_member_resumed_by_a_second_sweep(results: Path) -> None:
    """The sweeper's thread mirrors a fused member (SweepTracker.watch); the sweep is
    interrupted after epoch 3; a second sweep resumes the member: one point per epoch per
    key, and the run moves under the second sweep's parent with that sweep's tags."""
    url, uri = _urls(results)
    store = Store(url)
    run = _new_run(store, results, "method=baseline")
    point = "method=baseline alpha=0.25 seed=0"
    warned: list[str] = []
    s1 = store.create_sweep("s1", "-m ...", "local", 2)
    store.link_run(s1.id, run.id, point)
    t1 = store.claim(run.id, s1.id)
    first = _tracker(results, s1.id, "s1", warned)
    tags = point_tags(point, run.config["identity"])
    first.watch([run.id], [{"sweep_id": str(s1.id), "sweep_name": "s1", **tags,
                            "fused_group": "2"}])  # fmt: skip
    store.start_run(run.id, t1, {}, 0)
    _record(store, run.id, t1, range(2))
    deadline = time.monotonic() + 60
    while (
        not store.get_run_by_id(run.id).mlflow_run_id
        or len(_steps(results, store.get_run_by_id(run.id).mlflow_run_id)["test_acc"]) < 2
    ):  # the thread syncs while the member trains
        assert time.monotonic() < deadline, warned
        time.sleep(0.1)
    _record(store, run.id, t1, range(2, 4))
    store.mark_cancelled([(run.id, t1)], "Ctrl-C")
    first.close(failed=True)
    rid = store.get_run_by_id(run.id).mlflow_run_id
    assert _client(results).get_run(rid).info.status == "KILLED"

    s2 = store.create_sweep("s2", "-m ...", "local", 2)
    store.link_run(s2.id, run.id, point)
    t2 = store.claim(run.id, s2.id)
    second = _tracker(results, s2.id, "s2", warned)
    second.watch([run.id], [{"sweep_id": str(s2.id), "sweep_name": "s2", **tags}])
    store.start_run(run.id, t2, {}, 3)  # from the checkpoint of epoch 2
    _record(store, run.id, t2, range(3, 8))
    store.finish_run(run.id, RunStatus.done, owner=t2, train_seconds=5.0, gpu_hours=0.0)
    second.close(failed=False)
    assert not warned, warned
    assert store.get_run_by_id(run.id).mlflow_run_id == rid  # the same MLflow run
    _once_each(results, rid, 8)
    got = _client(results).get_run(rid)
    p2 = store.sweeps([s2.id])[0].mlflow_parent_run_id
    p1 = store.sweeps([s1.id])[0].mlflow_parent_run_id
    assert got.info.status == "FINISHED"
    assert got.data.tags["mlflow.parentRunId"] == p2 and got.data.tags["sweep_id"] == "2"
    assert got.data.tags["sweep_name"] == "s2" and "fused_group" not in got.data.tags
    assert got.data.tags["config_label"] == "method=baseline"  # alpha: no PGT, no effect
    assert [r.info.run_id for r in _children(results, p2)] == [rid]
    assert _children(results, p1) == []
    parent = _client(results).get_run(p2).data
    assert parent.tags["runs_ended"] == "1/1" and parent.metrics["runs/done"] == 1
    store.dispose()


# ------------------------------------------------------------------ every run under its parent
WRAPPED = """Job (task=0) failed during processing with trace:
----------------------
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/submitit/core/submission.py", line 55, in process_job
    result = delayed.result()
             ^^^^^^^^^^^^^^^^
  File "/repo/trainers/data.py", line 12, in build
    raise ValueError("the data set's files are corrupt")
ValueError: the data set's files are corrupt

----------------------
You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:
  - /r/logs/jobs/sweep1/1_0_log.err
  - /r/logs/jobs/sweep1/1_0_log.out"""


def test_reasons_are_the_exception() -> None:
    assert reason("failed", error=WRAPPED) == "ValueError: the data set's files are corrupt"
    tb = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad data'
    assert reason("failed", error=tb) == "ValueError: bad data"
    chained = (tb + "\n\nDuring handling of the above exception, another exception occurred:"
               "\n\n" + tb.replace("ValueError: bad data", "KeyError: 'x'"))  # fmt: skip
    assert reason("failed", error=chained) == "KeyError: 'x'"
    # a message of ours comes first; the stderr tail after it is not the reason
    ours = "failed: killed twice\njob 3 stderr:\n" + tb
    assert reason("failed", error=ours) == "failed: killed twice"


def test_a_run_that_failed_before_its_mlflow_run_opened(results: Path) -> None:
    """Its job raised before it recorded anything (the sweeper records the failure with
    submitit's error text): mirrored by the sweeper's thread under the sweep's parent, with
    the sweep's tags and the exception as its reason."""
    url, uri = _urls(results)
    store = Store(url)
    run = _new_run(store, results, "method=baseline", "seed=1")
    point = "method=baseline alpha=0.25 seed=1"
    sweep = store.create_sweep("s", "-m ...", "local", 1)
    store.link_run(sweep.id, run.id, point)
    token = store.claim(run.id, sweep.id)
    warned: list[str] = []
    tracker = _tracker(results, sweep.id, "s", warned)
    store.finish_run(run.id, RunStatus.failed, owner=token, error=WRAPPED)
    tracker.ended([run.id])
    tracker.close(failed=False)
    assert not warned, warned
    row = store.get_run_by_id(run.id)
    assert row.mlflow_run_id and row.mlflow_mirrored
    got = _client(results).get_run(row.mlflow_run_id)
    parent = store.sweeps([sweep.id])[0].mlflow_parent_run_id
    assert got.info.status == "FAILED" and got.data.tags["status"] == "failed"
    assert got.data.tags["reason"] == "ValueError: the data set's files are corrupt"
    assert got.data.tags["mlflow.parentRunId"] == parent and got.data.tags["sweep_id"] == "1"
    assert got.data.tags["point"] == point and got.data.tags["config_label"] == "method=baseline"
    store.dispose()


# ------------------------------------------------------------------ labels
def test_labels_carry_only_the_keys_that_matter(results: Path) -> None:
    def ident(*o: str) -> dict:
        return identity_of(compose(f"results_dir={results}", *o))[0]

    base, pgt = ident("method=baseline"), ident("method=pgt")
    assert point_label("method=baseline alpha=0.25 seed=0", base) == "method=baseline"
    assert point_label("method=pgt alpha=0.25 seed=0", pgt) == "method=pgt alpha=0.25"
    assert point_label("method=baseline alpha=0.25") == "method=baseline alpha=0.25"  # no ident
    assert point_label("alpha=0.05", base) == ""  # nothing of this run was swept
    assert point_label("lr=0.1 data.num_workers=2 compile=true", base) == "lr=0.1"
    assert point_label("method.gc_max_norm=2 method.pgt=true", pgt) == "method.pgt=true"
    assert point_label("method.gc_max_norm=2", ident("method=gc")) == "method.gc_max_norm=2"
    adamw = ident("optimizer=adamw")
    assert point_label("optimizer=adamw momentum=0.8", adamw) == "optimizer=adamw"
    assert point_label("optimizer=sgd optimizer.eps=1e-6", base) == "optimizer=sgd"
    assert point_tags("method=baseline alpha=0.25 seed=3", base) == {
        "point": "method=baseline alpha=0.25 seed=3",
        "config_label": "method=baseline",
    }

    # the parent's summary names the configurations the same way
    store = Store(_urls(results)[0])
    sweep = store.create_sweep("s", "-m method=baseline,pgt alpha=0.05,0.25", "local", 4)
    for method, alpha in (("baseline", "0.05"), ("baseline", "0.25"), ("pgt", "0.05")):
        run = _new_run(store, results, f"method={method}", f"alpha={alpha}")
        store.link_run(sweep.id, run.id, f"method={method} alpha={alpha}")
    s = summarize_sweep(store, sweep.id, with_report=False)
    assert sorted(r.label for r in s.rows) == ["method=baseline", "method=pgt alpha=0.05"]
    assert "test_acc.n/method:baseline" in summary_metrics(s)
    store.dispose()


# ------------------------------------------------------------------ verdicts
def test_the_parent_opens_with_the_verdicts_and_tags_each_configuration(results: Path) -> None:
    """A baseline and two treatments x 3 seeds (PGT clearly ahead, GC within noise): the
    description starts with sweep_verdicts' lines, each treatment's verdict is a tag; a
    configuration that loses its verdict loses its tag, and without a comparison the
    description says so."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH

    url, uri = _urls(results)
    store = Store(url)
    sweep = store.create_sweep("v", "-m method=baseline,pgt,gc seed=0,1,2", "local", 9)
    base = [80.0, 80.6, 81.1]
    bump = {"baseline": [0.0] * 3, "pgt": [3.0, 3.2, 2.9], "gc": [0.5, -0.4, 0.3]}
    ids: dict[str, list[int]] = {}
    for method, extra in (("baseline", ""), ("pgt", " alpha=0.25"), ("gc", "")):
        for seed in range(3):
            cfg = make_config(method, 0.25, epochs=3, seed=seed)
            rid = add_run(store, cfg, test=base[seed] + bump[method][seed])
            store.link_run(sweep.id, rid, f"method={method}{extra} seed={seed}")
            ids.setdefault(method, []).append(rid)
    warned: list[str] = []
    parent = open_parent(uri, "gradsweep", results / "mlartifacts", "v", {}, sweep.id,
                         warned.append)  # fmt: skip
    assert parent is not None and parent.run_id, warned

    def shown() -> tuple[str, dict[str, str], SweepVerdicts]:
        write_summary(parent, store, sweep.id, results)
        assert parent.ok and not warned, warned
        tags = _client(results).get_run(parent.run_id).data.tags
        verdicts = {k: v for k, v in tags.items() if k.startswith("verdict/")}
        # the analysis' own verdicts, computed here from the store's runs
        return tags["mlflow.note.content"], verdicts, sweep_verdicts(store.runs())

    key = {m: config_key(make_config(m, 0.25, epochs=3).identity("fp32")) for m in bump}
    note, tags, sv = shown()
    assert len(sv.lines) == 2 and set(sv.by_config) == {key["pgt"], key["gc"]}
    opening = "## Verdicts\n\n" + "\n".join(f"- {line}" for line in sv.lines) + "\n"
    assert note.startswith(opening), note[:1500]
    pgt, gc = sv.by_config[key["pgt"]].result, sv.by_config[key["gc"]].result
    assert (pgt.verdict, gc.verdict) == ("better", "unresolved") and gc.seeds_needed
    assert tags == {
        "verdict/method:pgt alpha:0.25": "better",
        "verdict/method:gc": f"unresolved (needs {gc.seeds_needed} seeds per side)",
    }
    assert all(len(k) <= MAX_ENTITY_KEY_LENGTH for k in tags)
    assert (
        f"## Sweep {sweep.id}: v" in note
        and "**Best configuration**: `method=pgt alpha=0.25`" in note
    )
    folder = results / "logs" / "jobs" / f"sweep{sweep.id}" / "summary"
    assert (folder / "verdicts.md").read_text().startswith(opening)
    # a description too short for every line counts the rest
    short = verdicts_markdown(summarize_sweep(store, sweep.id, with_report=False), 600)
    assert len(short) <= 600 and short.startswith(f"## Verdicts\n\n- {sv.lines[0]}\n- … and 1 ")

    # GC's seeds train again: it has no verdict now, and no tag
    for rid in ids["gc"]:
        store.set_fields(rid, status=RunStatus.running)
    note, tags, sv = shown()
    assert list(sv.by_config) == [key["pgt"]]
    assert note.startswith(f"## Verdicts\n\n- {sv.lines[0]}\n")
    assert tags == {"verdict/method:pgt alpha:0.25": "better"}

    # no baseline left: no comparison, said in one line
    for rid in ids["baseline"]:
        store.set_fields(rid, status=RunStatus.failed)
    note, tags, sv = shown()
    assert not sv.lines and not tags
    assert note.startswith("## Verdicts\n\nNo comparison yet: no setting of this sweep holds")
    parent.end("FINISHED")
    store.dispose()


# ------------------------------------------------------------------ mirror
def _done(store: Store, d: Path, run: RunRecord, token: int, epochs: int = 5) -> None:
    store.start_run(run.id, token, {}, 0)
    _record(store, run.id, token, range(epochs))
    store.finish_run(run.id, RunStatus.done, owner=token, train_seconds=3.0, gpu_hours=0.0)


def _mirror(d: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = catch_up([f"results_dir={d}"])
    return rc, capsys.readouterr().out


def test_mirror_copies_runs_made_without_mlflow_under_a_parent_of_their_sweep(
    results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(_urls(results)[0])
    sweep = store.create_sweep("nomlflow", "-m seed=0,1 mlflow.enabled=false", "local", 2)
    for seed in (0, 1):
        run = _new_run(store, results, f"seed={seed}", "mlflow.enabled=false")
        assert run.config["mlflow"]["enabled"] is False
        store.link_run(sweep.id, run.id, f"seed={seed}")
        _done(store, results, run, store.claim(run.id, sweep.id))
    # its sweeper ended (a live sweeper mirrors its own runs: mirror leaves them to it)
    store.set_sweep_fields(sweep.id, ended_at=sweep.created_at, outcome="finished")
    rc, out = _mirror(results, capsys)
    assert rc == 0 and "mirrored 2 of 2 run(s)" in out and "1 sweep parent run(s) made" in out
    parent = store.sweeps([sweep.id])[0].mlflow_parent_run_id
    kids = _children(results, parent)
    assert len(kids) == 2 and {k.data.tags["sweep_id"] for k in kids} == {"1"}
    for k in kids:
        _once_each(results, k.info.run_id, 5)
        assert k.info.status == "FINISHED" and k.data.tags["mirrored_later"] == "true"
    p = _client(results).get_run(parent)
    assert p.data.tags["runs_ended"] == "2/2" and p.data.metrics["runs/done"] == 2
    assert p.info.status != "RUNNING"
    rc, out = _mirror(results, capsys)
    assert rc == 0 and out.startswith("nothing to mirror") and "2 already complete" in out
    store.dispose()


def test_mirror_completes_a_record_that_lacks_steps_and_rebuilds_one_with_duplicates(
    results: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs marked mirrored: one whose MLflow record stops at epoch 2, one whose record
    holds epoch 1 twice (an earlier version's resume) with system metrics and an artifact
    of its own. ``mirror`` completes the first in place and rebuilds the second."""
    from mlflow.entities import Metric

    url, uri = _urls(results)
    store = Store(url)
    client = _client(results)
    ids = []
    for seed in (0, 1):
        run = _new_run(store, results, f"seed={seed}")
        _done(store, results, run, store.claim(run.id, None))
        m = MlflowRun(uri, "gradsweep", results / "mlartifacts")
        rid = m.open_run(run, None, {}, describe=False)
        for em in store.epoch_metrics(run.id)[: 3 if seed == 0 else 5]:
            m.log_metrics({k: getattr(em, k) for k in METRICS if getattr(em, k) is not None},
                          em.epoch)  # fmt: skip
        m.log_metrics({"train_seconds": 3.0, "gpu_hours": 0.0}, 0)
        if seed == 1:
            em = store.epoch_metrics(run.id)[1]
            client.log_batch(rid, metrics=[Metric("test_acc", em.test_acc, 1, 1)])  # twice
            client.log_batch(rid, metrics=[Metric("system/cpu_utilization_percentage", v,
                                                  1000 + i, i) for i, v in enumerate((5, 7))])  # fmt: skip
            note = results / "notes.txt"
            note.write_text("by hand")
            m.log_artifact(note)
        m.set_tags({"status": "done"})
        m.end("FINISHED")
        store.set_fields(run.id, mlflow_run_id=rid, mlflow_mirrored=True)
        ids.append((run.id, rid))
    rc, out = _mirror(results, capsys)
    assert rc == 0 and "mirrored 2 of 2 run(s)" in out, out
    assert "1 completed" in out and "1 rebuilt" in out
    (a, a_mlflow), (b, b_old) = ids
    assert store.get_run_by_id(a).mlflow_run_id == a_mlflow
    _once_each(results, a_mlflow, 5)
    b_new = store.get_run_by_id(b).mlflow_run_id
    assert b_new != b_old and client.get_run(b_old).info.lifecycle_stage == "deleted"
    _once_each(results, b_new, 5)
    new = client.get_run(b_new)
    assert new.data.tags["rebuilt_from"] == b_old and new.info.status == "FINISHED"
    hist = client.get_metric_history(b_new, "system/cpu_utilization_percentage")
    assert sorted((h.step, h.value) for h in hist) == [(0, 5.0), (1, 7.0)]
    assert "notes.txt" in {f.path for f in client.list_artifacts(b_new)}
    rc, out = _mirror(results, capsys)
    assert rc == 0 and out.startswith("nothing to mirror"), out
    store.dispose()


# ------------------------------------------------------------------ set-up races
RACE = """
import sys, time
from sweeper.tracking.client import init_tracking_store
from mlflow import MlflowClient  # noqa: F401  (imported before the start)
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
print("ready", flush=True)
at = float(sys.stdin.readline())
while time.time() < at:
    time.sleep(0.001)
init_tracking_store(sys.argv[1])
print("ok")
"""


@pytest.mark.slow
def test_processes_setting_up_one_tracking_store_at_once(tmp_path: Path) -> None:
    """Three processes create the same SQLite tracking DB at the same moment (without the
    lock, two of three failed with alembic's CommandError or 'table already exists' in
    every try here): each succeeds and the DB works."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = tmp_path / "race.py"
    script.write_text(RACE)
    procs = [subprocess.Popen([sys.executable, str(script), uri], env=cli_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for _ in range(3)]  # fmt: skip
    try:
        # each says "ready" once it has imported MLflow; then all get one start time
        for p in procs:
            assert p.stdout is not None and p.stderr is not None
            line = p.stdout.readline().strip()
            assert line == "ready", (line, p.stderr.read()[-1500:])
        at = time.time() + 0.3
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{at}\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-1500:] for _, e in outs]
    assert all(o.strip() == "ok" for o, _ in outs)
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    c.get_run(c.create_run(c.create_experiment("x")).info.run_id)


# ------------------------------------------------------------------ real sweeps
BAD_DATA = '''
import os


def corrupt(n: int = 128):
    """Fine for the sweeper's pre-flight; raises in the job (before any row changes)."""
    import torch

    if os.environ.get("SUBMITIT_LOCAL_JOB_ID"):
        raise ValueError("the data set's files are corrupt")
    x = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)  # as many as a batch
    y = torch.arange(n) % 2
    return x, y, x, y
'''


def test_who_keeps_a_sweep_jobs_mlflow_run() -> None:
    """The sweeper's thread keeps the MLflow runs of fused jobs and of jobs whose system
    metrics are surely off (such a job never imports MLflow); a job whose metrics may be on
    keeps its own, so that their monitor watches it from the job's first second."""
    auto, cpu = compose(), compose("device=cpu")
    on, off = compose("mlflow.system_metrics=true"), compose("mlflow.system_metrics=false")
    assert not tracks_itself(on, 2, local_cpu=True)  # fused: always the sweeper
    assert not tracks_itself(auto, 1, local_cpu=True)  # auto on a machine without a GPU
    assert not tracks_itself(cpu, 1, local_cpu=False)  # auto, device=cpu: anywhere
    assert tracks_itself(auto, 1, local_cpu=False)  # auto, maybe a GPU (Slurm, a GPU box)
    assert tracks_itself(on, 1, local_cpu=True)  # asked for: the job's own monitor
    assert not tracks_itself(off, 1, local_cpu=False)


@pytest.mark.slow
def test_a_sweep_whose_jobs_fail_before_mlflow_shows_them_under_its_parent(
    tmp_path: Path,
    seed_mlflow,  # noqa: ANN001
) -> None:
    seed_mlflow(tmp_path / "r")  # the default tracking store, set up (migrations done once)
    (tmp_path / "badlab").mkdir()
    (tmp_path / "badlab" / "__init__.py").write_text("")
    (tmp_path / "badlab" / "data.py").write_text(textwrap.dedent(BAD_DATA))
    env = cli_env(PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    res = subprocess.run([sys.executable, "-m", "sweeper", "-m", "method=baseline,pgt",
                          "alpha=0.05,0.25", "epochs=1", "data._target_=badlab.data.corrupt",
                          "hydra.launcher.fuse=off", f"results_dir={tmp_path / 'r'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    d = tmp_path / "r"
    rows = sql(d / "results.db", "SELECT id, status, mlflow_mirrored, mlflow_run_id FROM runs")
    assert len(rows) == 3 and all(s == "failed" and m == 1 for _, s, m, _ in rows), rows
    (parent,) = sql(d / "results.db", "SELECT mlflow_parent_run_id FROM sweeps")
    kids = _children(d, parent[0])
    assert sorted(k.info.run_id for k in kids) == sorted(r[3] for r in rows)
    labels = set()
    for k in kids:
        assert k.info.status == "FAILED" and k.data.tags["sweep_id"] == "1"
        assert k.data.tags["reason"] == "ValueError: the data set's files are corrupt"
        labels.add(k.data.tags["config_label"])
    assert labels == {"method=baseline", "method=pgt alpha=0.05", "method=pgt alpha=0.25"}
    p = _client(d).get_run(parent[0]).data
    assert p.tags["runs_ended"] == "3/3" and p.metrics["runs/failed"] == 3


def _members_past(db: Path, n: int, epoch: int) -> bool:
    """Whether the store holds ``n`` runs, each past ``epoch`` epochs."""
    rows = poll_sql(db, "SELECT count(*), min(epoch) FROM runs")
    return bool(rows) and rows[0][0] == n and (rows[0][1] or 0) >= epoch


@pytest.mark.slow
def test_a_fused_sweep_interrupted_and_resumed_by_a_second_sweep(
    tmp_path: Path,
    seed_mlflow,  # noqa: ANN001
) -> None:
    """The issue's case through the real CLI: a fused grid stopped with Ctrl-C after its
    members recorded epoch 2, the same command run again: each member's MLflow run has one
    point per epoch per key and sits under the second sweep's parent, which lists them."""
    seed_mlflow(tmp_path)  # the default tracking store, set up (its migrations done once)
    # 6 epochs: stopped after epoch 2, each member still has 3 or more epochs to go (the
    # members of a fused group on a CPU step in turn, so they pass each epoch together),
    # and the second sweep resumes every member mid-way; batch 32 halves an epoch's steps
    args = [sys.executable, "-m", "sweeper", "-m", "method=baseline,pgt", "alpha=0.25,0.5",
            "epochs=6", "batch_size=32", f"results_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not _members_past(tmp_path / "results.db", 3, 2):
            assert time.monotonic() < deadline and proc.poll() is None, "no epochs recorded"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=200)
        assert proc.returncode == 130, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    again = subprocess.run(args, cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "warning" not in again.stdout.lower(), again.stdout[-3000:]
    rows = sql(tmp_path / "results.db", "SELECT mlflow_run_id, status, method FROM runs")
    assert len(rows) == 3 and all(s == "done" for _, s, _ in rows)
    (p1,), (p2,) = sql(tmp_path / "results.db",
                       "SELECT mlflow_parent_run_id FROM sweeps ORDER BY id")  # fmt: skip
    kids = _children(tmp_path, p2)
    assert sorted(k.info.run_id for k in kids) == sorted(r[0] for r in rows)
    assert _children(tmp_path, p1) == []
    for k in kids:
        _once_each(tmp_path, k.info.run_id, 6)
        assert k.data.tags["sweep_id"] == "2" and k.info.status == "FINISHED"
    assert {k.data.tags["config_label"] for k in kids} == {
        "method=baseline",
        "method=pgt alpha=0.25",
        "method=pgt alpha=0.5",
    }
    p = _client(tmp_path).get_run(p2).data
    assert p.tags["runs_ended"] == "3/3" and "test_acc.mean/method:baseline" in p.metrics


def test_a_run_shorter_than_one_sampling_interval_still_shows_system_metrics(
    results: Path,
) -> None:
    """MLflow's monitor drops the samples of its unfinished window when it stops; ours logs
    them, so a short run asked for system metrics has some."""
    from mlflow import MlflowClient

    from sweeper.tracking.client import finish_monitor, system_metrics_monitor

    uri = f"sqlite:///{results / 'mlflow.db'}"
    c = MlflowClient(uri)
    run = c.create_run(c.create_experiment("short"))
    mon = system_metrics_monitor(uri, run.info.run_id)  # MLflow's default window: 10 s
    time.sleep(0.5)
    finish_monitor(mon)
    got = c.get_run(run.info.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in got, sorted(got)
    assert "system/system_memory_usage_megabytes" in got
