"""Fixtures shared by the test modules (helpers they import are in ``helpers.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# pytest runs two test files at once (pyproject: -n 2): one torch thread in each worker (set
# before anything imports torch), so the two share the two cores instead of fighting over them
os.environ.setdefault("OMP_NUM_THREADS", "1")

# the files that start many real processes go first, so that the two workers finish together
HEAVY_FIRST = ["test_sweep.py", "test_slurm.py", "test_search.py", "test_resume.py",
               "test_faults.py", "test_fused.py", "test_postgres.py", "test_custom_methods.py"]  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def shared_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One results dir shared by the in-process run tests (one MLflow DB initialisation)."""
    return tmp_path_factory.mktemp("shared_results")
