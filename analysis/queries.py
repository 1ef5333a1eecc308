"""Read runs from the results store through SQLAlchemy ``select()`` on the ORM models.

Everything returned is a plain dataclass, detached from any session, so the rest of the
analysis never touches SQLAlchemy. The engine is created here (not via ``Store``) so that
reading a store never creates tables or writes to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session

from analysis.errors import AnalysisError
from sweeper.store import EpochMetric, Run, RunStatus, Sweep, SweepRun, engine_url
from trainers.registry import first_line


@dataclass(frozen=True)
class RunRecord:
    """One run's grid keys, status and final metrics (accuracies in percent)."""

    id: int
    model: str
    method: str
    alpha: float | None
    data: str
    batch_size: int
    epochs: int
    schedule: str
    label_smoothing: float
    seed: int
    status: str
    error: str | None
    train_acc: float | None
    test_acc: float | None
    # for the figures: locating a run's artifacts, Fig. 8's logit norm vs loss
    config_hash: str = ""
    test_loss: float | None = None
    logit_norm: float | None = None
    # cost (store v3): GPU-hours (0 on CPU), wall seconds, throughput, peak GPU memory
    gpus: int | None = None
    gpu_hours: float | None = None
    train_seconds: float | None = None
    images_per_s: float | None = None
    peak_gpu_mem_mb: float | None = None


@dataclass(frozen=True)
class RunFilter:
    """Equality filters; an empty list means no filter on that key."""

    sweeps: Sequence[int] = field(default_factory=list)
    models: Sequence[str] = field(default_factory=list)
    methods: Sequence[str] = field(default_factory=list)
    datas: Sequence[str] = field(default_factory=list)


def open_engine(url: str) -> Engine:
    """An engine for ``url``; a SQLite file that does not exist is an error, not a new store."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise AnalysisError(f"invalid store URL {url!r}: {e}") from e
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:") and not Path(db).is_file():
            raise AnalysisError(f"store file not found: {db}")
    try:
        engine = create_engine(engine_url(url))
    except (SQLAlchemyError, ImportError) as e:
        raise AnalysisError(f"cannot open store {url!r}: {e}") from e
    _upgrade_if_old(engine, url)
    return engine


def _upgrade_if_old(engine: Engine, url: str) -> None:
    """A store written by an older gradsweep lacks newer columns (e.g. the v3 cost columns)
    that the queries select: bring it up to date first, with the store's own numbered
    migrations (the only write analysis ever makes; the data is untouched)."""
    from sqlalchemy import inspect

    from sweeper.store import SCHEMA_VERSION, StoreInfo

    try:
        if not inspect(engine).has_table(StoreInfo.__tablename__):
            return  # not a gradsweep store (or empty): the queries will say so
        with Session(engine) as s:
            info = s.get(StoreInfo, 1)
        if info is None or info.schema_version >= SCHEMA_VERSION:
            return
        from sweeper.store import Store

        Store(url).dispose()
    except SQLAlchemyError as e:
        raise _fail(e) from e


def _fail(e: SQLAlchemyError) -> AnalysisError:
    first = first_line(e)
    return AnalysisError(f"cannot read the results store: {first}")


def count_runs(engine: Engine) -> int:
    """How many runs the store holds, whatever their status."""
    try:
        with Session(engine) as s:
            return int(s.scalar(select(func.count()).select_from(Run)) or 0)
    except SQLAlchemyError as e:
        raise _fail(e) from e


def known_sweep_ids(engine: Engine) -> list[int]:
    """Ids of all recorded sweeps, ascending."""
    try:
        with Session(engine) as s:
            return list(s.scalars(select(Sweep.id).order_by(Sweep.id)))
    except SQLAlchemyError as e:
        raise _fail(e) from e


def sweep_names(engine: Engine, ids: Sequence[int]) -> list[str]:
    """Names of these sweeps (a search's sweep is named after its Optuna study)."""
    try:
        with Session(engine) as s:
            return list(s.scalars(select(Sweep.name).where(Sweep.id.in_(list(ids)))))
    except SQLAlchemyError as e:
        raise _fail(e) from e


def load_runs(engine: Engine, flt: RunFilter) -> list[RunRecord]:
    """Runs matching ``flt`` (any status), ordered by id.

    A run's final ``train_acc`` / ``test_acc`` come from the ``runs`` row; where one is
    NULL the last recorded epoch's value (``epoch_metrics``) is used instead.
    """
    q = select(Run).order_by(Run.id)
    if flt.sweeps:
        in_sweep = select(SweepRun.run_id).where(SweepRun.sweep_id.in_(list(flt.sweeps)))
        q = q.where(Run.id.in_(in_sweep))
    if flt.models:
        q = q.where(Run.model.in_(list(flt.models)))
    if flt.methods:
        q = q.where(Run.method.in_(list(flt.methods)))
    if flt.datas:
        q = q.where(Run.data.in_(list(flt.datas)))
    try:
        with Session(engine) as s:
            runs = list(s.scalars(q))
            need = [r.id for r in runs if r.train_acc is None or r.test_acc is None]
            last: dict[int, tuple[float, float]] = {}
            if need:
                last_epoch = (
                    select(EpochMetric.run_id, func.max(EpochMetric.epoch).label("ep"))
                    .where(EpochMetric.run_id.in_(need))
                    .group_by(EpochMetric.run_id)
                    .subquery()
                )
                lq = select(EpochMetric.run_id, EpochMetric.train_acc, EpochMetric.test_acc).join(
                    last_epoch,
                    (EpochMetric.run_id == last_epoch.c.run_id)
                    & (EpochMetric.epoch == last_epoch.c.ep),
                )
                last = {rid: (tr, te) for rid, tr, te in s.execute(lq).all()}
            return [_record(r, last.get(r.id)) for r in runs]
    except SQLAlchemyError as e:
        raise _fail(e) from e


def _record(r: Run, last: tuple[float, float] | None) -> RunRecord:
    train, test = r.train_acc, r.test_acc
    if last is not None:
        train = last[0] if train is None else train
        test = last[1] if test is None else test
    status = r.status.value if isinstance(r.status, RunStatus) else str(r.status)
    return RunRecord(
        id=r.id,
        model=r.model,
        method=r.method,
        alpha=r.alpha,
        data=r.data,
        batch_size=r.batch_size,
        epochs=r.epochs,
        schedule=r.schedule,
        label_smoothing=r.label_smoothing,
        seed=r.seed,
        status=status,
        error=r.error,
        train_acc=train,
        test_acc=test,
        config_hash=r.config_hash,
        test_loss=r.test_loss,
        logit_norm=r.logit_norm,
        gpus=r.gpus,
        gpu_hours=r.gpu_hours,
        train_seconds=r.train_seconds,
        images_per_s=r.images_per_s,
        peak_gpu_mem_mb=r.peak_gpu_mem_mb,
    )
