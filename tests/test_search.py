"""``hydra/sweeper=optuna``: the search space, seeded samplers, pruning of real training
jobs, a study continued in the results store, refusals before any trial, the report."""

from __future__ import annotations

import csv
import re
import shutil
import sqlite3
from pathlib import Path

import optuna
import pytest
from helpers import main_in_process, run_cli, sql
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from sweeper.config.compose import CONF_DIR
from sweeper.config.schema import register_configs
from sweeper.config.search import SearchParams
from sweeper.launch.trials import build_sampler, parse_space
from sweeper.store import SCHEMA_VERSION, Store
from trainers.registry import ConfigError

SEED = 3
SEARCH = [
    "-m",
    "hydra/sweeper=optuna",
    "alpha=interval(0.01,1)",
    "method=pgt",
    "+experiment=smoke",
    "epochs=2",  # the pruner decides after epoch 1 of 2 (n_warmup_steps=0)
    "hydra.sweeper.n_jobs=2",
    f"hydra.sweeper.seed={SEED}",
    "hydra.sweeper.pruner=median",
    "hydra.sweeper.n_startup_trials=2",
    "hydra.sweeper.n_warmup_steps=0",
    "sweep_name=alpha-search",
]


def _space(*overrides: str) -> tuple[list, list[str]]:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        base = compose("config")
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    missing = object()

    def value_of(key: str) -> object:
        v = OmegaConf.select(base, key, default=missing)
        if v is missing:
            raise KeyError(key)
        return v

    return parse_space(parsed, value_of)


# ------------------------------------------------------------------------ the space
def test_space_types_come_from_the_config() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dims, fixed = _space(
        "alpha=interval(0.01,1)",
        "lr=tag(log,interval(0.01,0.5))",
        "batch_size=interval(16,128)",
        "epochs=range(2,11,4)",
        "method=pgt,ls_pgt",
        "seed=3",
    )
    d = {x.key: x for x in dims}
    assert fixed == ["seed=3"]
    assert d["alpha"].distribution == FloatDistribution(0.01, 1.0)
    assert d["lr"].distribution == FloatDistribution(0.01, 0.5, log=True)
    assert d["batch_size"].distribution == IntDistribution(16, 128)  # batch_size is an int
    assert d["epochs"].distribution == IntDistribution(2, 10, step=4)
    assert d["epochs"].values == [2, 6, 10]  # Hydra's range excludes its stop
    assert d["method"].distribution == CategoricalDistribution(["pgt", "ls_pgt"])
    assert d["alpha"].override(0.1 + 0.2) == "alpha=0.30000000000000004"  # exact round trip


@pytest.mark.parametrize(
    "override, named",
    [
        ("alpha=interval(1,0)", "the lower bound 1 must be below the upper bound 0"),
        ("alpha=tag(log,interval(0,1))", "a log interval needs a lower bound > 0"),
        ("batch_size=interval(16.5,64)", "batch_size is an integer"),
        ("model=interval(0,1)", "model is a config group"),
        ("colour=interval(0,1)", "unknown key 'colour'"),
        ("epochs=range(5,2)", "the range is empty"),
        ("alpha=tag(sqrt,interval(0.1,1))", "unknown tag 'sqrt'"),
    ],
)
def test_malformed_space_is_one_clear_error(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        _space(override)


def test_nothing_to_search_is_refused() -> None:
    with pytest.raises(ConfigError, match="nothing to search"):
        _space("alpha=0.3")


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("sampler", "annealing", "hydra.sweeper.sampler=annealing is not allowed"),
        ("pruner", "percentile", "hydra.sweeper.pruner=percentile is not allowed"),
        ("metric", "f1", "hydra.sweeper.metric=f1 is not a metric the store records"),
        ("metric", "logit_norm", "set hydra.sweeper.direction"),
        ("direction", "up", "hydra.sweeper.direction=up is not allowed"),
        ("n_trials", 0, "hydra.sweeper.n_trials=0 is not allowed"),
        ("n_jobs", 0, "hydra.sweeper.n_jobs=0 is not allowed"),
    ],
)
def test_bad_search_settings(field: str, value: object, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        SearchParams(**{field: value}).validate()


# ------------------------------------------------------------------- seeded samplers
def _first_suggestions(sampler_name: str, seed: int | None, n: int = 6, offset: int = 0) -> list:
    dims, _ = _space("alpha=interval(0.01,1)", "lr=tag(log,interval(0.01,0.5))")
    if sampler_name == "grid":
        dims, _ = _space("alpha=range(0.1,1.0,0.1)", "method=pgt,ls_pgt")
    params = SearchParams(sampler=sampler_name, seed=seed)
    study = optuna.create_study(
        sampler=build_sampler(params, dims, n_existing=offset), direction="maximize"
    )
    space = {d.key: d.distribution for d in dims}
    out = []
    for i in range(n):
        t = study.ask(space)
        out.append(tuple(sorted(t.params.items())))
        study.tell(t, float(i % 3))  # values steer TPE / CMA-ES once past their start-up
    return out


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "grid"])
def test_fixed_seed_gives_the_same_suggestions(sampler: str) -> None:
    a = _first_suggestions(sampler, 11)
    assert a == _first_suggestions(sampler, 11)
    assert a != _first_suggestions(sampler, 12)
    assert len(set(a)) == len(a)


