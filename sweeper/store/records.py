"""Plain records: what the store's read API hands out (frozen, detached from any session).

Nothing outside :mod:`sweeper.store` sees an ORM row, so callers never hold a session
open, never lazy-load, and cannot write by accident.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sweeper.store.models import EpochMetric, FilterStat, Run, RunStatus, Sweep, SweepRun


@dataclass(frozen=True)
class RunRecord:
    """One run's row. ``run_dir`` is where its artifacts are (see :func:`artifact_dir`)."""

    id: int
    config_hash: str = ""
    model: str = ""
    method: str = ""
    alpha: float | None = None
    data: str = ""
    batch_size: int = 0
    epochs: int = 0
    lr: float = 0.0
    schedule: str = ""
    label_smoothing: float = 0.0
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    status: RunStatus = RunStatus.queued
    epoch: int = 0
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    host: str | None = None
    device: str | None = None
    precision: str | None = None
    versions: dict[str, str] | None = None
    git_sha: str | None = None
    error: str | None = None
    diverged_step: int | None = None
    train_acc: float | None = None
    test_acc: float | None = None
    test_top5: float | None = None
    test_loss: float | None = None
    logit_norm: float | None = None
    n_features: int | None = None
    zero_features: int | None = None
    mlflow_run_id: str | None = None
    mlflow_mirrored: bool = False
    gpus: int | None = None
    train_seconds: float | None = None
    gpu_hours: float | None = None
    images_per_s: float | None = None
    peak_gpu_mem_mb: float | None = None
    heartbeat_at: dt.datetime | None = None
    run_dir: str | None = None
    killed_at_epoch: int | None = None
    owner: int = 0
    claimed_by: int | None = None
    pid: int | None = None
    val_acc: float | None = None  # v6: the last epoch's, on the validation split
    val_loss: float | None = None

    @property
    def optimizer(self) -> str:
        """The run's optimiser (``sgd`` for runs from before there was a choice)."""
        opt = (self.config or {}).get("optimizer")
        return str(opt.get("name", "sgd")) if isinstance(opt, dict) else "sgd"


@dataclass(frozen=True)
class EpochRecord:
    run_id: int
    epoch: int
    step: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    test_top5: float
    logit_norm: float
    gap: float
    lr: float
    epoch_time: float
    images_per_s: float
    grad_norm_before: float
    grad_norm_after: float
    peak_mem_mb: float | None = None
    val_acc: float | None = None  # v6: on the validation split (data.val_split)
    val_loss: float | None = None


@dataclass(frozen=True)
class FilterStatRecord:
    run_id: int
    step: int
    epoch: int
    layer_index: int
    layer_name: str
    n_filters: int
    n_zero: int
    min_norm: float
    median_norm: float
    max_norm: float


@dataclass(frozen=True)
class SweepRecord:
    id: int
    name: str
    created_at: dt.datetime
    ended_at: dt.datetime | None
    command: str
    launcher: str
    n_points: int
    mlflow_parent_run_id: str | None = None
    heartbeat_at: dt.datetime | None = None
    host: str | None = None
    pid: int | None = None
    outcome: str | None = None
    parent_id: int | None = None  # the sweep a resolve sweep adds seeds to


@dataclass(frozen=True)
class SweepRunRecord:
    sweep_id: int
    run_id: int
    point: str
    job_id: str | None = None
    trial: int | None = None


@functools.cache
def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _copy(cls: type, row: object, **extra: Any) -> Any:
    return cls(**{n: getattr(row, n) for n in _names(cls) if n not in extra}, **extra)


# The columns a RunRecord is made of, for bulk reads that skip the ORM: building ORM objects
# and then copying them was a large share of a big report (benchmarks/analysis_report.py).
RUN_COLUMNS = tuple(Run.__table__.c[n] for n in _names(RunRecord))


_AT = {n: i for i, n in enumerate(_names(RunRecord))}
_RUN_DIR, _HASH, _CONFIG = _AT["run_dir"], _AT["config_hash"], _AT["config"]


def run_record(row: Run, db_dir: Path | None = None) -> RunRecord:
    return _copy(
        RunRecord, row, run_dir=artifact_dir(row.run_dir, row.config_hash, row.config, db_dir)
    )


def run_record_from_columns(values: Sequence[Any], db_dir: Path | None = None) -> RunRecord:
    """A RunRecord from a row selected as :data:`RUN_COLUMNS` (positional, no attribute lookups)."""
    v = list(values)
    v[_RUN_DIR] = artifact_dir(v[_RUN_DIR], v[_HASH], v[_CONFIG], db_dir)
    return RunRecord(*v)


def epoch_record(row: EpochMetric) -> EpochRecord:
    return _copy(EpochRecord, row)


def filter_record(row: FilterStat) -> FilterStatRecord:
    return _copy(FilterStatRecord, row)


def sweep_record(row: Sweep) -> SweepRecord:
    return _copy(SweepRecord, row)


def sweep_run_record(row: SweepRun) -> SweepRunRecord:
    return _copy(SweepRunRecord, row)


def artifact_dir(
    run_dir: str | None, config_hash: str | None, config: dict | None, db_dir: Path | None
) -> str | None:
    """Where a run's checkpoint and norm artifacts are.

    Runs started by schema-4 code record it (``runs.run_dir``). For older runs it is found
    where their job put it, ``<results_dir>/runs/<config_hash[:16]>``: first beside the
    SQLite file (the default store lives in the results dir), then under the results dir
    named in the run's resolved config (when absolute). None when neither exists.
    """
    if run_dir:
        return run_dir
    # os.path, not pathlib: this runs once per run of a 10,000-run report.
    leaf = os.path.join("runs", (config_hash or "")[:16])
    candidates = []
    if db_dir is not None:
        candidates.append(os.path.join(db_dir, leaf))
    rd = (config or {}).get("results_dir")
    if isinstance(rd, str) and os.path.isabs(rd):
        candidates.append(os.path.join(rd, leaf))
    for c in candidates:
        if os.path.isdir(c):
            return c
    return None
