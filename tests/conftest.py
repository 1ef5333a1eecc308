"""Fixtures shared by the test modules (helpers they import are in ``helpers.py``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# the README's command runs two test files at once (-n 2): one torch thread in each worker (set
# before anything imports torch), so the two share the two cores instead of fighting over them
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Python caches what it compiles in __pycache__ (git-ignored) unless PYTHONDONTWRITEBYTECODE is
# set, as some machines' environments do. The suite starts a few hundred Python processes (jobs,
# sweepers, CLIs) that import the same modules, and pytest rewrites every test module's asserts
# in each worker: without the cache each of them compiles that code again, for the same result.
# Set before the workers start (they inherit this environment) and before any test module is
# imported (pytest caches its rewritten modules only when this is False).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# the files that start many real processes go first in a single-process run; the README's
# command (-n 2) hands whole files to the workers in pytest-xdist's own order, by test count,
# which measured as fast as any order tried (e.g. the longest first, with Slurm and PostgreSQL
# spread out)
HEAVY_FIRST = ["test_docs.py", "test_slurm.py", "test_search.py", "test_sweep.py",
               "test_fused.py", "test_postgres.py", "test_mlflow_ui.py", "test_ownership.py",
               "test_mlflow_truth.py", "test_resolve.py", "test_verdicts.py", "test_refusals.py", "test_resume.py",
               "test_custom_methods.py", "test_faults.py"]  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow tracking DB set up once per test process: MLflow's schema migrations take
    seconds of CPU in every fresh results dir, and a copy of this file is the same store."""
    from sweeper.tracking.client import init_tracking_store

    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    init_tracking_store(f"sqlite:///{db}")
    return db


@pytest.fixture
def seed_mlflow(mlflow_template: Path):  # -> Callable[[Path], Path]
    """``seed_mlflow(results_dir)``: give a results dir a set-up ``mlflow.db`` (a copy of
    :func:`mlflow_template`) where it has none yet, and return the dir."""

    def seed(results_dir: Path) -> Path:
        results_dir.mkdir(parents=True, exist_ok=True)
        if not (results_dir / "mlflow.db").exists():
            shutil.copyfile(mlflow_template, results_dir / "mlflow.db")
        return results_dir

    return seed


@pytest.fixture(scope="session")
def shared_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One results dir shared by the in-process run tests (one MLflow DB initialisation)."""
    return tmp_path_factory.mktemp("shared_results")


# ---------------------------------------------------------------- headless Chromium
def _in_ci() -> bool:
    return bool(os.environ.get("CI"))


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a Chromium binary, installed with apt-get under CI when missing."""
    path = _find_chromium()
    want_install = _in_ci() or os.environ.get("GRADSWEEP_INSTALL_CHROMIUM") == "1"
    why = "chromium is not installed"
    if path is None and want_install:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            for cmd in (["apt-get", "update", "-q"],
                        ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                         "chromium"]):  # fmt: skip
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
                if proc.returncode != 0:
                    why = f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}"
                    break
            path = _find_chromium()
        else:
            why = "chromium is not installed and apt-get (as root) is unavailable"
    if path is None:
        if _in_ci():
            pytest.fail(f"CI needs headless Chromium (the HTML report and MLflow UI tests): {why}")
        pytest.skip(f"{why} (set GRADSWEEP_INSTALL_CHROMIUM=1 to install it)")
    return path
