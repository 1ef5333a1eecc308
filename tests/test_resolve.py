"""``python -m sweeper resolve`` end to end, on digits (3 epochs), with real processes.

A two-seed pilot of three comparisons against one baseline: ``gc`` with a clip that never
binds (``method.gc_max_norm=1e6``) trains exactly like the baseline, a tie the pilot look
resolves at once (equivalent); PGT at α=0.05 and α=0.25 are behind the baseline, but two seeds
(one degree of freedom) leave them unresolved. ``resolve sweep=1 max_seeds=6`` plans seeds
0-5 for both PGT configurations and the baseline and none for gc, prints its plan and its
predicted cost, is killed while training, resumes when run again, and prints the final
verdicts; the same command once more trains nothing and prints the same verdicts; ``status``
shows the resolve sweep and its parent. Bad input is one line, exit 2, nothing written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import cli_env, error_lines, main_in_process, poll_sql, run_cli, sql

pytestmark = pytest.mark.slow

PILOT = ["-m", "epochs=3", "method=baseline,pgt,gc", "alpha=0.05,0.25", "method.gc_max_norm=1e6",
         "seed=0,1"]  # fmt: skip
RESOLVE = ["resolve", "sweep=1", "max_seeds=6"]


def _db(d: Path) -> Path:
    return d / "results" / "results.db"


def _state(d: Path) -> tuple:
    """What a refused command must leave as it was: every table's rows, and the files."""
    db = _db(d)
    rows = tuple(tuple(sql(db, f"SELECT * FROM {t} ORDER BY id"))
                 for t in ("sweeps", "sweep_runs", "runs", "epoch_metrics"))  # fmt: skip
    files = tuple(sorted(str(p.relative_to(d)) for p in d.rglob("*")
                         if not p.name.endswith(("-wal", "-shm"))))  # fmt: skip
    return rows, files


