"""The report's answers as pandas DataFrames, for a notebook.

``from analysis import load_runs, load_epochs, verdicts``; each takes a results directory
(its ``results.db``) or any store URL, reads through the store's read API (like
``python -m analysis``, never creating a store) and returns a DataFrame:

* :func:`load_runs`: one row per run: id, its configuration (``config_key``, a readable
  ``configuration``, the grid columns and every other identity key as a dotted column), seed,
  status, final metrics, cost;
* :func:`load_epochs`: one row per run and epoch (the store's ``epochs`` table);
* :func:`verdicts`: one row per comparison, the columns of ``verdicts.csv``
  (:data:`analysis.render.VERDICT_COLUMNS`), from the same code as the report.

pandas is imported here only (it comes with MLflow).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis.errors import AnalysisError
from analysis.inference import MARGIN

if TYPE_CHECKING:
    import pandas as pd

    from sweeper.store import RunRecord

RUN_COLUMNS = [
    "id", "config_key", "configuration", "model", "method", "alpha", "data", "batch_size",
    "epochs", "lr", "schedule", "label_smoothing", "optimizer", "seed", "status", "epoch",
    "train_acc", "test_acc", "test_top5", "test_loss", "val_acc", "val_loss", "logit_norm",
    "error", "gpus",
    "train_seconds", "gpu_hours", "cpu_hours", "images_per_s", "peak_gpu_mem_mb",
    "created_at", "started_at", "ended_at", "host", "device", "precision", "run_dir",
]  # fmt: skip


def _url(source: str | Path) -> str:
    """A store URL from a results directory or a URL."""
    from sweeper.store import default_url

    text = str(source)
    return text if "://" in text else default_url(Path(text))


def _runs(source: str | Path, sweep: Sequence[int] | None = None,
          models: Sequence[str] = (), methods: Sequence[str] = (),
          datas: Sequence[str] = ()) -> list[RunRecord]:  # fmt: skip
    from analysis.queries import RunFilter, open_store
    from analysis.queries import load_runs as _load

    store = open_store(_url(source))
    try:
        return _load(store, RunFilter(list(sweep or []), list(models), list(methods),
                                      list(datas)))  # fmt: skip
    finally:
        store.dispose()


def _run_row(r: RunRecord) -> dict[str, Any]:
    from analysis.configs import config_key, config_label, flat_identity

    ident = (r.config or {}).get("identity") or {}
    row: dict[str, Any] = {
        "id": r.id,
        "config_key": config_key(ident),
        "configuration": config_label(ident) if ident else f"{r.model} {r.method}",
        "optimizer": r.optimizer,
        "status": getattr(r.status, "value", r.status),
        "cpu_hours": (r.train_seconds or 0.0) / 3600
        if r.train_seconds is not None and not r.gpus
        else None,
    }
    for f in dataclasses.fields(r):
        if f.name in RUN_COLUMNS and f.name not in row:
            row[f.name] = getattr(r, f.name)
    for k, v in flat_identity(r).items():  # the knobs the columns above do not hold
        if k not in row:
            row[k] = list(v) if isinstance(v, tuple) else v
    return row


def load_runs(
    source: str | Path,
    sweep: Sequence[int] | None = None,
    model: Sequence[str] = (),
    method: Sequence[str] = (),
    data: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per run of the store at ``source`` (a results dir or a URL), any status,
    optionally only those of the given sweeps / models / methods / data sets."""
    import pandas as pd

    rows = [_run_row(r) for r in _runs(source, sweep, model, method, data)]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    rest = [c for c in frame.columns if c not in RUN_COLUMNS]
    return frame[[c for c in RUN_COLUMNS if c in frame.columns] + rest]


def load_epochs(source: str | Path, runs: Sequence[int] | pd.DataFrame | None = None,
                ) -> pd.DataFrame:  # fmt: skip
    """One row per run and epoch (``run_id``, ``epoch``, losses, accuracies, lr, time...)
    for ``runs`` (ids, or a :func:`load_runs` frame; default every run)."""
    import pandas as pd

    from analysis.queries import open_store
    from sweeper.store import EpochRecord

    if runs is None:
        ids = [r.id for r in _runs(source)]
    elif isinstance(runs, pd.DataFrame):
        ids = [int(i) for i in runs["id"]]
    else:
        ids = [int(i) for i in runs]
    store = open_store(_url(source))
    try:
        rows = [dataclasses.asdict(e) for i in ids for e in store.epoch_metrics(i)]
    finally:
        store.dispose()
    columns = [f.name for f in dataclasses.fields(EpochRecord)]
    return pd.DataFrame(rows, columns=columns)


def verdicts(
    source: str | Path,
    metric: str = "test_acc",
    margin: float = MARGIN,
    alpha: str = "best",
    sweep: Sequence[int] | None = None,
    select_on: str = "auto",
) -> pd.DataFrame:
    """One row per comparison the report makes (``verdicts.csv``'s columns), as
    ``python -m analysis --metric METRIC --margin MARGIN`` judges them. ``select_on``: where
    the best α is chosen, ``auto`` (the report's: ``val`` for a table whose runs all have a
    validation split, else ``test``), ``val`` or ``test``."""
    import pandas as pd

    from analysis.comparisons import metric_choices
    from analysis.render import VERDICT_COLUMNS, verdict_record
    from analysis.tables import SELECT_ON, build_tables

    if metric not in metric_choices():
        raise AnalysisError(f"unknown metric {metric!r}; choose from {', '.join(metric_choices())}")
    if not margin >= 0:
        raise AnalysisError(f"margin must be a number >= 0, got {margin!r}")
    if select_on not in SELECT_ON:
        raise AnalysisError(f"select_on={select_on!r} is not allowed; expected "
                            f"{', '.join(SELECT_ON)}")  # fmt: skip
    tables, _ = build_tables(_runs(source, sweep), alpha, metric, margin, select_on)
    rows = [verdict_record(j) for t in tables for j in t.verdicts]
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)