def test_continued_study_does_not_replay_the_seed() -> None:
    """Raising n_trials must not re-suggest the finished trials' values."""
    fresh = _first_suggestions("random", 5)
    continued = _first_suggestions("random", 5, offset=len(fresh))
    assert not set(fresh) & set(continued)


# --------------------------------------------------------------- the store's schema
V3_COLUMNS = {"runs": ["gpus", "train_seconds", "gpu_hours", "images_per_s", "peak_gpu_mem_mb",
                       "heartbeat_at", "run_dir", "killed_at_epoch"],
              "epoch_metrics": ["peak_mem_mb"]}  # fmt: skip  # columns added after schema 1


def _make_version_1(db: Path) -> None:
    """Turn a fresh store into what gradsweep 0.1 (schema 1) created."""
    Store(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE sweep_runs DROP COLUMN trial")
    for table, cols in V3_COLUMNS.items():
        for c in cols:
            con.execute(f"ALTER TABLE {table} DROP COLUMN {c}")
    con.execute("UPDATE store_info SET schema_version = 1")
    con.commit()
    con.close()


def test_a_version_1_store_is_upgraded(tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    _make_version_1(db)
    con = sqlite3.connect(db)
    con.execute("INSERT INTO sweeps (name, created_at, command, launcher, n_points) "
                "VALUES ('old', '2026-01-01', 'x', 'local', 1)")  # fmt: skip
    con.commit()
    con.close()
    store = Store(f"sqlite:///{db}")
    store.dispose()
    cols = [r[1] for r in sql(db, "PRAGMA table_info(sweep_runs)")]
    assert "trial" in cols
    for table, want in V3_COLUMNS.items():
        have = [r[1] for r in sql(db, f"PRAGMA table_info({table})")]
        assert set(want) <= set(have), (table, have)
    assert sql(db, "SELECT schema_version FROM store_info") == [(SCHEMA_VERSION,)]
    assert sql(db, "SELECT name FROM sweeps") == [("old",)]


def test_analysis_upgrades_an_old_store_before_reading(tmp_path: Path) -> None:
    """The report selects the v3 cost columns: an old store is migrated, not an error."""
    from analysis.queries import RunFilter, load_runs, open_store

    db = tmp_path / "results.db"
    _make_version_1(db)
    store = open_store(f"sqlite:///{db}")
    assert load_runs(store, RunFilter()) == []
    store.dispose()
    assert sql(db, "SELECT schema_version FROM store_info") == [(SCHEMA_VERSION,)]


# ------------------------------------------------------- a real search, end to end
# N trials, two at a time, prove every claim below. Each trial's accuracies are seeded
# (seed 3, one torch thread): epoch-0 test_acc of trials 0-3 is 57.22, 56.94, 57.22, 56.94.
# Trial 3 starts only when two trials have ended, and none can end pruned before two have
# COMPLETED (n_startup_trials=2), so when trial 3 reports epoch 0 the median pruner sees at
# least two of trials 0-2 complete: a median >= 57.08 > 56.94, and trial 3 is PRUNED, in
# whatever order the parallel trials end. Trial 2 (57.22) is never pruned. So 4 trials give
# COMPLETE and PRUNED trials, parallel ones, and a best trial, as the 8 of before did.
N = 4


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> tuple[Path, list]:
    d = tmp_path_factory.mktemp("search")
    (d / "results").mkdir()  # the default MLflow store, set up once per test process
    shutil.copyfile(mlflow_template, d / "results" / "mlflow.db")
    first = run_cli(*SEARCH, f"hydra.sweeper.n_trials={N}", cwd=d, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return d, [first]


def _trials(db: Path) -> list[tuple]:
    return sql(
        db,
        "SELECT t.number, t.state, p.param_value FROM trials t "
        "JOIN trial_params p ON p.trial_id = t.trial_id AND p.param_name = 'alpha' "
        "ORDER BY t.number",
    )


@pytest.mark.slow
def test_the_trials_end_complete_or_pruned_with_a_run_each(search: tuple[Path, list]) -> None:
    d, (res, *_) = search
    db = d / "results" / "results.db"
    trials = _trials(db)
    assert [t[0] for t in trials][:N] == list(range(N))
    assert all(state in ("COMPLETE", "PRUNED") for _, state, _ in trials[:N])
    # every trial is an ordinary run, linked to the search's sweep with its trial number
    links = sql(
        db,
        "SELECT sr.trial, r.alpha, r.status, r.epoch FROM sweep_runs sr "
        "JOIN runs r ON r.id = sr.run_id JOIN sweeps s ON s.id = sr.sweep_id "
        "WHERE s.id = 1 ORDER BY sr.trial",
    )
    assert [x[0] for x in links] == list(range(N))
    for (number, state, alpha), (_, run_alpha, status, epochs) in zip(trials, links, strict=False):
        assert run_alpha == pytest.approx(alpha, rel=1e-12)
        assert status == {"COMPLETE": "done", "PRUNED": "pruned"}[state], number
        assert (epochs == 2) == (state == "COMPLETE")
    # the best trial is printed with its metric, and it is the store's best run
    m = re.search(r"best trial (\d+): alpha=(\S+)  test_acc (\S+)  \(run (\d+)\)", res.stdout)
    assert m, res.stdout[-2000:]
    best = sql(db, "SELECT id, alpha, test_acc FROM runs WHERE status = 'done' "
                   "ORDER BY test_acc DESC, id LIMIT 1")[0]  # fmt: skip
    assert float(m.group(3)) == pytest.approx(best[2], abs=1e-4)
    assert float(m.group(2)) == pytest.approx(best[1], rel=1e-5)


@pytest.mark.slow  # the module's search: real jobs
def test_jobs_report_every_epoch_and_the_pruner_stops_some(search: tuple[Path, list]) -> None:
    d, _ = search
    db = d / "results" / "results.db"
    rows = sql(
        db,
        "SELECT t.number, t.state, v.step, v.intermediate_value FROM trials t "
        "JOIN trial_intermediate_values v ON v.trial_id = t.trial_id "
        "WHERE t.number < ? ORDER BY t.number, v.step",
        N,
    )
    steps: dict[int, list[int]] = {}
    for number, _state, step, _ in rows:
        steps.setdefault(number, []).append(step)
    states = dict((n, s) for n, s, _ in _trials(db))
    assert set(steps) == set(range(N))  # every trial's job reported
    pruned = [n for n in range(N) if states[n] == "PRUNED"]
    assert pruned, "the median pruner stopped no trial"
    for n in range(N):
        assert steps[n] == list(range(2 if states[n] == "COMPLETE" else len(steps[n])))
        if states[n] == "PRUNED":
            assert len(steps[n]) < 2
    # the reported values are the runs' per-epoch test accuracy, from the jobs themselves
    for number, _state, step, value in rows:
        (acc,) = sql(
            db,
            "SELECT e.test_acc FROM epoch_metrics e JOIN sweep_runs sr ON sr.run_id = e.run_id "
            "WHERE sr.trial = ? AND sr.sweep_id = 1 AND e.epoch = ?",
            number,
            step,
        )[0]
        assert value == pytest.approx(acc)


@pytest.mark.slow  # the module's search: real jobs
def test_seeded_search_suggests_what_a_fresh_seeded_study_does(search: tuple[Path, list]) -> None:
    d, _ = search
    alphas = [a for _, _, a in _trials(d / "results" / "results.db")][:N]
    dims, _ = _space("alpha=interval(0.01,1)")
    fresh = optuna.create_study(sampler=build_sampler(SearchParams(seed=SEED), dims))
    expected = [fresh.ask({"alpha": dims[0].distribution}).params["alpha"] for _ in range(N)]
    # TPE's first 10 suggestions come from its seeded start-up sampler, whatever the order
    # in which the parallel trials end
    assert alphas == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
def test_trials_are_runs_in_mlflow_tagged_with_their_number(search: tuple[Path, list]) -> None:
    from mlflow import MlflowClient

    d, _ = search
    client = MlflowClient(f"sqlite:///{d / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gradsweep")
    runs = client.search_runs([exp.experiment_id], "tags.optuna_study = 'alpha-search'")
    tagged = sorted(int(r.data.tags["optuna_trial"]) for r in runs)
    assert tagged[:N] == list(range(N))
    for r in runs:
        assert r.data.tags["status"] in ("done", "pruned")
        assert "mlflow.parentRunId" in r.data.tags
    # the search's parent run names its best trial: one with Optuna's best value (ties are
    # possible: 360 test images)
    study = optuna.load_study(study_name="alpha-search",
                              storage=f"sqlite:///{d / 'results' / 'results.db'}")  # fmt: skip
    (parent,) = client.search_runs([exp.experiment_id], "tags.sweep = 'parent'")
    best = int(parent.data.tags["best_trial"])
    assert study.trials[best].value == pytest.approx(study.best_value)
    assert parent.data.metrics["best/test_acc"] == pytest.approx(study.best_value)
    assert parent.data.metrics["best/trial"] == best
    assert f"**Best trial**: {best} " in parent.data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_rerun_with_more_trials_adds_exactly_the_difference(
    search: tuple[Path, list], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, results = search
    more = N + 2
    again = run_cli(*SEARCH, f"hydra.sweeper.n_trials={more}", cwd=d, timeout=600)
    results.append(again)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{N} finished trials, 0 to resume, 2 to start (n_trials={more})" in again.stdout
    db = d / "results" / "results.db"
    trials = _trials(db)
    assert [t[0] for t in trials] == list(range(more))
    assert sql(db, "SELECT COUNT(*) FROM runs") == [(more,)]
    alphas = [a for _, _, a in trials]
    assert len(set(alphas)) == more  # a continued study does not repeat finished trials
    # and once the study holds n_trials, the same command starts nothing (the CLI's own
    # entry in this process: what it starts is the point, not its process)
    monkeypatch.chdir(d)
    out: list[str] = []
    code, err = main_in_process([*SEARCH, f"hydra.sweeper.n_trials={more}"], capsys,
                                monkeypatch, out)  # fmt: skip
    assert code == 0, err[-20:]
    assert any("nothing to start" in ln for ln in out), out[-20:]
    assert sql(db, "SELECT COUNT(*) FROM trials") == [(more,)]


@pytest.mark.slow
def test_report_has_history_importances_and_best_trial(
    search: tuple[Path, list], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from analysis.__main__ import main  # python -m analysis, in this process

    d, _ = search
    monkeypatch.chdir(d)
    capsys.readouterr()
    code = main(["--results-dir", "results", "--out", "rep"])
    got = capsys.readouterr()
    assert code == 0, got.err[-2000:]
    assert "## Optuna studies: best trials" in got.out
    rows = list(csv.DictReader((d / "rep" / "optuna_studies.csv").open()))
    assert len(rows) == 1 and rows[0]["study"] == "alpha-search"
    states = [t[1] for t in _trials(d / "results" / "results.db")]
    assert int(rows[0]["trials"]) == len(states)
    assert int(rows[0]["pruned"]) == states.count("PRUNED")
    best = sql(d / "results" / "results.db", "SELECT MAX(test_acc) FROM runs WHERE status='done'")
    assert float(rows[0]["best value"]) == pytest.approx(best[0][0], rel=1e-5)
    trials = list(csv.DictReader((d / "rep" / "optuna_trials.csv").open()))
    assert len(trials) == len(states)
    imp = list(csv.DictReader((d / "rep" / "optuna_importances.csv").open()))
    assert [(r["parameter"], float(r["importance"])) for r in imp] == [("alpha", 1.0)]
    assert (d / "rep" / "figures" / "optuna_history_alpha-search.png").stat().st_size > 1000
    html = (d / "rep" / "report.html").read_text()
    assert "Optuna study alpha-search: optimisation history" in html


# ------------------------------------------------------------- refused up front
@pytest.mark.parametrize(
    "args, named",
    [
        (["alpha=interval(1,0)"], "alpha=interval(1,0): the lower bound 1 must be below"),
        (["alpha=interval(0.01,1)", "hydra.sweeper.sampler=sobol"], "sampler=sobol"),
        (["alpha=interval(0.01,1)", "hydra.sweeper.pruner=patient"], "pruner=patient"),
        (["alpha=interval(0.01,1)", "hydra.sweeper.metric=f1"], "metric=f1 is not a metric"),
        (["alpha=interval(0.5,2)"], "alpha=2.0 is not allowed"),
        (["alpha=interval(0.1,1)", "hydra.sweeper.n_trials=many"], "n_trials"),
    ],
)
def test_bad_search_refused_before_any_trial(
    args: list[str], named: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, lines = main_in_process(["-m", "hydra/sweeper=optuna", "+experiment=smoke", *args],
                                  capsys, monkeypatch)  # fmt: skip
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not list(tmp_path.rglob("results.db"))  # no store, no study, no run


# --------------------------------------------------- pruned in the trainer, resumable
class _PruneAfterFirstEpoch:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_start(self, resume_epoch: int, device: str, precision: str) -> None:
        pass

    def on_epoch(self, metrics, filter_stats, filter_file) -> None:  # noqa: ANN001
        self.seen.append(metrics.epoch)

    def should_stop(self, metrics) -> bool:  # noqa: ANN001
        return True


@pytest.mark.slow
def test_pruned_run_stops_after_its_checkpoint_and_a_grid_can_finish_it(tmp_path: Path) -> None:
    """A pruned trial keeps its checkpoint: asked for again (e.g. by a grid), the run
    resumes and ends exactly where an uninterrupted run does."""
    import torch

    from trainers.config import MethodConf, ModelConf, RunConfig
    from trainers.data import DataConfig
    from trainers.train import Trainer

    torch.set_num_threads(1)
    cfg = dict(
        model=ModelConf("digits_cnn"),
        method=MethodConf.preset("pgt"),
        data=DataConfig(name="digits"),
        epochs=2,  # pruned after epoch 0, resumed for epoch 1 from the checkpoint
        filter_stats_every=0,
    )
    sink = _PruneAfterFirstEpoch()
    pruned = Trainer(RunConfig(**cfg), tmp_path / "a", sink=sink, log=lambda _m: None).fit()  # type: ignore[arg-type]
    assert pruned.status == "pruned" and sink.seen == [0] and len(pruned.history) == 1
    finished = Trainer(RunConfig(**cfg), tmp_path / "a", log=lambda _m: None).fit()  # type: ignore[arg-type]
    straight = Trainer(RunConfig(**cfg), tmp_path / "b", log=lambda _m: None).fit()  # type: ignore[arg-type]
    assert finished.status == straight.status == "done"
    assert [h.test_acc for h in finished.history] == [h.test_acc for h in straight.history]
    assert finished.history[-1].train_loss == straight.history[-1].train_loss
