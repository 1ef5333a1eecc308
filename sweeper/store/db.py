"""Opening a store: the engine, the session scope, schema creation and upgrade."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from sweeper.store.migrations import MIGRATIONS, SCHEMA_VERSION
from sweeper.store.models import Base, StoreInfo
from sweeper.store.retry import RETRY_S, is_transient, patience
from sweeper.store.url import display_url, engine_url, sqlite_path
from trainers.registry import ConfigError, first_line


class StoreError(ConfigError):
    """The store cannot be used (missing, unreachable, not a gradsweep store, too new):
    bad input, one line, nothing written."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL: readers (status, analysis, MLflow UI) never block the writer; busy_timeout:
    # concurrent writers wait for the lock instead of failing with "database is locked".
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Database:
    """An engine on a store URL, created or upgraded to :data:`SCHEMA_VERSION`.

    ``create=True`` (jobs, sweeps): a missing store is created. ``create=False`` (status,
    mirror, analysis): the store must exist and be a gradsweep store; an older schema is
    still upgraded (the numbered migrations only add), so every reader sees one schema.
    """

    def __init__(self, url: str, *, create: bool = True, missing_hint: str = "",
                 retry_s: float | None = None, warn: Callable[[str], None] | None = None,
                 wait_open: bool = False) -> None:  # fmt: skip
        """``retry_s``: how long a call waits for a store that stopped answering
        (:mod:`sweeper.store.retry`; default ``GRADSWEEP_STORE_RETRY_S`` or 120 s);
        ``warn``: where the first retry of a call is said; ``wait_open``: a store not
        answering when it is opened is waited for too (a job: its sweeper opened it
        already, so it is there), else refused at once (a command: a wrong URL is bad
        input, not an outage)."""
        self.url = url
        self.retry_s = RETRY_S if retry_s is None else float(retry_s)
        self.warn = warn if warn is not None else logging.getLogger("gradsweep").warning
        db = sqlite_path(url)
        self.db_dir = db.resolve().parent if db is not None else None
        self.where = str(db.resolve()) if db is not None else display_url(url)  # for errors
        if not create and db is not None and not db.is_file():
            raise StoreError(
                f"no results store at {db}" + (f"; {missing_hint}" if missing_hint else "")
            )
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 60}
        else:  # a server may have restarted since a pooled connection was opened
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = create_engine(engine_url(url), **kwargs)
        except (ArgumentError, ImportError, ValueError) as e:
            raise StoreError(
                f"store URL {display_url(url)} is not usable ({first_line(e)})"
            ) from None
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        end = time.monotonic() + (self.retry_s if wait_open else 0.0)
        while True:
            try:
                self._open(create)
                break
            except SQLAlchemyError as e:
                if is_transient(e) and time.monotonic() < end:
                    time.sleep(1.0)
                    continue
                self.engine.dispose()
                raise StoreError(
                    f"the results store {display_url(url)} cannot be opened ({first_line(e)})"
                ) from None
            except StoreError:
                self.engine.dispose()
                raise

    def _open(self, create: bool) -> None:
        if create:
            Base.metadata.create_all(self.engine)
        elif not inspect(self.engine).has_table(StoreInfo.__tablename__):
            raise StoreError(
                f"{display_url(self.url)} is not a gradsweep results store (no store_info table)"
            )
        self._upgrade()

    def _upgrade(self) -> None:
        with self.session() as s:
            info = s.get(StoreInfo, 1)
            if info is None:  # a new store: create_all made the current schema
                s.add(StoreInfo(id=1, schema_version=SCHEMA_VERSION))
                return
            version = info.schema_version
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the results store {display_url(self.url)} has schema version {version}, newer "
                f"than this gradsweep's {SCHEMA_VERSION}; upgrade gradsweep"
            )
        if version < SCHEMA_VERSION:
            Base.metadata.create_all(self.engine)  # tables added since (none so far)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[target](self.engine)
            with self.session() as s:
                s.get_one(StoreInfo, 1).schema_version = target

    @property
    def schema_version(self) -> int:
        with self.session() as s:
            return s.get_one(StoreInfo, 1).schema_version

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One unit of work: commits on success, rolls back on any exception."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    patience = staticmethod(patience)

    def dispose(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()
