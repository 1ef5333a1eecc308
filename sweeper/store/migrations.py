"""Numbered schema migrations: a store written by an older gradsweep is upgraded in place.

Each migration is idempotent (it checks before it alters) and race-safe, so jobs that open
an old store at the same moment cannot break it: one alters, the others see the change and
only record the version. ``store_info.schema_version`` says where a store is.

1. the first schema (runs, epoch_metrics, filter_stats, sweeps, sweep_runs)
2. ``sweep_runs.trial`` and the ``pruned`` run status (Optuna searches)
3. cost columns, ``runs.heartbeat_at``, the ``interrupted`` run status
4. ``runs.run_dir`` (where a run's artifacts are) and ``runs.killed_at_epoch``
5. one owner per run: ``runs.owner`` (the fencing token), ``runs.claimed_by``, ``runs.pid``;
   the sweeper's liveness and how a sweep ended: ``sweeps.heartbeat_at``, ``host``, ``pid``,
   ``outcome`` (older sweeps keep NULL: ended ones have ``ended_at``)
6. the validation split: ``epoch_metrics.val_acc``, ``val_loss`` and the last epoch's
   ``runs.val_acc``, ``val_loss`` (NULL for runs without ``data.val_split``)
7. ``sweeps.parent_id``: the sweep a ``python -m sweeper resolve`` sweep adds seeds to
   (NULL for every other sweep)
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

SCHEMA_VERSION = 7


def _add_columns(engine: Engine, table: str, columns: dict[str, str]) -> None:
    """ALTER TABLE ... ADD COLUMN for each column not there yet (idempotent, race-safe)."""
    for name, sql_type in columns.items():
        if name in {c["name"] for c in inspect(engine).get_columns(table)}:
            continue
        try:
            with engine.begin() as c:
                c.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}"))
        except DBAPIError:  # another process added it a moment ago
            if name not in {c["name"] for c in inspect(engine).get_columns(table)}:
                raise


def _add_status(engine: Engine, value: str) -> None:
    """PostgreSQL keeps the run status as a native ENUM; SQLite stores plain text."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f"ALTER TYPE run_status ADD VALUE IF NOT EXISTS '{value}'"))


def _real(engine: Engine) -> str:
    return "DOUBLE PRECISION" if engine.dialect.name == "postgresql" else "FLOAT"


def _to_2(engine: Engine) -> None:
    _add_columns(engine, "sweep_runs", {"trial": "INTEGER"})
    _add_status(engine, "pruned")


def _to_3(engine: Engine) -> None:
    real = _real(engine)
    _add_columns(
        engine,
        "runs",
        {"gpus": "INTEGER", "train_seconds": real, "gpu_hours": real, "images_per_s": real,
         "peak_gpu_mem_mb": real},
    )  # fmt: skip
    _add_columns(engine, "epoch_metrics", {"peak_mem_mb": real})
    stamp = "TIMESTAMP WITHOUT TIME ZONE" if engine.dialect.name == "postgresql" else "DATETIME"
    _add_columns(engine, "runs", {"heartbeat_at": stamp})
    _add_status(engine, "interrupted")


def _to_4(engine: Engine) -> None:
    # run_dir stays NULL for older runs: the read API finds their folder where the default
    # layout put it (sweeper.store.records.artifact_dir); nothing is rewritten
    _add_columns(engine, "runs", {"run_dir": "TEXT", "killed_at_epoch": "INTEGER"})


def _to_5(engine: Engine) -> None:
    stamp = "TIMESTAMP WITHOUT TIME ZONE" if engine.dialect.name == "postgresql" else "DATETIME"
    _add_columns(engine, "runs", {"owner": "INTEGER NOT NULL DEFAULT 0",
                                  "claimed_by": "INTEGER", "pid": "INTEGER"})  # fmt: skip
    _add_columns(engine, "sweeps", {"heartbeat_at": stamp, "host": "VARCHAR(255)",
                                    "pid": "INTEGER", "outcome": "VARCHAR(16)"})  # fmt: skip


def _to_6(engine: Engine) -> None:
    real = _real(engine)
    _add_columns(engine, "epoch_metrics", {"val_acc": real, "val_loss": real})
    _add_columns(engine, "runs", {"val_acc": real, "val_loss": real})


def _to_7(engine: Engine) -> None:
    _add_columns(engine, "sweeps", {"parent_id": "INTEGER"})


MIGRATIONS: dict[int, Callable[[Engine], None]] = {
    2: _to_2, 3: _to_3, 4: _to_4, 5: _to_5, 6: _to_6, 7: _to_7
}  # fmt: skip
