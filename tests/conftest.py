"""Fixtures shared by the test modules (helpers they import are in ``helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One results dir shared by the CLI tests (one MLflow DB initialisation)."""
    return tmp_path_factory.mktemp("shared_results")
