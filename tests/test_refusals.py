"""Refused means untouched: what the pre-flight refuses, for a run, a sweep and a search.

Each kind of refusal goes through the real CLI in a process once per mode (a run, a sweep, a
search), in a folder of its own with the default ``results_dir=./results``: exit 2, exactly
one line on stderr naming the bad value, no traceback, and the folder exactly as it was (no
``results/``, no ``outputs/``, no ``.hydra/``, no ``gradsweep.log``). Its variants (other
knobs, other groups' keys, the same check in another mode) go through the same entry in this
process (:func:`helpers.main_in_process`: ``sweeper.cli.main``, the function ``python -m
sweeper`` calls, with its error boundary; the refusal is raised by the same pre-flight
before Hydra writes anything), with the same checks of the exit status, the line and the
folder; a traceback there would be a second line.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, error_lines, main_in_process, run_cli

HUGE = "1" * 5000  # beyond what Python reads as an integer (4300 digits)
SHOWN = "1111...1111 (5000 digits)"
BEYOND_64_BITS = "1" + "0" * 30
FAST = ["epochs=1", "mlflow.enabled=false"]


def _fast(args: list[str]) -> list[str]:
    """``args`` then the FAST settings they do not set (after: Hydra's parser takes its
    flags, ``-m`` or ``--cfg job``, before the overrides)."""
    keys = {a.split("=", 1)[0] for a in args}
    return [*args, *(f for f in FAST if f.split("=", 1)[0] not in keys)]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _refused(args: list[str], cwd: Path, **env: str) -> str:
    """``python -m sweeper ARGS`` in ``cwd``: refused in one line, nothing written; the line."""
    before = _tree(cwd)
    res = run_cli(*args, cwd=cwd, **env)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    lines = error_lines(res)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert _tree(cwd) == before, "refused input changed the folder it ran in"
    return lines[0]


MISSING_STORE = "store.url=sqlite:///missing/results.db"
SEARCH = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "alpha=interval(0.1,0.5)"]
CASES = {
    # the store: a single run used to leave Hydra's run folder (.hydra/, gradsweep.log),
    # a sweep and a search an empty ./results
    "run-store-folder-missing": ([MISSING_STORE], ["missing/results.db", "does not exist"]),
    "sweep-store-folder-missing": (["-m", "seed=0,1", MISSING_STORE], ["does not exist"]),
    "search-store-folder-missing": ([*SEARCH, MISSING_STORE], ["does not exist"]),
    # numbers Python cannot read, named with what their key allows
    "run-huge-alpha": ([f"alpha={HUGE}"], [f"alpha={SHOWN} is not allowed", "(0, 1]"]),
    # what the job's loader would refuse, known before: it used to leave results/results.db
    "run-batch-beyond-the-data": (["batch_size=2000"], ["batch_size=2000", "1437 training"]),
    # keys: the nearest known one, and the keys of the node the key was put in
    "search-sweeper-typo": (
        [*SEARCH, "hydra.sweeper.n_trails=2"],
        ["did you mean 'hydra.sweeper.n_trials'?", "sampler, seed, metric"],
    ),
}


@pytest.mark.parametrize(("args", "named"), CASES.values(), ids=CASES.keys())
def test_refused_in_one_line_and_nothing_written(args: list[str], named: list[str],
                                                 tmp_path: Path) -> None:  # fmt: skip
    line = _refused(_fast(args), tmp_path)
    assert all(n in line for n in named), line
    assert "hydra." not in line or "model, method" not in line  # not the top level's keys


def test_an_existing_file_that_is_not_a_store_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_text("not a database\n")
    line = _refused(["-m", "seed=0,1", "store.url=sqlite:///notes.db", *FAST], tmp_path)
    assert "notes.db is not a SQLite database" in line
    assert (tmp_path / "notes.db").read_text() == "not a database\n"


# the same kinds of refusal for other knobs, nodes and modes, through the CLI's entry in process
IN_PROCESS = {
    "sweep-huge-lr": (["-m", f"lr=0.1,{HUGE}"], [f"lr={SHOWN} is not allowed", "> 0"]),
    "run-epochs-beyond-64-bits": ([f"epochs={BEYOND_64_BITS}"], ["epochs=1000", "2**63"]),
    # MLflow's own limit, before training (it used to warn and train without MLflow)
    "run-mlflow-experiment-too-long": (
        [f"mlflow.experiment={'x' * 501}"],
        ["mlflow.experiment=xxxx", "(501 characters)", "1 to 500 characters"],
    ),
    "run-typo": (["alpah=0.3"], ["unknown key 'alpah'; did you mean 'alpha'?"]),
    "sweep-typo": (["-m", "alpah=0.3,0.4"], ["unknown key 'alpah'; did you mean 'alpha'?"]),
    "sweep-launcher-key": (
        ["-m", "seed=0,1", "hydra.launcher.foo=1"],
        ["unknown key 'hydra.launcher.foo'", "known keys of hydra.launcher: kind, max_parallel"],
    ),
    **{
        f"huge-{k}": ([f"{k}={HUGE}"], [f"{k}={SHOWN}", allowed])
        for k, allowed in (
            ("epochs", "below 2**63"),
            ("batch_size", "below 2**63"),
            ("seed", "[0, 2**32)"),
            ("momentum", "[0, 1)"),
            ("data.data_seed", "[0, 2**32)"),
        )
    },
    "huge-negative-epochs": ([f"epochs=-{HUGE}"], [f"epochs=-{SHOWN}", ">= 1"]),
    "huge-without-a-check": ([f"hydra.launcher.max_parallel={HUGE}"], ["at most 300 digits"]),
    "huge-int-as-float": ([f"lr=1{'0' * 400}"], ["lr=1000...0000 (401 digits)", "> 0"]),
    **{
        f"beyond-64-bits-{k}": ([f"{k}={BEYOND_64_BITS}"], [f"{k}=1000", "below 2**63"])
        for k in ("batch_size", "check_every", "filter_stats_every")
    },
    "milestone-beyond-64-bits": (
        ["schedule=step", f"schedule.milestones=[2,{BEYOND_64_BITS}]"],
        ["schedule.milestones=[2, 1000", "below 2**63"],
    ),
    "synthetic-no-images": (
        ["data=synthetic", "data.num_train=0"],
        ["data.num_train=0 must be positive for synthetic"],
    ),
    "mlflow-experiment-empty": (["mlflow.experiment="], ["mlflow.experiment= is not allowed"]),
    "typo-method": (["method.pgtt=true"], ["did you mean 'method.pgt'?", "keys of method"]),
    "typo-data": (["data=synthetic", "data.num_trian=5"], ["did you mean 'data.num_train'?"]),
    "typo-mlflow": (["mlflow.enabeld=false"], ["did you mean 'mlflow.enabled'?"]),
    "typo-store": (["store.ulr=x"], ["did you mean 'store.url'?", "keys of store: url"]),
    "typo-schedule": (["schedule.warmup_epoch=1"], ["did you mean 'schedule.warmup_epochs'?"]),
    "typo-launcher": (
        ["-m", "hydra.launcher.max_paralel=2"],
        ["did you mean 'hydra.launcher.max_parallel'?"],
    ),
    "typo-slurm-launcher": (
        ["-m", "hydra/launcher=slurm", "hydra.launcher.partiton=gpu"],
        ["did you mean 'hydra.launcher.partition'?", "mem_gb"],
    ),
    "grid-sweeper-key": (
        ["-m", "hydra.sweeper.n_trials=3"],
        ["keys of hydra.sweeper: params", "hydra/sweeper=optuna"],
    ),
    "typo-hydra": (["hydra.job.nam=x"], ["did you mean 'hydra.job.name'?", "keys of hydra.job"]),
    "help-huge-alpha": (["--help", f"alpha={HUGE}"], [f"alpha={SHOWN}", "(0, 1]"]),
    "cfg-huge-alpha": (["--cfg", "job", f"alpha={HUGE}"], [f"alpha={SHOWN}", "(0, 1]"]),
}


@pytest.mark.parametrize(("args", "named"), IN_PROCESS.values(), ids=IN_PROCESS.keys())
def test_refused_in_process(args: list[str], named: list[str], tmp_path: Path, capsys,
                            monkeypatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code, lines = main_in_process(_fast(args), capsys, monkeypatch)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(n in lines[0] for n in named), lines[0]
    assert "hydra." not in lines[0] or "model, method" not in lines[0]
    assert _tree(tmp_path) == []


def test_a_long_fraction_is_a_number_like_any_other() -> None:
    """Only an integer part is too long: 400 digits after the point are a float."""
    from sweeper.config.checks import check_argv

    check_argv([f"alpha=0.{'3' * 400}", f"lr=0.{'0' * 400}1", "x=1e400"])


def test_the_experiment_name_limit_is_mlflows() -> None:
    """The pre-flight's copy of MLflow's limit (not imported there: a job-only import)."""
    from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH

    from sweeper.config.schema import MLFLOW_MAX_EXPERIMENT_NAME

    assert MLFLOW_MAX_EXPERIMENT_NAME == MAX_EXPERIMENT_NAME_LENGTH


# ------------------------------------------------------- your own model and data (torch)
LAB = """
import torch
from torch import nn


