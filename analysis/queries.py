"""What the analysis reads, through the store's read API (:mod:`sweeper.store.read`).

The store hands out plain frozen records (:class:`~sweeper.store.RunRecord`), so the rest of
the analysis never touches SQLAlchemy. Opening a store here never creates one: a missing
store is an error; an older schema is upgraded in place by the store's own numbered
migrations (they only add columns), the analysis's only write.
"""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy.exc import SQLAlchemyError

from analysis.errors import AnalysisError
from sweeper.store import RunQuery, RunRecord, Store, StoreError
from trainers.registry import first_line

RunFilter = RunQuery  # sweeps, models, methods, datas: equality filters, [] = no filter

__all__ = ["RunFilter", "RunRecord", "load_runs", "open_store"]


def open_store(url: str) -> Store:
    """The existing store at ``url`` (AnalysisError, one line, when it cannot be read)."""
    try:
        return Store(url, create=False, missing_hint="pass --results-dir DIR or --store-url URL")
    except StoreError as e:
        raise AnalysisError(str(e)) from None


def load_runs(store: Store, flt: RunQuery) -> list[RunRecord]:
    """Runs matching ``flt`` (any status), ordered by id.

    A run's final ``train_acc`` / ``test_acc`` come from the ``runs`` row; where one is
    NULL (a failed or running run) the last recorded epoch's value is used instead.
    """
    try:
        runs = store.runs(flt)
        need = [r.id for r in runs if r.train_acc is None or r.test_acc is None]
        last = store.last_epochs(need)
    except SQLAlchemyError as e:
        raise AnalysisError(f"cannot read the results store: {first_line(e)}") from e
    out = []
    for r in runs:
        e = last.get(r.id)
        if e is not None:
            r = replace(
                r,
                train_acc=e.train_acc if r.train_acc is None else r.train_acc,
                test_acc=e.test_acc if r.test_acc is None else r.test_acc,
            )
        out.append(r)
    return out
