"""Shared helpers: run the real CLI in a subprocess, read the real stores."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m sweeper ARGS`` exactly as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "sweeper", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def poll_sql(db: Path, query: str, *params: object) -> list[tuple]:
    """Like :func:`sql` for polling a store another process is still creating."""
    try:
        return sql(db, query, *params)
    except sqlite3.OperationalError:  # tables not created yet, or a writer holds the lock
        return []


def sql(db: Path, query: str, *params: object) -> list[tuple]:
    """Read the results store with plain SQL, as a user would (independent of our ORM)."""
    if not db.exists():
        return []
    con = sqlite3.connect(db)
    try:
        return con.execute(query, params).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="session")
def shared_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One results dir shared by the CLI tests (one MLflow DB initialisation)."""
    return tmp_path_factory.mktemp("shared_results")