class NoFc(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.head = nn.Linear(in_channels * 64, num_classes)

    def forward(self, x):
        return self.head(x.flatten(1))


def broken(num_classes: int):
    raise RuntimeError("a bug in the constructor")


def pairs():
    return 1, 2
"""


@pytest.fixture
def lab(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A researcher's module outside the folder the CLI runs in; no bytecode written."""
    (tmp_path / "lab" / "mylab").mkdir(parents=True)
    (tmp_path / "lab" / "mylab" / "__init__.py").write_text("")
    (tmp_path / "lab" / "mylab" / "nets.py").write_text(textwrap.dedent(LAB))
    (tmp_path / "work").mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path / "lab")]),
           "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
    return tmp_path / "work", env


def _refused_in_process(args: list[str], lab: tuple[Path, dict], capsys,  # noqa: ANN001
                        monkeypatch) -> str:  # fmt: skip
    """:func:`_refused` through the CLI's entry in this process, with the lab importable as
    in the process (on ``sys.path``, no bytecode written): the same status, one line, the
    folder unchanged; the line."""
    cwd, env = lab
    monkeypatch.syspath_prepend(env["PYTHONPATH"].split(os.pathsep)[-1])
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    for name in [m for m in sys.modules if m == "mylab" or m.startswith("mylab.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.chdir(cwd)
    before = _tree(cwd)
    code, lines = main_in_process(args, capsys, monkeypatch)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert _tree(cwd) == before, "refused input changed the folder it ran in"
    return lines[0]


@pytest.mark.slow
def test_a_model_without_fc_is_refused_by_a_sweep_as_by_a_run(lab: tuple[Path, dict], capsys,
                                                               monkeypatch) -> None:  # fmt: skip
    """A sweep used to record itself, fail every point and exit 1; a run refused it after
    Hydra had made its run folder. Now a run, a sweep and a search refuse it first, with the
    same line (prefixed with the point's label where other points differ). The run and the
    search through real processes, the sweeps through the same entry in this process."""
    cwd, env = lab
    model = "model._target_=mylab.nets.NoFc"
    run = _refused([model, *FAST], cwd, **env)
    assert "NoFc has no nn.Linear attribute 'fc'" in run
    choice = "model._target_=choice(mylab.nets.NoFc,torchvision.models.resnet18)"
    search = _refused(["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", choice, *FAST],
                      cwd, **env)  # fmt: skip
    sweep = _refused_in_process(["-m", model, "seed=0,1", *FAST], lab, capsys, monkeypatch)
    assert sweep == run
    mixed = _refused_in_process(["-m", f"{model},torchvision.models.resnet18", *FAST], lab,
                                capsys, monkeypatch)  # fmt: skip
    assert mixed == f"error: point [{model}]: {run.removeprefix('error: ')}"
    assert search == mixed  # each corner of the space (here: each choice)


@pytest.mark.slow
def test_custom_data_and_constructors_are_checked_once_before_the_sweep(
    lab: tuple[Path, dict], capsys, monkeypatch
) -> None:
    """The data through a real process, the constructor through the same entry in process."""
    cwd, env = lab
    line = _refused(["-m", "data._target_=mylab.nets.pairs", "seed=0,1", *FAST], cwd, **env)
    assert "data._target_=mylab.nets.pairs must return (x_train, y_train, x_test, y_test)" in line
    line = _refused_in_process(["-m", "model._target_=mylab.nets.broken", "seed=0,1", *FAST],
                               lab, capsys, monkeypatch)  # fmt: skip
    assert "model._target_=mylab.nets.broken raised RuntimeError: a bug in the constructor" in line