@pytest.fixture(scope="module")
def pilot(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Path:
    """Sweep 1: the pilot (8 runs); sweep 2: gc alone, already trained (no comparison)."""
    import shutil

    d = tmp_path_factory.mktemp("resolve")
    (d / "results").mkdir()
    shutil.copyfile(mlflow_template, d / "results" / "mlflow.db")
    res = run_cli(*PILOT, cwd=d, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "predicted" not in res.stdout  # a store without done runs: no prediction
    res = run_cli("-m", "epochs=3", "method=gc", "method.gc_max_norm=1e6", "seed=0,1", cwd=d)
    assert res.returncode == 0 and "0 to run, 2 already finished" in res.stdout, res.stdout
    return d


def test_a_grid_header_predicts_its_cost_from_similar_done_runs(pilot: Path) -> None:
    """The mean cost of the done runs of the same model, data, batch size and epochs (CPU-h
    here: train_seconds / 3600) times the runs to train, also in a dry run."""
    (mean_s,) = sql(_db(pilot), "SELECT avg(train_seconds) FROM runs WHERE status = 'done' "
                                "AND epochs = 3 AND batch_size = 64")[0]  # fmt: skip
    (n,) = sql(_db(pilot), "SELECT count(*) FROM runs WHERE status = 'done'")[0]
    res = run_cli("-m", "epochs=3", "method=baseline", "seed=7,8,9", "hydra.launcher.dry_run=true",
                  cwd=pilot)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    want = 3 * mean_s / 3600
    shown = f"{want:.2g}" if want < 0.1 else f"{want:.2f}"
    assert f"predicted ~{shown} CPU-h from {n} similar runs" in res.stdout, res.stdout
    other = run_cli("-m", "epochs=4", "method=baseline", "seed=7,8", "hydra.launcher.dry_run=true",
                    cwd=pilot)  # fmt: skip
    assert other.returncode == 0 and "predicted" not in other.stdout, other.stdout


def test_resolve_adds_only_the_seeds_unresolved_comparisons_need(pilot: Path) -> None:
    d, db = pilot, _db(pilot)
    before = sql(db, "SELECT id, config_hash, started_at, ended_at, test_acc FROM runs ORDER BY id")
    assert len(before) == 8

    # the plan and its cost, read only
    state = _state(d)
    dry = run_cli(*RESOLVE, "dry_run=true", cwd=d)
    assert dry.returncode == 0, dry.stderr[-2000:]
    lines = dry.stdout.splitlines()
    gc = next(ln for ln in lines if ln.startswith("  gc "))
    assert "equivalent at 2 seeds → no new seed" in gc, lines
    for alpha in ("0.05", "0.25"):
        ln = next(ln for ln in lines if ln.startswith(f"  pgt α={alpha} vs baseline"))
        assert "unresolved at 2 seeds → 6 seeds per side" in ln and "+4 treatment run(s)" in ln
    assert any(ln.startswith("  baseline — ") and ln.endswith("+4 run(s)") for ln in lines)
    cost = next(ln for ln in lines if "runs to train" in ln)
    assert cost.startswith("12 runs to train, predicted ") and "CPU-h (from 6 done runs" in cost
    assert "dry run: nothing is started or written" in lines
    assert _state(d) == state

    # over budget: refused before anything is written, naming the predicted cost
    over = run_cli(*RESOLVE, "budget=0.000001", cwd=d)
    err = error_lines(over)
    assert over.returncode == 2 and len(err) == 1, over.stderr
    assert "budget=1e-06 CPU-h is less than the plan's predicted" in err[0]
    assert _state(d) == state

    # killed while it trains (SIGTERM = Ctrl-C): its runs interrupted, exit 130
    proc = subprocess.Popen([sys.executable, "-m", "sweeper", *RESOLVE], cwd=d, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        trained = poll_sql(db, "SELECT count(*) FROM epoch_metrics e JOIN sweep_runs l "
                               "ON l.run_id = e.run_id WHERE l.sweep_id = 3")  # fmt: skip
        if trained and trained[0][0] > 0:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGTERM)
    out, err_text = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out[-2000:], err_text[-2000:])
    assert sql(db, "SELECT parent_id FROM sweeps WHERE id = 3") == [(1,)]
    states = dict(sql(db, "SELECT r.status, count(*) FROM runs r JOIN sweep_runs l "
                          "ON l.run_id = r.id WHERE l.sweep_id = 3 GROUP BY r.status"))  # fmt: skip
    assert states.get("interrupted", 0) > 0 and states.get("running", 0) == 0, states

    # the same command resumes and ends with the final verdicts
    again = run_cli(*RESOLVE, cwd=d, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "similar runs (done runs of the same model" in again.stdout  # its grid's header
    verdicts = _verdicts(again.stdout)
    assert len(verdicts) == 3, again.stdout[-3000:]
    assert verdicts[0].startswith("- gc vs baseline") and verdicts[0].endswith("→ equivalent")
    assert "+0.00 pp [+0.00, +0.00]" in verdicts[0]  # bit for bit the baseline's runs
    for v, alpha in zip(verdicts[1:], ("0.05", "0.25"), strict=True):
        assert v.startswith(f"- pgt α={alpha} vs baseline") and "(0/6 seeds) → worse" in v, v

    # every planned seed once, the resolved comparison none, nothing retrained
    rows = sql(db, "SELECT method, alpha, group_concat(seed) FROM (SELECT * FROM runs "
                   "ORDER BY seed) GROUP BY method, alpha ORDER BY method, alpha")  # fmt: skip
    assert rows == [("baseline", None, "0,1,2,3,4,5"), ("gc", None, "0,1"),
                    ("pgt", 0.05, "0,1,2,3,4,5"), ("pgt", 0.25, "0,1,2,3,4,5")]  # fmt: skip
    assert sql(db, "SELECT count(*) FROM runs WHERE status != 'done'") == [(0,)]
    after = sql(db, "SELECT id, config_hash, started_at, ended_at, test_acc FROM runs "
                    "WHERE id <= 8 ORDER BY id")  # fmt: skip
    assert after == before
    assert sql(db, "SELECT parent_id FROM sweeps ORDER BY id") == [(None,), (None,), (1,), (1,)]

    # once more: nothing to train, no sweep recorded, the same verdicts
    third = run_cli(*RESOLVE, cwd=d)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "0 runs to train: every planned seed has its run" in third.stdout
    assert _verdicts(third.stdout) == verdicts
    assert sql(db, "SELECT count(*) FROM sweeps") == [(4,)]

    st = run_cli("status", cwd=d, COLUMNS="250")  # a console wide enough for one line a sweep
    assert st.returncode == 0 and "(resolves sweep 1)" in st.stdout, st.stdout


def _verdicts(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("verdicts on test_acc after"))
    return [ln for ln in lines[start:] if ln.startswith("- ")]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["sweep=99"], "unknown sweep 99; known: 1, 2"),
        (["sweep=2"], "sweep 2 has no comparison to resolve"),
        (["sweep=1", "max_seeds=1"], "max_seeds=1 is not allowed; expected an integer >= 2"),
        (["sweep=1", "budget=-1"], "budget=-1 is not allowed; expected a number of hours >= 0"),
        (["sweep=1", "margin=0"], "margin=0 is not allowed; expected a number > 0"),
        (["sweep=1", "margin=-0.5"], "margin=-0.5 is not allowed; expected a number > 0"),
        (["sweep=1", "metric=top1"], "metric=top1 is not allowed; expected one of test_acc"),
        (["sweep=x"], "sweep=x is not allowed; expected sweep ids"),
        (["sweep=1", "seeds=4"], "resolve does not take 'seeds=4'"),
        (["max_seeds=4"], "resolve needs sweep=ID"),
        (["sweep=1", "model=resnet20"], "sweep 1 has no comparison to resolve"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    pilot: Path,
    args: list[str],
    says: str,
    capsys,
    monkeypatch,  # noqa: ANN001
) -> None:
    """Through the CLI's own entry and error boundary, in this process (its refusals come
    before anything is composed or dispatched); the process-level check is the budget
    refusal above."""
    monkeypatch.chdir(pilot)
    state = _state(pilot)
    code, err = main_in_process(["resolve", *args], capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert _state(pilot) == state


def test_two_pilot_sweeps_and_a_method_filter(pilot: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    """``sweep=1,2`` reads both sweeps' runs (sweep 2's gc runs are sweep 1's: the same
    families); ``method=pgt`` leaves gc out of the comparisons, and out of its family's size.
    Read only: a dry run."""
    monkeypatch.chdir(pilot)
    state = _state(pilot)
    out: list[str] = []
    code, err = main_in_process(["resolve", "sweep=1,2", "max_seeds=6", "dry_run=true"], capsys,
                                monkeypatch, out)  # fmt: skip
    assert code == 0, err
    assert out[0].startswith("resolve sweep 1, 2: 3 comparison(s) on test_acc"), out
    assert sum(ln.startswith(("  gc ", "  pgt ")) for ln in out) == 3
    out.clear()
    code, err = main_in_process(["resolve", "sweep=1", "method=pgt", "max_seeds=6",
                                 "dry_run=true"], capsys, monkeypatch, out)  # fmt: skip
    assert code == 0, err
    assert out[0].startswith("resolve sweep 1: 2 comparison(s)"), out
    assert not any(ln.startswith("  gc ") for ln in out)
    assert _state(pilot) == state
